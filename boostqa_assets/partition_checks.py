"""A partition's check read one part file at a time: what grows with a partition is never all in memory.

A discipline x grade cell of a 10^8-row run holds ~10^6 rows, gigabytes with their reasoning traces; its check
read it whole. ``scan`` feeds each part to ``checks.PartTableChecks`` (the same rules and numbers as
``checks.table_checks``) and keeps, for the expectation suite, the rows ``expectations.spread_sample`` would take
of the whole partition and every row's text lengths (a few bytes a row). Memory holds a part, that sample, the
lengths and the ``unique_on`` column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import polars as pl
import pyarrow.parquet as pq

from boostqa_assets import checks, expectations
from boostqa_assets.configs import TaxonomyConfig
from boostqa_assets.storage import Store
from boostqa_assets.streaming import owned


@dataclass
class Scan:
    rules: checks.CheckOutcome
    suite: checks.CheckOutcome


def scan(
    store: Store,
    asset: str,
    partition: Mapping[str, str],
    rules: checks.PartTableChecks,
    taxonomy: TaxonomyConfig,
    each: Callable[[pl.DataFrame], None] | None = None,
) -> Scan:
    """The rules and the expectation suite over one committed partition, a part at a time; ``each`` sees every
    part whose schema is right (a rule of the caller's own). A partition never materialized raises as
    ``Store.read_partition`` does."""
    files = store.partition_files(asset, partition)
    if not files:  # nothing to stream: an empty partition, or a clear error for one never materialized
        parts: list[pl.DataFrame] | None = [store.read_partition(asset, partition)]
        total = parts[0].height  # type: ignore[index]
    else:
        parts, total = None, sum(_rows(store, path) for path in files)
    # Every k-th row of the whole partition, as spread_sample takes it: a part starting at row `offset` gives
    # its rows (offset + j) % k == 0.
    step = -(-total // expectations.GX_SAMPLE_ROWS) if total > expectations.GX_SAMPLE_ROWS else 1
    length_cols = expectations.length_columns(asset, taxonomy)
    samples, lengths, offset = [], [], 0
    shape = pl.DataFrame()  # the columns of an empty partition's sample
    for df in parts if parts is not None else (store.read_parquet(path) for path in files):
        rules.add(df)
        first = -offset % step
        offset += df.height
        if rules.mismatch is not None:  # a part of the wrong shape fails the rules; the suite sees the rest
            continue
        if each is not None:
            each(df)
        shape = df.head(0)
        if first < df.height:
            samples.append(owned(df.gather_every(step, offset=first)))
        lengths.append(expectations.text_lengths(df, length_cols))
    sample = pl.concat(samples, how="vertical_relaxed").head(expectations.GX_SAMPLE_ROWS) if samples else shape
    all_lengths = pl.concat(lengths, how="vertical_relaxed") if lengths else pl.DataFrame()
    suite = expectations.validate(asset, sample, taxonomy, rows=total, lengths=all_lengths)
    return Scan(rules.outcome(), suite)


def _rows(store: Store, path: str) -> int:
    """A part's row count from its Parquet footer (no data read)."""
    with store.fs.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows
