"""The pure-polars rules of ``refined_qa_valid`` for one partition (no Great Expectations): what the mixture
runs for a refined partition whose latest check evaluation in the Dagster instance is missing or older than its
data. The check itself (``defs/refined_qa.py``) runs these same rules plus its expectation suite."""

from __future__ import annotations

import polars as pl

from boostqa_assets import checks
from boostqa_assets.records import REFINED_SCHEMA


def refined_rules(
    df: pl.DataFrame, rejects: pl.DataFrame, discipline: str, grade: str, reject_flags: list[str]
) -> checks.CheckOutcome:
    """Schema, unique ``qa_id``, the partition's discipline and grade, no null or empty key columns, ``status =
    kept``, no kept row with a flag that must reject, and no row left unsent (``checks.all_sent``)."""
    outcome = checks.table_checks(
        df,
        REFINED_SCHEMA,
        unique_on="qa_id",
        equals={"discipline": discipline, "grade": grade},
        not_null=["qa_id", "seed_id", "question", "refined_answer", "refine_request_hash"],
        allowed={"status": ["kept"]},
    )
    if outcome.passed and df.height:
        flagged = df.filter(pl.col("flags").list.eval(pl.element().is_in(reject_flags)).list.any()).height
        outcome.metadata["kept_rows_with_reject_flags"] = flagged
        outcome.passed = flagged == 0
    return checks.CheckOutcome.all_of(outcome, checks.all_sent(rejects))
