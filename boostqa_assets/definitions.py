"""Assembles the code location: assets, checks, resources. Nothing else lives here."""

from __future__ import annotations

import warnings

import dagster as dg

from boostqa_assets.defs import annotated_seeds, qa_mixture, refined_qa, seeds, synthesized_qa
from boostqa_assets.partitions import build_partitions
from boostqa_assets.resources import LLMResource, StoreResource, project_config

# Per-partition asset checks and backfill policies are marked preview/beta in Dagster 1.13; we rely on
# both on purpose (see CONVENTIONS.md), so their warnings would only bury the useful log lines.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

STAGES: tuple[str, ...] = ("seeds", "annotated_seeds", "synthesized_qa", "refined_qa", "qa_mixture")


def build_definitions() -> dg.Definitions:
    parts = build_partitions(project_config())
    built = [
        d for module in (seeds, annotated_seeds, synthesized_qa, refined_qa, qa_mixture) for d in module.build(parts)
    ]
    return dg.Definitions(
        assets=[d for d in built if not isinstance(d, dg.AssetChecksDefinition)],
        asset_checks=[d for d in built if isinstance(d, dg.AssetChecksDefinition)],
        resources={"store": StoreResource(), "llm": LLMResource()},
    )


defs = build_definitions()
