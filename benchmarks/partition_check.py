"""Benchmark: the `refined_qa_valid` check of one big discipline x grade cell, read whole (as it was) against a
part file at a time (`partition_checks.scan`, as it is), side by side.

A cell of a 10^8-row run holds ~10^6 rows, each with a reasoning trace of thousands of tokens. The benchmark
writes one refined cell of N rows (2,000-row part files, the stages' chunk size) with a reasoning trace of
``--reasoning-chars`` characters a row, then checks it in two fresh child processes, one per way, and prints each
one's wall time and peak RSS (``ru_maxrss``) and whether both said the same (metadata equal but for GX's
seconds). Figures, no asserts.

    .venv/bin/python benchmarks/partition_check.py                  # 100k rows, 4,000-character traces
    .venv/bin/python benchmarks/partition_check.py --rows 300000    # a bigger cell
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PART_ROWS = 2_000


def _write_cell(root: str, rows: int, reasoning_chars: int) -> dict[str, str]:
    import polars as pl

    from boostqa_assets.records import REFINED_SCHEMA
    from boostqa_assets.resources import project_config
    from boostqa_assets.storage import Store

    tax = project_config().taxonomy
    discipline, grade = tax.discipline_names[0], tax.grades[2]
    rng = random.Random(0)
    words = ["force", "mass", "energy", "momentum", "field", "charge", "wave", "particle", "orbit", "heat"]
    store = Store(root)
    part = {"discipline": discipline, "grade": grade}
    # Every row's trace is its own text (a window of a random 1 MB text): equal traces would be read as views
    # of one Parquet dictionary entry and cost a whole read almost nothing.
    pool = " ".join(rng.choices(words, k=2**20 // 6))
    with store.partition_writer("refined_qa", part, REFINED_SCHEMA) as writer:
        for start in range(0, rows, PART_ROWS):
            n = min(PART_ROWS, rows - start)
            writer.write(
                pl.DataFrame(
                    {
                        "qa_id": [f"q_{start + i:09d}" for i in range(n)],
                        "seed_id": [f"s_{(start + i) // 3:09d}" for i in range(n)],
                        "source": "synthetic",
                        "discipline": discipline,
                        "category": tax.category_of(discipline),
                        "grade": grade,
                        "difficulty": tax.difficulties[1],
                        "seed_grade": grade,
                        "seed_difficulty": tax.difficulties[1],
                        "track": "multi_grade",
                        "language": "en",
                        "seed_language": "en",
                        "target_language": "en",
                        "question": [f"Why does body {start + i} keep its {rng.choice(words)}?" for i in range(n)],
                        "answer": "Because no net external force acts on it, so it keeps its state of motion.",
                        "reasoning": [
                            pool[o : o + reasoning_chars]
                            for o in (((start + i) * 7919) % (len(pool) - reasoning_chars) for i in range(n))
                        ],
                        "refined_answer": "No net external force acts on it, so by Newton's first law it keeps "
                        "its state of motion.",
                        "flags": [[] for _ in range(n)],
                        "status": "kept",
                        "annotate_request_hash": "a" * 64,
                        "synth_model": "m",
                        "synth_prompt_id": "synthesize_multi_grade",
                        "synth_prompt_version": "v1",
                        "synth_request_hash": [f"{start + i:064d}" for i in range(n)],
                        "refine_model": "m",
                        "refine_prompt_id": "refine",
                        "refine_prompt_version": "v1",
                        "refine_request_hash": [f"r{start + i:063d}" for i in range(n)],
                    },
                    schema_overrides={"flags": pl.List(pl.String)},
                ).pipe(
                    lambda df: df.select(
                        (pl.col(c) if c in df.columns else pl.lit(None)).cast(t).alias(c)
                        for c, t in REFINED_SCHEMA.items()
                    )
                )
            )
        writer.commit()
    return part


def _child(root: str, way: str, part: dict[str, str]) -> None:
    """Check the cell one way in this process; print a JSON line."""
    from boostqa_assets import checks, expectations
    from boostqa_assets.defs.refined_qa import evaluate_partition
    from boostqa_assets.partitions import qa_key
    from boostqa_assets.records import REFINED_SCHEMA
    from boostqa_assets.resources import project_config
    from boostqa_assets.storage import Store

    store = Store(root)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    started = time.perf_counter()
    if way == "parts":
        outcome = evaluate_partition(store, qa_key(part["discipline"], part["grade"]), [])
    else:  # the check as it was: the partition read whole, then the same rules and suite
        df = store.read_partition("refined_qa", part)
        rules = checks.table_checks(
            df,
            REFINED_SCHEMA,
            unique_on="qa_id",
            equals=part,
            not_null=["qa_id", "seed_id", "question", "refined_answer", "refine_request_hash"],
            allowed={"status": ["kept"]},
        )
        rules.metadata["kept_rows_with_reject_flags"] = 0
        suite = expectations.validate("refined_qa", df, project_config().taxonomy)
        outcome = checks.CheckOutcome.all_of(rules, checks.CheckOutcome(True, {"rows_not_sent": 0}), suite)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    meta = {k: v for k, v in outcome.metadata.items() if k != "gx_seconds"}
    print(json.dumps({"way": way, "wall_s": round(wall, 1), "peak_mb": peak, "imports_mb": base, "meta": meta}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--reasoning-chars", type=int, default=4_000)
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "WAY", "PART"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], json.loads(args.child[2]))
        return
    with tempfile.TemporaryDirectory(prefix="boostqa-check-") as root:
        started = time.perf_counter()
        part = _write_cell(root, args.rows, args.reasoning_chars)
        size = sum(f.stat().st_size for f in Path(root).rglob("*.parquet"))
        print(
            f"one refined cell: {args.rows:,} rows with {args.reasoning_chars:,}-character traces, "
            f"{args.rows // PART_ROWS + (args.rows % PART_ROWS > 0)} part files, {size / 2**20:,.0f} MB of Parquet "
            f"(written in {time.perf_counter() - started:.0f} s)"
        )
        results = {}
        for way in ("whole", "parts"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", root, way, json.dumps(part)],
                check=True,
                capture_output=True,
                text=True,
            )
            results[way] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[way]
            print(
                f"  {way:>5}: {r['wall_s']:6.1f} s, peak RSS {r['peak_mb']:,} MB "
                f"({r['peak_mb'] - r['imports_mb']:,} MB over the imports)"
            )
        same = results["whole"]["meta"] == results["parts"]["meta"]
        ratio = results["whole"]["peak_mb"] / results["parts"]["peak_mb"]
        print(f"  same outcome both ways: {same}; peak RSS whole / parts: {ratio:.2f}x")


if __name__ == "__main__":
    main()
