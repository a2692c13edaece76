"""Great Expectations 1.x suites, one per asset, evaluated on one partition's frame (no Dagster here).

``validate(asset, df, taxonomy)`` runs the asset's suite (schema, nulls, allowed values, ranges, uniqueness of
a column or of a column combination, length distributions) on an ephemeral GX context and returns a
``CheckOutcome`` with flat numbers: ``gx_<rule>_<column>_unexpected`` per row-level expectation
(``gx_unique_<a>_<b>_unexpected`` for a combination), ``gx_mean_<column>`` per distribution expectation,
``gx_evaluated_expectations`` / ``gx_failed_expectations`` / ``gx_success_percent``, and ``<column>_len_mean`` /
``_p50`` / ``_p95`` / ``_max`` for the text columns. The ``*_valid`` asset checks in
``defs/`` combine it with the rules of ``checks.py``.

GX is imported lazily (2-3 s) and its context built once per process; it validates pandas, so the polars
frame goes through ``to_pandas()`` (pyarrow): past ``GX_SAMPLE_ROWS`` rows it sees an even sample of the frame
(``gx_rows``), so its memory stays bounded as partitions grow. The per-row rules that matter for every row are
enforced elsewhere on all of them: nulls, uniqueness and label sets by ``checks.py``, lengths when the rows are
written (the synthesis validator, the refinement rules). Text lengths are derived columns ``<column>__len`` so their
mean is a plain column expectation.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

import polars as pl

from boostqa_assets.checks import CheckOutcome
from boostqa_assets.logic.synthesize import QUESTION_MAX_CHARS, QUESTION_MIN_CHARS
from boostqa_assets.records import (
    ANNOTATED_SCHEMA,
    MIXTURE_SCHEMA,
    PLAN_SCHEMA,
    PROBE_CELL_SCHEMA,
    REFINED_SCHEMA,
    SEED_SCHEMA,
    SYNTHESIZED_SCHEMA,
    Kind,
    PlanCell,
    ProbeStatus,
    Track,
)
from boostqa_assets.streaming import owned

if TYPE_CHECKING:
    from boostqa_assets.configs import TaxonomyConfig

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

# Per-value length bounds (characters) and bounds on the partition's mean length.
QUESTION_CHARS = (QUESTION_MIN_CHARS, QUESTION_MAX_CHARS)  # the synthesis validator enforces the same
ANSWER_CHARS = (1, 8000)
MIXTURE_TEXT_CHARS = (1, 16000)
QUESTION_MEAN_CHARS = (QUESTION_MIN_CHARS, 2000)
ANSWER_MEAN_CHARS = (2, 4000)

TRACKS = list(typing.get_args(Track))
KINDS = list(typing.get_args(Kind))
PROBE_STATUSES = list(typing.get_args(ProbeStatus))
PLAN_BASES = list(typing.get_args(PlanCell.model_fields["basis"].annotation))
PLAN_PROBE_STATUSES = [*PROBE_STATUSES, "not_probed"]  # a plan cell the probe table has no row for

SCHEMAS: dict[str, pl.Schema] = {
    "seeds": SEED_SCHEMA,
    "annotated_seeds": ANNOTATED_SCHEMA,
    "synthesized_qa": SYNTHESIZED_SCHEMA,
    "refined_qa": REFINED_SCHEMA,
    "qa_mixture": MIXTURE_SCHEMA,
    "deficiency_probe": PROBE_CELL_SCHEMA,
    "synthesis_plan": PLAN_SCHEMA,
}

# Short names for the metadata keys.
_SHORT = {
    "expect_column_values_to_not_be_null": "not_null",
    "expect_column_values_to_be_in_set": "in_set",
    "expect_column_values_to_be_unique": "unique",
    "expect_compound_columns_to_be_unique": "unique",
    "expect_column_values_to_be_between": "between",
    "expect_column_value_lengths_to_be_between": "length",
    "expect_column_mean_to_be_between": "mean",
    "expect_column_values_to_be_of_type": "type",
    "expect_table_columns_to_match_set": "columns",
}


@dataclass(frozen=True)
class Bounds:
    """A closed numeric range; ``strict_min`` opens it at the bottom. Nulls are not checked (``not_null`` is)."""

    min: float | None
    max: float | None
    strict_min: bool = False


UNIT = Bounds(0.0, 1.0)  # a fraction: accuracy, interval bounds


@dataclass(frozen=True)
class SuiteSpec:
    """What one asset's suite checks, in plain data (turned into GX expectations by ``_build_suite``)."""

    schema: pl.Schema
    unique: tuple[str, ...]
    not_null: tuple[str, ...]
    in_set: dict[str, list[str]]
    at_least: dict[str, int]  # numeric column -> minimum value
    lengths: dict[str, tuple[int, int]]  # text column -> per-value (min, max) characters
    mean_lengths: dict[str, tuple[int, int]]  # text column -> (min, max) of the partition's mean length
    length_stats: tuple[str, ...]  # text columns whose length distribution is reported
    # numeric column -> range (a column is in at_least or in between, not both: both report as `between`)
    between: dict[str, Bounds] = field(default_factory=dict)
    unique_together: tuple[tuple[str, ...], ...] = ()  # column combinations unique per row


