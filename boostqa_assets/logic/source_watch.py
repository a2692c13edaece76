"""Watched prefixes and ``seeds`` partition keys: list the files under a watched prefix (local or s3://), give
each a stable partition key, fingerprint a source so a changed file is refreshed, and resolve any ``seeds``
partition key (a configured source, a shard of one, or a discovered file) to what ``sources.read_source`` reads.
Split from ``sources.py``, which reads a source's records."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from boostqa_assets.configs import SourceConfig, SourcesConfig, WatchConfig
from boostqa_assets.logic.sources import SourceError, fsspec_options, protocol_of, resolve_path

KEY_SLUG_CHARS = 48


class UnknownSourceError(SourceError):
    """A ``seeds`` partition key that is neither a configured source nor a file under a watched prefix."""


@dataclass(frozen=True)
class SourceFile:
    """One file under a watched prefix, as listed now."""

    watch: str
    key: str  # its `seeds` partition key (watch_key)
    path: str  # as read_source takes it: an absolute local path or s3://bucket/key
    relative: str  # path under the prefix
    size: int
    modified: float  # epoch seconds (local mtime, S3 LastModified)
    fingerprint: str


def watch_key(watch: str, relative: str) -> str:
    """The partition key of a discovered file: ``<watch>__<slug of its path under the prefix>_<8 hex>``.

    A pure function of the watch name and the relative path (the same file always gets the same key), a valid
    Dagster partition key and a slug (the key is also the seeds' `source`); the hash of the exact relative path
    keeps apart names that the slug folds together (``a-b.jsonl``, ``A_b.jsonl``).
    """
    slug = re.sub(r"[^a-z0-9]+", "_", relative.lower()).strip("_")[:KEY_SLUG_CHARS].rstrip("_") or "file"
    digest = hashlib.sha256(relative.encode("utf-8")).hexdigest()[:8]
    return f"{watch}__{slug}_{digest}"


def _filesystem(protocol: str, storage_options: dict[str, Any] | None) -> Any:
    """A fresh filesystem: sensors list the same prefix every tick, so no cached instance or listing."""
    opts = fsspec_options(protocol, storage_options)
    if protocol in ("s3", "s3a"):
        opts["use_listings_cache"] = False
    return fsspec.filesystem(protocol, skip_instance_cache=True, **opts)


def _local_stat(path: str) -> tuple[int, float, str]:
    st = os.stat(path)
    return st.st_size, st.st_mtime, f"size={st.st_size};mtime_ns={st.st_mtime_ns}"


def _remote_fingerprint(info: dict[str, Any]) -> str | None:
    """S3: ETag and size. HTTP: ETag and/or Last-Modified, and size. None when the server gives neither."""
    etag = info.get("ETag") or info.get("etag")
    parts = [f"etag={str(etag).strip(chr(34))}"] if etag else []
    if info.get("Last-Modified"):
        parts.append(f"last_modified={info['Last-Modified']}")
    if not parts:
        return None
    return ";".join([*parts, f"size={info.get('size')}"])


def watch_root(watch: WatchConfig, config_dir: Path) -> str:
    """The watched prefix: ``s3://bucket/prefix`` or an absolute local folder (relative ones under config_dir)."""
    if watch.prefix.startswith("s3://"):
        return watch.prefix.rstrip("/")
    local = Path(watch.prefix).expanduser()
    return str(local if local.is_absolute() else (Path(config_dir) / local).resolve())


def list_watch(watch: WatchConfig, config_dir: Path, storage_options: dict[str, Any] | None = None) -> list[SourceFile]:
    """Every file matching the watch's glob under its prefix (hidden files excluded), sorted by path.

    A prefix that does not exist yet lists as empty; one that cannot be listed raises ``SourceError``.
    """
    root = watch_root(watch, config_dir)
    protocol = protocol_of(root)
    bare = root.split("://", 1)[1] if "://" in root else root
    try:
        fs = _filesystem(protocol, storage_options)
        found = fs.glob(posixpath.join(bare, watch.glob), detail=True)
    except FileNotFoundError:
        found = {}
    except Exception as exc:  # s3fs/botocore raise many types (credentials, endpoint, permissions)
        raise SourceError(
            f"watch {watch.name!r}: cannot list {root}: {type(exc).__name__}: {exc}; fix: check the prefix, the "
            "credentials and BOOSTQA_S3_ENDPOINT_URL"
        ) from exc
    files = []
    for path, info in sorted(found.items()):
        if info.get("type") != "file" or posixpath.basename(path).startswith("."):
            continue
        relative = posixpath.relpath(path, bare)
        if protocol == "file":
            try:
                size, modified, fingerprint = _local_stat(path)
            except FileNotFoundError:  # deleted between the listing and the stat
                continue
            full = path
        else:
            size = int(info.get("size") or 0)
            last = info.get("LastModified")
            modified = last.timestamp() if hasattr(last, "timestamp") else float(info.get("mtime") or 0.0)
            fingerprint = _remote_fingerprint(info) or f"size={size};modified={modified}"
            full = f"{protocol}://{path}"
        key = watch_key(watch.name, relative)
        files.append(SourceFile(watch.name, key, full, relative, size, modified, fingerprint))
    return files


def source_fingerprint(
    cfg: SourceConfig, config_dir: Path, storage_options: dict[str, Any] | None = None
) -> str | None:
    """What identifies the current content of a source's file without reading it: size + mtime locally
    (pkg:// included), ETag + size on S3, ETag / Last-Modified + size over HTTP (None if the server sends
    neither). Raises ``SourceError`` if the file is missing or cannot be reached."""
    path = resolve_path(cfg, config_dir)
    protocol = protocol_of(path)
    try:
        if protocol == "file":
            return _local_stat(path.removeprefix("file://"))[2]
        return _remote_fingerprint(_filesystem(protocol, storage_options).info(path))
    except FileNotFoundError as exc:
        raise SourceError(
            f"source {cfg.name!r}: file {path} not found; fix: put the file back, or correct the source's `path` in "
            "sources.yaml"
        ) from exc
    except Exception as exc:  # network and client errors of the remote filesystems
        raise SourceError(
            f"source {cfg.name!r}: cannot stat {path}: {type(exc).__name__}: {exc}; fix: check the path, the "
            "permissions and the credentials"
        ) from exc


class SourceResolver:
    """Resolves ``seeds`` partition keys, configured source names or discovered files' keys, to sources and
    their current fingerprints; lists each watched prefix at most once (build one per run or tick)."""

    def __init__(self, sources: SourcesConfig, config_dir: Path, storage_options: dict[str, Any] | None = None):
        self.sources = sources
        self.config_dir = Path(config_dir)
        self.storage_options = storage_options
        self._configured = set(sources.partition_keys())
        self._listed: dict[str, dict[str, SourceFile]] = {}

    def files(self, watch: WatchConfig) -> dict[str, SourceFile]:
        if watch.name not in self._listed:
            listed = list_watch(watch, self.config_dir, self.storage_options)
            self._listed[watch.name] = {f.key: f for f in listed}
        return self._listed[watch.name]

    def file(self, key: str) -> SourceFile | None:
        """The watched file behind a discovered key (None for configured sources and unknown keys)."""
        watch = None if key in self._configured else self.sources.watch_for_key(key)
        return None if watch is None else self.files(watch).get(key)

    def resolve(self, key: str) -> SourceConfig:
        """The source of a partition key, with the concrete path. Raises ``UnknownSourceError``."""
        if key in self._configured:
            found = self.sources.for_key(key)
            assert found is not None
            return found[0]
        watch = self.sources.watch_for_key(key)
        if watch is None:
            raise UnknownSourceError(
                f"seeds partition {key!r} is neither a source in sources.yaml "
                f"{sorted(self._configured)} nor a file of a watched prefix "
                f"{[w.name + '__*' for w in self.sources.watch]}; fix: add the source back to sources.yaml, "
                "or delete the partition (Dagster UI: seeds > Partitions)"
            )
        found = self.files(watch).get(key)
        if found is None:
            raise UnknownSourceError(
                f"seeds partition {key!r} belongs to watch {watch.name!r}, but no file matching {watch.glob!r} "
                f"under {watch_root(watch, self.config_dir)} has this key (moved, renamed or deleted?); fix: put "
                "the file back, or delete the partition (Dagster UI: seeds > Partitions)"
            )
        return watch.source_config(key, found.path)

    def shard(self, key: str) -> tuple[int, int] | None:
        """(index, count) when ``key`` is a shard of a configured source, else None."""
        found = self.sources.for_key(key) if key in self._configured else None
        return found[1] if found is not None else None

    def fingerprint(self, key: str) -> str | None:
        found = self.file(key)
        if found is not None:
            return found.fingerprint
        return source_fingerprint(self.resolve(key), self.config_dir, self.storage_options)


def resolve_source(
    sources: SourcesConfig, key: str, config_dir: Path, storage_options: dict[str, Any] | None = None
) -> SourceConfig:
    """The source behind any ``seeds`` partition key (see ``SourceResolver.resolve``)."""
    return SourceResolver(sources, config_dir, storage_options).resolve(key)


def split_new_files(
    files: Iterable[SourceFile], seen: Collection[str], now: float, min_age_s: float
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Files whose key is not in ``seen``: (settled ones, ones modified less than ``min_age_s`` ago)."""
    settled, young = [], []
    for f in files:
        if f.key in seen:
            continue
        (young if now - f.modified < min_age_s else settled).append(f)
    return settled, young


def refresh_reason(current: str | None, materialized: bool, recorded: str | None) -> str | None:
    """Why a materialized source partition needs a refresh, or None: never materialized; no fingerprint recorded
    (materialized before fingerprints were); its file changed. A source whose fingerprint cannot be known now
    (an HTTP server with neither ETag nor Last-Modified) is refreshed only if it was never materialized."""
    if not materialized:
        return "never materialized"
    if current is None:
        return None
    if recorded is None:
        return "no fingerprint recorded"
    return "changed" if current != recorded else None
