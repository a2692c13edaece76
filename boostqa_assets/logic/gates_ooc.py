"""The gates between ``refined_qa`` and the mixture, streamed: the rule of ``gates.py`` in bounded memory.

1. **Keys** (``prepare_keys``): per refined partition, the keys file of ``qa_signatures`` when it still
   describes the partition's files (same key version, same file fingerprints), else computed here into the work
   folder (``gate_keys.write_keys_file``, chunk by chunk).
2. **Dedup** (``dedup_ooc.dedup_out_of_core``): the global merge in DuckDB; which rows go, and why.
3. **Stream** (``stream_gates``): the refined files once more, ``chunk_rows`` rows at a time: removed rows
   become ``exact_duplicate`` / ``near_duplicate`` rejects, survivors are checked against the benchmark index
   (``decontam.decontaminate``, fixed size) and contaminated ones become rejects; what passes is appended, per
   recipe, to that recipe's pool spill (the document text, its token count and its sampling key: ``mixture_ooc``
   sorts it). Rejects are written chunk by chunk (``RejectSink``).

Same rows kept, same rejects (reason and detail), same counts as ``gates.apply_gates`` (tests compare them).
Memory: a chunk, the benchmark index (~25 MB for MMLU), the removed rows of one refined file, DuckDB's limit.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from boostqa_assets.configs import QualityConfig, Recipe
from boostqa_assets.logic.decontam import BenchmarkIndex, decontaminate, reject_rows
from boostqa_assets.logic.dedup_ooc import KeysSource, OocDedup, dedup_out_of_core
from boostqa_assets.logic.gate_keys import (
    KEYS_ASSET,
    SourceFile,
    fingerprint,
    is_fresh,
    keys_path,
    keys_version,
    partition_folder,
    read_keys_meta,
    relative,
    write_keys_file,
)
from boostqa_assets.logic.gates import STAGE, decontam_config
from boostqa_assets.logic.minhash import DedupConfig
from boostqa_assets.logic.mixture import POOL_SCHEMA, pool_rows
from boostqa_assets.logic.spill import Progress, SpillConfig, iter_parquet, parquet_rows, publish_file
from boostqa_assets.records import REFINED_SCHEMA, REJECT_SCHEMA, to_json

logger = logging.getLogger(__name__)

_REJECT_FLUSH_ROWS = 100_000


def dedup_config(quality: QualityConfig, chunk_rows: int) -> DedupConfig:
    return DedupConfig(**quality.dedup.model_dump(), chunk_rows=chunk_rows)


def _stored_keys_files(store: Any) -> set[str]:
    """Every keys file ``qa_signatures`` has written, in one listing (paths without the protocol)."""
    root = store.path(KEYS_ASSET)
    try:
        return {store.fs._strip_protocol(p) for p in store.fs.find(root)}
    except FileNotFoundError:
        return set()


def prepare_keys(
    store: Any, files: Sequence[str], cfg: DedupConfig, spill: SpillConfig
) -> tuple[list[KeysSource], dict[str, int]]:
    """One keys file per refined partition folder (in ``files`` order): ``qa_signatures``' when fresh, else
    computed into the work folder. Returns the keys files and how many were reused / computed."""
    version = keys_version(cfg)
    groups: dict[str, list[str]] = {}
    for path in files:
        groups.setdefault(partition_folder(path), []).append(path)
    keys: list[KeysSource] = []
    counts = {"keys_reused": 0, "keys_computed": 0}
    out = spill.work_dir / "keys"
    out.mkdir(parents=True, exist_ok=True)
    stale: list[tuple[list[str], Path]] = []
    stored_files = _stored_keys_files(store)
    for i, (folder, group) in enumerate(groups.items()):
        stored = keys_path(store, folder)
        # Only a keys file that exists is opened and its sources fingerprinted (on S3 each probe is a request).
        if store.fs._strip_protocol(stored) in stored_files:
            sources = [SourceFile(relative(store, p), fingerprint(store, p), 0) for p in group]
            if is_fresh(read_keys_meta(store, stored), version, sources):
                keys.append(KeysSource(stored, store.fs))
                counts["keys_reused"] += 1
                continue
        local = out / f"{i:05d}.parquet"
        stale.append((group, local))
        keys.append(KeysSource(str(local)))
        counts["keys_computed"] += 1
    stale_rows = sum(parquet_rows(p, store.fs) for group, _ in stale for p in group) if len(stale) > 1 else 0
    if spill.workers > 1 and stale_rows >= spill.parallel_min_rows:
        from boostqa_assets.logic.gates_parallel import keys_parallel

        counts["peak_rss_worker_mb"] = keys_parallel(store, stale, cfg, spill)
    else:
        for group, local in stale:
            write_keys_file(store, group, cfg, local, spill.chunk_rows)
    logger.info(
        "dedup keys: %d partitions, %d from qa_signatures, %d computed here",
        len(groups),
        counts["keys_reused"],
        counts["keys_computed"],
    )
    return keys, counts


class RejectSink:
    """The rejects of one stage partition, written chunk by chunk and published at ``commit``.

    With a store that commits partitions by manifest (``Store.rejects_writer``) each flush is one part file;
    otherwise the rows stream into one local Parquet file that replaces ``rejects_path`` whole at the end."""

    def __init__(self, store: Any, stage: str, partition: str, work_dir: Path) -> None:
        self.store, self.stage, self.partition = store, stage, partition
        self.rows = 0
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0
        self._writer: Any = None
        self._local: Path | None = None
        if hasattr(store, "rejects_writer"):
            self._writer = store.rejects_writer(stage, partition)
        else:
            self._local = work_dir / f"rejects-{uuid.uuid4().hex}.parquet"
            self._pq = pq.ParquetWriter(str(self._local), _arrow_schema(REJECT_SCHEMA), compression="zstd")

    def write(self, df: pl.DataFrame) -> None:
        if df.height:
            self._buffer.append(df)
            self._buffered += df.height
            self.rows += df.height
            if self._buffered >= _REJECT_FLUSH_ROWS:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        df = pl.concat(self._buffer).select([pl.col(c).cast(t) for c, t in REJECT_SCHEMA.items()])
        self._buffer, self._buffered = [], 0
        if self._writer is not None:
            self._writer.write(df)
        else:
            self._pq.write_table(df.to_arrow().cast(_arrow_schema(REJECT_SCHEMA)))

    def commit(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.commit()
        else:
            self._pq.close()
            assert self._local is not None
            publish_file(self.store, self._local, self.store.rejects_path(self.stage, self.partition))


def _arrow_schema(schema: pl.Schema) -> pa.Schema:
    return pl.DataFrame(schema=schema).to_arrow().schema


@dataclass
class StreamResult:
    counts: dict[str, int]  # pool, exact_duplicate, near_duplicate, contaminated (as gates.apply_gates)
    pools: dict[str, list[Path]]  # recipe name -> its pool spill files (mixture.POOL_SCHEMA)
    refined_rows: int
    stats: dict[str, Any] = field(default_factory=dict)


def run_gates(
    store: Any,
    files: Sequence[str],
    quality: QualityConfig,
    index: BenchmarkIndex | None,
    recipes: Sequence[Recipe],
    spill: SpillConfig,
) -> StreamResult:
    """Keys, dedup merge and the streaming pass, with one rejects partition per recipe (as ``qa_mixture``)."""
    t0 = time.perf_counter()
    cfg = dedup_config(quality, spill.chunk_rows)
    dedup: OocDedup | None = None
    stats: dict[str, Any] = {}
    if files and (cfg.exact or cfg.near):
        keys, stats = prepare_keys(store, files, cfg, spill)
        dedup = dedup_out_of_core(keys, cfg, spill)
        stats.update(dedup.stats)
    sinks = {r.name: RejectSink(store, STAGE, r.name, spill.work_dir) for r in recipes}
    try:
        result = stream_gates(store, files, dedup, quality, index, recipes, spill, sinks)
    finally:
        if dedup is not None:
            dedup.con.close()
    for sink in sinks.values():
        sink.commit()
    worker_peak = max(int(stats.get("peak_rss_worker_mb", 0)), int(result.stats.get("peak_rss_worker_mb", 0)))
    result.stats = {**stats, "peak_rss_worker_mb": worker_peak, "seconds_gates": round(time.perf_counter() - t0, 3)}
    return result


def stream_gates(
    store: Any,
    files: Sequence[str],
    dedup: OocDedup | None,
    quality: QualityConfig,
    index: BenchmarkIndex | None,
    recipes: Sequence[Recipe],
    spill: SpillConfig,
    sinks: dict[str, RejectSink],
) -> StreamResult:
    """Step 3 of the module docstring over ``files`` (the order the dedup merge saw them in): in this process,
    or over ``spill.workers`` processes (``gates_parallel``) when the pool is large enough to pay for them."""
    if dedup is not None:
        for fid, path in enumerate(files):
            if dedup.files[fid] != relative(store, path):
                raise RuntimeError(f"refined files changed during the gates: {path} is not {dedup.files[fid]}")
    rows = int(dedup.stats["rows_in"]) if dedup is not None else None
    if spill.workers > 1 and len(files) > 1 and (rows or 0) >= spill.parallel_min_rows:
        from boostqa_assets.logic.gates_parallel import stream_parallel

        return stream_parallel(store, files, dedup, quality, index, recipes, spill, sinks)
    counts = {"pool": 0, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0}
    pools = {r.name: spill.work_dir / f"pool-{r.name}.parquet" for r in recipes}
    writers = {name: pq.ParquetWriter(str(path), POOL_SCHEMA, compression="zstd") for name, path in pools.items()}
    progress = Progress("gates: stream refined rows", rows)
    try:
        for fid, path in enumerate(files):
            removed = dedup.removed_in(fid) if dedup is not None else no_removals()
            stream_file(
                store,
                path,
                removed,
                index,
                quality,
                recipes,
                spill.chunk_rows,
                lambda df: _to_sinks(df, sinks),
                writers,
                counts,
                progress,
            )
    finally:
        for w in writers.values():
            w.close()
    progress.finish()
    return StreamResult(counts, {k: [v] for k, v in pools.items()}, counts["pool"])


def stream_file(
    store: Any,
    path: str,
    removed: tuple[np.ndarray, list[str], list[str], np.ndarray],
    index: BenchmarkIndex | None,
    quality: QualityConfig,
    recipes: Sequence[Recipe],
    chunk_rows: int,
    emit: Callable[[pl.DataFrame], None],
    writers: dict[str, Any],
    counts: dict[str, int],
    progress: Progress,
) -> None:
    """One refined file, chunk by chunk: dedup rejects, decontamination, the recipes' pool rows."""
    decontam_cfg = decontam_config(quality)
    offset = 0
    for chunk in iter_parquet(path, None, chunk_rows, store.fs):
        chunk = chunk.select([pl.col(c).cast(t) for c, t in REFINED_SCHEMA.items()])
        n = chunk.height
        counts["pool"] += n
        kept = _dedup_rejects(chunk, offset, removed, counts, emit)
        offset += n
        if index is not None and kept.height:
            keep, matches = decontaminate(kept, index, decontam_cfg)
            contaminated = reject_rows(kept, matches, STAGE, "", request_hash_col="refine_request_hash")
            counts["contaminated"] += contaminated.height
            if contaminated.height:
                emit(contaminated)
            kept = kept.filter(keep)
        kept = kept.filter(pl.col("status") == "kept")
        for recipe in recipes:
            if kept.height:
                writers[recipe.name].write_table(pool_rows(kept, recipe))
        progress.add(n)


