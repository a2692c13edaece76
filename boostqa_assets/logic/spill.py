"""Bounded-memory plumbing for the gates: Parquet read in chunks, DuckDB set to spill, files published whole.

- ``iter_parquet``: a Parquet file (local or any fsspec filesystem) as polars frames of at most ``rows`` rows,
  one row group's columns at a time, so reading never holds more than a chunk (plus one row group's pages).
- ``duckdb_connect``: a DuckDB database file in the work folder with ``memory_limit``, ``threads`` and
  ``temp_directory`` set, so joins, group-bys, windows and sorts larger than the limit spill to disk instead
  of growing the process.
- ``publish_file``: move a finished local file to its place in the store as one object (``os.replace`` in
  the target's folder locally, one upload on S3), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpillConfig:
    """Where and how much: the work folder (local disk), DuckDB's memory limit and threads, rows per chunk."""

    work_dir: Path
    memory_limit: str = "1GB"  # DuckDB's buffer pool; past it, operators spill to work_dir/duckdb_tmp
    threads: int = 2
    chunk_rows: int = 50_000  # rows read, hashed, scanned and tokenized at a time
    block_rows: int = 1_000_000  # signature rows per block in the pair screen (x 4 x num_perm bytes, two blocks)
    workers: int = min(2, os.cpu_count() or 1)  # processes for the per-file work (keys, the streaming pass)
    parallel_min_rows: int = 200_000  # below this, processes cost more to start than they save


def iter_parquet(path: str, columns: list[str] | None, rows: int, fs: Any | None = None) -> Iterator[pl.DataFrame]:
    """Frames of at most ``rows`` rows of ``path`` in file order (an empty file yields nothing)."""
    opener = fs.open(path, "rb") if fs is not None else open(path, "rb")  # noqa: SIM115 - closed below
    with opener as f:
        parquet = pq.ParquetFile(f)
        for batch in parquet.iter_batches(batch_size=rows, columns=columns, use_threads=True):
            if batch.num_rows:
                yield pl.from_arrow(batch)  # type: ignore[misc]


def parquet_rows(path: str, fs: Any | None = None) -> int:
    opener = fs.open(path, "rb") if fs is not None else open(path, "rb")  # noqa: SIM115 - closed below
    with opener as f:
        return pq.ParquetFile(f).metadata.num_rows


def duckdb_connect(cfg: SpillConfig, name: str = "gates.duckdb") -> duckdb.DuckDBPyConnection:
    """A DuckDB database in the work folder that spills past ``memory_limit`` (tables live in the file, not in
    RAM; insertion order is not kept unless a query asks for an order)."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.work_dir / "duckdb_tmp"
    tmp.mkdir(exist_ok=True)
    con = duckdb.connect(str(cfg.work_dir / name))
    con.execute(f"SET memory_limit = '{cfg.memory_limit}'")
    con.execute(f"SET threads = {int(cfg.threads)}")
    con.execute(f"SET temp_directory = '{tmp}'")
    con.execute("SET preserve_insertion_order = false")
    return con


def publish_file(store: Any, local: Path, target: str) -> None:
    """Put the finished local file ``local`` at ``target`` in ``store`` as one object, then remove ``local``."""
    if store.is_local:
        parent = posixpath.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(local, tmp) if _other_device(local, parent) else os.replace(local, tmp)
        os.replace(tmp, target)
        with contextlib.suppress(FileNotFoundError):
            os.remove(local)
    else:
        store.fs.put_file(str(local), target)  # one object: a single PUT, or a multipart upload completed at once
        os.remove(local)


def _other_device(path: Path, folder: str) -> bool:
    return os.stat(path).st_dev != os.stat(folder).st_dev


class Progress:
    """Logs ``label: done/total unit (rate/s)`` at most every ``every_s`` seconds, and once at the end."""

    def __init__(self, label: str, total: int | None, unit: str = "rows", every_s: float = 15.0) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.started = self.last = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._log(now)

    def finish(self) -> float:
        now = time.monotonic()
        self._log(now)
        return now - self.started

    def _log(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        of = f"/{self.total:,}" if self.total is not None else ""
        logger.info("%s: %s%s %s (%s/s)", self.label, f"{self.done:,}", of, self.unit, f"{rate:,.0f}")


def staging_folder(store: Any, asset: str) -> Path | None:
    """A fresh hidden folder under ``<root>/<asset>/`` to write a partition folder into (local stores), so the
    swap in ``publish_directory`` is one rename; None on remote stores (write to the work folder instead)."""
    if not store.is_local:
        return None
    folder = Path(store.path(asset, f".staging-{uuid.uuid4().hex}"))
    folder.mkdir(parents=True)
    return folder


def publish_directory(store: Any, asset: str, partition_dirs: str, local: Path) -> str:
    """Make the folder ``local`` the partition folder ``<asset>/<partition_dirs>``, as ``Store.write_directory``
    does for files held in memory: locally one rename of a staging folder (``local`` must come from
    ``staging_folder``), on S3 every file uploaded and then the stale ones deleted."""
    target = store.path(asset, partition_dirs)
    if store.is_local:
        trash = None
        if os.path.exists(target):
            trash = store.path(asset, f".trash-{uuid.uuid4().hex}")
            os.replace(target, trash)
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        os.replace(local, target)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
        return target
    old = set(store.fs.find(target)) if store.fs.exists(target) else set()
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    for name in names:
        store.fs.put_file(str(local / name), posixpath.join(target, name))
    new = {store.fs._strip_protocol(posixpath.join(target, n)) for n in names}
    stale = sorted(old - new)
    if stale:
        store.fs.rm(stale)
    shutil.rmtree(local, ignore_errors=True)
    return target


def read_columns(store: Any, files: list[str], columns: list[str], rows: int = 200_000) -> pl.DataFrame:
    """Only ``columns`` of ``files``, concatenated (a few bytes a row: what a summary needs, not the rows)."""
    frames = [chunk for path in files for chunk in iter_parquet(path, columns, rows, store.fs)]
    if not frames:
        return pl.DataFrame(schema=dict.fromkeys(columns, pl.Utf8))
    return pl.concat([f.select([pl.col(c).cast(pl.Utf8) for c in columns]) for f in frames])