def suite_spec(asset: str, taxonomy: TaxonomyConfig) -> SuiteSpec:
    """The expectations of ``asset``, from its record schema and the taxonomy."""
    labels = {
        "discipline": taxonomy.discipline_names,
        "category": taxonomy.categories,
        "grade": taxonomy.grades,
        "difficulty": taxonomy.difficulties,
    }
    qa_lengths = {"question": QUESTION_CHARS, "answer": ANSWER_CHARS}
    qa_means = {"question": QUESTION_MEAN_CHARS, "answer": ANSWER_MEAN_CHARS}
    synth_not_null = (
        "qa_id",
        "seed_id",
        "source",
        "discipline",
        "category",
        "grade",
        "difficulty",
        "seed_grade",
        "seed_difficulty",
        "track",
        "language",
        "question",
        "answer",
        "annotate_request_hash",
        "synth_request_hash",
    )
    synth_in_set = {
        **labels,
        "seed_grade": taxonomy.grades,
        "seed_difficulty": taxonomy.difficulties,
        "track": TRACKS,
    }
    if asset == "seeds":
        return SuiteSpec(
            SEED_SCHEMA,
            unique=("seed_id",),
            not_null=("seed_id", "source", "native_id", "kind", "language", "license", "meta"),
            in_set={"kind": KINDS},
            at_least={},
            lengths={},
            mean_lengths={},
            length_stats=("question", "answer", "text"),
        )
    if asset == "annotated_seeds":
        return SuiteSpec(
            ANNOTATED_SCHEMA,
            unique=("seed_id",),
            not_null=(
                "seed_id",
                "source",
                "kind",
                "language",
                "discipline",
                "category",
                "grade",
                "difficulty",
                "annotation_status",
                "annotate_request_hash",
            ),
            in_set={**labels, "kind": KINDS, "annotation_status": ["ok"]},
            at_least={},
            lengths={},
            mean_lengths={},
            length_stats=("question", "answer", "text"),
        )
    if asset == "synthesized_qa":
        return SuiteSpec(
            SYNTHESIZED_SCHEMA,
            unique=("qa_id",),
            not_null=synth_not_null,
            in_set=synth_in_set,
            at_least={},
            # Drafts: lengths are reported, not enforced; refinement's rule filters reject outliers row by row,
            # so one long draft cannot block a whole partition here.
            lengths={},
            mean_lengths={},
            length_stats=("question", "answer"),
        )
    if asset == "refined_qa":
        return SuiteSpec(
            REFINED_SCHEMA,
            unique=("qa_id",),
            not_null=(*synth_not_null, "refined_answer", "status", "refine_request_hash"),
            in_set={**synth_in_set, "status": ["kept"]},
            at_least={},
            lengths={**qa_lengths, "refined_answer": ANSWER_CHARS},
            mean_lengths={**qa_means, "refined_answer": ANSWER_MEAN_CHARS},
            length_stats=("question", "answer", "refined_answer"),
        )
    if asset == "qa_mixture":
        return SuiteSpec(
            MIXTURE_SCHEMA,
            unique=("doc_id", "qa_id"),
            not_null=(
                "doc_id",
                "recipe",
                "qa_id",
                "seed_id",
                "source",
                "discipline",
                "category",
                "grade",
                "track",
                "text",
                "n_tokens",
                "shard",
            ),
            in_set={k: labels[k] for k in ("discipline", "category", "grade")} | {"track": TRACKS},
            at_least={"n_tokens": 1, "shard": 0},
            lengths={"text": MIXTURE_TEXT_CHARS},
            mean_lengths={},
            length_stats=("text",),
        )
    if asset == "deficiency_probe":
        # One row per measured cell; numbers are null unless the cell is `ok` (the rules check which).
        return SuiteSpec(
            PROBE_CELL_SCHEMA,
            unique=(),
            not_null=("discipline", "grade", "n_candidates", "n_sampled", "n_graded", "n_correct", "status", "grading"),
            in_set={k: labels[k] for k in ("discipline", "grade")} | {"status": PROBE_STATUSES},
            at_least={"n_candidates": 0, "n_sampled": 0, "n_graded": 0, "n_correct": 0},
            lengths={},
            mean_lengths={},
            length_stats=(),
            between={"accuracy": UNIT, "ci_low": UNIT, "ci_high": UNIT},
            unique_together=(("discipline", "grade"),),
        )
    if asset == "synthesis_plan":
        # One row per cell (a partition holds one); need > 0 so a perfectly answered cell keeps a share.
        return SuiteSpec(
            PLAN_SCHEMA,
            unique=(),
            not_null=(
                "discipline",
                "grade",
                "category",
                "candidates",
                "capacity",
                "probe_n",
                "probe_status",
                "static_weight",
                "need",
                "weight",
                "basis",
                "recipe",
                "budget",
                "seed_ids",
                "fingerprint",
            ),
            in_set={k: labels[k] for k in ("discipline", "category", "grade")}
            | {"basis": PLAN_BASES, "probe_status": PLAN_PROBE_STATUSES},
            at_least={"budget": 0, "capacity": 0, "candidates": 0, "probe_n": 0},
            lengths={},
            mean_lengths={},
            length_stats=(),
            between={
                "accuracy": UNIT,
                "ci_low": UNIT,
                "ci_high": UNIT,
                "need": Bounds(0.0, 1.0, strict_min=True),
                "static_weight": Bounds(0.0, None),
                "weight": Bounds(0.0, None),
            },
            unique_together=(("discipline", "grade"),),
        )
    raise KeyError(f"no expectation suite for asset {asset!r}; known: {sorted(SCHEMAS)}")


