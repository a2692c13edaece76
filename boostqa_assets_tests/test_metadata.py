"""What the Dagster UI shows is true: each partition's materialization carries its own rows, rejects and tokens
(not the run's), a one-partition run records its check evaluation with its partition, runs are named after
their stage, and metadata tables stay readable (escaped ``|``, dicts as ``a: 1``)."""

from __future__ import annotations

import re

import dagster as dg
import polars as pl

from boostqa_assets.definitions import STAGES, build_definitions
from boostqa_assets.defs.jobs import stage_job, stage_job_name
from boostqa_assets.defs.metadata import LLMTally, grid_table, table_preview
from boostqa_assets.defs.support import md_table
from boostqa_assets.llm.types import LLMResult, LLMStats
from boostqa_assets.partitions import qa_key_parts
from boostqa_assets.runner import PIPELINE_TAG, run_pipeline
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer

SYNTH = dg.AssetKey("synthesized_qa")
CHECK = dg.AssetCheckKey(SYNTH, "synthesized_qa_valid")


def _separators(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_md_table_escapes_partition_keys_and_formats_dicts() -> None:
    rows = [
        {"partition": "arts|primary", "tasks": 0, "reject_reasons": {"refusal": 2, "too_short": 1}, "note": None},
        {"partition": "physics|high", "tasks": 3, "reject_reasons": {}, "note": "a\nb"},
    ]
    lines = str(md_table(rows).value).splitlines()
    assert lines[2] == "| arts\\|primary | 0 | refusal: 2, too_short: 1 | - |"
    assert lines[3] == "| physics\\|high | 3 | - | a b |"
    # every row has the header's cells: the grade stays under its column
    assert {_separators(line) for line in lines} == {5}


def test_grid_and_preview_tables() -> None:
    grid = grid_table(
        {("physics", "high"): 0.25, ("physics", "primary"): None}, ["physics"], ["primary", "high"], vmin=0, vmax=1
    )
    assert [c.name for c in grid.schema.columns] == ["discipline", "primary", "high"]
    assert grid.records[0].data == {"discipline": "physics", "primary": "n/a", "high": "0.25 ▃"}
    df = pl.DataFrame({"q": ["x" * 200, "short"], "flags": [["a", "b"], []], "n": [1, 2]})
    preview = table_preview(df, ["q", "flags", "missing"], n=1)
    assert [c.name for c in preview.schema.columns] == ["q", "flags"]
    assert len(preview.records) == 1 and len(preview.records[0].data["q"]) == 80
    assert preview.records[0].data["flags"] == "a, b"
    empty = table_preview(None, ["q"])
    assert empty.records == [] and [c.name for c in empty.schema.columns] == ["q"]


def test_llm_tally_sums_a_partitions_results() -> None:
    stats = LLMStats("synthesizer", "m", price_per_mtok_in=1.0, price_per_mtok_out=2.0)
    tally = LLMTally(stats)
    ok = LLMResult("a", "p", "v1", "m", "h", True, http_requests=2, retries=1, paid_tokens_in=100, paid_tokens_out=10)
    cached = LLMResult("b", "p", "v1", "m", "h2", True, cached=True, cache_hits=1, tokens_in=50)
    failed = LLMResult("c", "p", "v1", "m", "h3", False, error="invalid_json", http_requests=1, paid_tokens_in=7)
    tally.add([ok, cached, failed])
    meta = tally.metadata()
    assert (meta["llm_requests"], meta["llm_http_requests"], meta["llm_cache_hits"], meta["llm_failed"]) == (3, 3, 1, 1)
    assert (meta["tokens_in"], meta["tokens_out"], meta["llm_retries"]) == (107, 10, 1)
    assert meta["est_cost_usd"] == round((107 * 1.0 + 10 * 2.0) / 1e6, 6)
    assert meta["llm"].value["role"] == "synthesizer" and meta["llm"].value["failures_by_reason"] == {"invalid_json": 1}


def _latest(instance: dg.DagsterInstance, key: str) -> dict[str, object]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=SYNTH, asset_partitions=[key]), limit=1
    ).records
    mat = records[0].asset_materialization
    assert mat is not None
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def test_each_partition_shows_its_own_numbers(project_env: dict[str, str], fake_llm: FakeOpenAIServer) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    results = run_pipeline(defs, instance, stages=STAGES[: STAGES.index("synthesized_qa") + 1])
    assert all(r.success for r in results), [(r.asset, r.error) for r in results]
    synth = results[-1]
    store = Store(get_settings().data_root)
    keys = defs.resolve_assets_def("synthesized_qa").partitions_def.get_partition_keys()  # type: ignore[union-attr]
    actual = {}
    for key in keys:
        discipline, grade = qa_key_parts(key)
        actual[key] = store.read_partition("synthesized_qa", {"discipline": discipline, "grade": grade}).height
    empty = [k for k, n in actual.items() if n == 0]
    full = [k for k, n in actual.items() if n > 0]
    assert "arts|primary" in empty and full  # one run over all 110 partitions, most of them empty

    # An empty partition says 0 (rows, tokens, requests, preview), a full one its own count, not the run's.
    arts = _latest(instance, "arts|primary")
    assert arts["rows"] == 0 and arts["dagster/row_count"] == 0 and arts["rows_rejected"] == 0
    assert arts["llm_requests"] == 0 and arts["tokens_in"] == 0 and arts["tasks"] == 0
    assert arts["preview"].records == [] and "dagster/column_schema" in arts  # type: ignore[attr-defined]
    total_tokens, total_requests = 0, 0
    for key in full:
        meta = _latest(instance, key)
        assert meta["dagster/row_count"] == meta["rows"] == actual[key], key
        assert meta["llm_requests"] == meta["tasks"] > 0 and meta["tokens_in"] > 0, key  # type: ignore[operator]
        assert len(meta["preview"].records) == min(3, actual[key]), key  # type: ignore[attr-defined]
        total_tokens += meta["tokens_in"]  # type: ignore[operator]
        total_requests += meta["llm_http_requests"]  # type: ignore[operator]
    assert sum(actual.values()) < synth.stats.rows + 1 and synth.stats.rows == sum(actual.values())
    # The partitions' figures add up to the run's: the runner sums them for the demo summary.
    assert synth.stats.llm["synthesizer"]["tokens_in"] == total_tokens
    assert synth.stats.llm["synthesizer"]["http_requests"] == total_requests
    assert synth.metadata["rows"] == sum(actual.values())

    # Every stage ran as its named job, all under one pipeline id.
    runs = instance.get_runs()
    assert {r.job_name for r in runs} == {stage_job_name(s) for s in STAGES[:5]}
    assert len({r.tags[PIPELINE_TAG] for r in runs}) == 1
    # The multi-partition run recorded one check evaluation per partition, none without a partition.
    infos = instance.event_log_storage.get_asset_check_partition_info([CHECK])
    assert {i.partition_key for i in infos} == set(keys)

    # A run over a range of one partition (the runner's and a one-partition backfill's launch) records its check
    # evaluation with that partition; every reply comes from the cache now.
    job = dg.Definitions(
        jobs=[stage_job("synthesized_qa")],
        assets=[*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
        resources=defs.resources,
    ).resolve_job_def(stage_job_name("synthesized_qa"))
    key = full[0]
    one = job.execute_in_process(
        instance=instance,
        tags={"dagster/asset_partition_range_start": key, "dagster/asset_partition_range_end": key},
    )
    assert one.success and one.dagster_run.job_name == "synthesized_qa_job"
    evaluations = one.get_asset_check_evaluations()
    assert [(e.partition, e.passed) for e in evaluations] == [(key, True)]
    assert evaluations[0].target_materialization_data is not None
    assert evaluations[0].target_materialization_data.run_id == one.run_id
    latest = {i.partition_key: i for i in instance.event_log_storage.get_asset_check_partition_info([CHECK])}
    assert latest[key].latest_planned_run_id == one.run_id
    meta = _latest(instance, key)
    assert meta["rows"] == actual[key] and meta["llm_cache_hits"] == meta["llm_requests"] and meta["tokens_in"] == 0
