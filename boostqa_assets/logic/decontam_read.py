"""Reading benchmark files for decontamination (``decontam.py``): each record's text fields become segments.

Benchmarks are read with the seed reader's machinery (path resolution, local / ``s3://`` / ``https://`` /
``pkg://`` files, gzip, JSON / JSONL / CSV / Parquet parsing), so a benchmark file is configured like a source.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from boostqa_assets.configs import BenchmarkRef, SourceConfig
from boostqa_assets.logic.sources import _MISSING, _READ_ERRORS, SourceError, _items, _lookup, _open, resolve_path
from boostqa_assets.records import to_json

logger = logging.getLogger(__name__)


class BenchmarkError(SourceError):
    """A benchmark file is missing, unreadable or does not have the configured columns."""


def _read_benchmark(
    ref: BenchmarkRef,
    config_dir: Path,
    storage_options: dict[str, Any] | None,
    items: list[tuple[str, str]],
    seg_item: list[int],
    seg_field: list[str],
    seg_text: list[str],
) -> tuple[str, int]:
    """Append the items and segments of one benchmark; returns (resolved path, records skipped)."""
    # The seed reader's view of the file: same path resolution, opening (local, s3, http, gzip) and parsing.
    view = SourceConfig.model_construct(
        name=ref.name,
        path=ref.path,
        format=ref.format,
        compression="infer",
        kind="passage",
        fields={},
        json_records=ref.json_records,
    )
    where_bench = f"benchmark {ref.name!r}"
    try:
        path = resolve_path(view, config_dir)
        fmt = view.resolved_format()
    except (SourceError, ValueError) as exc:
        raise BenchmarkError(str(exc).replace(f"source {ref.name!r}", where_bench, 1)) from exc
    files = _expand(path, storage_options, where_bench)
    seen_fields: set[str] = set()
    skipped = unreadable = records = 0
    for file in files:
        # One file of several (CMMLU, C-Eval: one CSV per subject): ids are `<subject>:<id or record number>`.
        prefix = f"{PurePosixPath(file).stem}:" if len(files) > 1 else ""
        s, u, r = _read_file(
            ref, view, fmt, file, prefix, storage_options, items, seg_item, seg_field, seg_text, seen_fields
        )
        skipped, unreadable, records = skipped + s, unreadable + u, records + r
    absent = [c for c in ref.text_fields if c not in seen_fields]
    if records and absent:
        raise BenchmarkError(
            f"{where_bench}: {path}: no record has the text field(s) {absent}; fix: `text_fields` must name "
            "columns of the file"
        )
    if unreadable:
        logger.warning("%s: %d unreadable records skipped", where_bench, unreadable)
    return path, skipped + unreadable


def _expand(path: str, storage_options: dict[str, Any] | None, where_bench: str) -> list[str]:
    """The files a benchmark path names: itself, or every file a glob (``*``, ``?``, ``[``) matches, sorted."""
    if not any(c in path for c in "*?[") or path.startswith(("http://", "https://")):
        return [path]
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    opts = dict(storage_options or {}) if protocol in ("s3", "s3a") else {}
    endpoint = opts.pop("endpoint_url", None)
    if endpoint:
        opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": endpoint}
    fs = fsspec.filesystem(protocol, **opts)
    found = sorted(fs.glob(path))
    if not found:
        raise BenchmarkError(f"{where_bench}: no file matches {path}; fix: correct the benchmark's `path`")
    return [f"{protocol}://{f}" if protocol != "file" else f for f in found]


def _read_file(
    ref: BenchmarkRef,
    view: SourceConfig,
    fmt: str,
    path: str,
    prefix: str,
    storage_options: dict[str, Any] | None,
    items: list[tuple[str, str]],
    seg_item: list[int],
    seg_field: list[str],
    seg_text: list[str],
    seen_fields: set[str],
) -> tuple[int, int, int]:
    """Append the items and segments of one benchmark file; returns (skipped, unreadable, records)."""
    where_bench = f"benchmark {ref.name!r}"
    skipped = unreadable = records = 0
    try:
        with _open(view, path, storage_options) as f:
            for where, value, _raw, error in _items(fmt, f, view, path):
                records += 1
                if error is not None or not isinstance(value, dict):
                    unreadable += 1
                    if unreadable <= 5:
                        logger.warning("%s: %s: %s", where_bench, where, error[1] if error else "not an object")
                    continue
                if any(_text(_lookup(value, col)) == want for col, want in ref.skip_if.items()):
                    skipped += 1
                    continue
                segments: list[tuple[str, str]] = []
                for col in ref.text_fields:
                    found = _lookup(value, col)
                    if found is not _MISSING:
                        seen_fields.add(col)
                    parts = found if isinstance(found, list) else [found]
                    segments.extend((col, t) for p in parts if (t := _text(p)))
                if not segments:
                    skipped += 1
                    continue
                item_id = _text(_lookup(value, ref.id_field)) if ref.id_field else None
                items.append((ref.name, prefix + (item_id or str(records))))
                for col, text in segments:
                    seg_item.append(len(items) - 1)
                    seg_field.append(col)
                    seg_text.append(text)
    except SourceError as exc:
        raise BenchmarkError(str(exc).replace(f"source {ref.name!r}", where_bench, 1)) from exc
    except FileNotFoundError as exc:
        raise BenchmarkError(f"{where_bench}: file {path} not found") from exc
    except _READ_ERRORS as exc:
        raise BenchmarkError(f"{where_bench}: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    return skipped, unreadable, records


def _text(value: Any) -> str:
    if value is None or value is _MISSING:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict | list):
        return to_json(value)
    return str(value)
