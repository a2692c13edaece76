"""Per-row dedup keys of refined QA, computed chunk by chunk and kept in one Parquet "keys file" per partition.

A keys file holds, for every row of a partition's refined Parquet files (in file order, then row order):
``src`` (the index of the file in the ``sources`` list of the file's metadata), ``row`` (row number in that
file), ``qa_id``, ``text`` (the compared text, raw: the id-order tie-break and the Jaccard verification use it),
``e0``/``e1`` (the 128-bit exact key of the normalized text as two uint64), ``has_sh`` (the text has at least
one shingle), ``b0``..``b{bands-1}`` (the LSH bucket key of each band, uint64) and ``sig`` (the MinHash
signature, ``4 * num_perm`` bytes). Its Parquet key-value metadata ``boostqa.keys`` records the key version
(``keys_version``: everything that changes a key) and each source file's path (relative to the data root),
fingerprint (size + mtime locally, size + ETag on S3) and row count, so a reader can tell a keys file that
still describes the refined data from a stale one.

Who writes them: the ``qa_signatures[discipline x grade]`` asset (one partition per Dagster step: the per-row
work runs on whatever executor runs the steps), or the mixture itself, in its own work folder, for partitions
whose keys file is missing or stale. Both call ``write_keys_file``, so the keys are identical.

Memory: one chunk of ``chunk_rows`` rows at a time (its texts, ~150 shingle hashes a row, the signatures).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from boostqa_assets.logic.minhash import (
    DedupConfig,
    band_keys,
    dedup_text,
    exact_key,
    lsh_params,
    shingle_hashes,
    signatures,
)
from boostqa_assets.logic.spill import Progress, iter_parquet, publish_file
from boostqa_assets.records import normalize_text

logger = logging.getLogger(__name__)

KEYS_ASSET = "qa_signatures"
KEYS_FILE = "part-0000.parquet"
META_KEY = b"boostqa.keys"
_FORMAT = 1  # bump when the layout or a hash changes


def keys_version(cfg: DedupConfig) -> str:
    """A short hash of everything that changes a key: the layout, the compared text, shingling, MinHash and
    banding (the threshold only through the bands it implies; the screen and verification are not in it)."""
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm, cfg.bands) if cfg.near else (0, 0)
    parts = [_FORMAT, cfg.text, cfg.shingle, cfg.ngram, cfg.num_perm, cfg.seed, bands, rows, cfg.exact, cfg.near]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SourceFile:
    """A refined Parquet file as a keys file records it."""

    path: str  # relative to the data root
    fingerprint: str
    rows: int


def relative(store: Any, path: str) -> str:
    """``path`` relative to the store's root (local and S3 paths alike)."""
    root = store.root.split("://", 1)[-1].rstrip("/") + "/"
    bare = path.split("://", 1)[-1]
    return bare[len(root) :] if bare.startswith(root) else bare


def fingerprint(store: Any, path: str) -> str:
    """What identifies a file's content without reading it: size + mtime locally, size + ETag elsewhere."""
    info = store.fs.info(path)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{stamp}"


def partition_folder(path: str) -> str:
    """The partition folder of a part file (``.../refined_qa/discipline=x/grade=y``)."""
    return posixpath.dirname(path)


def keys_path(store: Any, refined_folder: str) -> str:
    """Where ``qa_signatures`` keeps the keys file of a refined partition folder (same hive path)."""
    rel = relative(store, refined_folder)
    dirs = rel.partition("/")[2]
    return store.path(KEYS_ASSET, dirs, KEYS_FILE)


def read_keys_meta(store: Any, path: str) -> dict[str, Any] | None:
    """The ``boostqa.keys`` metadata of a keys file, or None when it is missing or unreadable."""
    try:
        with store.fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else None


def is_fresh(meta: dict[str, Any] | None, version: str, sources: Sequence[SourceFile]) -> bool:
    """The keys file was computed with this key version from exactly these files (paths and fingerprints)."""
    if meta is None or meta.get("version") != version:
        return False
    recorded = [(s["path"], s["fingerprint"]) for s in meta.get("sources", [])]
    return recorded == [(s.path, s.fingerprint) for s in sources]


