"""BoostQA: a Dagster code location that turns seed corpora into a quality-gated QA dataset."""

from boostqa_assets.memory import limit_malloc_arenas, prefer_releasing_allocators

prefer_releasing_allocators()  # before pyarrow and polars are imported: see memory.py
limit_malloc_arenas()  # before the package starts threads: see memory.py
