"""What a reader knows of the stored entries, and bulk lookups through it.

- The tail (segments not compacted yet): the key column of each segment, in memory, merged into one sorted
  array (key -> segment, row) so a lookup is a binary search whatever the number of segments. The tail is
  small (compaction folds it into shards past ``compact_rows``), and any key may be in any segment.
- Shards (``shards/p=<prefix>/``): the per-row-group key ranges of the files in the prefixes a lookup touched,
  their parsed footers and recently read key chunks in byte-bounded LRUs. A key is looked for in the row group
  of each file of its prefix whose range holds it; then only the row groups with matches are read. The prefix
  comes from the folder name, so readers follow whatever prefix length compaction used (even a mix of two).
- On S3 the files of one lookup are read by ``REMOTE_READERS`` threads at once (``FileReader``: a small file in
  one GET, a big one by the byte ranges of the column chunks wanted, fetched together): waiting for them one
  after the other would cost more than the old one GET per entry.

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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from boostqa_assets.llm.cache.files import FileReader, Row, Storage, key_ranges, table_rows

logger = logging.getLogger(__name__)

_PREFIX_DIR = re.compile(r"p=[0-9a-f]{1,16}")
REMOTE_READERS = 16  # files read at once from a remote filesystem
FOOTER_CACHE_BYTES = 64 << 20  # parsed footers kept per reader
FOOTER_MEMORY_FACTOR = 13  # a parsed footer takes ~13x its size in the file (measured: 8.6 MB -> 111 MB)
RANGES_CACHE_BYTES = 64 << 20  # row-group key ranges kept per reader (24 bytes a row group)


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
    """Least recently used values up to ``limit`` bytes; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            item = self.items.get(key)
            if item is None:
                return None
            self.items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        with self.lock:
            old = self.items.pop(key, None)
            self.used += size - (old[1] if old else 0)
            self.items[key] = (value, size)
            while self.used > self.limit and len(self.items) > 1:
                _, (_, dropped) = self.items.popitem(last=False)
                self.used -= dropped

    def drop(self, pred: Callable[[Any], bool]) -> None:
        with self.lock:
            for key in [k for k in self.items if pred(k)]:
                self.used -= self.items.pop(key)[1]


