"""The distributed dedup path: `qa_signatures` materialized over several partitions by Dagster's multiprocess
executor (one process per partition step), then the mixture merging those keys gives exactly the mixture and
rejects of the single-process path (keys computed in the mixture's own process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from boostqa_assets.definitions import MODULES
from boostqa_assets.partitions import build_partitions
from boostqa_assets.resources import LLMResource, StoreResource, project_config
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets_tests.logic.test_gates_ooc import refined_pool

pytestmark = pytest.mark.small_taxonomy  # not about the taxonomy: 45 QA partitions, not 110

GRADES = ["primary", "middle", "high", "undergraduate", "graduate"]


def all_assets() -> list[dg.AssetsDefinition]:
    """The code location's assets (qa_signatures among them)."""
    parts = build_partitions(project_config())
    built = [d for module in MODULES for d in module.build(parts)]  # type: ignore[attr-defined]
    return [d for d in built if isinstance(d, dg.AssetsDefinition) and not isinstance(d, dg.AssetChecksDefinition)]


def signatures_job() -> dg.JobDefinition:
    """A job of qa_signatures on the multiprocess executor (module level, so `dg.reconstructable` can load it
    in the step processes)."""
    assets = all_assets()
    job = dg.define_asset_job(
        "signatures",
        selection=["qa_signatures"],
        executor_def=dg.multiprocess_executor.configured({"max_concurrent": 2}),
    )
    defs = dg.Definitions(assets=assets, jobs=[job], resources={"store": StoreResource(), "llm": LLMResource()})
    return defs.resolve_job_def("signatures")


def mixture_outputs(instance: dg.DagsterInstance) -> tuple[dict[str, object], pl.DataFrame, pl.DataFrame]:
    """Materialize qa_mixture in-process; its metadata, its documents and its rejects."""
    result = dg.materialize(
        [a for a in all_assets() if dg.AssetKey("qa_mixture") in a.keys],
        partition_key="stem_heavy",
        instance=instance,
        resources={"store": StoreResource()},
    )
    assert result.success
    meta = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    folder = Path(get_settings().data_root) / "qa_mixture" / "recipe=stem_heavy"
    manifest = json.loads((folder / "manifest.json").read_text())
    docs = pl.concat([pl.read_parquet(folder / f) for f in manifest["files"] if f.endswith(".parquet")])
    store = Store(get_settings().data_root)
    rejects = (
        store.read_rejects("qa_mixture", "stem_heavy")
        if hasattr(store, "read_rejects")
        else pl.read_parquet(store.rejects_path("qa_mixture", "stem_heavy"))
    )
    return meta, docs, rejects.sort("qa_id")


@pytest.mark.slow
def test_signatures_over_the_multiprocess_executor_give_the_single_process_mixture(
    project_env: dict[str, str], tmp_path: Path
) -> None:
    store = Store(get_settings().data_root)
    pool = refined_pool(600)
    for k, grade in enumerate(GRADES):  # one discipline, five grades: a contiguous partition range
        part = pool.slice(k * 120, 120).with_columns(
            pl.lit("physics").alias("discipline"), pl.lit(grade).alias("grade")
        )
        store.write_partition("refined_qa", {"discipline": "physics", "grade": grade}, part)

    (tmp_path / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        single_meta, single_docs, single_rejects = mixture_outputs(instance)
        assert single_meta["dedup_keys_from_qa_signatures"] == 0

        result = dg.execute_job(
            dg.reconstructable(signatures_job),
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": "physics|primary",
                "dagster/asset_partition_range_end": "physics|graduate",
            },
        )
        assert result.success
        steps = [e for e in result.all_events if e.event_type_value == "STEP_START"]
        pids = {e.pid for e in steps if e.step_key and e.step_key.startswith("qa_signatures.qa_signatures_partition")}
        assert len([e for e in steps if "qa_signatures_partition[" in (e.step_key or "")]) == 5
        assert len(pids) >= 2  # the per-partition steps ran in separate processes
        written = sorted(Path(get_settings().data_root, "qa_signatures").rglob("part-0000.parquet"))
        assert len(written) == 5
        materialized = instance.fetch_materializations(dg.AssetKey("qa_signatures"), limit=10).records
        assert {r.partition_key for r in materialized} == {f"physics|{g}" for g in GRADES}
        # Each partition's event carries its own row count (120 refined rows each), not the run's 600.
        counts = {r.asset_materialization.metadata["dagster/row_count"].value for r in materialized}
        assert counts == {120}

        dist_meta, dist_docs, dist_rejects = mixture_outputs(instance)
    assert dist_meta["dedup_keys_from_qa_signatures"] == 5
    assert dist_meta["removed_near_duplicates"] == single_meta["removed_near_duplicates"] > 0
    assert dist_meta["removed_exact_duplicates"] == single_meta["removed_exact_duplicates"] > 0
    assert dist_docs.equals(single_docs)
    assert dist_rejects.select("qa_id", "reason", "detail").equals(single_rejects.select("qa_id", "reason", "detail"))
    shutil.rmtree(Path(get_settings().data_root, "qa_signatures"))
