"""What a reader knows of the stored entries, and bulk lookups through it.

- The tail (segments not compacted yet): the key column of each segment, in memory, merged into one sorted
  array (key -> segment, row) so a lookup is a binary search whatever the number of segments. The tail is
  small (compaction folds it into shards past ``compact_rows``), and any key may be in any segment.
- Shards (``shards/p=<prefix>/``): only the footer's per-row-group key ranges of the files in the prefixes a
  lookup touched, plus recently read key chunks in a byte-bounded LRU. A key is looked for in the row group
  of each file of its prefix whose range holds it; then the matching rows are read. The prefix comes from the
  folder name, so readers follow whatever prefix length compaction used (even a mix of two).

Listings are taken segments first, then shards: a compactor writes its shards before it deletes the
segments, so an entry is always in one of the two listings. A file deleted after the listing (compacted
under us) raises ``Stale``; the caller lists again and retries.
"""

from __future__ import annotations

import contextlib
import logging
import math
import posixpath
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from boostqa_assets.llm.cache.files import Row, Storage, key_ranges, table_rows

logger = logging.getLogger(__name__)

_PREFIX_DIR = re.compile(r"p=[0-9a-f]{1,16}")
OPEN_FILES = 64  # open Parquet files kept per reader (their parsed footers)


class Stale(Exception):
    """A listed file is gone: it was compacted after the listing."""


