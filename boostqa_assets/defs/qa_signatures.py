"""``qa_signatures[discipline x grade]``: the per-row dedup keys of one refined partition, computed where Dagster
runs steps, so only the global merge of the mixture runs in one process."""

import time

import dagster as dg

from boostqa_assets.defs.support import asset_ui, backfill_policy
from boostqa_assets.logic import gates_ooc
from boostqa_assets.logic.gate_keys import keys_path, keys_version, write_keys_file
from boostqa_assets.partitions import Partitions, qa_key_parts
from boostqa_assets.resources import StoreResource, project_config
from boostqa_assets.storage import Store

CHUNK_ROWS = 50_000


def _refined_files(st: Store, discipline: str, grade: str) -> list[str]:
    """The refined part files of one partition (committed parts where the store keeps manifests)."""
    partition = {"discipline": discipline, "grade": grade}
    listed = getattr(st, "partition_files", None)
    if listed is not None:
        return list(listed("refined_qa", partition))
    path = st.partition_path("refined_qa", partition)
    return [path] if st.exists(path) else []


def build(parts: Partitions) -> list[dg.AssetsDefinition]:
    cfg = gates_ooc.dedup_config(project_config().pipeline.quality, CHUNK_ROWS)

    @dg.op(ins={"refined_qa": dg.In(dg.Nothing)}, out=dg.DynamicOut(str))
    def qa_signatures_fan_out(context: dg.OpExecutionContext):  # type: ignore[no-untyped-def]
        """One step per partition of the run, so the executor runs them side by side (processes locally, pods
        with `k8s_job_executor`)."""
        for key in context.partition_keys:
            yield dg.DynamicOutput(str(key), mapping_key=str(key).replace("|", "__"))

    @dg.op
    def qa_signatures_partition(context: dg.OpExecutionContext, store: StoreResource, key: str) -> dict:
        """Keys of every row of refined_qa[key], written to qa_signatures/<partition>/part-0000.parquet."""
        st = store.get()
        discipline, grade = qa_key_parts(key)
        files = _refined_files(st, discipline, grade)
        if not files:
            context.log.info(f"qa_signatures[{key}]: refined_qa has no data for this partition; nothing to do")
            return {"partition": key, "rows": 0, "seconds": 0.0}
        started = time.perf_counter()
        target = keys_path(st, st.path("refined_qa", f"discipline={discipline}", f"grade={grade}"))
        rows, _ = write_keys_file(st, files, cfg, target, CHUNK_ROWS)
        seconds = time.perf_counter() - started
        context.log.info(f"qa_signatures[{key}]: {rows} rows from {len(files)} files in {seconds:.1f} s")
        return {"partition": key, "rows": rows, "seconds": round(seconds, 2)}

    @dg.op(out=dg.Out(dg.Nothing))
    def qa_signatures_done(context: dg.OpExecutionContext, results: list[dict]) -> None:
        """Each partition's own figures on its own materialization event (the op's output metadata would give
        every partition the run's). An op of a graph asset has no public ``add_asset_metadata``; the step's
        context (what ``AssetExecutionContext.add_asset_metadata`` calls) takes it for the asset this op
        outputs."""
        for r in results:
            context._step_execution_context.add_asset_metadata(
                metadata={"rows": r["rows"], "dagster/row_count": r["rows"], "seconds": r["seconds"]},
                asset_key=dg.AssetKey("qa_signatures"),
                partition_key=r["partition"],
            )
        context.add_output_metadata({"keys_version": keys_version(cfg)})

    @dg.graph_asset(
        partitions_def=parts.qa_partitions,
        ins={"refined_qa": dg.AssetIn(dagster_type=dg.Nothing)},
        # Not eager: an optional scale-out step (the mixture computes the keys itself when these are missing or
        # stale), launched through qa_signatures_job when a run is big enough to spread over processes or pods.
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet"},
        code_version="signatures-" + keys_version(cfg),
        **asset_ui("qa_signatures"),
    )
    def qa_signatures(refined_qa):  # type: ignore[no-untyped-def]
        """One row per refined QA row of the partition: its dedup keys (`logic/gate_keys.py`): the 128-bit exact
        key of the normalized text, the LSH bucket key of each band, the MinHash signature and the compared
        text, with the refined files' fingerprints in the file's metadata.

        The mixture reads a partition's keys from here when they match the refined files and the dedup
        settings (`quality.dedup`), and computes them itself otherwise: this asset only moves the per-row work
        (normalization, shingling, MinHash) out of the mixture's process, one step per partition."""
        return qa_signatures_done(qa_signatures_fan_out(refined_qa=refined_qa).map(qa_signatures_partition).collect())

    # Its own job on the multiprocess executor: one step per partition of the launch, side by side (swap in
    # dagster-k8s's k8s_job_executor to run each step in its own pod).
    qa_signatures_job = dg.define_asset_job(
        "qa_signatures_job",
        selection=[qa_signatures],
        executor_def=dg.multiprocess_executor,  # a process per step, up to the cores
        description="Computes qa_signatures for the partitions a launch picks, one process per partition.",
    )
    return [qa_signatures, qa_signatures_job]
