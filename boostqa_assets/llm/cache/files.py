"""The cache's files: the entry schema, 64-bit keys, names, atomic writes, listings and key-range reads.

Every Parquet file of the cache (segment or shard) has ``SCHEMA``, is sorted by ``key`` then
``request_hash``, and keeps row-group statistics on ``key``: a reader finds the row groups that may hold a
key from the footer alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

KEY_MAX = 2**64 - 1
# The fields a client or batch entry has; anything else a caller puts goes to ``extra`` (JSON).
FIELDS = (
    "request_hash",
    "role",
    "model",
    "request",
    "content",
    "reasoning",
    "finish_reason",
    "tokens_in",
    "tokens_out",
    "latency_s",
)
SCHEMA = pa.schema(
    [
        ("key", pa.uint64()),  # the first 64 bits of the hash: routing and row-group statistics
        ("request_hash", pa.string()),
        ("role", pa.string()),
        ("model", pa.string()),
        ("request", pa.string()),  # the JSON body as text
        ("content", pa.string()),
        ("reasoning", pa.string()),
        ("finish_reason", pa.string()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("latency_s", pa.float64()),
        ("extra", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
# What a client re-reads of an entry (``Reply.from_cache``): reading 7 of 13 columns, without the request body
# (the largest), makes a bulk lookup's row groups about twice as cheap to decode.
REPLY_FIELDS = ("request_hash", "content", "reasoning", "finish_reason", "tokens_in", "tokens_out")
REPLY_COLUMNS = [*REPLY_FIELDS, "created_at"]
SORT = [("key", "ascending"), ("request_hash", "ascending"), ("created_at", "ascending")]
_HEX16 = re.compile(r"[0-9a-f]{16}")
_LEGACY_DIR = re.compile(r"[0-9a-f]{2}")

Row = tuple[Any, ...]  # one entry in SCHEMA's column order


def hash_key(rhash: str) -> int:
    """The 64-bit key of a request hash: its first 16 hex digits (sha256 hex), else a digest of it.

    Keys only route; two hashes may share a key, so every match is confirmed on the full hash."""
    head = rhash[:16]
    if _HEX16.fullmatch(head):
        return int(head, 16)
    return int.from_bytes(hashlib.blake2b(rhash.encode("utf-8"), digest_size=8).digest(), "big")


def entry_row(rhash: str, entry: dict[str, Any], created_us: int) -> Row:
    extra = {k: v for k, v in entry.items() if k not in FIELDS}
    request = entry.get("request")
    return (
        hash_key(rhash),
        rhash,
        entry.get("role"),
        entry.get("model"),
        None if request is None else json.dumps(request, ensure_ascii=False, separators=(",", ":")),
        entry.get("content"),
        entry.get("reasoning"),
        entry.get("finish_reason"),
        entry.get("tokens_in"),
        entry.get("tokens_out"),
        entry.get("latency_s"),
        json.dumps(extra, ensure_ascii=False) if extra else None,
        created_us,
    )


def row_entry(row: Row, reply_only: bool = False) -> dict[str, Any]:
    """The entry dict a caller put, back from a row (``request`` parsed again), or its ``REPLY_FIELDS``."""
    entry = dict(zip(FIELDS, row[1:11], strict=True))
    if reply_only:
        return {k: entry[k] for k in REPLY_FIELDS}
    if entry["request"] is not None:
        entry["request"] = json.loads(entry["request"])
    if row[11]:
        entry.update(json.loads(row[11]))
    return entry


def table_rows(table: pa.Table) -> Iterator[Row]:
    """Rows of a cache table in SCHEMA order (None for a column not read), ``created_at`` in microseconds."""
    n, names = table.num_rows, set(table.column_names)
    cols = [table.column(c).to_pylist() if c in names else [None] * n for c in SCHEMA.names[:-1]]
    cols.append(table.column("created_at").cast(pa.int64()).to_pylist())
    return zip(*cols, strict=True)


def rows_table(rows: Iterable[Row]) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    arrays = [pa.array(col, type=f.type) for col, f in zip(cols[:-1], SCHEMA, strict=False)]
    arrays.append(pa.array(cols[-1], type=pa.int64()).cast(SCHEMA.field("created_at").type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def sort_dedup(table: pa.Table) -> pa.Table:
    """Sorted by key, then hash; one row per hash, the earliest (what every reader returns)."""
    table = table.take(pc.sort_indices(table, sort_keys=SORT))
    n = table.num_rows
    if n < 2:
        return table
    hashes = table.column("request_hash")
    changed = pc.not_equal(hashes.slice(1), hashes.slice(0, n - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), changed.combine_chunks()]))


# zstd; key statistics only (the rest would only grow the footers); dictionaries only where values repeat.
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "write_statistics": ["key"],
    "use_dictionary": ["role", "model", "finish_reason"],
}


def parquet_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows, **WRITE_OPTIONS)
    return buf.getvalue()


# --- names ------------------------------------------------------------------------------------------------


def new_writer_id() -> str:
    return uuid.uuid4().hex[:12]


def stamp() -> str:
    """UTC time to the microsecond: names sort in write order, so compaction takes the oldest first."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}"