_lock = threading.Lock()


@lru_cache(maxsize=1)
def _context() -> Any:
    """One ephemeral GX context per process, progress bars off, with a pandas data source."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.data_sources.add_pandas("boostqa")
    return context


@cache
def _batch_definition(asset: str) -> Any:
    source = _context().data_sources.get("boostqa")
    return source.add_dataframe_asset(asset).add_batch_definition_whole_dataframe("partition")


def _release_batches(batch: Any) -> None:
    """Drop the frames GX keeps after a validation. Its pandas engine holds the last batch of every data asset
    (the frame and its data) until the next batch of that asset: one sample per asset, up to ~100 MB over the six
    assets at 10k seeds, carried by a one-process run into every later stage (and by a code server for good)."""
    manager = batch.data.execution_engine.batch_manager
    manager.reset_batch_cache()
    manager.batch_data_cache.clear()


def _pandas_type(dtype: pl.DataType) -> str | None:
    """The pandas dtype name ``to_pandas()`` gives a column (pandas 3 + pyarrow); None: not checked."""
    if dtype == pl.Utf8:
        return "str"
    if dtype == pl.Int64:
        return "int64"
    if dtype == pl.Float64:
        return "float64"
    if dtype == pl.Boolean:
        return "bool"
    return None  # lists: object columns


@lru_cache(maxsize=64)
def _build_suite(asset: str, taxonomy_json: str) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    from boostqa_assets.configs import TaxonomyConfig

    spec = suite_spec(asset, TaxonomyConfig.model_validate_json(taxonomy_json))
    derived = [f"{c}__len" for c in spec.mean_lengths]
    exps: list[Any] = [gxe.ExpectTableColumnsToMatchSet(column_set=[*spec.schema, *derived], exact_match=True)]
    for column, dtype in spec.schema.items():
        pandas_type = _pandas_type(dtype)
        if pandas_type:
            exps.append(gxe.ExpectColumnValuesToBeOfType(column=column, type_=pandas_type))
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in spec.not_null]
    exps += [gxe.ExpectColumnValuesToBeUnique(column=c) for c in spec.unique]
    exps += [gxe.ExpectCompoundColumnsToBeUnique(column_list=list(cs)) for cs in spec.unique_together]
    exps += [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=list(v)) for c, v in spec.in_set.items()]
    exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=v) for c, v in spec.at_least.items()]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(column=c, min_value=b.min, max_value=b.max, strict_min=b.strict_min)
        for c, b in spec.between.items()
    ]
    exps += [
        gxe.ExpectColumnValueLengthsToBeBetween(column=c, min_value=lo, max_value=hi)
        for c, (lo, hi) in spec.lengths.items()
    ]
    exps += [
        gxe.ExpectColumnMeanToBeBetween(column=f"{c}__len", min_value=lo, max_value=hi)
        for c, (lo, hi) in spec.mean_lengths.items()
    ]
    return spec, gx.ExpectationSuite(name=f"{asset}_suite", expectations=exps)


def length_columns(asset: str, taxonomy: TaxonomyConfig) -> tuple[str, ...]:
    """The text columns whose length distribution ``asset``'s suite reports (``text_lengths`` of them)."""
    return _build_suite(asset, taxonomy.model_dump_json())[0].length_stats