def chunk_keys(ids: pl.Series, raw: pl.Series, cfg: DedupConfig, bands: int, rows: int) -> dict[str, Any]:
    """The key columns of one chunk (numpy arrays; ``sig`` as a uint32 matrix)."""
    texts = raw.to_list()
    normalized = [normalize_text(t) for t in texts]
    digests = np.frombuffer(b"".join(exact_key(t) for t in normalized), dtype="<u8").reshape(-1, 2)
    out: dict[str, Any] = {"e0": digests[:, 0], "e1": digests[:, 1]}
    if cfg.near:
        flat, offsets = shingle_hashes(normalized, cfg)
        sig = signatures(flat, offsets, cfg)
        out["has_sh"] = np.diff(offsets) > 0
        out["bands"] = band_keys(sig, bands, rows)
        out["sig"] = sig
    else:
        out["has_sh"] = np.zeros(len(texts), dtype=bool)
    return out


def keys_schema(cfg: DedupConfig) -> pa.Schema:
    bands = lsh_params(cfg.threshold, cfg.num_perm, cfg.bands)[0] if cfg.near else 0
    fields = [
        pa.field("src", pa.int32()),
        pa.field("row", pa.int64()),
        pa.field("qa_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("e0", pa.uint64()),
        pa.field("e1", pa.uint64()),
        pa.field("has_sh", pa.bool_()),
        *(pa.field(f"b{k}", pa.uint64()) for k in range(bands)),
    ]
    if cfg.near:
        fields.append(pa.field("sig", pa.binary(4 * cfg.num_perm)))
    return pa.schema(fields)


def write_keys_file(
    store: Any, files: Sequence[str], cfg: DedupConfig, target: str | Path, chunk_rows: int, id_col: str = "qa_id"
) -> tuple[int, list[SourceFile]]:
    """Compute the keys of every row of ``files`` (refined part files of one partition, in order) and write
    them to ``target`` (a store path, published whole; or a local Path). Returns (rows, sources)."""
    bands, rows_per_band = lsh_params(cfg.threshold, cfg.num_perm, cfg.bands) if cfg.near else (0, 0)
    version = keys_version(cfg)
    sources: list[SourceFile] = []
    for path in files:
        sources.append(SourceFile(relative(store, path), fingerprint(store, path), 0))
    local = Path(target) if isinstance(target, Path) else Path(_scratch_name(target))
    local.parent.mkdir(parents=True, exist_ok=True)
    schema = keys_schema(cfg)
    columns = ["qa_id", "question"] + (["refined_answer", "answer"] if cfg.text != "question" else [])
    total = 0
    progress = Progress(f"dedup keys {relative(store, partition_folder(files[0])) if files else ''}", None)
    counts: list[int] = []
    with pq.ParquetWriter(str(local), schema, compression="zstd") as writer:
        for src, path in enumerate(files):
            n_file = 0
            with store.fs.open(path, "rb") as f:
                names = set(pq.ParquetFile(f).schema_arrow.names)
            wanted = [c for c in columns if c in names]
            for chunk in iter_parquet(path, wanted, chunk_rows, store.fs):
                if chunk[id_col].null_count():
                    raise ValueError(f"{path}: dedup id column {id_col!r} has null values")
                raw = dedup_text(chunk, cfg)
                keys = chunk_keys(chunk[id_col], raw, cfg, bands, rows_per_band)
                n = chunk.height
                arrays = [
                    pa.array(np.full(n, src, dtype=np.int32)),
                    pa.array(np.arange(n_file, n_file + n, dtype=np.int64)),
                    chunk[id_col].cast(pl.Utf8).to_arrow(),
                    raw.to_arrow(),
                    pa.array(keys["e0"]),
                    pa.array(keys["e1"]),
                    pa.array(keys["has_sh"]),
                    *(pa.array(np.ascontiguousarray(keys["bands"][:, k])) for k in range(bands)),
                ]
                if cfg.near:
                    sig = np.ascontiguousarray(keys["sig"], dtype="<u4")
                    sig_type = schema.field("sig").type
                    buffers = [None, pa.py_buffer(sig.tobytes())]
                    arrays.append(pa.FixedSizeBinaryArray.from_buffers(sig_type, n, buffers))
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                n_file += n
                progress.add(n)
            counts.append(n_file)
            total += n_file
        sources = [SourceFile(s.path, s.fingerprint, c) for s, c in zip(sources, counts, strict=True)]
        meta = {"version": version, "sources": [s.__dict__ for s in sources], "rows": total}
        writer.add_key_value_metadata({META_KEY.decode(): json.dumps(meta)})
    progress.finish()
    if not isinstance(target, Path):
        publish_file(store, local, target)
    return total, sources


def _scratch_name(target: str) -> str:
    import tempfile
    import uuid

    return str(Path(tempfile.gettempdir()) / f"boostqa-keys-{uuid.uuid4().hex}-{posixpath.basename(target)}")
