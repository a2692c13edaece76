"""BoostQA: a Dagster code location that turns seed corpora into a quality-gated QA dataset."""