def text_lengths(df: pl.DataFrame, columns: tuple[str, ...] | list[str]) -> pl.DataFrame:
    """The character length of each row's text in ``columns`` (those present as text): what ``length_stats`` reads,
    small enough to keep for every row of a partition read a part at a time."""
    present = [c for c in columns if c in df.columns and df.schema[c] == pl.Utf8]
    return df.select(pl.col(c).str.len_chars() for c in present)


def length_stats(df: pl.DataFrame, columns: tuple[str, ...] | list[str]) -> dict[str, float | int]:
    """Mean, median, p95 and max character length of each text column (nulls ignored)."""
    return lengths_summary(text_lengths(df, columns))


def lengths_summary(lengths: pl.DataFrame) -> dict[str, float | int]:
    """``length_stats`` from ``text_lengths``."""
    out: dict[str, float | int] = {}
    if not lengths.height or not lengths.width:
        return out
    row = lengths.select(
        expr
        for c in lengths.columns
        for expr in (
            pl.col(c).mean().alias(f"{c}_len_mean"),
            pl.col(c).median().alias(f"{c}_len_p50"),
            pl.col(c).quantile(0.95, "nearest").alias(f"{c}_len_p95"),
            pl.col(c).max().alias(f"{c}_len_max"),
        )
    ).row(0, named=True)
    for k, v in row.items():
        if v is not None:
            out[k] = round(float(v), 1) if k.endswith(("_mean", "_p50")) else int(v)
    return out


# GX validates pandas, which copies every string (a 200k-row synthesized sample with its reasoning took ~0.5 GB),
# so the suite sees at most GX_SAMPLE_ROWS rows, taken evenly over the frame (every k-th row). The exact rules of
# checks.py run over every row; the suite is the second opinion and its counts are the sample's (`gx_rows`).
GX_SAMPLE_ROWS = 20_000
# While a run's partitions are checked together (``deferred``), ``validate`` only collects each partition's share
# of that sample and the suite runs once over them: a suite run costs ~0.35 s whatever the row count, so one per
# partition per stage was most of a small run's time (110 partitions: ~40 s).


