"""The runner's accounting: a stage's rows, rejects and LLM figures add up over every run of the stage, every LLM
client of a run counts (probe, judge, fidelity re-annotation included), and the demo summary shows what this run
materialized only."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from boostqa_assets.cli_summary import llm_by_role, llm_lines, rejects_by_reason, stage_line
from boostqa_assets.definitions import build_definitions
from boostqa_assets.records import REJECT_SCHEMA
from boostqa_assets.runner import StageResult, StageStats, llm_stats_by_role, run_pipeline
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer

pytestmark = pytest.mark.small_taxonomy  # not about the taxonomy: 45 QA partitions, not 110


def _llm(role: str, requests: int, tokens_in: int, cost: float = 0.0) -> dict[str, object]:
    return {
        "role": role,
        "model": "m",
        "requests": requests,
        "http_requests": requests,
        "cache_hits": 0,
        "failed": 0,
        "retries": 0,
        "tokens_in": tokens_in,
        "tokens_out": 1,
        "est_cost_usd": cost,
    }


def test_stage_stats_add_every_run_and_every_client() -> None:
    stats = StageStats()
    # synthesized_qa in two runs: the synthesizer and the annotator's fidelity re-annotation in each.
    stats.add_run(
        {
            "rows": 18,
            "rows_rejected": 3,
            "llm": _llm("synthesizer", 10, 100, 0.5),
            "fidelity_llm": _llm("annotator", 4, 40),
        }
    )
    stats.add_run(
        {
            "rows": 16,
            "rows_rejected": 4,
            "llm": _llm("synthesizer", 8, 80, 0.25),
            "fidelity_llm": _llm("annotator", 2, 20),
        }
    )
    assert (stats.rows, stats.rows_rejected) == (34, 7)
    assert stats.llm["synthesizer"]["requests"] == 18 and stats.llm["synthesizer"]["tokens_in"] == 180
    assert stats.llm["synthesizer"]["est_cost_usd"] == 0.75
    assert stats.llm["annotator (fidelity)"]["requests"] == 6  # the fidelity re-annotation, kept apart
    # The probe's run: the target and the judge.
    probe = llm_stats_by_role({"rows": 3, "llm": _llm("probe", 6, 60), "judge_llm": _llm("judge", 2, 20), "x": {}})
    assert set(probe) == {"probe", "judge"}


def test_llm_by_role_adds_a_role_used_by_two_stages() -> None:
    annotate = StageResult("annotated_seeds", "r1", True, 1.0, 3)
    annotate.stats.add_run({"rows": 9, "llm": _llm("annotator", 9, 90)})
    synth = StageResult("synthesized_qa", "r2", True, 1.0, 110)
    synth.stats.add_run({"rows": 34, "llm": _llm("synthesizer", 34, 340), "fidelity_llm": _llm("annotator", 5, 50)})
    roles = llm_by_role([annotate, synth])
    assert roles["annotator"]["requests"] == 9 and roles["synthesizer"]["requests"] == 34
    assert roles["annotator (fidelity)"]["requests"] == 5
    line = stage_line(synth)
    assert "rows 34" in line and "tokens in/out 390/2" in line and "$0.0000" in line


def test_the_summary_shows_every_role_of_the_stages_run_with_requests_tokens_and_cost() -> None:
    probe = StageResult("deficiency_probe", "r1", True, 1.0, 1)
    probe.stats.add_run({"rows": 7, "llm": _llm("probe", 7, 70, 0.01)})  # the judge graded nothing: no entry
    synth = StageResult("synthesized_qa", "r2", True, 1.0, 110)
    synth.stats.add_run({"llm": _llm("synthesizer", 30, 300, 0.5), "fidelity_llm": _llm("annotator", 5, 50, 0.02)})
    lines = llm_lines([probe, synth])
    rows = {line.split("  ")[1].strip(): line for line in lines[2:]}
    assert list(rows) == ["probe", "judge", "synthesizer", "annotator (fidelity)", "total"]
    assert rows["judge"].split()[1:6] == ["0", "0", "0", "0", "0"] and rows["judge"].endswith("$0.0000")
    assert rows["annotator (fidelity)"].split()[2] == "5" and rows["annotator (fidelity)"].endswith("$0.0200")
    assert rows["total"].split()[1] == "42" and rows["total"].endswith("$0.5300")
    assert all(len(line) <= 80 for line in lines)  # fits a standard terminal


def test_rejects_counted_only_for_partitions_this_run_materialized(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "data"))

    def rejects(n: int, reason: str) -> pl.DataFrame:
        row = dict.fromkeys(REJECT_SCHEMA.names(), None) | {"stage": "seeds", "reason": reason}
        return pl.DataFrame([row] * n, schema=REJECT_SCHEMA)

    store.write_rejects("seeds", "good", rejects(2, "duplicate"))
    store.write_rejects("seeds", "left_behind", rejects(5, "empty_text"))  # a failed or older run's file
    seeds = StageResult("seeds", "r", True, 1.0, 1, materialized=["good"])
    assert rejects_by_reason([seeds], store) == [("seeds", "duplicate", 2)]


@pytest.mark.slow
def test_a_whole_run_counts_every_request_the_endpoint_answered(
    project_env: dict[str, str], fake_llm: FakeOpenAIServer
) -> None:
    results = run_pipeline(build_definitions(), dg.DagsterInstance.ephemeral())
    assert all(r.status == "ok" for r in results), [(r.asset, r.status, r.error) for r in results]
    roles = llm_by_role(results)
    assert {"annotator", "probe", "synthesizer", "refiner"} <= set(roles)
    assert sum(int(t["http_requests"]) for t in roles.values()) == fake_llm.stats()["requests"]
    seeds = next(r for r in results if r.asset == "seeds")
    assert (seeds.stats.rows, seeds.stats.rows_rejected) == (9, 4)
    summary = rejects_by_reason(results, Store(get_settings().data_root))
    assert ("seeds", "duplicate", 1) in summary


def test_a_failure_that_is_no_partitions_own_stops_the_pipeline_with_the_innermost_error(
    project_env: dict[str, str], fake_llm: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert run_pipeline(defs, instance, stages=["seeds"])[0].status == "ok"
    monkeypatch.setenv("BOOSTQA_REPLAY_ONLY", "1")  # an empty cache: the annotator's first request fails the run
    results = run_pipeline(defs, instance, stages=["annotated_seeds", "deficiency_probe"])
    assert [r.asset for r in results] == ["annotated_seeds"]
    stage = results[0]
    assert stage.status == "failed" and not stage.success and stage.error is not None
    assert stage.error.startswith("step annotated_seeds: ") and "DagsterExecutionStepExecutionError" not in stage.error
    assert fake_llm.stats()["requests"] == 0
