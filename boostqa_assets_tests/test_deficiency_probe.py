"""The deficiency probe materialized in-process against the fake OpenAI-compatible server, with a fake target
model that is perfect on some cells and wrong on others: accuracies, intervals, sample sizes, insufficient
cells, rejects, the request cache, the blocking check and the metadata heatmap."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from boostqa_assets import resources
from boostqa_assets.definitions import build_definitions
from boostqa_assets.inspect import view_statements
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.logic import probe
from boostqa_assets.records import PROBE_CELL_SCHEMA, PROBE_ITEM_SCHEMA, REJECT_SCHEMA
from boostqa_assets.runner import StageResult, run_pipeline, run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer
from boostqa_assets_tests.conftest import (
    PROBE_QA_ROWS,
    PROBE_WRONG_ANSWER,
    add_probe_source,
    probe_answers,
    probe_target_responder,
)

STAGES = ["seeds", "annotated_seeds", "deficiency_probe"]
# The fake target knows every physics|primary answer, half the history ones (one more gets no reply) and
# four of the five judged economics ones; it knows nothing about biology.
KNOWN = {r["q"] for r in PROBE_QA_ROWS if r["id"].startswith("pp") or r["id"] in ("hh1", "hh2", "hh3")} | {
    r["q"] for r in PROBE_QA_ROWS if r["id"] in ("eu1", "eu2", "eu3", "eu4")
}


def _store() -> Store:
    s = get_settings()
    return Store(s.data_root, s.storage_options)


@pytest.fixture
def probe_project(project_env: dict[str, str], fake_llm: FakeOpenAIServer) -> dict[str, str]:
    add_probe_source(Path(project_env["BOOSTQA_CONFIG_DIR"]))
    fake_llm.responder = probe_target_responder(probe_answers(), lambda q: q in KNOWN)
    resources._project_config.cache_clear()
    return project_env


def _run(instance: dg.DagsterInstance | None = None) -> list[StageResult]:
    results = run_pipeline(build_definitions(), instance or dg.DagsterInstance.ephemeral(), stages=STAGES)
    assert [r.asset for r in results] == STAGES
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]
    return results


def test_probe_measures_accuracy_per_cell(probe_project: dict[str, str], fake_llm: FakeOpenAIServer) -> None:
    instance = dg.DagsterInstance.ephemeral()
    results = _run(instance)
    res = results[-1]
    assert (res.checks_passed, res.checks_failed) == (1, 0)
    store = _store()
    cells = probe.read_probe_cells(store)
    assert cells is not None and cells.schema == PROBE_CELL_SCHEMA
    by = {(r["discipline"], r["grade"]): r for r in cells.iter_rows(named=True)}
    assert set(by) == {
        ("physics", "primary"),
        ("biology", "high"),
        ("history", "high"),
        ("chemistry", "high"),
        ("economics", "undergraduate"),
        ("physics", "high"),  # physics_qa p1, p2, p3
        ("mathematics", "high"),  # code_problems: problems, judged
    }

    def counts(cell: tuple[str, str]) -> tuple[int, int, int, int]:
        r = by[cell]
        return r["n_candidates"], r["n_sampled"], r["n_graded"], r["n_correct"]

    # Perfect cell, capped at samples_per_cell = 6 of 8 candidates.
    pp = by[("physics", "primary")]
    assert counts(("physics", "primary")) == (8, 6, 6, 6)
    assert (pp["status"], pp["accuracy"]) == ("ok", 1.0)
    assert pp["ci_low"] == pytest.approx(0.6097, abs=5e-4) and pp["ci_high"] == 1.0
    assert json.loads(pp["grading"]) == {"normalized": 6}
    # Always wrong (6 of 7 candidates: the physics_qa organelle question is biology too).
    bh = by[("biology", "high")]
    assert counts(("biology", "high")) == (7, 6, 6, 0)
    assert (bh["status"], bh["accuracy"], bh["ci_low"]) == ("ok", 0.0, 0.0)
    assert bh["ci_high"] == pytest.approx(0.3903, abs=5e-4)
    # Half right; the silent reply is graded wrong (method `empty`), not dropped.
    hh = by[("history", "high")]
    assert counts(("history", "high")) == (6, 6, 6, 3)
    assert hh["accuracy"] == pytest.approx(0.5)
    assert (hh["ci_low"], hh["ci_high"]) == pytest.approx(probe.wilson_interval(3, 6, 0.95))
    assert json.loads(hh["grading"]) == {"empty": 1, "normalized": 5}
    # Free-form references go to the judge; its one invalid verdict leaves that item not graded.
    eu = by[("economics", "undergraduate")]
    assert counts(("economics", "undergraduate")) == (6, 6, 5, 4)
    assert (eu["status"], eu["accuracy"]) == ("ok", pytest.approx(0.8))
    assert (eu["ci_low"], eu["ci_high"]) == pytest.approx((0.3755, 0.9638), abs=5e-4)
    assert json.loads(eu["grading"]) == {"judge": 5}
    # Too few for a number: said so, no number invented.
    for cell, n in ((("chemistry", "high"), 3), (("physics", "high"), 3), (("mathematics", "high"), 2)):
        r = by[cell]
        assert r["status"] == "insufficient_samples", cell
        assert (r["accuracy"], r["ci_low"], r["ci_high"]) == (None, None, None)
        assert (r["n_sampled"], r["n_graded"]) == (n, n)
    assert json.loads(by[("mathematics", "high")]["grading"]) == {"judge": 2}

    # Items: one per sampled question, with the reply, the method and the request hashes.
    items = store.read_partition("deficiency_probe_items", {})
    assert items.schema == PROBE_ITEM_SCHEMA
    assert items.height == sum(r["n_sampled"] for r in by.values()) == 32
    assert probe.items_match_cells(items, cells).passed
    wrong = items.filter(pl.col("discipline") == "biology")
    assert set(wrong["reply"]) == {PROBE_WRONG_ANSWER} and not wrong["correct"].any()
    assert set(items["probe_model"]) == {"fake-model"}
    assert set(items["probe_prompt_id"]) == {"probe"} and set(items["probe_prompt_version"]) == {"v1"}
    judged = items.filter(pl.col("method") == "judge")
    assert judged.height == 7 and judged["judge_request_hash"].null_count() == 0

    # Every reply and verdict is in the LLM cache under its request hash.
    cache = ResponseCache(str(Path(get_settings().data_root) / "_llm_cache"))
    hashes = [h for h in items["probe_request_hash"]] + [h for h in items["judge_request_hash"] if h]
    assert len(hashes) == 32 + 8  # the unjudgeable item keeps the hash of its (invalid) judge reply
    entries = cache.get_many(hashes)
    assert set(entries) == set(hashes)
    assert {e["role"] for e in entries.values()} == {"probe", "judge"}

    # Rejects: the item whose verdict stayed invalid after the re-asks, with the raw reply.
    rejects = store.read_rejects("deficiency_probe", "all")
    assert rejects.schema == REJECT_SCHEMA
    assert rejects["reason"].to_list() == ["judge_schema_mismatch"]
    assert "maybe" in rejects["raw_output"][0] and rejects["seed_id"][0] in set(items["seed_id"])

    # Metadata: counts, the table of cells, the heatmap as an inline PNG, accounting for both roles.
    meta = res.metadata
    assert (meta["rows"], meta["cells_ok"], meta["cells_insufficient"]) == (7, 4, 3)
    assert meta["overall_accuracy"] == pytest.approx(round(13 / 31, 4))
    assert meta["rows_rejected"] == 1 and meta["items_graded"] == 31
    assert "| economics | undergraduate | ok | 0.80 | [0.38, 0.96] | 5 / 6 / 6 | 4 | judge 5 |" in meta["cells"]
    heatmap = meta["heatmap"]
    assert heatmap.startswith("![deficiency probe") and "data:image/png;base64," in heatmap
    png = base64.b64decode(heatmap.split("base64,", 1)[1].rstrip(")"))
    assert png.startswith(b"\x89PNG") and len(png) < 150_000
    assert meta["llm_requests"] == 32 and meta["judge_llm_requests"] == 8
    assert meta["llm"]["role"] == "probe" and meta["judge_llm"]["role"] == "judge"

    # DuckDB views over the two tables.
    import duckdb

    con = duckdb.connect()
    for statement in view_statements(store):
        if statement.startswith(
            ("CREATE OR REPLACE VIEW deficiency_probe ", "CREATE OR REPLACE VIEW deficiency_probe_items ")
        ):
            con.execute(statement)
    assert con.sql("SELECT count(*) FROM deficiency_probe").fetchall() == [(7,)]
    joined = con.sql(
        "SELECT c.discipline, c.grade, c.n_correct, count_if(i.correct) FROM deficiency_probe c "
        "JOIN deficiency_probe_items i USING (discipline, grade) GROUP BY ALL HAVING c.n_correct <> count_if(i.correct)"
    ).fetchall()
    assert joined == []

    # A re-run sends nothing new (every probe and judge request is a cache hit) and writes the same tables.
    sent = fake_llm.stats()["requests"]
    again = run_stage(build_definitions(), "deficiency_probe", instance)
    assert again.success and again.checks_failed == 0
    assert fake_llm.stats()["requests"] == sent
    assert again.metadata["llm_cache_hits"] == 32
    assert probe.read_probe_cells(store).equals(cells)  # type: ignore[union-attr]


def test_failed_requests_are_not_graded(probe_project: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe budget too small for one request: nothing is sent, nothing graded, every cell says so, and
    every sampled question is a `budget_exhausted` reject."""
    monkeypatch.setenv("BOOSTQA_PROBE_BUDGET_TOKENS", "1")
    res = _run()[-1]
    assert (res.checks_passed, res.checks_failed) == (1, 0)
    store = _store()
    cells = probe.read_probe_cells(store)
    assert cells is not None and cells.height == 7
    assert set(cells["status"]) == {"insufficient_samples"}
    assert cells["n_graded"].sum() == 0 and cells["accuracy"].null_count() == 7
    rejects = store.read_rejects("deficiency_probe", "all")
    assert rejects.height == cells["n_sampled"].sum() == 32
    assert set(rejects["reason"]) == {"budget_exhausted"}
    assert res.metadata["overall_accuracy"] == "no graded replies"
    assert res.metadata["judge_llm_requests"] == 0


