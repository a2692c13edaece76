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


def _partition_tags(defs: dg.Definitions, asset: str) -> tuple[dict[str, str], int]:
    pdef = defs.resolve_assets_def(asset).partitions_def
    if pdef is None:
        return {}, 1
    keys = pdef.get_partition_keys()
    return {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }, len(keys)


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
    """Materialize every partition of ``asset`` (and run its checks) in one in-process run."""
    tags, n_parts = _partition_tags(defs, asset)
    started = time.perf_counter()
    result = dg.materialize(
        assets=[*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
        selection=dg.AssetSelection.assets(asset) | dg.AssetSelection.checks_for_assets(asset),
        instance=instance,
        resources=resources or defs.resources,
        tags=tags,
        run_config=QUIET_RUN_CONFIG if quiet else None,
        raise_on_error=False,
    )
    seconds = time.perf_counter() - started
    mats = result.asset_materializations_for_node(asset)
    passed = failed = 0
    for ev in result.get_asset_check_evaluations():
        if ev.passed:
            passed += 1
        else:
            failed += 1
    return StageResult(
        asset,
        result.run_id,
        result.success,
        seconds,
        n_parts,
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
