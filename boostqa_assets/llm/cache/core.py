"""``ResponseCache``: buffered writes into segments, bulk and single lookups, compaction (see ``__init__``)."""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import fsspec
import pyarrow as pa

from boostqa_assets.llm.cache.compaction import CompactionReport, compact_tail, default_namer, merge_tiers
from boostqa_assets.llm.cache.files import (
    REPLY_COLUMNS,
    REPLY_FIELDS,
    Row,
    Storage,
    entry_row,
    hash_key,
    new_writer_id,
    parquet_bytes,
    row_entry,
    rows_table,
    sort_dedup,
)
from boostqa_assets.llm.cache.index import Index, Stale

logger = logging.getLogger(__name__)

COMPACT_CHECK_S = 60.0  # a writer tries compaction at most this often
SEGMENT_ROW_GROUP_ROWS = 64  # a lookup reads one row group per hit; compaction reads by key range
_LOOKUP_ATTEMPTS = 5  # listings retried when files are compacted under a lookup


class ResponseCache:
    """Get/put replies by request hash.

    ``put`` buffers; a background thread writes the buffer as one segment when it holds ``flush_entries``
    replies or its oldest is ``flush_interval_s`` old, and ``flush``/``close`` (and interpreter exit) write
    the rest. ``get_many`` looks up in bulk; ``prefetch`` keeps a bulk lookup's answers in memory so the
    ``get`` of each request that follows costs nothing. ``close`` keeps the object usable.
    """

    def __init__(
        self,
        root: str,
        fs: fsspec.AbstractFileSystem | None = None,
        *,
        flush_entries: int = 1000,
        flush_interval_s: float = 5.0,
        auto_compact: bool = True,
        compact_rows: int = 128_000,
        compact_max_rows: int = 128_000,
        max_tail_segments: int = 512,
        fanout: int = 8,
        prefix_len: int = 2,
        shard_row_group_rows: int = 128,
        merge_chunk_rows: int = 32_768,
        max_file_rows: int = 131_072,
        key_cache_bytes: int = 64 << 20,
        refresh_s: float = 30.0,
    ) -> None:
        self.root = root.rstrip("/")
        self.storage = Storage.of(root, fs)
        self.fs = self.storage.fs
        self.is_local = self.storage.is_local
        self.flush_entries, self.flush_interval_s = flush_entries, flush_interval_s
        self.auto_compact, self.compact_rows, self.compact_max_rows = auto_compact, compact_rows, compact_max_rows
        self.max_tail_segments, self.fanout, self.prefix_len = max_tail_segments, fanout, prefix_len
        # Small row groups: a lookup decodes one row group per hit (128 rows: ~0.35 ms here, 256: ~0.6 ms; 64 was
        # no faster end to end); footers grow with their count (~7 bytes a row at 128), so files stop at
        # max_file_rows.
        self.shard_row_group_rows, self.merge_chunk_rows = shard_row_group_rows, merge_chunk_rows
        self.max_file_rows = max_file_rows
        self.refresh_s = refresh_s
        self.writer_id = new_writer_id()
        self._name = default_namer(self.writer_id)
        self._index = Index(self.storage, key_cache_bytes)
        self._has_legacy: bool | None = None  # decided once, on the first miss
        self._prefetched: dict[str, dict[str, Any]] = {}
        self._known_missing: set[str] = set()
        self.segments_written = 0
        self._reset_writer()

    def _reset_writer(self) -> None:
        self._pid = os.getpid()  # a forked child starts its own flusher (threads do not survive fork)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._index_lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._buffer: dict[str, Row] = {}
        self._flushing: dict[str, Row] = {}  # being written: still visible to get()
        self._first_at = 0.0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._compact_checked = -math.inf
        self._compactor: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ResponseCache(root={self.root!r}, writer={self.writer_id})"

    # --- reads ---------------------------------------------------------------------------------------------

    def get(self, rhash: str) -> dict[str, Any] | None:
        """One entry: this writer's unflushed replies, then a ``prefetch`` (whose entries hold ``REPLY_FIELDS``
        only), then storage (legacy files last)."""
        with self._lock:
            row = self._buffer.get(rhash) or self._flushing.get(rhash)
            if row is None:
                hit = self._prefetched.pop(rhash, None)  # handed out once: the caller keeps the reply
                if hit is not None or rhash in self._known_missing:
                    return hit
        if row is not None:
            return row_entry(row)
        return self._load([rhash], refresh=False).get(rhash)

    def get_many(self, hashes: Iterable[str], reply_only: bool = False) -> dict[str, dict[str, Any]]:
        """Entries of the hashes found (hash -> entry), from a fresh listing; misses are left out.

        ``reply_only``: only the fields a client re-reads (``REPLY_FIELDS``), about half the reading."""
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            rows = [(h, self._buffer.get(h) or self._flushing.get(h)) for h in wanted]
        found.update((h, row_entry(r, reply_only)) for h, r in rows if r is not None)
        found.update(self._load([h for h in wanted if h not in found], refresh=True, reply_only=reply_only))
        pa.default_memory_pool().release_unused()  # a bulk read's decoding buffers: give them back
        return found

    def prefetch(self, hashes: Iterable[str]) -> int:
        """Look ``hashes`` up in bulk and keep the answers (hits and misses) for ``get``; returns the hits.

        The entries kept hold ``REPLY_FIELDS`` only: what a client re-reads, at half the memory and reading."""
        wanted = list(dict.fromkeys(hashes))
        found = self.get_many(wanted, reply_only=True)
        with self._lock:
            self._prefetched.update(found)
            self._known_missing.update(h for h in wanted if h not in found)
        return len(found)

    def forget_prefetched(self) -> None:
        with self._lock:
            self._prefetched.clear()
            self._known_missing.clear()

    def _load(self, hashes: list[str], refresh: bool, reply_only: bool = False) -> dict[str, dict[str, Any]]:
        if not hashes:
            return {}
        wanted = {h: hash_key(h) for h in hashes}
        rows: dict[str, Row] = {}
        with self._index_lock:
            for attempt in range(_LOOKUP_ATTEMPTS):
                if refresh or attempt or time.monotonic() - self._index.listed_at > self.refresh_s:
                    self._index.refresh()
                try:
                    rows = self._index.lookup(wanted, REPLY_COLUMNS if reply_only else None)
                    break
                except Stale as exc:  # compacted under us: list again
                    logger.debug("cache %s: %s; listing again", self.root, exc)
            else:
                logger.warning(
                    "cache %s: files kept moving under a lookup of %d; misses for now", self.root, len(hashes)
                )
        found = {h: row_entry(r, reply_only) for h, r in rows.items()}
        missing = [h for h in hashes if h not in found]
        if missing and self._legacy():
            legacy = self._read_legacy(missing)
            if reply_only:
                legacy = {h: {k: e.get(k) for k in REPLY_FIELDS} for h, e in legacy.items()}
            found.update(legacy)
        return found

    def _legacy(self) -> bool:
        if self._has_legacy is None:
            self._has_legacy = self.storage.has_legacy()
            if self._has_legacy:
                logger.info("cache %s holds one-file-per-entry replies; misses also look there", self.root)
        return self._has_legacy

    def _read_legacy(self, hashes: list[str]) -> dict[str, dict[str, Any]]:
        paths = {self.storage.legacy_path(h): h for h in hashes}
        found: dict[str, dict[str, Any]] = {}
        for path, data in self.storage.read_bytes(list(paths)).items():
            try:
                found[paths[path]] = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("cache entry %s is unreadable; ignoring it", path)
        return found

    # --- writes --------------------------------------------------------------------------------------------

    def put(self, rhash: str, entry: dict[str, Any]) -> None:
        """Buffer one reply; it reaches storage within ``flush_interval_s`` (or at ``flush_entries``)."""
        row = entry_row(rhash, entry, time.time_ns() // 1000)
        if os.getpid() != self._pid:
            self._reset_writer()
        with self._cond:
            if not self._buffer:
                self._first_at = time.monotonic()
            self._buffer.setdefault(rhash, row)  # the first reply stored wins, as in every reader
            self._known_missing.discard(rhash)
            if self._thread is None:
                self._thread = threading.Thread(target=self._flusher, name=f"cache-flush-{self.writer_id}", daemon=True)
                self._thread.start()
                _OPEN.add(self)
            if len(self._buffer) == 1 or len(self._buffer) >= self.flush_entries:
                self._cond.notify()

    def flush(self) -> bool:
        """Write the buffer now, as one segment; False if the write failed (the replies stay buffered)."""
        with self._flush_lock:
            with self._lock:
                if not self._buffer:
                    return True
                batch, self._buffer, self._flushing = self._buffer, {}, self._buffer
            path = f"{self.storage.segments}/{self._name()}.parquet"
            try:
                table = sort_dedup(rows_table(batch.values()))
                data = parquet_bytes(table, SEGMENT_ROW_GROUP_ROWS)
                self.storage.write_atomic(path, data)
            except Exception:
                logger.exception("cache %s: writing %d replies failed; retrying later", self.root, len(batch))
                with self._lock:
                    for rhash, row in self._buffer.items():  # the first reply stored still wins
                        batch.setdefault(rhash, row)
                    self._buffer, self._flushing, self._first_at = batch, {}, time.monotonic()
                return False
            with self._index_lock:
                self._index.add_segment(path, table.column("key").to_numpy(), len(data))
            with self._lock:
                self._flushing = {}
            self.segments_written += 1
            return True

    def _flusher(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._buffer
                    and (
                        self._stopping
                        or len(self._buffer) >= self.flush_entries
                        or time.monotonic() - self._first_at >= self.flush_interval_s
                    )
                ):
                    if self._stopping:
                        self._thread = None
                        return
                    wait = self._first_at + self.flush_interval_s - time.monotonic() if self._buffer else None
                    self._cond.wait(wait)
                stopping = self._stopping
            ok = self.flush()
            if stopping and not ok:
                with self._cond:
                    self._thread = None
                return
            if not stopping:
                self._maybe_compact()

    def close(self) -> None:
        """Write what is buffered and stop the flusher; the cache can still be used (it starts again)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.flush()
        with self._cond:
            self._stopping = False
            self._thread = None
            left = len(self._buffer)
        self.forget_prefetched()
        _OPEN.discard(self)
        if left:
            logger.error("cache %s: %d replies could not be written; a re-run pays for them again", self.root, left)

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- compaction ----------------------------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        """Start a compaction when the tail is big, in a thread of its own: flushes go on meanwhile."""
        if not self.auto_compact or time.monotonic() - self._compact_checked < COMPACT_CHECK_S:
            return
        if self._compactor is not None and self._compactor.is_alive():
            return
        with self._index_lock:
            rows, segments = self._index.tail_rows(), len(self._index.tail)
        if rows < self.compact_rows and segments < self.max_tail_segments:
            return
        self._compact_checked = time.monotonic()
        # Not a daemon: interpreter exit waits for it instead of cutting it between publishing shards and
        # deleting segments (harmless, but the work would be done again).
        self._compactor = threading.Thread(target=self._compact_logged, name=f"cache-compact-{self.writer_id}")
        self._compactor.start()

    def _compact_logged(self) -> None:
        try:
            self.compact()
        except Exception:  # the entries stay in their segments: still found, only slower
            logger.exception("cache %s: compaction failed", self.root)

    def compact(self, force: bool = False) -> CompactionReport:
        """Fold the oldest segments into shards once the tail holds ``compact_rows`` entries or
        ``max_tail_segments`` segments (``force``: whatever it holds), then merge shards by tier."""
        report, merge_all = CompactionReport(), force
        with self._compact_lock:
            with self._index_lock:
                self._index.refresh()
                tail = sorted((p, len(k)) for p, k in self._index.tail.items())
            for _ in range(8):  # bounded work per call; the next call goes on
                rows = sum(n for _, n in tail)
                if not tail or (not force and rows < self.compact_rows and len(tail) < self.max_tail_segments):
                    break
                chosen, n = [], 0
                for path, size in tail:
                    if chosen and n + size > self.compact_max_rows:
                        break
                    chosen.append(path)
                    n += size
                part = compact_tail(self.storage, chosen, self.prefix_len, self.shard_row_group_rows, self._name)
                report.segments_in += part.segments_in
                report.rows_in += part.rows_in
                report.shards_written += part.shards_written
                report.touched |= part.touched
                tail, force = tail[len(chosen) :], False
            if report.touched or merge_all:
                prefixes = None if merge_all else report.touched
                report.merges = merge_tiers(
                    self.storage,
                    prefixes,
                    self.fanout,
                    self.shard_row_group_rows,
                    self.merge_chunk_rows,
                    self.max_file_rows,
                    self._name,
                )
            with self._index_lock:
                self._index.refresh()
        if report.segments_in or report.merges:
            logger.info(
                "cache %s: compacted %d segments (%d entries) into %d shards; %d tier merges",
                self.root,
                report.segments_in,
                report.rows_in,
                report.shards_written,
                report.merges,
            )
        return report


_OPEN: weakref.WeakSet[ResponseCache] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At interpreter exit, write every buffer still held (a SIGKILL skips this: see ``flush_interval_s``)."""
    for cache in list(_OPEN):
        try:
            cache.close()
        except Exception:
            logger.exception("cache %s: final flush failed", cache.root)