def spread_sample(df: pl.DataFrame, rows: int) -> pl.DataFrame:
    """At most ``rows`` rows of ``df``, every k-th one (a bad stretch anywhere in the frame shows up), in buffers of
    their own: callers keep samples past the frame they came from (a run's deferred suite, the mixture's check
    over its shards), and a ``gather_every`` view would keep each whole frame alive with them."""
    if df.height > rows:
        df = df.gather_every(-(-df.height // rows)).head(rows)
    return owned(df)


@dataclass
class _Deferred:
    asset: str
    taxonomy: TaxonomyConfig
    per_partition_rows: int
    frames: list[pl.DataFrame] = field(default_factory=list)


_deferred: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar("gx_deferred", default=None)


@contextlib.contextmanager
def deferred(asset: str, taxonomy: TaxonomyConfig, partitions: int) -> Iterator[_Deferred]:
    """Collect the frames ``validate`` sees instead of running the suite on each; run it once with ``run_deferred``.

    Within, ``validate`` returns a passing outcome (``gx: deferred``): the caller runs the suite over the collected
    frames afterwards and, if that fails, validates the partitions one by one to say which fail."""
    state = _Deferred(asset, taxonomy, max(1, GX_SAMPLE_ROWS // max(1, partitions)))
    token = _deferred.set(state)
    try:
        yield state
    finally:
        _deferred.reset(token)


def run_deferred(state: _Deferred) -> CheckOutcome:
    """The suite once over every collected frame (each partition's even sample, ``GX_SAMPLE_ROWS`` in all)."""
    frames = [f for f in state.frames if f.height]
    df = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
    outcome = validate(state.asset, df, state.taxonomy)
    outcome.metadata["gx_partitions"] = len(state.frames)
    return outcome


def validate(
    asset: str,
    df: pl.DataFrame,
    taxonomy: TaxonomyConfig,
    *,
    rows: int | None = None,
    lengths: pl.DataFrame | None = None,
) -> CheckOutcome:
    """Run ``asset``'s expectation suite on one partition's frame.

    An empty frame passes with ``rows: 0`` (whether a partition may be empty is the rules' call). With ``rows``
    and ``lengths``, ``df`` is already the partition's even sample, ``rows`` its row count and ``lengths`` its
    ``text_lengths`` (``partition_checks.py`` reads a partition a part file at a time).
    """
    height = df.height if rows is None else rows
    state = _deferred.get()
    if state is not None and state.asset == asset:
        state.frames.append(spread_sample(df, state.per_partition_rows))
        return CheckOutcome(True, {"rows": height, "gx": "run once for the whole run (see the run's check)"})
    spec, suite = _build_suite(asset, taxonomy.model_dump_json())
    meta: dict[str, Any] = {"rows": height}
    if df.is_empty():
        meta.update({"gx_evaluated_expectations": 0, "gx_failed_expectations": 0, "gx_failed": "-"})
        return CheckOutcome(True, meta)
    started = time.perf_counter()
    frame = spread_sample(df, GX_SAMPLE_ROWS)
    meta["gx_rows"] = frame.height
    if spec.mean_lengths:
        present = [c for c in spec.mean_lengths if c in df.columns and df.schema[c] == pl.Utf8]
        frame = frame.with_columns(pl.col(c).str.len_chars().cast(pl.Int64).alias(f"{c}__len") for c in present)
    pdf = frame.to_pandas()
    with _lock:
        batch = _batch_definition(asset).get_batch(batch_parameters={"dataframe": pdf})
        try:
            result = batch.validate(suite, result_format="SUMMARY")
        finally:
            _release_batches(batch)
    failed: list[str] = []
    for r in result.results:
        kind = r.expectation_config.type
        short = _SHORT.get(kind, kind.removeprefix("expect_"))
        kwargs = r.expectation_config.kwargs
        column = kwargs.get("column") or "_".join(kwargs.get("column_list") or ()) or None
        name = f"{short}_{column}" if column else short
        errored = bool(r.exception_info and r.exception_info.get("raised_exception"))
        if not r.success or errored:
            failed.append(name + (" (error)" if errored else ""))
        res = r.result or {}
        if short == "mean":
            observed = res.get("observed_value")
            if observed is not None:
                meta[f"gx_mean_{column.removesuffix('__len')}"] = round(float(observed), 1)
        elif "unexpected_count" in res:
            meta[f"gx_{name}_unexpected"] = int(res["unexpected_count"])
        elif not r.success and short not in ("type", "columns"):
            meta[f"gx_{name}_unexpected"] = -1  # the column is missing: the expectation could not run
    stats = result.statistics
    meta.update(
        {
            "gx_evaluated_expectations": int(stats["evaluated_expectations"]),
            "gx_failed_expectations": len(failed),
            "gx_success_percent": round(float(stats["success_percent"] or 0.0), 2),
            "gx_failed": ", ".join(failed) or "-",
            "gx_seconds": round(time.perf_counter() - started, 3),
        }
    )
    meta.update(length_stats(df, spec.length_stats) if lengths is None else lengths_summary(lengths))
    return CheckOutcome(bool(result.success) and not failed, meta)
