"""Partition definitions, built from the configuration (sources, taxonomy, recipes).

- ``source_partitions``: dynamic (``sources``): one key per configured source, registered in the instance by
  ``register_sources`` (the runner before each stage, the ``new_source_files`` sensor on every tick), plus one
  key per file discovered under a watched prefix (added by that sensor) (``seeds``, ``annotated_seeds``).
- ``qa_partitions``: discipline x grade (``synthesized_qa``, ``refined_qa``); keys look like
  ``physics|high`` (Dagster orders dimensions by name: discipline, then grade).
- ``recipe_partitions``: one key per mixture recipe (``qa_mixture``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import dagster as dg

from boostqa_assets.configs import ProjectConfig

SOURCE_PARTITIONS = "sources"


@dataclass(frozen=True)
class Partitions:
    source_partitions: dg.DynamicPartitionsDefinition
    qa_partitions: dg.MultiPartitionsDefinition
    recipe_partitions: dg.StaticPartitionsDefinition


def build_partitions(project: ProjectConfig) -> Partitions:
    return Partitions(
        source_partitions=dg.DynamicPartitionsDefinition(name=SOURCE_PARTITIONS),
        qa_partitions=dg.MultiPartitionsDefinition(
            {
                "discipline": dg.StaticPartitionsDefinition(project.taxonomy.discipline_names),
                "grade": dg.StaticPartitionsDefinition(project.taxonomy.grades),
            }
        ),
        recipe_partitions=dg.StaticPartitionsDefinition([r.name for r in project.recipes.recipes]),
    )


def register_sources(instance: dg.DagsterInstance, project: ProjectConfig) -> list[str]:
    """Add the configured sources that the instance does not have yet as ``sources`` partitions (in config
    order); returns the names added. Partitions of removed sources and of discovered files are kept."""
    from sqlalchemy.exc import IntegrityError  # Dagster's SQL storages (SQLite, PostgreSQL) raise it

    names = project.sources.partition_keys()
    existing = instance.get_existing_dynamic_partitions(SOURCE_PARTITIONS, names)
    missing = [n for n in names if n not in existing]
    if missing:
        try:
            instance.add_dynamic_partitions(SOURCE_PARTITIONS, missing)
        except IntegrityError:  # another run added some between our check and the insert (two demos at once)
            existing = instance.get_existing_dynamic_partitions(SOURCE_PARTITIONS, missing)
            for name in missing:
                if name not in existing:
                    with contextlib.suppress(IntegrityError):
                        instance.add_dynamic_partitions(SOURCE_PARTITIONS, [name])
    return missing


def qa_key_parts(key: str | dg.MultiPartitionKey) -> tuple[str, str]:
    """``"physics|high"`` (or a MultiPartitionKey) -> ``("physics", "high")``."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims["discipline"], dims["grade"]
    discipline, grade = str(key).split("|")
    return discipline, grade


def qa_key(discipline: str, grade: str) -> str:
    return f"{discipline}|{grade}"


def contiguous_ranges(all_keys: list[str], selected: list[str]) -> list[tuple[str, str]]:
    """``selected`` as the fewest (start, end) runs of consecutive keys in ``all_keys``' order: the ranges that
    runs take (partition range tags) when only some partitions must run."""
    chosen = set(selected)
    ranges: list[tuple[str, str]] = []
    start = prev = None
    for k in all_keys:
        if k in chosen:
            if start is None:
                start = k
            prev = k
        elif start is not None:
            ranges.append((start, prev))  # type: ignore[arg-type]
            start = prev = None
    if start is not None:
        ranges.append((start, prev))  # type: ignore[arg-type]
    return ranges