def shard_run(path: str) -> tuple[int, str]:
    """``t<k>-<time>-<writer>-<seq>-<part>.parquet`` -> (k, the run's name): k is how many merges its rows
    went through; the files of one run share its name and hold disjoint key ranges."""
    name = posixpath.basename(path).removesuffix(".parquet")
    head, _, _ = name.rpartition("-")
    tier = name[1 : name.index("-")] if name.startswith("t") and "-" in name else ""
    return (int(tier), head) if tier.isdigit() and head else (0, name)


# --- storage ----------------------------------------------------------------------------------------------


@dataclass
class Storage:
    """One cache root on one fsspec filesystem; paths are the filesystem's (no ``s3://``)."""

    fs: fsspec.AbstractFileSystem
    root: str
    is_local: bool

    @classmethod
    def of(cls, root: str, fs: fsspec.AbstractFileSystem | None) -> Storage:
        fs = fs or fsspec.filesystem("file")
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        return cls(fs, fs._strip_protocol(root).rstrip("/") or "/", "file" in protocols or "local" in protocols)

    @property
    def segments(self) -> str:
        return self.root + "/segments"

    @property
    def shards(self) -> str:
        return self.root + "/shards"

    def listing(self, base: str) -> dict[str, int]:
        """Every published ``*.parquet`` under ``base`` and its size, by path; never a cached listing."""
        self.fs.invalidate_cache(base)  # s3fs keeps listings: another process's new files would stay unseen
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {
            p: int(info.get("size") or 0)
            for p, info in sorted(found.items())
            if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
        }

    def list_parquet(self, base: str) -> list[str]:
        return list(self.listing(base))

    def has_legacy(self) -> bool:
        """Whether one-file-per-entry dirs (``<root>/<hh>/``) exist: one listing of the root, not of the files."""
        self.fs.invalidate_cache(self.root)
        try:
            names = self.fs.ls(self.root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return any(_LEGACY_DIR.fullmatch(posixpath.basename(n.rstrip("/"))) for n in names)

    def legacy_path(self, rhash: str) -> str:
        return f"{self.root}/{rhash[:2]}/{rhash}.json"

    def write_atomic(self, path: str, data: bytes) -> None:
        """Readers see the whole file or none: temp file + ``os.replace`` locally, one PUT on S3."""
        if self.is_local:
            parent = posixpath.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_many(self, files: dict[str, bytes]) -> None:
        if self.is_local:
            for path, data in files.items():
                self.write_atomic(path, data)
        elif files:
            self.fs.pipe(files)  # s3fs sends the PUTs concurrently

    def publish(self, local_tmp: str, path: str) -> None:
        """Move a finished local temp file to ``path`` (rename locally; one upload on S3)."""
        if self.is_local:
            os.replace(local_tmp, path)
        else:
            try:
                self.fs.put_file(local_tmp, path)  # a multipart upload is visible only once complete
            finally:
                os.unlink(local_tmp)

    def temp_for(self, path: str) -> str:
        """A temp file for ``path``: beside it locally (same filesystem, so rename is atomic), else in /tmp."""
        if self.is_local:
            parent = posixpath.dirname(path)
            os.makedirs(parent, exist_ok=True)
            return posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        fd, tmp = tempfile.mkstemp(suffix=".parquet")
        os.close(fd)
        return tmp

    def remove(self, paths: list[str]) -> None:
        """Delete, ignoring files already gone (another compactor got there first)."""
        if not paths:
            return
        if self.is_local:
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(p)

    def open_parquet(
        self, path: str, size: int | None = None, metadata: pq.FileMetaData | None = None
    ) -> pq.ParquetFile:
        """A Parquet file for row-group reads; raises FileNotFoundError when it is gone. With its ``size`` and
        parsed ``metadata`` known, opening it on S3 costs no request (no HEAD, no footer read)."""
        if self.is_local:
            return pq.ParquetFile(path, metadata=metadata)
        # No read-ahead cache: pyarrow coalesces a row group's column chunks into one ranged GET.
        handle = self.fs.open(path, "rb", cache_type="none", size=size or None)
        return pq.ParquetFile(handle, metadata=metadata, pre_buffer=True)

    def read_bytes(self, paths: list[str]) -> dict[str, bytes]:
        """Whole files (small ones: segments), fetched concurrently on S3; missing files are left out."""
        if not paths:
            return {}
        out = self.fs.cat(paths, on_error="omit")
        if len(paths) == 1 and isinstance(out, bytes | bytearray):  # fsspec returns bare bytes for one path
            return {paths[0]: bytes(out)}
        return {k: v for k, v in out.items() if isinstance(v, bytes | bytearray)}


def key_ranges(md: pq.FileMetaData) -> tuple[np.ndarray, np.ndarray]:
    """Per row group, the min and max ``key`` from the footer statistics."""
    col = md.schema.names.index("key")
    mins = np.empty(md.num_row_groups, dtype=np.uint64)
    maxs = np.empty(md.num_row_groups, dtype=np.uint64)
    for i in range(md.num_row_groups):
        stats = md.row_group(i).column(col).statistics
        if stats is None or not stats.has_min_max:  # no statistics: the row group may hold any key
            mins[i], maxs[i] = 0, KEY_MAX
        else:
            mins[i], maxs[i] = stats.min, stats.max
    return mins, maxs


WHOLE_FILE_BYTES = 2 << 20  # remote files up to this size are read whole (segments, young shards)
MERGE_GAP_BYTES = 64 << 10  # byte ranges closer than this are fetched as one


def _chunk_span(col: pq.ColumnChunkMetaData) -> tuple[int, int]:
    start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else 0
    start = start or col.data_page_offset
    return start, start + col.total_compressed_size


class FileReader:
    """Row groups of one file, read the cheapest way for where it lives: in place (local); the whole object in
    one GET (remote, small); or only the byte ranges of the wanted column chunks, fetched concurrently (remote,
    big: pyarrow's own reads do not coalesce chunks with other columns between them, so reading 7 of 13 columns
    cost one GET per column chunk, one after the other). Raises FileNotFoundError when the file is gone."""

    def __init__(self, storage: Storage, path: str, size: int | None, metadata: pq.FileMetaData | None) -> None:
        self.storage, self.path, self.size, self._md = storage, path, size, metadata
        self._pf: pq.ParquetFile | None = None
        if storage.is_local:
            self._pf = pq.ParquetFile(path, metadata=metadata)
        elif size is not None and size <= WHOLE_FILE_BYTES:
            self._pf = pq.ParquetFile(pa.BufferReader(storage.fs.cat_file(path)), metadata=metadata)

    @property
    def metadata(self) -> pq.FileMetaData:
        if self._md is None:
            if self._pf is not None:
                self._md = self._pf.metadata
            else:  # the footer alone: one or two ranged GETs
                pf = self.storage.open_parquet(self.path, self.size)
                try:
                    self._md = pf.metadata
                finally:
                    pf.close(force=True)
        return self._md

    def read(self, groups: list[int], columns: list[str] | None) -> pa.Table:
        if self._pf is not None:  # small reads: decoding threads would cost more than they give
            return self._pf.read_row_groups(groups, columns=columns, use_threads=False)
        md = self.metadata
        wanted = range(md.num_columns) if columns is None else [md.schema.names.index(c) for c in columns]
        merged: list[list[int]] = []
        for start, end in sorted(_chunk_span(md.row_group(g).column(i)) for g in groups for i in wanted):
            if merged and start - merged[-1][1] <= MERGE_GAP_BYTES:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        fs = self.storage.fs
        data = fs.cat_ranges([self.path] * len(merged), [m[0] for m in merged], [m[1] for m in merged])
        for part in data:
            if isinstance(part, BaseException):
                raise part
        parts = {(m[0], m[1]): part for m, part in zip(merged, data, strict=True)}
        handle = fs.open(self.path, "rb", cache_type="parts", cache_options={"data": parts}, size=self.size)
        try:
            pf = pq.ParquetFile(handle, metadata=md, pre_buffer=False)
            return pf.read_row_groups(groups, columns=columns, use_threads=False)
        finally:
            handle.close()

    def close(self) -> None:
        if self._pf is not None:
            self._pf.close(force=True)


class RangeSource:
    """One Parquet file read by key range: only the row groups whose statistics overlap the range."""

    def __init__(self, pf: pq.ParquetFile) -> None:
        self.pf = pf
        self.mins, self.maxs = key_ranges(pf.metadata)

    def read(self, lo: int, hi: int) -> pa.Table | None:
        """Rows with ``lo <= key <= hi``, or None."""
        groups = np.nonzero((self.maxs >= np.uint64(lo)) & (self.mins <= np.uint64(hi)))[0]
        if not len(groups):
            return None
        table = self.pf.read_row_groups([int(g) for g in groups], use_threads=False)
        keys = table.column("key")
        inside = pc.and_(
            pc.greater_equal(keys, pa.scalar(lo, pa.uint64())), pc.less_equal(keys, pa.scalar(hi, pa.uint64()))
        )
        table = table.filter(inside)
        return table if table.num_rows else None
