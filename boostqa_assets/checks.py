"""Data checks as pure functions: a frame in, an outcome with numbers out (no Dagster here).

Each returns ``CheckOutcome(passed, metadata)``; the Dagster asset checks in ``defs/`` call them per
partition and report the numbers, not just pass/fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl


@dataclass
class CheckOutcome:
    passed: bool
    metadata: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def all_of(*outcomes: CheckOutcome) -> CheckOutcome:
        meta: dict[str, Any] = {}
        for o in outcomes:
            meta.update(o.metadata)
        return CheckOutcome(all(o.passed for o in outcomes), meta)


def schema_matches(df: pl.DataFrame, schema: pl.Schema) -> CheckOutcome:
    expected = dict(schema)
    actual = dict(df.schema)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = sorted(c for c in set(expected) & set(actual) if expected[c] != actual[c])
    return CheckOutcome(
        not (missing or extra or wrong),
        {
            "columns": len(actual),
            "missing_columns": ", ".join(missing) or "-",
            "extra_columns": ", ".join(extra) or "-",
            "wrong_types": ", ".join(wrong) or "-",
        },
    )


def _null_counts(df: pl.DataFrame, columns: list[str], non_empty_strings: bool = True) -> dict[str, int]:
    bad: dict[str, int] = {}
    for c in columns:
        expr = pl.col(c).is_null()
        if non_empty_strings and df.schema[c] == pl.Utf8:
            expr = expr | (pl.col(c).str.strip_chars() == "")
        n = int(df.select(expr.sum()).item()) if df.height else 0
        if n:
            bad[c] = n
    return bad


def _nulls_outcome(rows: int, bad: dict[str, int]) -> CheckOutcome:
    return CheckOutcome(not bad, {"rows": rows, "null_or_empty": str(bad) if bad else "none"})


def no_nulls(df: pl.DataFrame, columns: list[str], non_empty_strings: bool = True) -> CheckOutcome:
    return _nulls_outcome(df.height, _null_counts(df, columns, non_empty_strings))


def _outside(df: pl.DataFrame, allowed: dict[str, list[str]]) -> dict[str, set[Any]]:
    return {
        c: set(df.filter(~pl.col(c).is_in(values))[c].unique().to_list()) if df.height else set()
        for c, values in allowed.items()
    }


def _values_outcome(outside: dict[str, set[Any]]) -> CheckOutcome:
    bad = {c: sorted(str(v) for v in values)[:10] for c, values in outside.items() if values}
    return CheckOutcome(not bad, {"values_outside_taxonomy": str(bad) if bad else "none"})


def values_in(df: pl.DataFrame, allowed: dict[str, list[str]]) -> CheckOutcome:
    return _values_outcome(_outside(df, allowed))


def unique(df: pl.DataFrame, column: str) -> CheckOutcome:
    dupes = df.height - df[column].n_unique() if df.height else 0
    return CheckOutcome(dupes == 0, {f"duplicate_{column}": dupes})


def non_empty(df: pl.DataFrame) -> CheckOutcome:
    return CheckOutcome(df.height > 0, {"rows": df.height})


def _other_rows(df: pl.DataFrame, column: str, value: str) -> int:
    return df.filter(pl.col(column) != value).height if df.height else 0


def column_equals(df: pl.DataFrame, column: str, value: str) -> CheckOutcome:
    bad = _other_rows(df, column, value)
    return CheckOutcome(bad == 0, {f"rows_with_other_{column}": bad})


def joins_back(df: pl.DataFrame, column: str, reference: pl.Series) -> CheckOutcome:
    """Every value of ``df[column]`` exists in ``reference`` (lineage: mixture rows join back to seeds)."""
    ref = set(reference.to_list())
    orphans = [v for v in df[column].unique().to_list() if v not in ref] if df.height else []
    return CheckOutcome(
        not orphans, {f"orphan_{column}s": len(orphans), "examples": ", ".join(map(str, orphans[:5])) or "-"}
    )


def table_checks(
    df: pl.DataFrame,
    schema: pl.Schema,
    *,
    not_null: list[str],
    unique_on: str | None = None,
    allowed: dict[str, list[str]] | None = None,
    equals: dict[str, str] | None = None,
    require_rows: bool = False,
) -> CheckOutcome:
    """The basic checks every asset gets; stops after a schema mismatch (the rest would be meaningless)."""
    outcome = schema_matches(df, schema)
    if not outcome.passed:
        return outcome
    parts = [outcome, no_nulls(df, not_null)]
    if require_rows:
        parts.append(non_empty(df))
    if unique_on:
        parts.append(unique(df, unique_on))
    if allowed:
        parts.append(values_in(df, allowed))
    for column, value in (equals or {}).items():
        parts.append(column_equals(df, column, value))
    return CheckOutcome.all_of(*parts)


class PartTableChecks:
    """``table_checks`` over a partition fed one part file at a time (``add``): the same rules and the same numbers,
    holding only a part and the ``unique_on`` column (a 10^6-row cell with its reasoning traces is gigabytes)."""

    def __init__(
        self,
        schema: pl.Schema,
        *,
        not_null: list[str],
        unique_on: str | None = None,
        allowed: dict[str, list[str]] | None = None,
        equals: dict[str, str] | None = None,
        require_rows: bool = False,
    ) -> None:
        self.rules: dict[str, Any] = {
            "not_null": not_null,
            "unique_on": unique_on,
            "allowed": allowed,
            "equals": equals,
            "require_rows": require_rows,
        }
        self.schema, self.not_null, self.unique_on = schema, not_null, unique_on
        self.allowed, self.equals, self.require_rows = allowed or {}, equals or {}, require_rows
        self.mismatch: CheckOutcome | None = None  # the first part whose schema is wrong: nothing else counts
        self.schema_meta: dict[str, Any] | None = None
        self.rows = 0
        self.nulls: dict[str, int] = {}
        self.outside: dict[str, set[Any]] = {c: set() for c in self.allowed}
        self.other = dict.fromkeys(self.equals, 0)
        self.keys: list[pl.Series] = []

    def add(self, df: pl.DataFrame) -> None:
        if self.mismatch is not None:
            return
        schema = schema_matches(df, self.schema)
        if not schema.passed:
            self.mismatch = schema
            return
        self.schema_meta = schema.metadata
        self.rows += df.height
        for c, n in _null_counts(df, self.not_null).items():
            self.nulls[c] = self.nulls.get(c, 0) + n
        for c, values in _outside(df, self.allowed).items():
            self.outside[c] |= values
        for c, value in self.equals.items():
            self.other[c] += _other_rows(df, c, value)
        if self.unique_on:
            self.keys.append(df[self.unique_on])

    def outcome(self) -> CheckOutcome:
        if self.mismatch is not None:
            return self.mismatch
        if self.schema_meta is None:  # no part file: what table_checks says of an empty read
            return table_checks(pl.DataFrame(), self.schema, **self.rules)
        nulls = {c: self.nulls[c] for c in self.not_null if c in self.nulls}
        parts = [CheckOutcome(True, self.schema_meta), _nulls_outcome(self.rows, nulls)]
        if self.require_rows:
            parts.append(CheckOutcome(self.rows > 0, {"rows": self.rows}))
        if self.unique_on:
            dupes = self.rows - pl.concat(self.keys).n_unique() if self.rows else 0
            parts.append(CheckOutcome(dupes == 0, {f"duplicate_{self.unique_on}": dupes}))
        if self.allowed:
            parts.append(_values_outcome(self.outside))
        for c, n in self.other.items():
            parts.append(CheckOutcome(n == 0, {f"rows_with_other_{c}": n}))
        return CheckOutcome.all_of(*parts)


# Reject reasons that mean "never answered": the request failed all its retries on the wire, the run stopped
# sending (the circuit breaker opened), or the endpoint kept answering 429 past rate_limit_max_wait_s. The
# partition is incomplete until it is materialized again (which pays only for these rows).
NOT_SENT_REASONS = ("endpoint_down", "rate_limited", "transport")


def read_stage_rejects(store: Any, stage: str, partition_key: str) -> pl.DataFrame:
    """The rejects a stage wrote for one partition (empty when it wrote none)."""
    return store.read_rejects(stage, partition_key)


def all_sent(rejects: pl.DataFrame) -> CheckOutcome:
    """Fails when the partition holds rows that were never answered because the run stopped sending: the
    replies that did come back are written and cached, so materializing the partition again pays only for
    the rest."""
    if rejects.is_empty() or "reason" not in rejects.columns:
        return CheckOutcome(True, {"rows_not_sent": 0})
    unsent = rejects.filter(pl.col("reason").is_in(NOT_SENT_REASONS))
    if unsent.is_empty():
        return CheckOutcome(True, {"rows_not_sent": 0})
    detail = str(unsent["detail"][0])[:300] if "detail" in unsent.columns else ""
    return CheckOutcome(
        False,
        {
            "rows_not_sent": unsent.height,
            "not_sent": f"{unsent.height} rows never answered ({', '.join(sorted(set(unsent['reason'])))}): "
            f"{detail}. Materialize this partition again: what was answered is cached, only the rest is paid for",
        },
    )
