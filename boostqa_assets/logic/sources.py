"""Read one seed source (jsonl, json, parquet, csv; local, s3://, https:// or pkg://) into seeds and rejects;
list the files of watched prefixes (local or s3://) and resolve any ``seeds`` partition key to its source.

A row that cannot become a seed is never dropped silently: it becomes a reject row with a reason code
(``invalid_utf8``, ``unparseable_line``, ``not_an_object``, ``missing_field``, ``empty_text``, ``oversize``,
``duplicate``, ``duplicate_id``). A file that cannot be read at all raises ``SourceError``, whose message names
the source, the file and the fix. Output order is deterministic: dedup keeps the earliest row in file order,
seeds come back sorted by ``seed_id``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import posixpath
import re
import zlib
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import polars as pl

from boostqa_assets.configs import LanguageDetectionSettings, SourceConfig, SourcesConfig, WatchConfig, shard_key
from boostqa_assets.logic.language import label_seeds
from boostqa_assets.records import (
    REJECT_SCHEMA,
    SEED_SCHEMA,
    frame,
    make_seed_id,
    normalize_text,
    stable_hash,
    to_json,
)

logger = logging.getLogger(__name__)

STAGE = "seeds"
MAX_RECORD_CHARS = 10_000
MAX_DETAIL_CHARS = 500
REQUIRED: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "problem": ("question",),
    "passage": ("text",),
}
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"
_MISSING: Any = object()

try:  # fsspec's http filesystem raises aiohttp errors for HTTP status codes
    from aiohttp import ClientError as _HttpError
except ImportError:  # pragma: no cover - aiohttp comes with fsspec[http]
    _HttpError = OSError  # type: ignore[assignment,misc]

_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, _HttpError)

# One item per row/record: (where, value, raw text or None = JSON of value, (reason, detail) or None)
_Item = tuple[str, Any, str | None, tuple[str, str] | None]


class SourceError(Exception):
    """A source file is missing, corrupt or unreadable; the message names the file and the cause."""


@dataclass
class SourceReadResult:
    seeds: pl.DataFrame  # SEED_SCHEMA, sorted by seed_id
    rejects: pl.DataFrame  # REJECT_SCHEMA, file order
    rows_read: int  # rows/records seen in the file (blank lines excluded)
    rows_not_sampled: int  # valid rows left out by `limit`
    path: str  # resolved path


def resolve_path(cfg: SourceConfig, config_dir: Path) -> str:
    """``pkg://<package>/<file>`` -> the file inside the installed package; relative -> under config_dir."""
    path = cfg.path
    if path.startswith("pkg://"):
        package, _, inner = path.removeprefix("pkg://").partition("/")
        if not package or not inner:
            raise SourceError(
                f"source {cfg.name!r}: {path!r} must look like pkg://<package>/<file>; fix: correct its `path` in "
                "sources.yaml"
            )
        try:  # find_spec locates a top-level package without importing (running) it
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(
                f"source {cfg.name!r}: file {path} not found: package {package!r} is not "
                f"installed; fix: install it (see requirements-data.in)"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / inner)
    if "://" in path:
        return path
    local = Path(path).expanduser()
    return str(local if local.is_absolute() else (Path(config_dir) / local).resolve())


