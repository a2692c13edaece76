"""Run the whole pipeline in-process against the Dagster instance: each stage as one run over its partitions
(single-run backfill), in dependency order. The runs appear in the Dagster UI like any other.

Failures stay in their partition: a source that cannot be read fails its own `seeds` partition (see
`defs/seeds.py`), the stage goes on with the others, and `annotated_seeds` runs over the sources that succeeded
only; the discipline x grade stages read the good annotated partitions (`failures.read_good_sources`). A run that
fails for any other reason stops the pipeline there.

Each run carries the runner's pid, host and process start time (`runs.py`): a later runner fails the runs of a
runner that was killed and frees their pool slots before it waits for a slot itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from boostqa_assets import failures
from boostqa_assets.definitions import STAGES
from boostqa_assets.defs.jobs import stage_job, stage_job_name
from boostqa_assets.memory import release_free_memory
from boostqa_assets.partitions import SOURCE_PARTITIONS, contiguous_ranges, register_sources
from boostqa_assets.resources import project_config
from boostqa_assets.runs import (
    LAUNCH_TAG,
    STAGE_TAG,
    SlotWatch,
    reconcile_dead_runs,
    runner_tags,
    stop_spinning_on_full_pools,
    wait_for_slot,
)
from boostqa_assets.settings import SettingsError
from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)

QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
PIPELINE_TAG = "boostqa/pipeline"
# Source-partitioned stages run only over the sources that did not fail in the stages named here.
UPSTREAM_SOURCE_STAGES: dict[str, tuple[str, ...]] = {"annotated_seeds": ("seeds",)}
LLM_STAT_FIELDS = ("requests", "http_requests", "cache_hits", "failed", "retries", "tokens_in", "tokens_out")


@dataclass
class StageStats:
    """What a stage did, summed over all of its runs, from the materialization metadata of the runs (never from
    files on disk, which may be left by other runs): rows kept and rejected, LLM figures per role."""

    rows: int = 0
    rows_rejected: int = 0
    llm: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> requests, tokens_in, ... est_cost_usd

    def add_run(self, metadata: dict[str, Any]) -> None:
        """Add one materialization event's figures: a partition's own (each partition of a run has its event), or
        an unpartitioned asset's."""
        self.rows += _int(metadata.get("rows"))
        self.rows_rejected += _int(metadata.get("rows_rejected"))
        for role, stats in llm_stats_by_role(metadata).items():
            total = self.llm.setdefault(role, {k: 0 for k in (*LLM_STAT_FIELDS, "est_cost_usd")})
            for k in LLM_STAT_FIELDS:
                total[k] += _int(stats.get(k))
            total["est_cost_usd"] = round(total["est_cost_usd"] + float(stats.get("est_cost_usd") or 0.0), 6)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def llm_stats_by_role(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every LLM client's figures in one run's metadata: each JSON entry with a ``role`` and ``requests`` (``llm``,
    ``judge_llm``, ``fidelity_llm``, ...), by role; two clients of one role in a run are added up.

    A client whose entry is named for a purpose rather than its role is kept apart, so the summary shows what each
    use cost: ``fidelity_llm`` of role ``annotator`` is ``annotator (fidelity)``."""
    found: dict[str, dict[str, Any]] = {}
    for name, value in metadata.items():
        if isinstance(value, dict) and "role" in value and "requests" in value:
            role = str(value["role"])
            purpose = name.removesuffix("_llm")
            if name != "llm" and purpose != role:
                role = f"{role} ({purpose})"
            if role in found:
                merged = dict(found[role])
                for k in (*LLM_STAT_FIELDS, "est_cost_usd"):
                    merged[k] = (merged.get(k) or 0) + (value.get(k) or 0)
                found[role] = merged
            else:
                found[role] = dict(value)
    return found


@dataclass
class StageResult:
    asset: str
    run_id: str  # the stage's run ids, comma-separated
    success: bool  # every run succeeded (no partition failed)
    seconds: float
    partitions: int
    metadata: dict[str, Any] = field(default_factory=dict)  # the last run's totals (``_run_totals``)
    partition_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # each partition's own, last run
    checks_passed: int = 0
    checks_failed: int = 0
    failed_partitions: dict[str, str] = field(default_factory=dict)  # key -> why (names the source, file and fix)
    skipped_partitions: dict[str, str] = field(default_factory=dict)  # key -> the upstream failure that kept it out
    materialized: list[str] = field(default_factory=list)  # partitions written by a run that succeeded for them
    stats: StageStats = field(default_factory=StageStats)
    error: str | None = None  # a failure that is not one partition's: the pipeline stops here

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "partial" if self.failed_partitions else "ok"


@dataclass
class _RangeOutcome:
    run_id: str
    success: bool
    metadata: dict[str, Any]  # the run's totals (``_run_totals`` of its events)
    events: dict[str, dict[str, Any]]  # each materialization event's own metadata, by partition ("" for none)
    materialized: list[str]
    failed: dict[str, str]
    passed_checks: list[str]
    checks_passed: int
    checks_failed: int
    error: str | None


def _is_source_partitioned(pdef: dg.PartitionsDefinition | None) -> bool:
    return isinstance(pdef, dg.DynamicPartitionsDefinition) and pdef.name == SOURCE_PARTITIONS


def _partition_ranges(
    defs: dg.Definitions,
    asset: str,
    instance: dg.DagsterInstance,
    store: Store | None = None,
    skipped: dict[str, str] | None = None,
) -> list[list[str]]:
    """The partitions to run, as runs of consecutive keys (one run each; [[]] for an unpartitioned asset).

    Source partitions live in the instance, so they may include keys that the configuration no longer
    knows (a source removed from sources.yaml, a watch removed): those are left out with a warning, and the
    keys around them run as separate ranges. So are sources that failed upstream (``UPSTREAM_SOURCE_STAGES``;
    recorded in ``skipped``). Everything else is one range over every partition.
    """
    pdef = defs.resolve_assets_def(asset).partitions_def
    if pdef is None:
        return [[]]
    keys = list(pdef.get_partition_keys(dynamic_partitions_store=instance))
    if asset == "synthesis_plan" and store is not None:
        # Only the cells whose plan changed: the others keep their data version, so their synthesized_qa
        # partitions stay fresh (the synthesis_plan sensor does the same).
        from boostqa_assets.defs.synthesis_plan import pending_ranges

        _, spans = pending_ranges(store, project_config(), keys)
        return [keys[keys.index(a) : keys.index(b) + 1] for a, b in spans]
    if not _is_source_partitioned(pdef):
        return [keys]
    sources = project_config().sources
    configured = set(sources.partition_keys())
    known = [k for k in keys if k in configured or sources.watch_for_key(k) is not None]
    orphans = [k for k in keys if k not in set(known)]
    if orphans:
        logger.warning(
            "%s: skipping source partitions that sources.yaml no longer configures: %s (delete them in the "
            "Dagster UI to hide them)",
            asset,
            ", ".join(orphans),
        )
    if store is not None:
        for upstream in UPSTREAM_SOURCE_STAGES.get(asset, ()):
            for key, failure in failures.read_failures(store, upstream).items():
                if key in known and skipped is not None:
                    skipped.setdefault(key, f"{upstream}[{key}] failed: {failure.message}")
        known = [k for k in known if skipped is None or k not in skipped]
    return [keys[keys.index(a) : keys.index(b) + 1] for a, b in contiguous_ranges(keys, known)]


def _metadata_values(event: dg.AssetMaterialization) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in event.metadata.items()}


def _run_totals(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's figures from its partitions' events (each carries only its own): counts summed, any other value
    kept where every event has the same one (a rate or a per-partition table has no run total, so it is left out)."""
    if len(events) == 1:
        return dict(events[0])
    totals: dict[str, Any] = {}
    for key in dict.fromkeys(k for e in events for k in e):
        values = [e[key] for e in events if key in e]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            totals[key] = sum(values)
        elif len(values) == len(events) and all(v == values[0] for v in values):
            totals[key] = values[0]
    return totals


def _materialize_watched(
    defs: dg.Definitions,
    asset: str,
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    tags: dict[str, str],
    quiet: bool,
    watch: SlotWatch,
) -> dg.ExecuteInProcessResult:
    """A run of the stage's named job (``defs/jobs.py``) in a worker thread while this (main) thread watches it.

    In the main thread, Dagster's in-process execution takes over SIGINT and SIGTERM and only acts on them inside a
    step's compute; a run waiting for a pool slot never looks, so `boostqa demo` could not be stopped. In a worker
    thread Dagster leaves the signal handlers alone: a signal interrupts the wait below at once, the run is marked
    failed and its slots are freed (``SlotWatch.abandon``), and the CLI exits (the worker thread dies with it)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            # As dg.materialize builds its ephemeral job, with the stage's job instead: the run carries its name.
            job = dg.Definitions(
                jobs=[stage_job(asset)],
                assets=[*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
                resources=resources,
            ).resolve_job_def(stage_job_name(asset))
            box["result"] = job.execute_in_process(
                instance=instance,
                tags=tags,
                run_config=QUIET_RUN_CONFIG if quiet else None,
                raise_on_error=False,
            )
        except BaseException as exc:  # handed to the main thread, which raises it
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"boostqa-run-{asset}", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(timeout=1.0)
            watch.tick()
    except BaseException as exc:  # KeyboardInterrupt, or SystemExit from the CLI's SIGTERM handler
        reason = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "the runner was asked to stop (SIGTERM)"
        watch.abandon(f"{reason}; the boostqa runner pid {os.getpid()} stopped before the run ended")
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def _check_message(evaluation: dg.AssetCheckEvaluation, key: str) -> str:
    meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
    if meta.get("error"):
        return str(meta["error"])
    shown = ", ".join(f"{k} {v}" for k, v in meta.items() if v not in ("-", "none", 0, None))[:400]
    return f"{evaluation.asset_key.to_user_string()}[{key}] fails {evaluation.check_name}: {shown}"


def _outcome(
    result: dg.ExecuteInProcessResult, asset: str, step_key: str, keys: list[str], store: Store | None, by_source: bool
) -> _RangeOutcome:
    """Sort a run's result into partitions that materialized, partitions that failed (with why) and a failure
    that belongs to no partition (which stops the pipeline)."""
    mats = result.asset_materializations_for_node(step_key)
    # Each partition's event carries that partition's own figures: the run's are their sum.
    events = {str(m.partition or ""): _metadata_values(m) for m in mats}
    metadata = _run_totals(list(events.values()))
    evaluations = result.get_asset_check_evaluations()
    per_partition = [(str(e.partition), e) for e in evaluations if e.partition is not None]
    if not per_partition and len(keys) == 1:  # a one-partition run may report its partition's result unkeyed
        per_partition = [(keys[0], e) for e in evaluations]
    failed = {key: _check_message(e, key) for key, e in per_partition if not e.passed}
    passed = [key for key, e in per_partition if e.passed]
    counted = [e for _, e in per_partition] or list(evaluations)
    n_passed = sum(1 for e in counted if e.passed)
    outcome = _RangeOutcome(
        result.run_id, result.success, metadata, events, [], failed, passed, n_passed, len(counted) - n_passed, None
    )
    if store is not None and by_source:
        for key in list(failed):
            record = failures.read_failure(store, asset, key)
            failed[key] = record.message if record is not None else failed[key]
    step_failures = result.get_step_failure_events()
    asset_failed = [e for e in step_failures if e.step_key == step_key]
    if asset_failed:
        record = failures.read_failure(store, asset, keys[0]) if store and by_source and len(keys) == 1 else None
        if record is not None and record.run_id == result.run_id:
            outcome.failed = {keys[0]: record.message}  # a source that failed its own one-partition run
        else:
            outcome.error = _failure_text(asset_failed[0])
        return outcome
    if not result.success and not (by_source and failed):
        outcome.error = "; ".join(_failure_text(e) for e in step_failures[:3]) or f"the run of {asset} failed"
    mat_keys = [m.partition for m in mats if m.partition is not None]
    outcome.materialized = [k for k in (mat_keys or ([""] if mats else [])) if k not in failed]
    return outcome


def _failure_text(event: dg.DagsterEvent) -> str:
    """One line: a `dg.Failure`'s description, else the innermost error (Dagster wraps user errors in
    DagsterExecutionStepExecutionError, whose own message only names the op)."""
    data = event.step_failure_data
    if data is None:
        return event.message or "step failed"
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    error = data.error
    if error is None:
        return "step failed"
    while error.cause is not None:
        error = error.cause
    lines = [line for line in error.message.strip().splitlines() if line.strip()]
    return f"step {event.step_key}: {' '.join(lines)[:500]}" if lines else "step failed"


def run_stage(
    defs: dg.Definitions,
    asset: str,
    instance: dg.DagsterInstance,
    resources: dict[str, Any] | None = None,
    quiet: bool = True,
    pipeline_id: str | None = None,
) -> StageResult:
    """Materialize every partition of ``asset`` (and run its checks): one in-process run per partition range.

    The configured sources are registered as ``sources`` partitions first (they are dynamic), so a fresh
    instance works as it is. Runs of killed runners are failed and their pool slots freed first, then the
    stage waits for a slot of its pool (logging who holds it) before it launches.
    """
    register_sources(instance, project_config())
    reconcile_dead_runs(instance)
    stop_spinning_on_full_pools()
    res = resources or defs.resources
    store = res["store"].get() if "store" in res else None
    assets_def = defs.resolve_assets_def(asset)
    by_source = _is_source_partitioned(assets_def.partitions_def)
    skipped: dict[str, str] = {}
    ranges = _partition_ranges(defs, asset, instance, store, skipped)
    for key, why in skipped.items():
        logger.warning("%s[%s] not run: %s", asset, key, why)
    started = time.perf_counter()
    if not ranges:
        meta = {"cells_changed": 0, "skipped": "the plan did not change"} if asset == "synthesis_plan" else {}
        return StageResult(asset, "", True, 0.0, 0, meta, skipped_partitions=skipped)
    pool = assets_def.node_def.pool if isinstance(assets_def.node_def, dg.OpDefinition) else None
    stage = StageResult(asset, "", True, 0.0, sum(max(len(k), 1) for k in ranges), skipped_partitions=skipped)
    run_ids = []
    for keys in ranges:
        # No daemon retries: an in-process run has no code location to relaunch it from; the next demo redoes it.
        tags = {**runner_tags(), LAUNCH_TAG: uuid.uuid4().hex, STAGE_TAG: asset, "dagster/max_retries": "0"}
        if pipeline_id:
            tags[PIPELINE_TAG] = pipeline_id
        if keys:
            tags.update({"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
        if pool:
            wait_for_slot(instance, pool, f"{asset}[{keys[0]}..{keys[-1]}]" if keys else asset)
        result = _materialize_watched(
            defs, asset, instance, res, tags, quiet, SlotWatch(instance, pool, tags[LAUNCH_TAG])
        )
        out = _outcome(result, asset, assets_def.node_def.name, keys, store, by_source)
        del result
        release_free_memory()  # what the run freed goes back to the system, not on to the next stage (memory.py)
        run_ids.append(out.run_id)
        stage.checks_passed += out.checks_passed
        stage.checks_failed += out.checks_failed
        if out.materialized or out.metadata:
            for event in out.events.values():
                stage.stats.add_run(event)
            stage.metadata = out.metadata
            stage.partition_metadata.update(out.events)
        stage.materialized += out.materialized
        stage.failed_partitions.update(out.failed)
        if store is not None and by_source:
            _record_partition_results(store, asset, out)
        if out.error is not None:
            stage.error = out.error
            break
    stage.run_id = ",".join(run_ids)
    stage.seconds = time.perf_counter() - started
    stage.success = stage.error is None and not stage.failed_partitions and bool(run_ids)
    return stage


def _record_partition_results(store: Store, asset: str, out: _RangeOutcome) -> None:
    """Keep the failure records of a source-partitioned stage true: a failed check records why (unless the asset
    already did), a passed one clears an old record, so later stages and runs see which sources are good."""
    for key, message in out.failed.items():
        if failures.read_failure(store, asset, key) is None:
            failures.record_failure(store, asset, key, message, out.run_id)
    for key in out.passed_checks:
        if key not in out.failed:
            failures.clear_failure(store, asset, key)


def run_pipeline(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    stages: Sequence[str] = STAGES,
    on_stage: Callable[[StageResult], None] | None = None,
    resources: dict[str, Any] | None = None,
) -> list[StageResult]:
    """Run ``stages`` in order. A stage whose failures are partitions' own (a source that cannot be read, a
    partition failing its blocking check) goes on with the other partitions; any other failure stops the pipeline
    at that stage."""
    results = []
    pipeline_id = uuid.uuid4().hex[:12]  # every run of this pipeline carries it: the runs list filters by it
    for asset in stages:
        res = run_stage(defs, asset, instance, resources, pipeline_id=pipeline_id)
        results.append(res)
        if on_stage:
            on_stage(res)
        if res.status == "failed":
            break
    return results


def ensure_dagster_home(default: str) -> str:
    """Use ``DAGSTER_HOME`` if set; else create ``default`` with the project's dagster.yaml linked in.

    Raises ``SettingsError`` (one line: the path, what is wrong, the fix) if the folder cannot be made."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = default
        os.environ["DAGSTER_HOME"] = home
    try:
        os.makedirs(home, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            f"Dagster instance folder {home} cannot be created: {exc.strerror or exc}; fix: point DAGSTER_HOME (or "
            "BOOSTQA_HOME) at a folder you can write"
        ) from exc
    project_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dagster.yaml")
    target = os.path.join(home, "dagster.yaml")
    if os.path.exists(project_yaml) and not os.path.exists(target):
        os.symlink(project_yaml, target)
    return home
