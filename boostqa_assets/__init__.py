"""BoostQA: a Dagster code location that turns seed corpora into a quality-gated QA dataset."""

from boostqa_assets.memory import limit_malloc_arenas

limit_malloc_arenas()  # before the package starts threads: see memory.py
