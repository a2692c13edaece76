"""Assembles the code location: assets, checks, resources. Nothing else lives here."""

from __future__ import annotations

import warnings

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from boostqa_assets.defs import (
    annotated_seeds,
    automation,
    catalog,
    deficiency_probe,
    jobs,
    qa_mixture,
    qa_signatures,
    refined_qa,
    seeds,
    synthesis_plan,
    synthesized_qa,
)
from boostqa_assets.partitions import build_partitions
from boostqa_assets.resources import LLMResource, StoreResource, project_config

# Per-partition asset checks and backfill policies are marked preview/beta in Dagster 1.13; we rely on
# both on purpose (see CONVENTIONS.md), so their warnings would only bury the useful log lines.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

STAGES: tuple[str, ...] = (
    "seeds",
    "annotated_seeds",
    "deficiency_probe",
    "synthesis_plan",
    "synthesized_qa",
    "refined_qa",
    "qa_mixture",
)


# One module per asset under defs/; each build() returns its asset, checks, sensors and schedules.
MODULES = (
    seeds,
    annotated_seeds,
    deficiency_probe,
    synthesis_plan,
    synthesized_qa,
    refined_qa,
    qa_signatures,
    qa_mixture,
    automation,
    catalog,
)


def build_definitions() -> dg.Definitions:
    parts = build_partitions(project_config())
    built = [d for module in MODULES for d in module.build(parts)]
    return dg.Definitions(
        assets=[d for d in built if isinstance(d, dg.AssetsDefinition) and not isinstance(d, dg.AssetChecksDefinition)],
        asset_checks=[d for d in built if isinstance(d, dg.AssetChecksDefinition)],
        sensors=[d for d in built if isinstance(d, dg.SensorDefinition)],
        schedules=[d for d in built if isinstance(d, dg.ScheduleDefinition)],
        jobs=[
            *(d for d in built if isinstance(d, (dg.JobDefinition, UnresolvedAssetJobDefinition))),
            *jobs.stage_jobs(STAGES),  # one named job per stage: runs say what they did
        ],
        resources={"store": StoreResource(), "llm": LLMResource()},
    )


defs = build_definitions()
