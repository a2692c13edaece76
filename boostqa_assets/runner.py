"""Run the whole pipeline in-process against the Dagster instance: each stage as one run over all of its
partitions (single-run backfill), in dependency order. The runs appear in the Dagster UI like any other.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from boostqa_assets.definitions import STAGES
from boostqa_assets.partitions import SOURCE_PARTITIONS, contiguous_ranges, register_sources
from boostqa_assets.resources import project_config
from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)

QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


@dataclass
class StageResult:
    asset: str
    run_id: str
    success: bool
    seconds: float
    partitions: int
    metadata: dict[str, Any] = field(default_factory=dict)
    checks_passed: int = 0
    checks_failed: int = 0


def _partition_ranges(
    defs: dg.Definitions, asset: str, instance: dg.DagsterInstance, store: Store | None = None
) -> list[list[str]]:
    """The partitions to run, as runs of consecutive keys (one run each; [[]] for an unpartitioned asset).

    Source partitions live in the instance, so they may include keys that the configuration no longer
    knows (a source removed from sources.yaml, a watch removed): those are left out with a warning, and the
    keys around them run as separate ranges. Everything else is one range over every partition.
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
    if not (isinstance(pdef, dg.DynamicPartitionsDefinition) and pdef.name == SOURCE_PARTITIONS):
        return [keys]
    sources = project_config().sources
    configured = {s.name for s in sources.sources}
    known = [k for k in keys if k in configured or sources.watch_for_key(k) is not None]
    known_set = set(known)
    orphans = [k for k in keys if k not in known_set]
    if orphans:
        logger.warning(
            "%s: skipping source partitions that sources.yaml no longer configures: %s (delete them in the "
            "Dagster UI to hide them)",
            asset,
            ", ".join(orphans),
        )
    return [keys[keys.index(a) : keys.index(b) + 1] for a, b in contiguous_ranges(keys, known)]


def _metadata_values(event: dg.AssetMaterialization) -> dict[str, Any]:
    out = {}
    for k, v in event.metadata.items():
        out[k] = getattr(v, "value", v)
    return out


def run_stage(
    defs: dg.Definitions,
    asset: str,
    instance: dg.DagsterInstance,
    resources: dict[str, Any] | None = None,
    quiet: bool = True,
) -> StageResult:
    """Materialize every partition of ``asset`` (and run its checks) in one in-process run.

    The configured sources are registered as ``sources`` partitions first (they are dynamic), so a fresh
    instance works as it is.
    """
    register_sources(instance, project_config())
    res = resources or defs.resources
    store = res["store"].get() if "store" in res else None
    ranges = _partition_ranges(defs, asset, instance, store)
    started = time.perf_counter()
    if not ranges:
        return StageResult(asset, "", True, 0.0, 0, {"cells_changed": 0, "skipped": "the plan did not change"})
    run_ids, success, mats, passed, failed = [], True, [], 0, 0
    for keys in ranges:
        tags = (
            {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
            if keys
            else {}
        )
        result = dg.materialize(
            assets=[*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
            selection=dg.AssetSelection.assets(asset) | dg.AssetSelection.checks_for_assets(asset),
            instance=instance,
            resources=res,
            tags=tags,
            run_config=QUIET_RUN_CONFIG if quiet else None,
            raise_on_error=False,
        )
        run_ids.append(result.run_id)
        success = success and result.success
        mats.extend(result.asset_materializations_for_node(asset))
        for ev in result.get_asset_check_evaluations():
            if ev.passed:
                passed += 1
            else:
                failed += 1
        if not result.success:
            break
    seconds = time.perf_counter() - started
    return StageResult(
        asset,
        ",".join(run_ids),
        success and bool(run_ids),
        seconds,
        sum(max(len(k), 1) for k in ranges),
        _metadata_values(mats[-1]) if mats else {},
        passed,
        failed,
    )


def run_pipeline(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    stages: Sequence[str] = STAGES,
    on_stage: Callable[[StageResult], None] | None = None,
    resources: dict[str, Any] | None = None,
) -> list[StageResult]:
    """Run ``stages`` in order; stop at the first stage that fails (a failed blocking check included)."""
    results = []
    for asset in stages:
        res = run_stage(defs, asset, instance, resources)
        results.append(res)
        if on_stage:
            on_stage(res)
        if not res.success:
            break
    return results


def ensure_dagster_home(default: str) -> str:
    """Use ``DAGSTER_HOME`` if set; else create ``default`` with the project's dagster.yaml linked in."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = default
        os.environ["DAGSTER_HOME"] = home
    os.makedirs(home, exist_ok=True)
    project_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dagster.yaml")
    target = os.path.join(home, "dagster.yaml")
    if os.path.exists(project_yaml) and not os.path.exists(target):
        os.symlink(project_yaml, target)
    return home