def read_source(
    cfg: SourceConfig,
    config_dir: Path,
    storage_options: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    detection: LanguageDetectionSettings | None = None,
) -> SourceReadResult:
    """Read, validate, dedup and sample one source, or one shard of it. Raises ``SourceError`` if the file cannot
    be read.

    ``shard = (index, count)``: only the seeds whose ``seed_id`` falls in hash bucket ``index`` of ``count`` are
    kept (so every seed_id lives in exactly one shard, and duplicate ids are caught within it), and only the
    rejects of the records whose position falls in that bucket (every reject is reported once). Memory holds the
    shard only; each shard reads the whole file. ``limit`` applies per shard (``limit / count``). Duplicate
    content across shards is left to the dedup gate before the mixture. Seeds with no language (neither the
    record's language field nor the source's `language:`) get one from ``language.label_seeds`` (``detection``)."""
    path = resolve_path(cfg, config_dir)
    fmt = cfg.resolved_format()
    collector = _Collector(cfg, shard)
    try:
        with _open(cfg, path, storage_options) as f:
            for item in _items(fmt, f, cfg, path):
                collector.add(*item)
    except FileNotFoundError as exc:
        raise SourceError(
            f"source {cfg.name!r}: file {path} not found; fix: put the file back, or correct the source's `path` in "
            "sources.yaml"
        ) from exc
    except PermissionError as exc:
        raise SourceError(
            f"source {cfg.name!r}: cannot read {path}: permission denied; fix: make the file readable by this user"
        ) from exc
    except _READ_ERRORS as exc:
        raise SourceError(
            f"source {cfg.name!r}: cannot read {path}: {type(exc).__name__}: {exc}; fix: replace it with a complete "
            "copy (a truncated download or copy?), or correct `format` / `compression` in sources.yaml"
        ) from exc

    kept, not_sampled = collector.seeds, 0
    limit = cfg.limit if shard is None or cfg.limit is None else -(-cfg.limit // shard[1])
    if limit is not None and len(kept) > limit:
        kept = sorted(kept, key=lambda s: stable_hash(str(cfg.sample_seed), s["seed_id"]))
        not_sampled, kept = len(kept) - limit, kept[:limit]
    kept = sorted(kept, key=lambda s: s["seed_id"])
    languages = label_seeds(kept, detection)
    reasons = Counter(r["reason"] for r in collector.rejects)
    logger.info(
        "source %s: %d rows read from %s -> %d seeds %s, %d rejects %s, %d not sampled (limit %s)",
        cfg.name,
        collector.rows_read,
        path,
        len(kept),
        languages,
        len(collector.rejects),
        dict(reasons),
        not_sampled,
        cfg.limit,
    )
    return SourceReadResult(
        seeds=frame(kept, SEED_SCHEMA),
        rejects=frame(collector.rejects, REJECT_SCHEMA),
        rows_read=collector.rows_read,
        rows_not_sampled=not_sampled,
        path=path,
    )


def empty_source_message(name: str, result: SourceReadResult) -> str | None:
    """Why a source that could be read gave no seed at all (with the fix), or None when it gave some.

    An empty source is a configuration or data problem that only its owner can fix: it fails its own partition,
    by name, instead of passing on an empty table that every later stage would have to explain."""
    if result.seeds.height:
        return None
    if result.rows_read == 0:
        return (
            f"source {name!r}: {result.path} has no records (the file is empty); fix: put the seeds in it, or remove "
            "the source from sources.yaml"
        )
    reasons = Counter(result.rejects["reason"].to_list()) if result.rejects.height else Counter()
    listed = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "none"
    return (
        f"source {name!r}: none of the {result.rows_read} records of {result.path} became a seed (rejected: {listed}); "
        f"fix: check the source's `kind` and `fields` in sources.yaml against the file (the rejects say why: "
        f"boostqa sql \"SELECT reason, detail FROM rejects WHERE stage = 'seeds' AND partition = '{name}'\")"
    )


# --- watched prefixes, partition keys, fingerprints ----------------------------------------------------

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


def _protocol(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else "file"


def _fs_options(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options for ``protocol``: an S3 ``endpoint_url`` (BOOSTQA_S3_ENDPOINT_URL) goes to the client."""
    if protocol not in ("s3", "s3a"):
        return {}
    opts = dict(storage_options or {})
    endpoint = opts.pop("endpoint_url", None)
    if endpoint:
        opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": endpoint}
    return opts


def _filesystem(protocol: str, storage_options: dict[str, Any] | None) -> Any:
    """A fresh filesystem: sensors list the same prefix every tick, so no cached instance or listing."""
    opts = _fs_options(protocol, storage_options)
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
    protocol = _protocol(root)
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
    protocol = _protocol(path)
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


# --- opening and record readers ------------------------------------------------------------------------


def _open(cfg: SourceConfig, path: str, storage_options: dict[str, Any] | None) -> Any:
    protocol = _protocol(path)
    opts: dict[str, Any] = _fs_options(protocol, storage_options)
    if protocol in ("http", "https"):
        opts = {"block_size": 0}  # stream: we read front to back, and servers need not support Range
    compression = {"infer": "infer", "gzip": "gzip", "none": None}[cfg.compression]
    try:
        return fsspec.open(path, "rb", compression=compression, **opts)
    except ValueError as exc:  # e.g. a compression codec that is not installed
        raise SourceError(
            f"source {cfg.name!r}: cannot open {path}: {exc}; fix: install the codec, or set `compression` in "
            "sources.yaml"
        ) from exc


def _lines(f: IO[bytes], keepends: bool = False) -> Iterator[bytes]:
    """Lines of a binary stream; works on any file object (no readline/seek needed)."""
    buf, first = b"", True
    while chunk := f.read(_CHUNK):
        if first:
            chunk, first = chunk.removeprefix(_BOM), False
        parts = (buf + chunk).split(b"\n")
        buf = parts.pop()
        yield from (p + b"\n" if keepends else p for p in parts)
    if buf:
        yield buf


def _items(fmt: str, f: IO[bytes], cfg: SourceConfig, path: str) -> Iterator[_Item]:
    if fmt == "jsonl" or (fmt == "json" and cfg.json_records == "jsonl"):
        return _jsonl_items(f)
    if fmt == "json":
        return _json_items(f, cfg, path)
    if fmt == "parquet":
        return _parquet_items(f, cfg, path)
    return _csv_items(f, cfg, path)


def _jsonl_items(f: IO[bytes]) -> Iterator[_Item]:
    for lineno, line in enumerate(_lines(f), 1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                where,
                None,
                line.decode("utf-8", "replace"),
                ("invalid_utf8", f"not valid UTF-8 ({exc.reason} at byte {exc.start})"),
            )
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield where, None, text, ("unparseable_line", f"not JSON: {exc}")
            continue
        yield where, value, text, None


def _json_items(f: IO[bytes], cfg: SourceConfig, path: str) -> Iterator[_Item]:
    where_file = f"source {cfg.name!r}: {path}"
    try:
        doc = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{where_file} is not valid UTF-8 ({exc.reason} at byte {exc.start}); fix: save the file as UTF-8"
        ) from exc
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{where_file} is not valid JSON: {exc}; fix: replace it with a complete, valid copy (a truncated "
            "download or copy?), or set `format: jsonl` if it holds one object per line"
        ) from exc
    layout = cfg.json_records
    if layout == "dict_values":
        if not isinstance(doc, dict):
            raise SourceError(
                f"{where_file}: json_records is 'dict_values' but the top level is a "
                f"{type(doc).__name__}; fix: set `json_records` to match the file"
            )
        for i, (key, value) in enumerate(doc.items(), 1):
            yield f"record {i} (key {str(key)[:80]!r})", value, None, None
        return
    records: Any = doc
    if layout != "list":
        records = _lookup(doc, layout) if isinstance(doc, dict) else _MISSING
        if records is _MISSING:
            raise SourceError(
                f"{where_file}: key {layout!r} (json_records) is not in the top-level object; fix: set "
                "`json_records` to the key that holds the records (list, dict_values, jsonl or a key)"
            )
    if not isinstance(records, list):
        raise SourceError(
            f"{where_file}: expected a list of records at "
            f"{'the top level' if layout == 'list' else repr(layout)}, got a "
            f"{type(records).__name__}; fix: set `json_records` "
            "(list, dict_values, jsonl or a key)"
        )
    for i, value in enumerate(records, 1):
        yield f"record {i}", value, None, None


def _parquet_items(f: IO[bytes], cfg: SourceConfig, path: str) -> Iterator[_Item]:
    data = f.read()
    try:
        df = pl.read_parquet(io.BytesIO(data))
    except Exception as exc:  # polars/arrow raise several error types for a corrupt file
        raise SourceError(
            f"source {cfg.name!r}: {path} is not a readable Parquet file: {type(exc).__name__}: {str(exc)[:300]}; "
            "fix: replace it with a complete Parquet file (a truncated download or copy?), or correct `format`"
        ) from exc
    for i, row in enumerate(df.iter_rows(named=True), 1):
        yield f"row {i}", row, None, None


def _csv_items(f: IO[bytes], cfg: SourceConfig, path: str) -> Iterator[_Item]:
    reader = csv.reader(line.decode("utf-8", "surrogateescape") for line in _lines(f, keepends=True))
    header: list[str] | None = None
    try:
        header = next((row for row in reader if row), None)
    except csv.Error as exc:
        raise SourceError(
            f"source {cfg.name!r}: {path}: unreadable CSV header: {exc}; fix: the first row must name the columns"
        ) from exc
    if header is None:
        raise SourceError(
            f"source {cfg.name!r}: {path} has no header row (the file is empty); fix: put the seeds in it (a header "
            "row, then one row per seed), or remove the source from sources.yaml"
        )
    if any(_has_surrogates(h) for h in header):
        raise SourceError(
            f"source {cfg.name!r}: {path}: the header row is not valid UTF-8; fix: save the file as UTF-8"
        )
    header = [h.strip() for h in header]
    need = [col for fld, col in cfg.fields.items() if fld in REQUIRED[cfg.kind] and col not in header]
    if need:
        raise SourceError(
            f"source {cfg.name!r}: {path}: the header row {header[:12]} lacks the column(s) "
            f"{need}; fix: the first row must name the columns, or fix `fields`"
        )
    n = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            n += 1
            yield f"row {n} (line {reader.line_num})", None, "", ("unparseable_line", f"malformed CSV: {exc}")
            continue
        if not row:
            continue
        n += 1
        where = f"row {n} (line {reader.line_num})"
        if any(_has_surrogates(c) for c in row):
            yield where, None, _safe("\n".join(row)), ("invalid_utf8", "the row is not valid UTF-8")
        elif len(row) != len(header):
            yield (
                where,
                None,
                to_json(row),
                ("unparseable_line", f"{len(row)} fields where the header has {len(header)}"),
            )
        else:
            yield where, dict(zip(header, row, strict=True)), None, None


# --- values --------------------------------------------------------------------------------------------


def _lookup(record: dict[str, Any], column: str) -> Any:
    """``record[column]``, or a dotted path into nested objects (list indexes allowed); _MISSING if absent."""
    if column in record:
        return record[column]
    cur: Any = record
    for part in column.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def _strip(text: str) -> str:
    """Strip surrounding whitespace, except that multi-line text (code) keeps its first line's indentation."""
    lines = text.rstrip().split("\n")
    while len(lines) > 1 and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines) if len(lines) > 1 else lines[0].strip()


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return _strip(value)
    if isinstance(value, bytes):
        return _strip(value.decode("utf-8", "surrogateescape"))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        if all(isinstance(v, str | int | float) for v in value):
            return ", ".join(_to_str(v) for v in value)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return str(value)


def _is_null(value: Any) -> bool:
    return value is None or value is _MISSING or (isinstance(value, float) and math.isnan(value))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _safe(text: str) -> str:
    """Text that can be written as UTF-8: undecodable bytes and lone surrogates become U+FFFD."""
    if not _has_surrogates(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# --- validation, seeds, dedup --------------------------------------------------------------------------


class _Collector:
    def __init__(self, cfg: SourceConfig, shard: tuple[int, int] | None = None) -> None:
        self.cfg = cfg
        self.shard = shard
        self.partition = cfg.name if shard is None else shard_key(cfg.name, shard[0])
        self.required = REQUIRED[cfg.kind]
        self.rows_read = 0
        self.seeds: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.by_content: dict[str, str] = {}  # normalized content -> kept seed_id
        self.by_id: dict[str, str] = {}  # kept seed_id -> normalized content

    def _mine(self, text: str) -> bool:
        """Whether a seed_id (or, before there is one, a record's position) belongs to this shard."""
        if self.shard is None:
            return True
        index, count = self.shard
        return int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), 16) % count == index

    def reject(self, reason: str, where: str, detail: str, record: str, seed_id: str | None = None) -> None:
        if not self._mine(seed_id or where):
            return
        self.rejects.append(
            {
                "stage": STAGE,
                "partition": self.partition,
                "source": self.cfg.name,
                "seed_id": seed_id,
                "qa_id": None,
                "reason": reason,
                "detail": _safe(f"{where}: {detail}")[:MAX_DETAIL_CHARS],
                "raw_output": None,
                "request_hash": None,
                "record": _safe(record)[:MAX_RECORD_CHARS],
            }
        )

    def add(self, where: str, value: Any, raw: str | None, error: tuple[str, str] | None) -> None:
        self.rows_read += 1
        record = raw if raw is not None else to_json(value)
        if error is not None:
            self.reject(error[0], where, error[1], record)
            return
        if not isinstance(value, dict):
            self.reject("not_an_object", where, f"expected a JSON object, got {type(value).__name__}", record)
            return
        cfg = self.cfg
        values: dict[str, str | None] = {}
        for fld, col in cfg.fields.items():
            found = _lookup(value, col)
            if fld in self.required and _is_null(found):
                state = "missing" if found is _MISSING else "null"
                detail = f"required field {fld!r} (column {col!r}) is {state}"
                self.reject("missing_field", where, detail, record)
                return
            values[fld] = None if _is_null(found) else _to_str(found)
        meta = {col: v for col in cfg.meta_fields if (v := _lookup(value, col)) is not _MISSING}
        meta_json = to_json(meta)
        bad = [f for f, v in values.items() if v is not None and _has_surrogates(v)]
        if bad or _has_surrogates(meta_json):
            self.reject("invalid_utf8", where, f"invalid UTF-8 in {bad or ['meta']}", record)
            return
        empty = [f for f in self.required if not (values[f] or "").strip()]
        if empty:
            cols = [col for fld, col in cfg.fields.items() if fld in empty]
            self.reject("empty_text", where, f"required field(s) {empty} (columns {cols}) are empty", record)
            return
        question, answer, text = values.get("question"), values.get("answer"), values.get("text")
        size = sum(len(v or "") for v in (question, answer, text))
        content = (text or "") if cfg.kind == "passage" else f"{question}\n{answer or ''}"
        native_id = values.get("id") or ""
        seed_id = make_seed_id(cfg.name, native_id or None, content)
        if not self._mine(seed_id):  # another shard's seed: not read into memory here
            return
        if size > cfg.max_chars:
            self.reject("oversize", where, f"{size} chars > max_chars {cfg.max_chars}", record, seed_id)
            return
        norm = normalize_text(content)
        if seed_id in self.by_id and self.by_id[seed_id] != norm:
            detail = f"id {native_id!r} already used by {seed_id} with other content"
            self.reject("duplicate_id", where, detail, record, seed_id)
            return
        if norm in self.by_content:
            self.reject("duplicate", where, f"same content as {self.by_content[norm]}", record, seed_id)
            return
        self.by_content[norm] = seed_id
        self.by_id[seed_id] = norm
        self.seeds.append(
            {
                "seed_id": seed_id,
                "source": cfg.name,
                "native_id": native_id,
                "kind": cfg.kind,
                # None: detected in one batch once the sample is drawn (read_source), so only kept seeds pay for it.
                "language": values.get("language") or cfg.language,
                "language_confidence": None,
                "language_origin": "record" if values.get("language") else ("source" if cfg.language else None),
                "question": question,
                "answer": answer,
                "text": text,
                "title": values.get("title") or None,
                "url": values.get("url") or None,
                "license": values.get("license") or cfg.license,
                "meta": meta_json,
            }
        )