def test_disabled_probe_writes_an_empty_table(probe_project: dict[str, str], fake_llm: FakeOpenAIServer) -> None:
    path = Path(probe_project["BOOSTQA_CONFIG_DIR"]) / "pipeline.yaml"
    pipeline = yaml.safe_load(path.read_text())
    pipeline["probe"]["enabled"] = False
    path.write_text(yaml.safe_dump(pipeline))
    resources._project_config.cache_clear()
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    assert run_stage(defs, "seeds", instance).success
    assert run_stage(defs, "annotated_seeds", instance).success
    sent = fake_llm.stats()["requests"]
    res = run_stage(defs, "deficiency_probe", instance)
    assert res.success and (res.checks_passed, res.checks_failed) == (1, 0)
    assert fake_llm.stats()["requests"] == sent
    assert res.metadata["rows"] == 0 and "disabled" in res.metadata["probe"]
    store = _store()
    assert probe.read_probe_cells(store) is None  # the plan falls back to static weights
    assert store.partition_files("deficiency_probe", {})


def test_probe_without_annotated_seeds_fails_nothing(probe_project: dict[str, str]) -> None:
    """No annotated seed yet: an empty table (no candidates), a passing check, no request sent."""
    res = run_stage(build_definitions(), "deficiency_probe", dg.DagsterInstance.ephemeral())
    assert res.success and res.checks_failed == 0
    assert res.metadata["rows"] == 0 and res.metadata["overall_accuracy"] == "no graded replies"
    assert probe.read_probe_cells(_store()) is None


def test_definitions_shape() -> None:
    defs = build_definitions()
    spec = defs.resolve_assets_def("deficiency_probe")
    assert spec.partitions_def is None
    assert sorted(k.to_user_string() for k in spec.dependency_keys) == ["annotated_seeds"]
    key = dg.AssetKey("deficiency_probe")
    assert spec.specs_by_key[key].group_name == "boostqa"
    assert set(spec.specs_by_key[key].kinds) == {"parquet", "llm"}
    assert (spec.code_versions_by_key[key] or "").startswith("probe-")
    assert spec.node_def.pool == "llm_embedded"  # type: ignore[union-attr]
    description = spec.specs_by_key[key].description or ""
    assert "row" in description.lower()
    checks = [c for c in defs.asset_checks or [] for k in c.check_keys if k.name == "deficiency_probe_valid"]
    assert len(checks) == 1 and all(s.blocking for s in checks[0].check_specs)
