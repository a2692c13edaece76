"""Compaction: the tail's small segments into hash-prefix shards, then shards of a prefix merged by tier.

Why tiers: a shard is never rewritten in place (S3 has no append), so a prefix collects one ``t0`` file per
tail compaction. ``fanout`` runs of tier k are merged into one run of tier k+1, which bounds the runs a lookup
probes per prefix to about ``fanout - 1`` per tier (a logarithmic number of tiers) and writes each entry
about once per tier. A run past ``max_file_rows`` is cut into files of disjoint key ranges.

Safe with two compactors at once: each writes its outputs (new names) before it deletes its inputs, and
deletes ignore files already gone. Two compactors that pick the same inputs both write the same entries:
duplicates of a content-addressed entry, which every reader and the next merge collapse to one (the
earliest). A compactor whose input vanished (another merged it first) drops that merge; nothing is lost,
because the other one published its output before deleting.

Memory is bounded by ranges: inputs are sorted by key and carry row-group key statistics, so each step reads
only the row groups of one key range from every input (1/16 of the keyspace for the tail, about
``chunk_rows`` rows for a merge) and a merge streams its output row group by row group.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from boostqa_assets.llm.cache.files import (
    KEY_MAX,
    SCHEMA,
    WRITE_OPTIONS,
    RangeSource,
    Storage,
    parquet_bytes,
    shard_run,
    sort_dedup,
    stamp,
)

logger = logging.getLogger(__name__)


@dataclass
class CompactionReport:
    """What one ``compact()`` did (for logs and the benchmark)."""

    segments_in: int = 0
    rows_in: int = 0
    shards_written: int = 0
    merges: int = 0
    skipped: str = ""
    touched: set[str] = field(default_factory=set)


def compact_tail(
    storage: Storage, segments: list[str], prefix_len: int, row_group_rows: int, name: Callable[[], str]
) -> CompactionReport:
    """Fold ``segments`` into one ``t0`` shard per hash prefix present, then delete them."""
    report = CompactionReport()
    files_in: dict[str, pq.ParquetFile] = {}
    if storage.is_local:  # read in place, by range (the page cache holds them, not this process)
        for path in segments:
            with contextlib.suppress(FileNotFoundError):
                files_in[path] = storage.open_parquet(path)
    else:  # small objects: fetched whole and concurrently (memory: their compressed size)
        files_in = {p: pq.ParquetFile(pa.BufferReader(b)) for p, b in storage.read_bytes(segments).items()}
    if len(files_in) < len(segments):
        logger.info("cache compaction: %d segment(s) already taken by another compactor", len(segments) - len(files_in))
    try:
        _fold(storage, list(files_in.values()), prefix_len, row_group_rows, name, report)
    finally:
        for pf in files_in.values():
            pf.close(force=True)
    storage.remove(list(files_in))  # only after every shard holding their entries is published
    report.segments_in = len(files_in)
    return report


def _fold(
    storage: Storage,
    files_in: list[pq.ParquetFile],
    prefix_len: int,
    row_group_rows: int,
    name: Callable[[], str],
    report: CompactionReport,
) -> None:
    sources = [RangeSource(pf) for pf in files_in]
    shift = 64 - 4 * prefix_len
    for first in range(16):  # one sixteenth of the keyspace in memory at a time
        lo, hi = first << 60, ((first + 1) << 60) - 1
        parts = [t for t in (s.read(lo, hi) for s in sources) if t is not None]
        if not parts:
            continue
        table = sort_dedup(pa.concat_tables(parts))
        report.rows_in += table.num_rows
        prefixes = (table.column("key").to_numpy() >> np.uint64(shift)).astype(np.int64)
        starts = [*np.searchsorted(prefixes, np.unique(prefixes)).tolist(), table.num_rows]
        files = {}
        for a, b in itertools.pairwise(starts):
            prefix = f"{int(prefixes[a]):0{prefix_len}x}"
            report.touched.add(prefix)
            files[f"{storage.shards}/p={prefix}/t0-{name()}-000.parquet"] = parquet_bytes(
                table.slice(a, b - a), row_group_rows
            )
        storage.write_many(files)
        report.shards_written += len(files)
        del parts, table, files
        pa.default_memory_pool().release_unused()  # else the allocator keeps each range's peak


def merge_tiers(
    storage: Storage,
    prefixes: set[str] | None,
    fanout: int,
    row_group_rows: int,
    chunk_rows: int,
    max_file_rows: int,
    name: Callable[[], str],
) -> int:
    """Merge every ``fanout`` runs of one prefix and tier into one run of the next tier; returns merges.

    A run is what one compaction wrote: one file, or several with disjoint key ranges once it passes
    ``max_file_rows`` (which keeps footers, read whole on open, small)."""
    by_prefix: dict[str, dict[int, dict[str, list[str]]]] = {}
    for path in storage.list_parquet(storage.shards):
        prefix = posixpath.basename(posixpath.dirname(path)).removeprefix("p=")
        if prefixes is None or prefix in prefixes:
            tier, run = shard_run(path)
            by_prefix.setdefault(prefix, {}).setdefault(tier, {}).setdefault(run, []).append(path)
    merges = 0
    for prefix, tiers in sorted(by_prefix.items()):
        tier = 0
        while tier <= max(tiers):
            runs = sorted(tiers.get(tier, {}).items())  # run names start with their time: oldest first
            while len(runs) >= fanout:
                batch, runs = runs[:fanout], runs[fanout:]
                inputs = [p for _, paths in batch for p in paths]
                out = f"{storage.shards}/p={prefix}/t{tier + 1}-{name()}"
                written = merge_files(storage, inputs, out, row_group_rows, chunk_rows, max_file_rows)
                if written:
                    storage.remove(inputs)
                    tiers.setdefault(tier + 1, {})[posixpath.basename(out)] = written
                    merges += 1
            tier += 1
    return merges


def merge_files(
    storage: Storage, inputs: list[str], out: str, row_group_rows: int, chunk_rows: int, max_file_rows: int
) -> list[str]:
    """Merge sorted shard files into ``<out>-<part>.parquet`` by key range, one range in memory at a time.

    Returns the files written, or [] when an input is gone (another compactor merged it); parts published
    before that only duplicate entries that are still stored."""
    pfs: list[pq.ParquetFile] = []
    written: list[str] = []
    tmp = ""
    writer: pq.ParquetWriter | None = None
    try:
        for path in inputs:
            pfs.append(storage.open_parquet(path))
        sources = [RangeSource(pf) for pf in pfs]
        # Ranges of about chunk_rows rows, from the footers alone: row groups ordered by their first key.
        groups = sorted(
            (int(lo), pf.metadata.row_group(i).num_rows)
            for s, pf in zip(sources, pfs, strict=True)
            for i, lo in enumerate(s.mins)
        )
        starts, held = [], chunk_rows
        for lo, rows in groups:
            if held >= chunk_rows and (not starts or lo > starts[-1]):
                starts.append(lo)
                held = 0
            held += rows
        rows_in_part = 0
        for i, lo in enumerate(starts):
            hi = starts[i + 1] - 1 if i + 1 < len(starts) else KEY_MAX
            parts = [t for t in (s.read(lo, hi) for s in sources) if t is not None]
            if not parts:
                continue
            if writer is None:
                path = f"{out}-{len(written):03d}.parquet"
                tmp = storage.temp_for(path)
                writer = pq.ParquetWriter(tmp, SCHEMA, **WRITE_OPTIONS)
            table = sort_dedup(pa.concat_tables(parts))
            writer.write_table(table, row_group_size=row_group_rows)
            rows_in_part += table.num_rows
            del parts, table
            pa.default_memory_pool().release_unused()
            if rows_in_part >= max_file_rows or i + 1 == len(starts):
                writer.close()
                writer = None
                storage.publish(tmp, path)
                tmp, rows_in_part = "", 0
                written.append(path)
        if writer is not None:  # the last ranges were empty
            writer.close()
            writer = None
            storage.publish(tmp, path)
            tmp = ""
            written.append(path)
        return written
    except FileNotFoundError as exc:
        logger.info("cache compaction: %s is gone (merged by another compactor); skipping this merge", exc)
        return []
    finally:
        if writer is not None:
            writer.close()
        for pf in pfs:
            pf.close(force=True)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def default_namer(writer_id: str) -> Callable[[], str]:
    """Unique, time-ordered names for this process's output files."""
    seq = iter(range(1, 1 << 62))
    return lambda: f"{stamp()}-{writer_id}-{next(seq):06d}"
