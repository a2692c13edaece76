"""Read one seed source (jsonl, json, parquet, csv; local, s3://, https:// or pkg://) into seeds and rejects.
Watched prefixes and ``seeds`` partition keys (listing, fingerprints, resolving a key) are ``source_watch.py``'s.

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
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import polars as pl

from boostqa_assets.configs import LanguageDetectionSettings, SourceConfig, shard_key
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


# --- filesystems ------------------------------------------------------------------------------------


def protocol_of(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else "file"


def fsspec_options(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options for ``protocol``: an S3 ``endpoint_url`` (BOOSTQA_S3_ENDPOINT_URL) goes to the client."""
    if protocol not in ("s3", "s3a"):
        return {}
    opts = dict(storage_options or {})
    endpoint = opts.pop("endpoint_url", None)
    if endpoint:
        opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": endpoint}
    return opts


# --- opening and record readers ------------------------------------------------------------------------


def _open(cfg: SourceConfig, path: str, storage_options: dict[str, Any] | None) -> Any:
    protocol = protocol_of(path)
    opts: dict[str, Any] = fsspec_options(protocol, storage_options)
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