def no_removals() -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    return np.empty(0, np.int64), [], [], np.empty(0)


def _dedup_rejects(
    chunk: pl.DataFrame,
    offset: int,
    removed: tuple[np.ndarray, list[str], list[str], np.ndarray],
    counts: dict[str, int],
    emit: Callable[[pl.DataFrame], None],
) -> pl.DataFrame:
    """Reject rows of ``chunk`` (rows ``offset``.. of its file) that the dedup removed; return the others."""
    rows, reasons, dup_of, sims = removed
    lo, hi = np.searchsorted(rows, [offset, offset + chunk.height])
    if lo == hi:
        return chunk
    local = rows[lo:hi] - offset
    mask = np.ones(chunk.height, dtype=bool)
    mask[local] = False
    out = []
    for k, i in enumerate(local.tolist()):
        row = chunk.row(i, named=True)
        reason = reasons[lo + k]
        counts[reason] += 1
        out.append(
            {
                "stage": STAGE,
                "partition": "",
                "source": row["source"],
                "seed_id": row["seed_id"],
                "qa_id": row["qa_id"],
                "reason": reason,
                "detail": f"duplicate of {dup_of[lo + k]} (similarity {float(sims[lo + k]):.2f})",
                "raw_output": None,
                "request_hash": row.get("refine_request_hash"),
                "record": to_json(row),
            }
        )
    emit(pl.DataFrame(out, schema=REJECT_SCHEMA, orient="row"))
    return chunk.filter(pl.Series(mask))


def _to_sinks(rejects: pl.DataFrame, sinks: dict[str, RejectSink]) -> None:
    """The same rejects into every recipe's partition (the partition column names the recipe)."""
    if rejects.height:
        for name, sink in sinks.items():
            sink.write(rejects.with_columns(pl.lit(name).alias("partition")))


def work_folder(base: str | None = None) -> Path:
    """A fresh folder for the gates' spill (``TMPDIR`` by default: put it on a disk with room, ~1 KB a row)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="boostqa-gates-", dir=base))
