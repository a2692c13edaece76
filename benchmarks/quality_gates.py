"""Benchmark: the gates before the mixture (exact + near dedup, MMLU decontamination) plus the mixture itself
(tokenize with tiktoken, weighted sampling to a budget) over N generated QA rows.

Each row count is generated in one child process and written to Parquet; a second, fresh process reads it
(as the mixture reads `refined_qa`) and is the one measured, so peak RSS is that scale's own. The rows are synthetic
generated-QA look-alikes: template questions with ~5% planted exact and ~5% planted near duplicates (from
`dedup_scale.py`), answers cut from the offline Wikipedia summaries with ~0.5% planted MMLU text (from
`decontam_scale.py`), spread over the taxonomy's disciplines, grades and both tracks.

    .venv/bin/python benchmarks/quality_gates.py                       # 100,000 and 1,000,000 rows
    .venv/bin/python benchmarks/quality_gates.py --rows 20000          # a quick look

Targets (issue 4): 1,000,000 rows in under 10 minutes and under 6 GB peak RSS on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
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


def generate_child(rows: int, path: str) -> None:
    """Write the pool to Parquet, as `refined_qa` would hold it (kept out of the measured process)."""
    pool, planted = make_pool(rows)
    pool.write_parquet(path)
    Path(path + ".planted.json").write_text(json.dumps(planted))


def run_child(path: str) -> None:
    t0 = time.perf_counter()
    pool = pl.read_parquet(path)
    planted = json.loads(Path(path + ".planted.json").read_text())
    rows = pool.height
    t_read = time.perf_counter() - t0
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quality = QualityConfig()
    t1 = time.perf_counter()
    index = gates.build_index(quality, DEFAULT_CONFIG_DIR)
    t_index = time.perf_counter() - t1
    t2 = time.perf_counter()
    kept, _rejects, counts = gates.apply_gates(pool, quality, index, "bench")
    t_gates = time.perf_counter() - t2
    # Budget: half the kept tokens (estimated at 4 characters a token), so the weighted sampling must choose.
    chars = kept.select((pl.col("question").str.len_chars() + pl.col("refined_answer").str.len_chars()).sum())
    recipe = Recipe(
        name="bench",
        token_budget=max(1, int(chars.item() / 8)),
        seed=17,
        category_weights={"stem": 3.0},
        track_weights={"high_difficulty": 2.0},
    )
    t3 = time.perf_counter()
    docs, manifest = build_mixture(kept, recipe)
    t_mix = time.perf_counter() - t3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rows": rows,
                "read_s": round(t_read, 1),
                "index_s": round(t_index, 2),
                "gates_s": round(t_gates, 1),
                "mixture_s": round(t_mix, 1),
                "gates_plus_mixture_s": round(t_index + t_gates + t_mix, 1),
                "peak_rss_mb": round(peak),
                "rss_after_read_mb": round(rss_read),
                "removed": counts,
                "planted": planted,
                "kept": kept.height,
                "docs": docs.height,
                "tokens": manifest["tokens_total"],
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate_child(int(args.generate[0]), args.generate[1])
        return
    if args.child:
        run_child(args.child)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            path = str(Path(tmp) / f"pool-{rows}.parquet")
            subprocess.run([sys.executable, __file__, "--generate", str(rows), path], check=True)
            out = subprocess.run(
                [sys.executable, __file__, "--child", path], capture_output=True, text=True, check=True
            )
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
            results.append(json.loads(line))
            print(line, flush=True)
    print("\nrows       gates+mixture  (index / gates / mixture)    peak RSS   removed (exact/near/contaminated)")
    for r in results:
        rm = r["removed"]
        print(
            f"{r['rows']:>9,}  {r['gates_plus_mixture_s']:>8.1f} s    ({r['index_s']} / {r['gates_s']} / "
            f"{r['mixture_s']} s)   {r['peak_rss_mb']:>6} MB   {rm['exact_duplicate']}/{rm['near_duplicate']}/"
            f"{rm['contaminated']} (planted {r['planted']['exact']}/{r['planted']['near']}/{r['planted']['mmlu']})"
        )


if __name__ == "__main__":
    main()
