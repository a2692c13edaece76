"""Named jobs, one per stage: a run says which stage it ran (a run of an ad-hoc asset selection is
``__ephemeral_asset_job__`` in the runs list). ``boostqa demo`` launches its runs through these jobs too.

The whole pipeline is not one job: its assets have four partitionings (sources, discipline x grade, recipes, none),
and Dagster 1.13 resolves an asset job only when every selected asset has the same partitions definition
("Selected assets must have the same partitions definitions"). A ``boostqa demo`` is one run per stage, each tagged
with the demo's ``boostqa/pipeline`` id, which the runs list filters by.
"""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from boostqa_assets.resources import project_config
from boostqa_assets.runs import STAGE_TAG


def stage_job_name(asset: str) -> str:
    return f"{asset}_job"


def stage_job(asset: str) -> UnresolvedAssetJobDefinition:
    """The job of one stage: the asset (the partitions a launch picks) and its checks, owned like the asset."""
    return dg.define_asset_job(
        stage_job_name(asset),
        selection=dg.AssetSelection.assets(asset) | dg.AssetSelection.checks_for_assets(asset),
        description=f"Materializes {asset} (the partitions a launch picks) and runs its blocking check.",
        tags={STAGE_TAG: asset},
        owners=project_config().pipeline.ui.owners_for(asset),
    )


def stage_jobs(stages: tuple[str, ...]) -> list[UnresolvedAssetJobDefinition]:
    return [stage_job(asset) for asset in stages]