def _matches(file_keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row positions in ``file_keys`` whose key is in ``wanted`` (sorted): a binary search per file key."""
    if not len(file_keys) or not len(wanted):
        return np.empty(0, dtype=np.int64)
    pos = np.searchsorted(wanted, file_keys)
    pos[pos == len(wanted)] = len(wanted) - 1
    return np.nonzero(wanted[pos] == file_keys)[0]


class _Lru:
    """Least recently used values up to ``limit`` (in ``size`` units: bytes, or 1 per value); evicted values
    go to ``on_evict``."""

    def __init__(self, limit: int, on_evict: Callable[[Any], None] | None = None) -> None:
        self.limit, self.used, self.on_evict = limit, 0, on_evict
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get(self, key: Any) -> Any:
        item = self.items.get(key)
        if item is None:
            return None
        self.items.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any, size: int = 1) -> None:
        self.pop(key)
        self.items[key] = (value, size)
        self.used += size
        while self.used > self.limit and len(self.items) > 1:
            self.pop(next(iter(self.items)))

    def pop(self, key: Any) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            self.used -= item[1]
            if self.on_evict is not None:
                self.on_evict(item[0])

    def drop(self, pred: Callable[[Any], bool]) -> None:
        for key in [k for k in self.items if pred(k)]:
            self.pop(key)


class Index:
    """The tail's keys and the shards' footers, refreshed by listing."""

    def __init__(self, storage: Storage, chunk_cache_bytes: int) -> None:
        self.storage = storage
        self.tail: dict[str, np.ndarray] = {}  # segment path -> its keys (sorted)
        self._merged: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None = None
        self.shards: dict[str, list[str]] = {}  # prefix -> shard paths
        self.footers: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # path -> mins, maxs, row offsets
        self.chunks = _Lru(chunk_cache_bytes)  # (path, row group) -> its keys
        self.files = _Lru(OPEN_FILES, on_evict=lambda pf: pf.close(force=True))  # path -> open ParquetFile
        self.listed_at = -math.inf  # never listed

    def tail_rows(self) -> int:
        return sum(len(k) for k in self.tail.values())

    def refresh(self) -> None:
        """List segments, then shards (in that order: see the module docstring); load new segments' keys."""
        segments = self.storage.list_parquet(self.storage.segments)
        shard_paths = self.storage.list_parquet(self.storage.shards)
        new = [p for p in segments if p not in self.tail]
        tail = {p: self.tail[p] for p in segments if p in self.tail}
        if self.storage.is_local:  # only the key column: a segment gone since the listing was compacted
            for path in new:
                with contextlib.suppress(FileNotFoundError):
                    tail[path] = pq.read_table(path, columns=["key"]).column("key").to_numpy()
        else:  # whole small objects, fetched concurrently: one round trip each instead of footer + column
            for path, data in self.storage.read_bytes(new).items():
                tail[path] = pq.read_table(pa.BufferReader(data), columns=["key"]).column("key").to_numpy()
        shards: dict[str, list[str]] = {}
        for p in shard_paths:
            folder = posixpath.basename(posixpath.dirname(p))
            if _PREFIX_DIR.fullmatch(folder):
                shards.setdefault(folder.removeprefix("p="), []).append(p)
        listed = set(segments) | set(shard_paths)
        for p in set(self.footers) - listed:
            del self.footers[p]
        self.chunks.drop(lambda k: k[0] not in listed)
        self.files.drop(lambda k: k not in listed)
        if list(tail) != list(self.tail):
            self._merged = None
        self.tail, self.shards, self.listed_at = tail, shards, time.monotonic()

    def add_segment(self, path: str, keys: np.ndarray) -> None:
        """A segment this process just wrote: visible to its own lookups without listing again."""
        self.tail[path] = keys
        self._merged = None

    def _merged_tail(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Every tail key, sorted, with its segment (an index into the returned paths) and row."""
        if self._merged is None:
            paths = list(self.tail)
            keys = np.concatenate([self.tail[p] for p in paths]) if paths else np.empty(0, np.uint64)
            segment = np.repeat(np.arange(len(paths)), [len(self.tail[p]) for p in paths])
            row = np.concatenate([np.arange(len(self.tail[p])) for p in paths]) if paths else np.empty(0, np.int64)
            order = np.argsort(keys, kind="stable")
            self._merged = (keys[order], segment[order], row[order], paths)
        return self._merged

    # --- lookups -------------------------------------------------------------------------------------------

    def lookup(self, wanted: dict[str, int], columns: list[str] | None = None) -> dict[str, Row]:
        """Rows of the wanted hashes (hash -> key) found in the tail and shards; the earliest row per hash.

        ``columns``: the columns to read (default all). Raises ``Stale`` when a listed file is gone."""
        if not wanted:
            return {}
        keys = np.unique(np.fromiter(wanted.values(), dtype=np.uint64, count=len(wanted)))
        found: dict[str, Row] = {}
        tail_keys, segment, row, paths = self._merged_tail()
        lo = np.searchsorted(tail_keys, keys, side="left")
        hi = np.searchsorted(tail_keys, keys, side="right")
        counts = hi - lo  # a key may be in several segments (two writers stored the same request)
        at = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        for seg in np.unique(segment[at]).tolist():
            rows = np.sort(row[at][segment[at] == seg])
            try:
                _keep(self._read_rows(paths[seg], rows, columns), wanted, found)
            except FileNotFoundError as exc:
                raise Stale(paths[seg]) from exc
        for length in {len(p) for p in self.shards}:  # one length unless compaction's prefix_len changed
            prefixes = keys >> np.uint64(64 - 4 * length)
            starts = np.flatnonzero(np.r_[True, prefixes[1:] != prefixes[:-1]])
            for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(keys)], strict=True):
                for path in self.shards.get(f"{int(prefixes[start]):0{length}x}", ()):
                    self._lookup_shard(path, keys[start:end], wanted, found, columns)
        return found

    def _file(self, path: str) -> pq.ParquetFile:
        """An open file (kept: its footer is parsed once) and its row-group key ranges and row offsets."""
        pf = self.files.get(path)
        if pf is None:
            pf = self.storage.open_parquet(path)
            self.files.put(path, pf)
        if path not in self.footers:
            mins, maxs = key_ranges(pf.metadata)
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            self.footers[path] = (mins, maxs, np.cumsum([0, *sizes]))
        return pf

    def _read_rows(self, path: str, rows: np.ndarray, columns: list[str] | None) -> pa.Table:
        """The rows at ``rows`` (sorted file positions): only the row groups that hold them are read."""
        pf = self._file(path)
        offsets = self.footers[path][2]
        groups = np.searchsorted(offsets, rows, side="right") - 1
        read = np.unique(groups)
        # Small reads: threads would cost more than they give.
        table = pf.read_row_groups(read.tolist(), columns=columns, use_threads=False)
        sizes = offsets[read + 1] - offsets[read]
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each read row group starts in ``table``
        return table.take(rows - offsets[groups] + base[np.searchsorted(read, groups)])

    def _lookup_shard(
        self, path: str, keys: np.ndarray, wanted: dict[str, int], found: dict[str, Row], columns: list[str] | None
    ) -> None:
        try:
            footer = self.footers.get(path)
            if footer is None:
                self._file(path)
                footer = self.footers[path]
            mins, maxs, offsets = footer
            # Row groups of one file hold disjoint, ascending key ranges: two binary searches per group.
            lo = np.searchsorted(keys, mins, side="left")
            hi = np.searchsorted(keys, maxs, side="right")
            groups = np.nonzero(hi > lo)[0].tolist()
            chunks = {g: self.chunks.get((path, g)) for g in groups}
            missing = [g for g, c in chunks.items() if c is None]
            if missing:  # one read for every key chunk not in memory
                col = self._file(path).read_row_groups(missing, columns=["key"], use_threads=False)
                keys_read = col.column("key").to_numpy()
                at = 0
                for g in missing:
                    n = int(offsets[g + 1] - offsets[g])
                    chunks[g] = keys_read[at : at + n].copy()
                    self.chunks.put((path, g), chunks[g], chunks[g].nbytes)
                    at += n
            rows = [_matches(chunks[g], keys[lo[g] : hi[g]]) + offsets[g] for g in groups]
            hits = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
            if len(hits):
                _keep(self._read_rows(path, hits, columns), wanted, found)
        except FileNotFoundError as exc:
            raise Stale(path) from exc


def _keep(table: pa.Table, wanted: dict[str, int], found: dict[str, Row]) -> None:
    """Add the rows whose full hash is wanted (a key match may be another hash), keeping the earliest."""
    for row in table_rows(table):
        h = row[1]
        if h in wanted and (h not in found or row[-1] < found[h][-1]):
            found[h] = row
