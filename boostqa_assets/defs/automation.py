"""The declarative-automation sensor: evaluates every asset's automation condition (eager on annotated_seeds,
synthesized_qa, refined_qa and qa_mixture) so changes flow downstream without a click."""

import dagster as dg

from boostqa_assets.partitions import Partitions
from boostqa_assets.resources import project_config


def build(parts: Partitions) -> list[dg.SensorDefinition]:
    enabled = project_config().pipeline.orchestration.automation
    return [
        dg.AutomationConditionSensorDefinition(
            "boostqa_automation",
            target=dg.AssetSelection.all(),
            default_status=dg.DefaultSensorStatus.RUNNING if enabled else dg.DefaultSensorStatus.STOPPED,
            minimum_interval_seconds=30,
            description=(
                "Eager automation: a refreshed seeds partition is re-annotated; synthesis_plan cells changed by the "
                "plan sensor are re-synthesized and refined; the mixture is rebuilt. Only partitions whose inputs "
                "changed are requested. On by default (`pipeline.yaml` orchestration.automation)."
            ),
        )
    ]
