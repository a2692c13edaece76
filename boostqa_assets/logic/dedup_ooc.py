"""Exact and near-duplicate removal out of core: the rule of ``dedup.py``, in memory bounded by configuration.

Input: keys files (``gate_keys.py``: one per refined partition, each row's exact key, LSH band keys, MinHash
signature and compared text), in the order of the refined files. Output: a DuckDB table ``removed(fid, row,
reason, dup_of, sim)`` naming every removed row by its refined file (``fid``, the index in ``files``) and
row number, with the kept row it duplicates (``dup_of``: a qa_id) and the similarity. The result is the
in-memory ``dedup``'s exactly (the same kept set, reasons, duplicate_of and similarities), because every step
keeps its rule:

1. **Ingest**: keys go to a DuckDB table ``rows`` (on disk); signatures are appended to ``sigs.bin`` (row
   ``gidx`` at byte ``gidx * 4 * num_perm``), in refined-file order.
2. **Id order**: ``pos`` = rank by (qa_id, text, gidx): the in-memory order (qa_id, then text, then input
   order). A DuckDB window: sorted out of core.
3. **Exact**: group by the 128-bit key; every member but the smallest ``pos`` is an exact duplicate of it.
4. **Buckets**: for each band, over the exact survivors that have shingles, each row is paired with the
   first ``max_candidates`` rows (by ``pos``) of its bucket that come before it: a window ``row_number`` per
   bucket and a join against the bucket's first rows only, so a hub bucket of S rows gives S x cap pairs,
   never S^2.
5. **Screen**: the pairs, sorted by (block of the later row, block of the earlier row), stream past two
   blocks of ``block_rows`` signatures read from ``sigs.bin``; a pair passes when its signatures agree on at
   least ``min_agreement`` positions (``minhash.py``, as in memory).
6. **Verify**: the screened pairs (a few per hundred rows) join their two texts; the exact Jaccard of the
   shingle sets is computed per pair (``verify_jaccard``; otherwise the estimate is the similarity).
7. **Keep rule**: the verified pairs stream in (later, earlier) id order through the sequential rule (a row
   is a duplicate of the earliest kept candidate at or above the threshold, at most ``max_candidates``
   checks a row): exactly the in-memory loop.

**Memory** (what the process holds, whatever the row count): DuckDB's ``memory_limit`` (it spills past it to
``work_dir/duckdb_tmp``), one Arrow batch of ``chunk_rows`` in flight, two signature blocks in the screen
(``2 x block_rows x 4 x num_perm`` = 512 MB at 10^6 rows of 64 perms; pairs are compared ``_SCREEN_STEP`` at a
time and verified ``_VERIFY_BATCH`` at a time) and, in the keep rule, one byte per
row of the pool (a bool "kept" array: 10 MB at 10^7 rows, 100 MB at 10^8). Disk: ``rows`` (~250 B a row),
``sigs.bin`` (256 B a row), the pairs (~40 B each) and DuckDB's spill, all under ``work_dir``.

**Measured** (``benchmarks/quality_gates.py``, 2 cores shared with other work, load 4-9; ``memory_limit`` 1 GB):
10^6 rows: the merge (ingest, order, exact, buckets, screen, verify, keep rule) 26-32 s, same 50,163 exact and
48,778 near removals, 10.2 M bucket pairs, 116,755 screened, as in memory; 10^7 rows (rotated copies): keys in
2 processes ~6 min, then the merge in ~4-6 min more (592-699 s in all), 91.7 M bucket pairs, 1.29 M screened,
1.20 M checked, 501,630 exact and 488,040 near removals; the parent peaked at ~2.0 GB, each key worker ~0.6 GB;
~9 GB of spill on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from boostqa_assets.logic.minhash import (
    DedupConfig,
    lsh_params,
    min_agreement,
    set_jaccard,
    shingle_hashes,
    unique_rows,
)
from boostqa_assets.logic.spill import Progress, SpillConfig, duckdb_connect
from boostqa_assets.memory import release_free_memory
from boostqa_assets.records import normalize_text

logger = logging.getLogger(__name__)

EXACT = "exact_duplicate"
NEAR = "near_duplicate"
_INGEST_BATCH = 100_000
_SCREEN_STEP = 65_536  # pairs compared at a time in the screen
# Pairs read from DuckDB at a time in the screen: each costs ~100 B in numpy temporaries (~25 MB a batch).
_SCREEN_BATCH = 262_144
# Pairs verified at a time: both texts of each are normalized and shingled at once, ~4 KB a pair in numpy
# temporaries (50,000 pairs took ~400 MB), whatever the row count.
_VERIFY_BATCH = 8_192


@dataclass
class KeysSource:
    """One keys file to merge: where it is, and how to open it (an fsspec filesystem, or None for local)."""

    path: str
    fs: Any | None = None


@dataclass
class OocDedup:
    """The merge's outcome: the DuckDB connection holding ``removed``, the refined files (by ``fid``), counts."""

    con: duckdb.DuckDBPyConnection
    files: list[str]  # refined files relative to the data root, index = fid
    rows_per_file: list[int]
    stats: dict[str, int | float] = field(default_factory=dict)

    def removed_in(self, fid: int) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        """(rows, reasons, dup_of qa_ids, similarities) of file ``fid``'s removed rows, by row."""
        table = self.con.sql(
            "SELECT row, reason, dup_of, sim FROM removed WHERE fid = ? ORDER BY row", params=[fid]
        ).to_arrow_table()
        return (
            table["row"].to_numpy(),
            table["reason"].to_pylist(),
            table["dup_of"].to_pylist(),
            table["sim"].to_numpy(),
        )


