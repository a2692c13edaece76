"""Partition definitions, built from the configuration (sources, taxonomy, recipes).

- ``source_partitions``: one key per configured source (``seeds``, ``annotated_seeds``).
- ``qa_partitions``: discipline x grade (``synthesized_qa``, ``refined_qa``); keys look like
  ``physics|high`` (Dagster orders dimensions by name: discipline, then grade).
- ``recipe_partitions``: one key per mixture recipe (``qa_mixture``).
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from boostqa_assets.configs import ProjectConfig


@dataclass(frozen=True)
class Partitions:
    source_partitions: dg.StaticPartitionsDefinition
    qa_partitions: dg.MultiPartitionsDefinition
    recipe_partitions: dg.StaticPartitionsDefinition


def build_partitions(project: ProjectConfig) -> Partitions:
    return Partitions(
        source_partitions=dg.StaticPartitionsDefinition([s.name for s in project.sources.sources]),
        qa_partitions=dg.MultiPartitionsDefinition(
            {
                "discipline": dg.StaticPartitionsDefinition(project.taxonomy.discipline_names),
                "grade": dg.StaticPartitionsDefinition(project.taxonomy.grades),
            }
        ),
        recipe_partitions=dg.StaticPartitionsDefinition([r.name for r in project.recipes.recipes]),
    )


def qa_key_parts(key: str | dg.MultiPartitionKey) -> tuple[str, str]:
    """``"physics|high"`` (or a MultiPartitionKey) -> ``("physics", "high")``."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims["discipline"], dims["grade"]
    discipline, grade = str(key).split("|")
    return discipline, grade


def qa_key(discipline: str, grade: str) -> str:
    return f"{discipline}|{grade}"