class Index:
    """The tail's keys and the shards' footers, refreshed by listing. One lookup at a time (the caller locks)."""

    def __init__(self, storage: Storage, chunk_cache_bytes: int) -> None:
        self.storage = storage
        self.tail: dict[str, np.ndarray] = {}  # segment path -> its keys (sorted)
        self._merged: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None = None
        self.shards: dict[str, list[str]] = {}  # prefix -> shard paths
        self.sizes: dict[str, int] = {}  # path -> bytes, from the listing
        self.ranges = _Lru(RANGES_CACHE_BYTES)  # path -> its row groups' key mins, maxs and row offsets
        self.footers = _Lru(FOOTER_CACHE_BYTES)  # path -> parsed FileMetaData
        self.chunks = _Lru(chunk_cache_bytes)  # (path, row group) -> its keys
        self.listed_at = -math.inf  # never listed

    def tail_rows(self) -> int:
        return sum(len(k) for k in self.tail.values())

    def refresh(self) -> None:
        """List segments, then shards (in that order: see the module docstring); load new segments' keys."""
        segments = self.storage.listing(self.storage.segments)
        shard_sizes = self.storage.listing(self.storage.shards)
        new = [p for p in segments if p not in self.tail]
        tail = {p: self.tail[p] for p in segments if p in self.tail}
        if self.storage.is_local:  # only the key column; a segment gone since the listing was compacted
            for path in new:
                with contextlib.suppress(FileNotFoundError):
                    tail[path] = _keys(pq.ParquetFile(path))
        else:  # small objects, fetched whole and concurrently: one round trip each, not footer then column
            for path, data in self.storage.read_bytes(new).items():
                tail[path] = _keys(pq.ParquetFile(pa.BufferReader(data)))
        shards: dict[str, list[str]] = {}
        for p in shard_sizes:
            folder = posixpath.basename(posixpath.dirname(p))
            if _PREFIX_DIR.fullmatch(folder):
                shards.setdefault(folder.removeprefix("p="), []).append(p)
        self.sizes = {**segments, **shard_sizes}
        self.ranges.drop(lambda k: k not in self.sizes)
        self.footers.drop(lambda k: k not in self.sizes)
        self.chunks.drop(lambda k: k[0] not in self.sizes)
        if list(tail) != list(self.tail):
            self._merged = None
        self.tail, self.shards, self.listed_at = tail, shards, time.monotonic()

    def add_segment(self, path: str, keys: np.ndarray, size: int) -> None:
        """A segment this process just wrote: visible to its own lookups without listing again."""
        self.tail[path] = keys
        self.sizes[path] = size
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
        tasks: list[Callable[[], pa.Table | None]] = []
        tail_keys, segment, row, paths = self._merged_tail()
        lo = np.searchsorted(tail_keys, keys, side="left")
        hi = np.searchsorted(tail_keys, keys, side="right")
        counts = hi - lo  # a key may be in several segments (two writers stored the same request)
        at = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        for seg in np.unique(segment[at]).tolist():
            rows = np.sort(row[at][segment[at] == seg])
            tasks.append(lambda p=paths[seg], r=rows: self._read_rows(p, r, columns))
        for length in {len(p) for p in self.shards}:  # one length unless compaction's prefix_len changed
            prefixes = keys >> np.uint64(64 - 4 * length)
            starts = np.flatnonzero(np.r_[True, prefixes[1:] != prefixes[:-1]])
            for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(keys)], strict=True):
                for path in self.shards.get(f"{int(prefixes[start]):0{length}x}", ()):
                    tasks.append(lambda p=path, k=keys[start:end]: self._probe_shard(p, k, columns))
        found: dict[str, Row] = {}
        try:
            if self.storage.is_local or len(tasks) < 2:
                tables = [task() for task in tasks]
            else:
                with ThreadPoolExecutor(REMOTE_READERS, thread_name_prefix="cache-read") as pool:
                    tables = list(pool.map(lambda task: task(), tasks))
        except FileNotFoundError as exc:
            raise Stale(str(exc)) from exc
        for table in tables:
            if table is not None:
                _keep(table, wanted, found)
        return found

    def _open(self, path: str) -> tuple[FileReader, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A reader of the file (its footer parsed once per index) and its row groups' key ranges and offsets."""
        reader = FileReader(self.storage, path, self.sizes.get(path), self.footers.get(path))
        md = reader.metadata
        self.footers.put(path, md, FOOTER_MEMORY_FACTOR * md.serialized_size)
        ranges = self.ranges.get(path)
        if ranges is None:
            mins, maxs = key_ranges(md)
            ranges = (mins, maxs, np.cumsum([0, *(md.row_group(i).num_rows for i in range(md.num_row_groups))]))
            self.ranges.put(path, ranges, sum(a.nbytes for a in ranges))
        return reader, ranges

    def _read_rows(
        self,
        path: str,
        rows: np.ndarray,
        columns: list[str] | None,
        opened: tuple[FileReader, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    ) -> pa.Table:
        """The rows at ``rows`` (sorted file positions): only the row groups that hold them are read."""
        reader, (_, _, offsets) = opened or self._open(path)
        try:
            groups = np.searchsorted(offsets, rows, side="right") - 1
            read = np.unique(groups)
            table = reader.read(read.tolist(), columns)
        finally:
            if opened is None:
                reader.close()
        sizes = offsets[read + 1] - offsets[read]
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each read row group starts in ``table``
        return table.take(rows - offsets[groups] + base[np.searchsorted(read, groups)])

    def _probe_shard(self, path: str, keys: np.ndarray, columns: list[str] | None) -> pa.Table | None:
        """The rows of ``path`` whose key is one of ``keys`` (sorted), or None."""
        reader: FileReader | None = None
        try:
            ranges = self.ranges.get(path)
            if ranges is None:
                reader, ranges = self._open(path)
            mins, maxs, offsets = ranges
            # Row groups of one file hold disjoint, ascending key ranges: two binary searches per group.
            lo = np.searchsorted(keys, mins, side="left")
            hi = np.searchsorted(keys, maxs, side="right")
            groups = np.nonzero(hi > lo)[0].tolist()
            chunks = {g: self.chunks.get((path, g)) for g in groups}
            missing = [g for g, c in chunks.items() if c is None]
            if missing:  # one read for every key chunk not in memory
                if reader is None:
                    reader, _ = self._open(path)
                col = reader.read(missing, ["key"]).column("key").to_numpy()
                at = 0
                for g in missing:
                    n = int(offsets[g + 1] - offsets[g])
                    chunks[g] = col[at : at + n].copy()
                    self.chunks.put((path, g), chunks[g], chunks[g].nbytes)
                    at += n
            rows = [_matches(chunks[g], keys[lo[g] : hi[g]]) + offsets[g] for g in groups]  # type: ignore[arg-type]
            hits = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
            if not len(hits):
                return None
            if reader is None:
                reader, ranges = self._open(path)
            return self._read_rows(path, hits, columns, (reader, ranges))
        finally:
            if reader is not None:
                reader.close()


def _keys(pf: pq.ParquetFile) -> np.ndarray:
    """A file's key column (ParquetFile, not read_table: that loads pyarrow.dataset, ~80 MB, for nothing)."""
    try:
        return pf.read(columns=["key"], use_threads=False).column("key").to_numpy()
    finally:
        pf.close(force=True)


def _keep(table: pa.Table, wanted: dict[str, int], found: dict[str, Row]) -> None:
    """Add the rows whose full hash is wanted (a key match may be another hash), keeping the earliest."""
    for row in table_rows(table):
        h = row[1]
        if h in wanted and (h not in found or row[-1] < found[h][-1]):
            found[h] = row