def dedup_out_of_core(keys: Sequence[KeysSource], cfg: DedupConfig, spill: SpillConfig) -> OocDedup:
    """Merge ``keys`` (in refined-file order) and decide every row; see the module docstring."""
    t0 = time.perf_counter()
    con = _connect(spill)
    bands, rows_per_band = lsh_params(cfg.threshold, cfg.num_perm, cfg.bands) if cfg.near else (0, 0)
    files, counts, n = _ingest(con, keys, cfg, bands, spill)
    con = _reopen(con, spill)
    times = {"seconds_ingest": time.perf_counter() - t0}
    stats: dict[str, int | float] = {"rows_in": n, "lsh_pairs": 0, "screened_pairs": 0, "candidates_checked": 0}
    stats["verify_rows"] = 0
    con.execute("CREATE TABLE near (pos BIGINT, dup_pos BIGINT, sim DOUBLE)")
    con.execute("CREATE TABLE exact_dups (pos BIGINT, first BIGINT)")
    if n:
        ta = time.perf_counter()
        band_cols = "".join(f", b{k}" for k in range(bands))
        con.execute(
            "CREATE TABLE ordered AS SELECT gidx, e0, e1, has_sh" + band_cols + ", "
            "row_number() OVER (ORDER BY qa_id, text, gidx) - 1 AS pos FROM rows"
        )
        times["seconds_order"] = time.perf_counter() - ta
        ta = time.perf_counter()
        if cfg.exact:
            con.execute(
                "INSERT INTO exact_dups SELECT o.pos, f.first FROM ordered o JOIN "
                "(SELECT e0, e1, min(pos) AS first FROM ordered GROUP BY e0, e1 HAVING count(*) > 1) f "
                "USING (e0, e1) WHERE o.pos <> f.first"
            )
        times["seconds_exact"] = time.perf_counter() - ta
        if cfg.near:
            con = _near(con, cfg, spill, bands, n, stats, times)
    ta = time.perf_counter()
    con.execute(
        "CREATE TABLE removed AS "
        "SELECT r.fid, r.row, 'exact_duplicate' AS reason, d.qa_id AS dup_of, 1.0::DOUBLE AS sim "
        "FROM exact_dups x JOIN ordered o ON o.pos = x.pos JOIN rows r ON r.gidx = o.gidx "
        "JOIN ordered od ON od.pos = x.first JOIN rows d ON d.gidx = od.gidx "
        "UNION ALL "
        "SELECT r.fid, r.row, 'near_duplicate', d.qa_id, x.sim "
        "FROM near x JOIN ordered o ON o.pos = x.pos JOIN rows r ON r.gidx = o.gidx "
        "JOIN ordered od ON od.pos = x.dup_pos JOIN rows d ON d.gidx = od.gidx"
    )
    exact_removed = _scalar(con, "SELECT count(*) FROM removed WHERE reason = 'exact_duplicate'")
    near_removed = _scalar(con, "SELECT count(*) FROM removed WHERE reason = 'near_duplicate'")
    con = _reopen(con, spill)  # the caller reads ``removed`` for as long as it writes the mixture
    times["seconds_removed"] = time.perf_counter() - ta
    stats.update(
        {
            "rows_kept": n - int(exact_removed) - int(near_removed),
            "exact_removed": int(exact_removed),
            "near_removed": int(near_removed),
            "bands": bands,
            "rows_per_band": rows_per_band,
            "num_perm": cfg.num_perm,
            "threshold": cfg.threshold,
            **{k: round(v, 3) for k, v in times.items()},
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )
    logger.info(
        "dedup (out of core): %d rows in, %d kept, %d exact and %d near duplicates removed "
        "(%d bucket pairs, %d screened, %d checked) in %.1f s",
        n,
        stats["rows_kept"],
        stats["exact_removed"],
        stats["near_removed"],
        stats["lsh_pairs"],
        stats["screened_pairs"],
        stats["candidates_checked"],
        stats["seconds"],
    )
    return OocDedup(con, files, counts, stats)


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    """One integer (fetchall: DuckDB 2.0 keeps a half-fetched result open and refuses the next query)."""
    return int(con.execute(sql).fetchall()[0][0] or 0)


def _connect(spill: SpillConfig) -> duckdb.DuckDBPyConnection:
    path = spill.work_dir / "dedup.duckdb"
    if path.exists():
        path.unlink()
    return duckdb_connect(spill, "dedup.duckdb")


def _reopen(con: duckdb.DuckDBPyConnection, spill: SpillConfig) -> duckdb.DuckDBPyConnection:
    """The same database through a new connection. Closing the last connection ends DuckDB's instance, and with
    it what DuckDB's allocator (its own jemalloc) kept of a phase's transient memory, which neither
    ``malloc_trim`` nor ``allocator_flush_threshold`` releases. The tables are in the file: nothing is lost.
    Measured on the 100k-seed mixture (277,851 rows, its own process): the screen starts at 412-427 MB instead
    of 640, and the mixture's peak fell from 1,029 to 884-900 MB; a reopen costs a few milliseconds."""
    con.close()
    return duckdb_connect(spill, "dedup.duckdb")


def _ingest(
    con: duckdb.DuckDBPyConnection, keys: Sequence[KeysSource], cfg: DedupConfig, bands: int, spill: SpillConfig
) -> tuple[list[str], list[int], int]:
    """Load every keys file into ``rows`` (+ ``gidx``, ``fid``) and append the signatures to ``sigs.bin``."""
    band_defs = "".join(f", b{k} UBIGINT" for k in range(bands))
    con.execute(
        "CREATE TABLE rows (gidx BIGINT, fid INTEGER, row BIGINT, qa_id VARCHAR, text VARCHAR, e0 UBIGINT, "
        "e1 UBIGINT, has_sh BOOLEAN" + band_defs + ")"
    )
    files: list[str] = []
    counts: list[int] = []
    gidx = 0
    width = 4 * cfg.num_perm
    progress = Progress("dedup: ingest keys", None)
    with open(spill.work_dir / "sigs.bin", "wb") as sig_out:
        for source in keys:
            opener = source.fs.open(source.path, "rb") if source.fs is not None else open(source.path, "rb")  # noqa: SIM115
            with opener as f:
                parquet = pq.ParquetFile(f)
                meta = _meta(parquet, source.path)
                base_fid = len(files)
                for s in meta["sources"]:
                    files.append(s["path"])
                    counts.append(int(s["rows"]))
                for batch in parquet.iter_batches(batch_size=_INGEST_BATCH):
                    m = batch.num_rows
                    table = pa.Table.from_batches([batch])
                    if cfg.near:
                        sig = table.column("sig").combine_chunks()
                        data = sig.buffers()[1]
                        sig_out.write(memoryview(data)[sig.offset * width : (sig.offset + m) * width])
                        table = table.drop_columns(["sig"])
                    table = table.append_column("gidx", pa.array(np.arange(gidx, gidx + m, dtype=np.int64)))
                    fid = pc.add(table.column("src"), pa.scalar(base_fid, pa.int32()))
                    table = table.append_column("fid", fid)
                    cols = "gidx, fid, row, qa_id, text, e0, e1, has_sh" + "".join(f", b{k}" for k in range(bands))
                    con.register("_batch", table)
                    con.execute(f"INSERT INTO rows SELECT {cols} FROM _batch")
                    con.unregister("_batch")
                    gidx += m
                    progress.add(m)
    progress.finish()
    return files, counts, gidx


def _meta(parquet: pq.ParquetFile, path: str) -> dict[str, Any]:
    import json

    raw = (parquet.metadata.metadata or {}).get(b"boostqa.keys")
    if not raw:
        raise ValueError(f"{path} is not a keys file (no boostqa.keys metadata); re-materialize qa_signatures")
    meta: dict[str, Any] = json.loads(raw)
    return meta


def _near(
    con: duckdb.DuckDBPyConnection,
    cfg: DedupConfig,
    spill: SpillConfig,
    bands: int,
    n: int,
    stats: dict[str, int | float],
    times: dict[str, float],
) -> duckdb.DuckDBPyConnection:
    """Steps 4-7 of the module docstring: bucket pairs, signature screen, verification, keep rule."""
    ta = time.perf_counter()
    con.execute("CREATE TABLE cand AS SELECT o.* FROM ordered o ANTI JOIN exact_dups d ON d.pos = o.pos WHERE o.has_sh")
    con.execute("CREATE TABLE pairs (lg BIGINT, eg BIGINT, lpos BIGINT, epos BIGINT)")
    cap = int(cfg.max_candidates)
    for band in range(bands):
        con.execute(
            f"""
            INSERT INTO pairs
            WITH m AS (SELECT pos, gidx, b{band} AS key FROM cand),
            multi AS (SELECT key FROM m GROUP BY key HAVING count(*) > 1),
            mm AS (
                SELECT m.pos, m.gidx, m.key, row_number() OVER (PARTITION BY m.key ORDER BY m.pos) AS rn
                FROM m SEMI JOIN multi USING (key)
            )
            SELECT l.gidx, e.gidx, l.pos, e.pos
            FROM mm l JOIN (SELECT * FROM mm WHERE rn <= {cap}) e ON l.key = e.key AND e.rn < l.rn
            """
        )
    stats["lsh_pairs"] = _scalar(con, "SELECT count(*) FROM pairs")
    con = _reopen(con, spill)
    times["seconds_buckets"] = time.perf_counter() - ta
    ta = time.perf_counter()
    _screen(con, cfg, spill, n, stats)
    release_free_memory()  # the screen's batches and DuckDB's sort buffers: ~150 MB at 277k rows (memory.py)
    times["seconds_screen"] = time.perf_counter() - ta
    ta = time.perf_counter()
    _verify(con, cfg, spill, stats)
    release_free_memory()
    times["seconds_verify"] = time.perf_counter() - ta
    ta = time.perf_counter()
    _keep_rule(con, cfg, spill, n, stats)
    times["seconds_keep_rule"] = time.perf_counter() - ta
    return con


class _Blocks:
    """Signature blocks of ``sigs.bin`` read on demand with plain reads (nothing is memory-mapped, so the
    process holds the two blocks in use and nothing else): one for the later rows of a tile, one for the
    earlier rows."""

    def __init__(self, path: str, num_perm: int, block_rows: int) -> None:
        self.path, self.num_perm, self.block_rows = path, num_perm, block_rows
        self.slots: dict[str, tuple[int, np.ndarray]] = {}
        self.reads = 0

    def get(self, slot: str, block: int) -> np.ndarray:
        found = self.slots.get(slot)
        if found is not None and found[0] == block:
            return found[1]
        other = self.slots.get("later" if slot == "earlier" else "earlier")
        if other is not None and other[0] == block:
            sig = other[1]
        else:
            self.slots.pop(slot, None)  # free the old block before reading the new one
            width = 4 * self.num_perm
            with open(self.path, "rb") as f:
                f.seek(block * self.block_rows * width)
                data = f.read(self.block_rows * width)
            self.reads += 1
            sig = np.frombuffer(data, dtype="<u4").reshape(-1, self.num_perm)
        self.slots[slot] = (block, sig)
        return sig


def _screen(
    con: duckdb.DuckDBPyConnection, cfg: DedupConfig, spill: SpillConfig, n: int, stats: dict[str, int | float]
) -> None:
    """Pairs whose signatures agree on at least ``min_agreement`` positions go to ``screened``."""
    con.execute("CREATE TABLE screened (lg BIGINT, eg BIGINT, lpos BIGINT, epos BIGINT, agree INTEGER)")
    min_agree = min_agreement(cfg)
    block = int(spill.block_rows)
    blocks = _Blocks(str(spill.work_dir / "sigs.bin"), cfg.num_perm, block)
    progress = Progress("dedup: screen bucket pairs", int(stats["lsh_pairs"]), "pairs")
    writer = con.cursor()  # a streaming result holds its connection: inserts go through another one
    # Sorted by tile so each block is read once; with one block (n <= block_rows) every order is one tile, and
    # DuckDB's sort of the pairs (up to its memory_limit: ~750 MB of 1 GB for 277k rows) is not needed.
    order = f"ORDER BY lg // {block}, eg // {block}" if n > block else ""
    reader = con.sql(f"SELECT lg, eg, lpos, epos FROM pairs {order}").to_arrow_reader(_SCREEN_BATCH)
    for batch in reader:
        lg, eg = batch.column(0).to_numpy(), batch.column(1).to_numpy()
        lpos, epos = batch.column(2).to_numpy(), batch.column(3).to_numpy()
        lb, eb = lg // block, eg // block
        # tiles of one (later block, earlier block); the batch is sorted by them
        cut = np.flatnonzero((lb[1:] != lb[:-1]) | (eb[1:] != eb[:-1])) + 1
        keep_parts = []
        for s, e in zip(np.concatenate(([0], cut)), np.concatenate((cut, [len(lg)])), strict=True):
            sig_l = blocks.get("later", int(lb[s]))
            sig_e = blocks.get("earlier", int(eb[s]))
            rows_l, rows_e = lg[s:e] - lb[s] * block, eg[s:e] - eb[s] * block
            agree = np.empty(e - s, dtype=np.int32)
            # Gathered a step at a time: a tile's pairs at once would be 2 x 4 x num_perm bytes each (512 MB
            # for a batch of 10^6 pairs of 64 perms); a step is 2 x 16 MB.
            for k in range(0, e - s, _SCREEN_STEP):
                part = slice(k, k + _SCREEN_STEP)
                agree[part] = (sig_l[rows_l[part]] == sig_e[rows_e[part]]).sum(axis=1)
            ok = np.flatnonzero(agree >= min_agree) + s
            keep_parts.append((ok, agree[ok - s]))
        if keep_parts:
            idx = np.concatenate([p[0] for p in keep_parts])
            agree_ok = np.concatenate([p[1] for p in keep_parts])
            if len(idx):
                table = pa.table(
                    {"lg": lg[idx], "eg": eg[idx], "lpos": lpos[idx], "epos": epos[idx], "agree": agree_ok}
                )
                writer.register("_screened", table)
                writer.execute("INSERT INTO screened SELECT * FROM _screened")
                writer.unregister("_screened")
        progress.add(batch.num_rows)
    progress.finish()
    con.execute("CREATE TABLE screened_u AS SELECT DISTINCT lg, eg, lpos, epos, agree FROM screened")
    stats["screened_pairs"] = _scalar(con, "SELECT count(*) FROM screened_u")
    stats["signature_block_reads"] = blocks.reads


def _verify(
    con: duckdb.DuckDBPyConnection, cfg: DedupConfig, spill: SpillConfig, stats: dict[str, int | float]
) -> None:
    """``verified(lpos, epos, sim)``: the exact Jaccard of each screened pair (or its estimate)."""
    con.execute("CREATE TABLE verified (lpos BIGINT, epos BIGINT, sim DOUBLE)")
    if not cfg.verify_jaccard:
        con.execute(f"INSERT INTO verified SELECT lpos, epos, agree / {float(cfg.num_perm)} FROM screened_u")
        return
    involved = "SELECT lg AS g FROM screened_u UNION ALL SELECT eg FROM screened_u"
    stats["verify_rows"] = _scalar(con, f"SELECT count(DISTINCT g) FROM ({involved})")
    progress = Progress("dedup: verify screened pairs", int(stats["screened_pairs"]), "pairs")
    writer = con.cursor()
    reader = con.sql(
        "SELECT s.lpos, s.epos, rl.text AS lt, re.text AS et FROM screened_u s "
        "JOIN rows rl ON rl.gidx = s.lg JOIN rows re ON re.gidx = s.eg"
    ).to_arrow_reader(_VERIFY_BATCH)
    for batch in reader:
        m = batch.num_rows
        texts = [normalize_text(t) for t in batch.column(2).to_pylist()] + [
            normalize_text(t) for t in batch.column(3).to_pylist()
        ]
        flat, off = unique_rows(*shingle_hashes(texts, cfg))
        sims = np.array(
            [set_jaccard(flat[off[k] : off[k + 1]], flat[off[m + k] : off[m + k + 1]]) for k in range(m)],
            dtype=np.float64,
        )
        table = pa.table({"lpos": batch.column(0), "epos": batch.column(1), "sim": sims})
        writer.register("_verified", table)
        writer.execute("INSERT INTO verified SELECT * FROM _verified")
        writer.unregister("_verified")
        progress.add(m)
    progress.finish()


def _keep_rule(
    con: duckdb.DuckDBPyConnection, cfg: DedupConfig, spill: SpillConfig, n: int, stats: dict[str, int | float]
) -> None:
    """The sequential rule over the verified pairs in (later, earlier) id order; near duplicates to ``near``."""
    kept = np.ones(n, dtype=bool)  # exact duplicates never reach a pair, so every row in one starts kept
    done, current, checks, checked = -1, -1, 0, 0
    out_pos: list[int] = []
    out_dup: list[int] = []
    out_sim: list[float] = []
    writer = con.cursor()
    reader = con.sql("SELECT lpos, epos, sim FROM verified ORDER BY lpos, epos").to_arrow_reader(1_000_000)
    for batch in reader:
        for i, j, s_ij in zip(
            batch.column(0).to_pylist(), batch.column(1).to_pylist(), batch.column(2).to_pylist(), strict=True
        ):
            if i == done:
                continue
            if i != current:
                current, checks = i, 0
            if not kept[j] or checks >= cfg.max_candidates:
                continue
            checks += 1
            checked += 1
            if s_ij >= cfg.threshold:
                kept[i] = False
                out_pos.append(i)
                out_dup.append(j)
                out_sim.append(s_ij)
                done = i
        if len(out_pos) >= spill.chunk_rows:
            _flush_near(writer, out_pos, out_dup, out_sim)
    _flush_near(writer, out_pos, out_dup, out_sim)
    stats["candidates_checked"] = checked


def _flush_near(con: duckdb.DuckDBPyConnection, pos: list[int], dup: list[int], sim: list[float]) -> None:
    if pos:
        table = pa.table(
            {"pos": np.asarray(pos, np.int64), "dup_pos": np.asarray(dup, np.int64), "sim": np.asarray(sim)}
        )
        con.register("_near", table)
        con.execute("INSERT INTO near SELECT * FROM _near")
        con.unregister("_near")
        pos.clear()
        dup.clear()
        sim.clear()
