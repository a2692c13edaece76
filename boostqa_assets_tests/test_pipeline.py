"""The whole graph materialized in-process over a temporary folder, against the fake LLM server on
127.0.0.1: real Parquet, real DuckDB, real Dagster runs and checks."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from boostqa_assets.definitions import STAGES, build_definitions
from boostqa_assets.defs import refined_qa as refined_qa_defs
from boostqa_assets.inspect import connect
from boostqa_assets.records import REFINED_SCHEMA
from boostqa_assets.runner import run_pipeline, run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer

pytestmark = pytest.mark.small_taxonomy  # not about the taxonomy: 45 QA partitions, not 110


def _store() -> Store:
    s = get_settings()
    return Store(s.data_root, s.storage_options)


def test_full_pipeline_in_process(project_env: dict[str, str], fake_llm: FakeOpenAIServer) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    results = run_pipeline(defs, instance)
    assert [r.asset for r in results] == list(STAGES)
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]
    assert all(r.checks_failed == 0 for r in results)

    con = connect(_store())
    count = {v: con.sql(f"SELECT count(*) FROM {v}").fetchall()[0][0] for v in (*STAGES, "rejects")}
    # physics_qa: 7 lines + 1 broken -> 5 kept; history: 2 of 3; code: 2.
    assert count["seeds"] == 9
    assert count["annotated_seeds"] == 8  # the UNLABELLABLE seed gets a label outside the taxonomy
    assert count["synthesized_qa"] == 34
    assert count["refined_qa"] == 29  # the biology QA carrying REFUSE are refused by the refiner
    assert count["qa_mixture"] == 29

    reasons = dict(con.sql("SELECT stage || ':' || reason, count(*) FROM rejects GROUP BY ALL").fetchall())
    assert reasons == {
        "seeds:duplicate": 1,
        "seeds:empty_text": 1,
        "seeds:unparseable_line": 1,
        "seeds:invalid_utf8": 1,
        "annotated_seeds:schema_mismatch": 1,
        "refined_qa:refusal": 5,
    }
    raw = con.sql("SELECT raw_output FROM rejects WHERE stage = 'annotated_seeds'").fetchall()[0][0]
    assert "astrology" in raw  # the raw reply is kept

    # Multi-grade: a STEM seed yields QA at every grade; non-STEM only at its own; high-difficulty at top grades.
    grades = con.sql("SELECT DISTINCT grade FROM synthesized_qa WHERE discipline = 'physics' ORDER BY 1").fetchall()
    assert [g for (g,) in grades] == ["graduate", "high", "middle", "primary", "undergraduate"]
    hist = con.sql("SELECT DISTINCT grade FROM synthesized_qa WHERE discipline = 'history'").fetchall()
    assert hist == [("high",)]
    tracks = dict(con.sql("SELECT track, count(*) FROM synthesized_qa GROUP BY ALL").fetchall())
    assert tracks == {"multi_grade": 32, "high_difficulty": 2}
    assert (
        con.sql(
            "SELECT count(*) FROM synthesized_qa WHERE track = 'high_difficulty' AND "
            "grade NOT IN ('undergraduate', 'graduate')"
        ).fetchall()[0][0]
        == 0
    )

    # Reasoning is kept apart from the answer.
    bad = con.sql("SELECT count(*) FROM synthesized_qa WHERE reasoning = '' OR answer LIKE '%thinking about%'")
    assert bad.fetchall()[0][0] == 0

    # Every mixture row joins back to its seed and to each LLM request, in one query.
    orphans = con.sql("SELECT count(*) FROM qa_mixture m ANTI JOIN seeds s USING (seed_id)").fetchall()[0][0]
    assert orphans == 0
    lineage = con.sql("SELECT * FROM lineage").pl()
    assert lineage.height == 29
    for col in ("annotate_request_hash", "synth_request_hash", "refine_request_hash"):
        assert lineage[col].str.len_chars().min() == 64

    # The request cache is queryable and every row's request hashes point into it.
    roles = {r for (r,) in con.sql("SELECT DISTINCT role FROM llm_cache").fetchall()}
    assert roles == {"annotator", "synthesizer", "refiner", "probe", "judge"}
    missing = con.sql(
        "SELECT count(*) FROM refined_qa r ANTI JOIN llm_cache c ON c.request_hash = r.refine_request_hash"
    ).fetchall()[0][0]
    assert missing == 0

    # Manifest next to the shards.
    folder = Path(get_settings().data_root) / "qa_mixture" / "recipe=stem_heavy"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == 29 and manifest["tokens_total"] == sum(manifest["tokens_by_track"].values())
    assert (folder / "part-00000.jsonl").read_text().count("\n") == 29
    assert manifest["recipe_hash"] and manifest["sampling_seed"] == 17
    card = (folder / "DATASET_CARD.md").read_text()
    assert "| physics_qa | unknown | 5 |" in card and "| code_problems | MIT | 2 |" in card
    assert "| refined_qa | refusal | 5 |" in card and "| seeds | duplicate | 1 |" in card

    # Coverage report: one row per populated discipline x grade cell.
    cov = con.sql("SELECT * FROM coverage").pl()
    assert cov.filter(pl.col("discipline") == "physics")["refined_rows"].sum() == 17

    # Grade fidelity: every high-difficulty row and a sample of multi-grade rows were re-annotated.
    synth_meta = next(r for r in results if r.asset == "synthesized_qa").metadata
    # (each partition reports its own rate; the run's totals are counts, so the rate is theirs)
    assert synth_meta["grade_fidelity_matches"] == synth_meta["grade_fidelity_sampled"]
    assert synth_meta["difficulty_degraded"] == 0
    assert synth_meta["grade_fidelity_sampled"] >= 2
    unchecked_hd = con.sql(
        "SELECT count(*) FROM synthesized_qa WHERE track = 'high_difficulty' AND check_grade IS NULL"
    ).fetchall()[0][0]
    assert unchecked_hd == 0

    # Materialization metadata carries LLM accounting.
    synth = next(r for r in results if r.asset == "synthesized_qa")
    assert synth.metadata["llm_requests"] == 34 and synth.metadata["tokens_in"] > 0

    # Re-materializing finished partitions pays for nothing: every request is a cache hit.
    before = fake_llm.stats()["requests"]
    again = run_pipeline(defs, instance)
    assert all(r.success for r in again)
    assert fake_llm.stats()["requests"] == before
    assert next(r for r in again if r.asset == "refined_qa").metadata["llm_cache_hits"] == 34


def test_one_partition_run_records_per_partition_check(project_env: dict[str, str]) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert run_stage(defs, "seeds", instance).success
    assert run_stage(defs, "annotated_seeds", instance).success
    assert run_stage(defs, "synthesis_plan", instance).success
    result = dg.materialize(
        assets=[*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
        selection=dg.AssetSelection.assets("synthesized_qa") | dg.AssetSelection.checks_for_assets("synthesized_qa"),
        partition_key="physics|graduate",
        instance=instance,
        resources=defs.resources,
    )
    assert result.success
    evals = result.get_asset_check_evaluations()
    assert len(evals) == 1 and evals[0].passed
    df = _store().read_partition("synthesized_qa", {"discipline": "physics", "grade": "graduate"})
    assert set(df["track"]) == {"multi_grade", "high_difficulty"}
    assert set(df["grade"]) == {"graduate"}


def test_blocking_check_fails_on_planted_bad_rows(project_env: dict[str, str]) -> None:
    defs = build_definitions()
    spec = next(c for c in defs.asset_checks or [] for k in c.check_keys if k.name == "refined_qa_valid")
    assert all(s.blocking for s in spec.check_specs)
    store = _store()
    bad = pl.DataFrame(
        [
            {c: None for c in REFINED_SCHEMA}
            | {
                "qa_id": "q_x",
                "seed_id": "s_x",
                "question": "Q?",
                "refined_answer": "fine",
                "flags": ["refusal"],
                "status": "kept",
                "discipline": "physics",
                "grade": "high",
                "refine_request_hash": "h",
            }
        ],
        schema=REFINED_SCHEMA,
    )
    store.write_partition("refined_qa", {"discipline": "physics", "grade": "high"}, bad)
    outcome = refined_qa_defs.evaluate_partition(store, "physics|high", ["refusal"])
    assert not outcome.passed and outcome.metadata["kept_rows_with_reject_flags"] == 1
    empty_answer = bad.with_columns(
        pl.lit("").alias("refined_answer"), pl.lit([], dtype=pl.List(pl.Utf8)).alias("flags")
    )
    store.write_partition("refined_qa", {"discipline": "physics", "grade": "high"}, empty_answer)
    outcome = refined_qa_defs.evaluate_partition(store, "physics|high", ["refusal"])
    assert not outcome.passed and "refined_answer" in outcome.metadata["null_or_empty"]
    # ... and the mixture refuses to read it, even in a later run than the one that wrote it.
    res = run_stage(defs, "qa_mixture", dg.DagsterInstance.ephemeral())
    assert not res.success
    assert not (Path(get_settings().data_root) / "qa_mixture").exists()


def test_corrupt_source_fails_the_run_naming_the_file(project_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "sources" / "code.parquet").write_bytes(b"PAR1 this is not parquet")
    defs = build_definitions()
    res = run_stage(defs, "seeds", dg.DagsterInstance.ephemeral())
    assert not res.success


@pytest.mark.parametrize("asset", ["annotated_seeds"])
def test_llm_failure_rejects_rows_and_keeps_going(
    project_env: dict[str, str], fake_llm: FakeOpenAIServer, asset: str
) -> None:
    """A reply that stays malformed after the bounded re-asks becomes a reject row with its raw output."""
    from boostqa_assets.testing.fake_server import FaultConfig

    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert run_stage(defs, "seeds", instance).success
    fake_llm.set_config(FaultConfig(malformed_rate=1.0))
    res = run_stage(defs, asset, instance)
    assert res.success  # the batch goes on
    con = connect(_store())
    assert con.sql("SELECT count(*) FROM annotated_seeds").fetchall()[0][0] == 0
    rows = con.sql("SELECT reason, raw_output FROM rejects WHERE stage = 'annotated_seeds'").fetchall()
    assert len(rows) == 9 and {r for r, _ in rows} == {"invalid_json"} and all(raw for _, raw in rows)


def test_an_endpoint_down_mid_stage_fails_the_step_and_the_rerun_pays_only_the_rest(
    project_env: dict[str, str], fake_llm: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The breaker opens: the rows already answered are written and cached, the rest are rejects
    (`endpoint_down`), and the step fails (so a re-execution from failure runs this asset again) with a message
    that says what to do; the rerun pays only for the rest."""
    from boostqa_assets.testing.fake_server import FaultConfig

    monkeypatch.setenv("BOOSTQA_LLM_MAX_RETRIES", "0")
    monkeypatch.setenv("BOOSTQA_LLM_MAX_CONCURRENCY", "1")
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert run_stage(defs, "seeds", instance).success
    fake_llm.set_config(FaultConfig(error_500_rate=1.0))
    res = run_stage(defs, "annotated_seeds", instance)
    assert not res.success and res.error is not None
    assert "never answered" in res.error and "materialize again" in res.error, res.error
    con = connect(_store())
    reasons = dict(
        con.sql("SELECT reason, count(*) FROM rejects WHERE stage = 'annotated_seeds' GROUP BY 1").fetchall()
    )
    assert reasons.get("endpoint_down", 0) >= 1 and sum(reasons.values()) == 9  # every seed accounted for
    assert not instance.get_latest_materialization_event(dg.AssetKey("annotated_seeds"))  # nothing looks done
    fake_llm.set_config(FaultConfig())
    again = run_stage(defs, "annotated_seeds", instance)
    assert again.success and again.checks_failed == 0, again.failed_partitions
    assert set(fake_llm.stats()["ok_by_body"].values()) == {1}  # no request was paid for twice
    con = connect(_store())  # views list the committed files: a new connection sees the new partitions
    left = con.sql("SELECT count(*) FROM rejects WHERE stage = 'annotated_seeds' AND reason = 'endpoint_down'")
    assert left.fetchall()[0][0] == 0


def test_pipeline_through_the_batch_api(
    project_env: dict[str, str], fake_llm: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batch: true` sends each stage's requests as one Batch API job; rows and rejects are the same."""
    monkeypatch.setenv("BOOSTQA_LLM_BATCH", "true")
    monkeypatch.setenv("BOOSTQA_LLM_BATCH_POLL_S", "0.05")
    results = run_pipeline(build_definitions(), dg.DagsterInstance.ephemeral())
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]
    stats = fake_llm.stats()
    assert stats["batches_created"] >= 4  # annotation (per source), synthesis, refinement
    con = connect(_store())
    assert con.sql("SELECT count(*) FROM qa_mixture").fetchall()[0][0] == 29
    assert con.sql("SELECT count(*) FROM rejects WHERE stage = 'refined_qa'").fetchall()[0][0] == 5
