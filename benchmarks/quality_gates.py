"""Benchmark: the gates before the mixture (exact + near dedup, MMLU decontamination) plus the mixture itself
(tokenize, weighted sampling to a token budget), in-memory (``gates.apply_gates`` + ``build_mixture`` on one
frame) against out of core (``gates_ooc.run_gates`` + ``mixture_ooc``: what ``qa_mixture`` runs), over N
generated QA rows.

The rows are written once as refined partitions (blocks of 250k rows, one Parquet file each, generated in
parallel child processes; ``--data-dir`` keeps them for the next run). Each measured run is a fresh child
process that reads them as ``qa_mixture`` reads ``refined_qa``, so its peak RSS (``ru_maxrss``) is its own. The
rows are synthetic generated-QA look-alikes: template questions with ~5% planted exact and ~5% planted near
duplicates per block (``dedup_scale.py``), answers cut from the offline Wikipedia summaries with ~0.5% planted
MMLU text (``decontam_scale.py``), spread over the taxonomy's disciplines, grades and both tracks. Both modes
get the same token budget (about half the pool's tokens), so the sampling has to choose.

    .venv/bin/python benchmarks/quality_gates.py                     # 10^6 rows: in-memory and out of core
    .venv/bin/python benchmarks/quality_gates.py --ten-million       # + 10^7 rows, out of core (~20 min)
    .venv/bin/python benchmarks/quality_gates.py --ten-million --fast --modes out-of-core  # 10^7 as rotated copies
    .venv/bin/python benchmarks/quality_gates.py --rows 50000        # a quick look
    .venv/bin/python benchmarks/quality_gates.py --rows 1000000 --signatures   # keys precomputed per partition

``--signatures`` first computes every partition's keys file in a pool of 2 processes, as the
``qa_signatures`` asset does over Dagster's executors, so the measured run only merges. Figures, no asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decontam_scale
import dedup_scale

from boostqa_assets.configs import QualityConfig, Recipe, load_config
from boostqa_assets.logic import gates
from boostqa_assets.logic.mixture import build_mixture
from boostqa_assets.records import REFINED_SCHEMA
from boostqa_assets.settings import DEFAULT_CONFIG_DIR

BLOCK = 250_000


def make_pool(rows: int, seed: int = 7) -> tuple[pl.DataFrame, dict[str, int]]:
    base = dedup_scale.generate(rows, exact_share=0.05, near_share=0.05, seed=seed)
    answers, n_planted = decontam_scale.make_rows(rows, words_per_field=30, planted=0.005, seed=seed)
    # make_rows plants MMLU text in the question or the answer; our questions come from the dedup generator,
    # so carry a planted question into the answer to keep every planted row.
    answers = answers.with_columns(
        pl.when(pl.col("planted"))
        .then(pl.col("question") + " " + pl.col("answer"))
        .otherwise(pl.col("answer"))
        .alias("answer")
    )
    tax = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    rng = random.Random(seed)
    disciplines = [d.name for d in tax.disciplines]  # type: ignore[attr-defined]
    categories = {d.name: d.category for d in tax.disciplines}  # type: ignore[attr-defined]
    picks = [rng.choice(disciplines) for _ in range(rows)]
    cols = {
        "qa_id": base["qa_id"],
        "seed_id": [f"s_{i % 50_000:05d}" for i in range(rows)],
        "source": ["bench"] * rows,
        "discipline": picks,
        "category": [categories[d] for d in picks],
        "grade": [rng.choice(tax.grades) for _ in range(rows)],  # type: ignore[attr-defined]
        "difficulty": ["medium"] * rows,
        "seed_grade": ["high"] * rows,
        "seed_difficulty": ["medium"] * rows,
        "track": [rng.choice(["multi_grade", "high_difficulty"]) for _ in range(rows)],
        "language": ["en"] * rows,
        "question": base["question"],
        "answer": answers["answer"].to_list(),
        "reasoning": [""] * rows,
        "refined_answer": answers["answer"].to_list(),
        "flags": [[] for _ in range(rows)],
        "status": ["kept"] * rows,
    }
    df = pl.DataFrame(cols).with_columns(
        [pl.lit("x").alias(c) for c in REFINED_SCHEMA if c not in cols and REFINED_SCHEMA[c] == pl.Utf8]
    )
    df = df.select([pl.col(c).cast(t) for c, t in REFINED_SCHEMA.items()])
    planted = {
        "exact": sum(p == "exact" for p in base["planted"]),
        "near": sum(p == "near" for p in base["planted"]),
        "mmlu": n_planted,
    }
    return df, planted


def block_path(data: Path, block: int) -> Path:
    return data / "refined_qa" / f"discipline=bench{block:04d}" / "grade=all" / "part-0000.parquet"


def generate_block(data: str, block: int, rows: int) -> dict[str, int]:
    """One refined partition of ``rows`` rows (seeded by its block number: qa_ids never collide)."""
    pool, planted = make_pool(rows, seed=1000 + block)
    path = block_path(Path(data), block)
    path.parent.mkdir(parents=True, exist_ok=True)
    pool.write_parquet(path, row_group_size=50_000)
    chars = int(
        pool.select((pl.col("question").str.len_chars() + pl.col("refined_answer").str.len_chars()).sum()).item()
    )
    return {**planted, "chars": chars}


def replicate_block(src: str, out: str, copy: int) -> None:
    """A letter-rotated image of a generated block: the text is NFKC-normalized, lower-cased and every letter a-z
    shifted by ``copy``, so each copy is new text to dedup (no row of one copy is near another copy's) while the
    planted exact duplicates stay exact and the near ones keep their Jaccard (the shift is a bijection on
    characters). MMLU plants survive in answers only (questions are rotated, answers are not)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    rotated = letters[copy % 26 :] + letters[: copy % 26]
    df = pl.read_parquet(src)
    question = pl.col("question").str.normalize("NFKC").str.to_lowercase().str.replace_many(letters, rotated)
    df = df.with_columns(question, (pl.col("qa_id") + f"_c{copy}").alias("qa_id"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(out, row_group_size=50_000)


def replicate(data: Path, rows: int, base: Path) -> dict[str, int]:
    """``rows`` rows as rotated copies of the 10^6-row set in ``base`` (``--fast``): seconds instead of the
    ~20 minutes that generating 10^7 rows row by row takes on 2 loaded cores."""
    source = generate(base, 1_000_000)
    blocks = sorted(Path(base, "refined_qa").rglob("part-0000.parquet"))
    copies = -(-rows // 1_000_000)
    t = time.perf_counter()
    jobs = [
        (str(b), str(block_path(data, c * len(blocks) + k)), c) for c in range(copies) for k, b in enumerate(blocks)
    ]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(replicate_block, *zip(*jobs, strict=True)))
    # exact and near plants repeat in every copy; MMLU plants in every copy only where they were in the answer
    # (about half; not tracked per field): the printed "planted" MMLU figure is the first copy's
    totals = {"exact": source["exact"] * copies, "near": source["near"] * copies, "mmlu": source["mmlu"]}
    totals["chars"] = source["chars"] * copies
    (data / "planted.json").write_text(json.dumps(totals))
    print(f"replicated {rows:,} rows ({copies} rotated copies) in {time.perf_counter() - t:.0f} s", flush=True)
    return totals


def generate(data: Path, rows: int) -> dict[str, int]:
    """The refined partitions of ``rows`` rows under ``data`` (reused when ``data`` already holds them)."""
    info = data / "planted.json"
    if info.exists():
        return json.loads(info.read_text())
    t = time.perf_counter()
    blocks = [(b, min(BLOCK, rows - b * BLOCK)) for b in range(-(-rows // BLOCK))]
    totals: dict[str, int] = {}
    with ProcessPoolExecutor(2) as pool:
        for found in pool.map(generate_block, [str(data)] * len(blocks), *zip(*blocks, strict=True)):
            for k, v in found.items():
                totals[k] = totals.get(k, 0) + v
    info.write_text(json.dumps(totals))
    print(f"generated {rows:,} rows in {len(blocks)} partitions in {time.perf_counter() - t:.0f} s", flush=True)
    return totals


def bench_recipe(chars: int) -> Recipe:
    # About half the pool's tokens (4 characters a token), so the weighted sampling must choose.
    return Recipe(
        name="bench",
        token_budget=max(1, chars // 8),
        seed=17,
        category_weights={"stem": 3.0},
        track_weights={"high_difficulty": 2.0},
    )


def peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_in_memory(data: Path, chars: int) -> dict:
    from boostqa_assets.storage import Store

    t0 = time.perf_counter()
    st = Store(str(data))
    pool = (
        st.read_files(st.list_partition_files("refined_qa"), REFINED_SCHEMA)
        if hasattr(st, "read_files")
        else (pl.concat([pl.read_parquet(f) for f in st.list_partition_files("refined_qa")]))
    )
    t_read = time.perf_counter() - t0
    quality = QualityConfig()
    t1 = time.perf_counter()
    index = gates.build_index(quality, DEFAULT_CONFIG_DIR)
    t_index = time.perf_counter() - t1
    t2 = time.perf_counter()
    kept, _rejects, counts = gates.apply_gates(pool, quality, index, "bench")
    t_gates = time.perf_counter() - t2
    t3 = time.perf_counter()
    docs, manifest = build_mixture(kept, bench_recipe(chars))
    t_mix = time.perf_counter() - t3
    return {
        "mode": "in-memory",
        "rows": pool.height,
        "read_s": round(t_read, 1),
        "index_s": round(t_index, 1),
        "gates_s": round(t_gates, 1),
        "mixture_s": round(t_mix, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": peak_mb(),
        "removed": counts,
        "kept": kept.height,
        "docs": docs.height,
        "tokens": manifest["tokens_total"],
    }


def run_out_of_core(data: Path, chars: int, memory_limit: str) -> dict:
    import logging
    import shutil

    from boostqa_assets.logic import gates_ooc
    from boostqa_assets.logic.mixture_ooc import build_mixture_streaming
    from boostqa_assets.logic.spill import SpillConfig
    from boostqa_assets.storage import Store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    st = Store(str(data))
    quality = QualityConfig()
    index = gates.build_index(quality, DEFAULT_CONFIG_DIR)
    t_index = time.perf_counter() - t0
    spill = SpillConfig(work_dir=gates_ooc.work_folder(str(data.parent)), memory_limit=memory_limit)
    recipe = bench_recipe(chars)
    try:
        t1 = time.perf_counter()
        run = gates_ooc.run_gates(st, st.list_partition_files("refined_qa"), quality, index, [recipe], spill)
        t_gates = time.perf_counter() - t1
        t2 = time.perf_counter()
        mix = build_mixture_streaming(run.pools["bench"], recipe, spill, spill.work_dir / "out")
        t_mix = time.perf_counter() - t2
        spill_mb = sum(f.stat().st_size for f in spill.work_dir.rglob("*") if f.is_file()) / 1e6
    finally:
        shutil.rmtree(spill.work_dir, ignore_errors=True)
    phases = {k.removeprefix("seconds_"): v for k, v in run.stats.items() if k.startswith("seconds_")}
    return {
        "mode": "out-of-core",
        "rows": run.refined_rows,
        "index_s": round(t_index, 1),
        "gates_s": round(t_gates, 1),
        "mixture_s": round(t_mix, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": peak_mb(),
        # worker processes (the per-file work) are separate: the largest one's peak, and the bound on the total
        "peak_rss_worker_mb": run.stats.get("peak_rss_worker_mb", 0),
        "workers": spill.workers,
        "removed": run.counts,
        "kept": mix.manifest["available_rows"],
        "docs": mix.manifest["rows"],
        "tokens": mix.manifest["tokens_total"],
        "keys_reused": run.stats.get("keys_reused", 0),
        "dedup_phases_s": phases,
        "pairs": {k: run.stats.get(k) for k in ("lsh_pairs", "screened_pairs", "candidates_checked")},
        "spill_mb_at_end": round(spill_mb),
    }


def precompute_keys(data: Path) -> float:
    """Every partition's keys file, 2 processes at a time: what qa_signatures does on Dagster's executors."""
    from boostqa_assets.logic import gates_ooc
    from boostqa_assets.storage import Store

    st = Store(str(data))
    cfg = gates_ooc.dedup_config(QualityConfig(), 50_000)
    files = st.list_partition_files("refined_qa")
    t = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        jobs = [pool.submit(_keys_one, str(data), f, cfg) for f in files]
        for j in jobs:
            j.result()
    return time.perf_counter() - t


def _keys_one(data: str, path: str, cfg: object) -> None:
    from boostqa_assets.logic import gate_keys
    from boostqa_assets.storage import Store

    st = Store(data)
    target = gate_keys.keys_path(st, os.path.dirname(path))
    gate_keys.write_keys_file(st, [path], cfg, target, 50_000)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--ten-million", action="store_true", help="also 10^7 rows, out of core only")
    parser.add_argument("--modes", default="in-memory,out-of-core", help="in-memory runs only up to --in-memory-max")
    parser.add_argument("--in-memory-max", type=int, default=2_000_000)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB's memory_limit in the out-of-core run")
    parser.add_argument("--signatures", action="store_true", help="precompute the keys per partition first")
    parser.add_argument("--data-dir", help="keep the generated rows here (reused when present)")
    parser.add_argument("--fast", action="store_true", help="rows past 10^6 as rotated copies of the 10^6 set")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, data, chars, limit = args.child
        run = run_in_memory if mode == "in-memory" else None
        out = run(Path(data), int(chars)) if run else run_out_of_core(Path(data), int(chars), limit)
        print("RESULT " + json.dumps(out), flush=True)
        return
    sizes = list(args.rows) + ([10_000_000] if args.ten_million else [])
    modes = args.modes.split(",")
    base = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="boostqa-gates-bench-"))
    results = []
    print(f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", flush=True)
    for rows in sizes:
        data = base / f"rows-{rows}"
        if args.fast and rows > 1_000_000 and not (data / "planted.json").exists():
            planted = replicate(data, rows, base / "rows-1000000")
        else:
            planted = generate(data, rows)
        for mode in modes:
            if mode == "in-memory" and rows > args.in_memory_max:
                continue
            extra = {}
            if mode == "out-of-core" and args.signatures:
                extra["signatures_s"] = round(precompute_keys(data), 1)
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(data), str(planted["chars"]), args.memory_limit],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                print(proc.stdout[-3000:], proc.stderr[-5000:])
                raise SystemExit(proc.returncode)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            res = {**json.loads(line[len("RESULT ") :]), **extra, "wall_s": round(time.perf_counter() - started, 1)}
            res["planted"] = planted
            res["load"] = round(os.getloadavg()[0], 1)
            results.append(res)
            print(json.dumps(res), flush=True)
    print(
        "\nrows        mode          wall (index / gates / mixture)        peak RSS   removed exact/near/contaminated"
    )
    for r in results:
        rm, pl_ = r["removed"], r["planted"]
        print(
            f"{r['rows']:>10,}  {r['mode']:<12}  {r['total_s']:>7.1f} s ({r['index_s']} / {r['gates_s']} / "
            f"{r['mixture_s']} s)  {r['peak_rss_mb']:>6} MB{_workers(r)}   "
            f"{rm['exact_duplicate']}/{rm['near_duplicate']}/"
            f"{rm['contaminated']} (planted {pl_['exact']}/{pl_['near']}/{pl_['mmlu']}), {r['docs']:,} docs, "
            f"{r['tokens']:,} tokens"
        )


def _workers(r: dict) -> str:
    if not r.get("peak_rss_worker_mb"):
        return ""
    bound = r["peak_rss_mb"] + r["workers"] * r["peak_rss_worker_mb"]
    return f" (+ {r['workers']} workers <= {r['peak_rss_worker_mb']} MB each: <= {bound} MB together)"


if __name__ == "__main__":
    main()
