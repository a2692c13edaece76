"""The per-file work of the out-of-core gates over a few local processes (``SpillConfig.workers``).

Keys (normalization, shingling, MinHash) and the streaming pass (decontamination, tokenization) are pure
Python and numpy per row, one core each; the refined files are independent, so a pool of processes (spawned:
polars and DuckDB threads do not survive a fork) takes one file at a time. What must stay global does: the
dedup merge ran before (its removed rows go to the workers as a Parquet file, read by file id), and the parent
alone writes the rejects partitions (workers hand back local reject files, streamed into the sinks in file
order) and owns DuckDB. Pool spills stay one file per worker job; the mixture's sort reads them all.

Memory per worker: a chunk, the benchmark index (~25 MB, sent once), one file's removed rows. This is the
single-machine analogue of ``qa_signatures``, which moves the keys to Dagster's executors.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from boostqa_assets.configs import QualityConfig, Recipe
from boostqa_assets.logic.decontam import BenchmarkIndex
from boostqa_assets.logic.dedup_ooc import OocDedup
from boostqa_assets.logic.minhash import DedupConfig
from boostqa_assets.logic.mixture import POOL_SCHEMA
from boostqa_assets.logic.spill import Progress, SpillConfig, iter_parquet
from boostqa_assets.records import REJECT_SCHEMA

logger = logging.getLogger(__name__)

_STATE: dict[str, Any] = {}


def _pool(spill: SpillConfig, initializer: Any = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        spill.workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer, initargs=initargs
    )


def _store(root: str, storage_options: dict[str, Any]) -> Any:
    from boostqa_assets.storage import Store

    return Store(root, storage_options)


# --- keys ------------------------------------------------------------------------------------------------


def peak_rss_mb() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it starts afresh at exec, so a spawned worker does not
    report the parent's peak as its own)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _keys_job(root: str, options: dict[str, Any], files: list[str], cfg: DedupConfig, out: str, rows: int) -> int:
    from boostqa_assets.logic.gate_keys import write_keys_file

    write_keys_file(_store(root, options), files, cfg, Path(out), rows)
    return peak_rss_mb()


def keys_parallel(store: Any, jobs: Sequence[tuple[list[str], Path]], cfg: DedupConfig, spill: SpillConfig) -> int:
    """Write the keys file of each (files, local path) job, ``spill.workers`` at a time; the workers' peak RSS."""
    peak = 0
    progress = Progress("dedup keys (processes)", len(jobs), "partitions")
    with _pool(spill) as pool:
        futures = [
            pool.submit(_keys_job, store.root, store.storage_options, files, cfg, str(out), spill.chunk_rows)
            for files, out in jobs
        ]
        for f in futures:
            peak = max(peak, f.result())
            progress.add(1)
    progress.finish()
    return peak


# --- the streaming pass ----------------------------------------------------------------------------------


def _init(
    index: BenchmarkIndex | None, quality: QualityConfig, recipes: list[Recipe], root: str, options: dict
) -> None:
    _STATE.update(index=index, quality=quality, recipes=recipes, store=_store(root, options))


def _removed(path: str, fid: int) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    table = pq.read_table(path, filters=[("fid", "=", fid)]).sort_by("row")
    return (
        table["row"].to_numpy(),
        table["reason"].to_pylist(),
        table["dup_of"].to_pylist(),
        table["sim"].to_numpy(),
    )


def _file_job(fid: int, path: str, removed_path: str, out: str, chunk_rows: int) -> dict[str, int]:
    """One refined file: rejects to ``out``-rejects.parquet, pool rows to ``out``-pool-<recipe>.parquet."""
    from boostqa_assets.logic.gates_ooc import stream_file

    recipes: list[Recipe] = _STATE["recipes"]
    reject_schema = _arrow(REJECT_SCHEMA)
    counts = {"pool": 0, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0}
    writers = {r.name: pq.ParquetWriter(f"{out}-pool-{r.name}.parquet", POOL_SCHEMA) for r in recipes}
    with pq.ParquetWriter(f"{out}-rejects.parquet", reject_schema) as rejects:
        try:
            stream_file(
                _STATE["store"],
                path,
                _removed(removed_path, fid),
                _STATE["index"],
                _STATE["quality"],
                recipes,
                chunk_rows,
                lambda df: rejects.write_table(df.to_arrow().cast(reject_schema)),
                writers,
                counts,
                Progress(f"gates: {path}", None, every_s=1e9),
            )
        finally:
            for w in writers.values():
                w.close()
    return {**counts, "peak_rss_mb": peak_rss_mb()}


def _arrow(schema: Any) -> pa.Schema:
    import polars as pl

    return pl.DataFrame(schema=schema).to_arrow().schema


def stream_parallel(
    store: Any,
    files: Sequence[str],
    dedup: OocDedup | None,
    quality: QualityConfig,
    index: BenchmarkIndex | None,
    recipes: Sequence[Recipe],
    spill: SpillConfig,
    sinks: dict[str, Any],
) -> Any:
    """``gates_ooc.stream_gates`` with one worker job per refined file; same counts, rejects and pool rows."""
    from boostqa_assets.logic.gates_ooc import StreamResult, _to_sinks

    t0 = time.perf_counter()
    removed_path = spill.work_dir / "removed.parquet"
    if dedup is not None:
        dedup.con.execute(f"COPY (SELECT * FROM removed ORDER BY fid, row) TO '{removed_path}' (FORMAT parquet)")
    else:
        pq.write_table(pa.table({"fid": pa.array([], pa.int32()), "row": pa.array([], pa.int64())}), removed_path)
    parts = spill.work_dir / "parts"
    parts.mkdir(exist_ok=True)
    counts = {"pool": 0, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0}
    pools: dict[str, list[Path]] = {r.name: [] for r in recipes}
    rows = int(dedup.stats["rows_in"]) if dedup is not None else None
    progress = Progress(f"gates: stream refined rows ({spill.workers} processes)", rows)
    initargs = (index, quality, list(recipes), store.root, store.storage_options)
    worker_peak = 0
    with _pool(spill, _init, initargs) as pool:
        futures: list[tuple[Future, str]] = []
        for fid, path in enumerate(files):
            out = str(parts / f"{fid:06d}")
            futures.append((pool.submit(_file_job, fid, path, str(removed_path), out, spill.chunk_rows), out))
        for future, out in futures:  # in file order: the rejects go to the sinks in the order a single process writes
            found = future.result()
            worker_peak = max(worker_peak, found.pop("peak_rss_mb"))
            for k, v in found.items():
                counts[k] += v
            for chunk in iter_parquet(f"{out}-rejects.parquet", None, spill.chunk_rows):
                _to_sinks(chunk, sinks)
            Path(f"{out}-rejects.parquet").unlink()
            for r in recipes:
                pools[r.name].append(Path(f"{out}-pool-{r.name}.parquet"))
            progress.add(found["pool"])
    progress.finish()
    logger.info("gates: streaming pass over %d files in %.1f s", len(files), time.perf_counter() - t0)
    return StreamResult(counts, pools, counts["pool"], {"peak_rss_worker_mb": worker_peak})
