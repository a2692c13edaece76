"""Parquet storage over fsspec: a local folder by default, ``s3://`` through s3fs.

Layout (hive style): a table partition is a folder ``<root>/<asset>/<key>=<value>/...`` of immutable part files
committed by ``_manifest.json`` (``manifests.py``): a stage writes chunk by chunk and commits at the end, so a
reader sees the old partition or the new one, never half of one, and memory does not grow with the partition.
Rejects go to ``<root>/rejects/stage=<asset>/partition=<key>/`` the same way. Every object is written whole (a
hidden temporary name and ``os.replace`` locally, a single PUT on S3). Multi-file partitions swapped as a whole
(mixture shards) use ``write_directory``: locally one rename; on S3 new objects first and stale ones deleted
after, so a reader may briefly see both generations.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import polars as pl

from boostqa_assets.manifests import MANIFEST, STAGING, PartitionWriter, committed_files
from boostqa_assets.settings import SettingsError

logger = logging.getLogger(__name__)

PART_FILE = "part-0000.parquet"  # the single file of a partition written before manifests


class DataRootError(SettingsError):
    """The data root cannot be used (a path under a regular file, no permission); one line with the fix."""


def _data_root_problem(root: str, exc: OSError) -> str:
    """What is wrong with a local data root that ``os.makedirs`` refused, in words, with the fix."""
    fix = "fix: point BOOSTQA_DATA_ROOT at a folder you can write (unset, it is $BOOSTQA_HOME/data)"
    if isinstance(exc, NotADirectoryError | FileExistsError):
        blocker = root
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        if blocker and not os.path.isdir(blocker):
            return f"data root {root} cannot be created: {blocker} is a file, not a folder; {fix}"
    if isinstance(exc, PermissionError):
        return f"data root {root} cannot be created: permission denied on {exc.filename or root}; {fix}"
    return f"data root {root} cannot be created: {exc.strerror or exc}; {fix}"


def partition_dirs(partition: Mapping[str, str]) -> str:
    """``{"discipline": "physics", "grade": "high"}`` -> ``discipline=physics/grade=high``."""
    return "/".join(f"{k}={v}" for k, v in partition.items())


def partition_slug(key: str) -> str:
    """A partition key as a single path segment (multi-partition keys hold ``|``)."""
    return key.replace("|", "+").replace("/", "_")


class Store:
    """Reads and writes the assets' Parquet partitions under one root."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if root.startswith("file://"):  # a local path: os.* calls below need it without the scheme
            root = root.removeprefix("file://") or "/"
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        protocol = root.split("://", 1)[0] if "://" in root else "file"
        if protocol == "s3":
            opts = dict(self.storage_options)
            endpoint = opts.pop("endpoint_url", None)
            if endpoint:
                opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
            self.fs = fsspec.filesystem("s3", **opts)
        else:
            self.fs = fsspec.filesystem(protocol, **self.storage_options)
        self.protocol = protocol
        self.is_local = protocol == "file"
        self.objects_written = 0  # objects this store wrote (benchmarks count them)
        if self.is_local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise DataRootError(_data_root_problem(self.root, exc)) from exc

    def require_writable(self) -> None:
        """Raise ``DataRootError`` now if a local data root cannot be written, rather than in the middle of a run."""
        if self.is_local and not os.access(self.root, os.W_OK | os.X_OK):
            raise DataRootError(
                f"data root {self.root} is not writable by this user; fix: make it writable, or point "
                "BOOSTQA_DATA_ROOT at a folder you can write"
            )

    # --- paths -------------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *[p for p in parts if p])

    def partition_folder(self, asset: str, partition: Mapping[str, str]) -> str:
        return self.path(asset, partition_dirs(partition))

    def partition_path(self, asset: str, partition: Mapping[str, str]) -> str:
        """The single file of an unpartitioned-style table (``<asset>/part-0000.parquet``)."""
        return self.path(asset, partition_dirs(partition), PART_FILE)

    def rejects_folder(self, stage: str, partition_key: str) -> str:
        return self.path("rejects", f"stage={stage}", f"partition={partition_slug(partition_key)}")

    def rejects_path(self, stage: str, partition_key: str) -> str:
        return posixpath.join(self.rejects_folder(stage, partition_key), PART_FILE)

    # --- single-file partitions --------------------------------------------------------------------

    def write_parquet(self, path: str, df: pl.DataFrame) -> int:
        """Write ``df`` to ``path`` atomically; returns bytes written."""
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd", statistics=True)
        data = buf.getvalue()
        self._put_atomic(path, data)
        return len(data)

    def _put_atomic(self, path: str, data: bytes) -> None:
        parent = posixpath.dirname(path)
        self.objects_written += 1
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        elif self.protocol == "s3":
            self.fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
        else:
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)

    def put_bytes(self, path: str, data: bytes) -> None:
        """Write one object whole (readers see the old content or the new)."""
        self._put_atomic(path, data)

    def delete(self, paths: list[str]) -> None:
        """Delete files that may or may not exist."""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def delete_folder(self, folder: str) -> None:
        """Delete a folder and everything under it, if it exists."""
        if self.exists(folder):
            self.fs.rm(folder, recursive=True)

    # --- partitions (parts + manifest) -------------------------------------------------------------

    def partition_writer(
        self,
        asset: str,
        partition: Mapping[str, str],
        schema: pl.Schema | None = None,
        resume_key: str | None = None,
        resume_committed: bool = False,
    ) -> PartitionWriter:
        """A writer for one partition, chunk by chunk (see ``manifests.PartitionWriter``)."""
        folder = self.partition_folder(asset, partition)
        return PartitionWriter(self, folder, schema, resume_key, resume_committed)

    def rejects_writer(self, stage: str, partition_key: str, resume_key: str | None = None) -> PartitionWriter:
        from boostqa_assets.records import REJECT_SCHEMA

        return PartitionWriter(self, self.rejects_folder(stage, partition_key), REJECT_SCHEMA, resume_key)

    def write_partition(self, asset: str, partition: Mapping[str, str], df: pl.DataFrame) -> str:
        """Replace a partition with ``df`` (one chunk, committed); returns the partition's folder."""
        with self.partition_writer(asset, partition) as writer:
            writer.write(df)
        return writer.folder

    def write_rejects(self, stage: str, partition_key: str, df: pl.DataFrame) -> str:
        with self.rejects_writer(stage, partition_key) as writer:
            writer.write(df)
        return writer.folder

    def partition_files(self, asset: str, partition: Mapping[str, str]) -> list[str]:
        """The committed part files of one partition (empty if it was never written)."""
        return committed_files(self, self.partition_folder(asset, partition))

    def read_parquet(
        self, path: str, schema: pl.Schema | None = None, columns: list[str] | None = None
    ) -> pl.DataFrame:
        with self.fs.open(path, "rb") as f:
            df = pl.read_parquet(f, columns=columns)
        return df if schema is None else df.select([pl.col(c).cast(t) for c, t in schema.items()])

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_files(self, files: list[str], schema: pl.Schema | None = None) -> pl.DataFrame:
        frames = [self.read_parquet(p, schema) for p in files]
        if not frames:
            return pl.DataFrame(schema=schema) if schema is not None else pl.DataFrame()
        return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]

    def read_partition(self, asset: str, partition: Mapping[str, str], schema: pl.Schema | None = None) -> pl.DataFrame:
        folder = self.partition_folder(asset, partition)
        files = committed_files(self, folder)
        if not files and not self.exists(posixpath.join(folder, MANIFEST)):
            raise FileNotFoundError(
                f"{asset} partition {partition_dirs(partition)} has not been materialized "
                f"({folder} holds no committed data); materialize it first"
            )
        return self.read_files(files, schema)

    def read_rejects(self, stage: str, partition_key: str) -> pl.DataFrame:
        """The rejects a stage wrote for one partition (empty when it wrote none)."""
        from boostqa_assets.records import REJECT_SCHEMA

        return self.read_files(committed_files(self, self.rejects_folder(stage, partition_key)), REJECT_SCHEMA)

    def list_partition_files(self, asset: str) -> list[str]:
        """The committed part files of every partition of ``asset`` (what its DuckDB view reads)."""
        base = self.path(asset)
        if not self.exists(base):
            return []
        folders: dict[str, bool] = {}  # folder -> has a manifest
        for found in self.fs.find(base):
            path = found if "://" in found or self.is_local else f"{self.protocol}://{found}"
            folder, name = posixpath.split(path)
            if f"/{STAGING}" in folder or posixpath.basename(folder).startswith("."):
                continue
            if name == MANIFEST:
                folders[folder] = True
            elif name.startswith("part-") and name.endswith(".parquet"):
                folders.setdefault(folder, False)
        files: list[str] = []
        for folder in sorted(folders):
            files.extend(committed_files(self, folder))
        return files

    def read_asset(self, asset: str, schema: pl.Schema) -> pl.DataFrame:
        """Every materialized partition of ``asset`` concatenated (empty frame with ``schema`` if none)."""
        return self.read_files(self.list_partition_files(asset), schema)

    # --- multi-file partitions ---------------------------------------------------------------------

    def write_directory(self, asset: str, partition: Mapping[str, str], files: Mapping[str, bytes]) -> str:
        """Replace the whole partition directory with ``files`` (name -> content)."""
        target = self.path(asset, partition_dirs(partition))
        if self.is_local:
            staging = self.path(asset, f".staging-{uuid.uuid4().hex}")
            os.makedirs(staging)
            for name, data in files.items():
                with open(posixpath.join(staging, name), "wb") as f:
                    f.write(data)
            trash = None
            if os.path.exists(target):
                trash = self.path(asset, f".trash-{uuid.uuid4().hex}")
                os.replace(target, trash)
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            os.replace(staging, target)
            if trash:
                self.fs.rm(trash, recursive=True)
        else:
            old = set(self.fs.find(target)) if self.fs.exists(target) else set()
            for name, data in files.items():
                self.fs.pipe_file(posixpath.join(target, name), data)
            new = {self.fs._strip_protocol(posixpath.join(target, n)) for n in files}
            stale = sorted(old - new)
            if stale:
                self.fs.rm(stale)
        return target

    def read_bytes(self, path: str) -> bytes:
        """A small object (a manifest, a staging record) in one request. s3fs's default first asks for the size
        (HEAD, and a LIST when the key is missing) to read big objects in parallel ranges: three requests for
        each manifest lookup of every partition write."""
        if self.protocol == "s3":
            return self.fs.cat_file(path, max_concurrency=1)
        return self.fs.cat_file(path)
