"""How well CJK decontamination separates copied benchmark items from unrelated Chinese text, per window.

Builds CMMLU-style items (``boostqa_assets_tests/cjk_fixture.py``: one CSV per subject in CMMLU's layout), QA rows
that copy one item each (question and choices inside a wrapper sentence) and unrelated QA from the same stems,
topics and phrases; prints, for each (cjk_n, cjk_min_chars), the recall on the copies and the false-positive rate
on the unrelated rows, and which span kind (window or whole short segment) caused the false positives.

    .venv/bin/python benchmarks/decontam_cjk.py [--items-per-subject 200] [--unrelated 5000] [--planted 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl

from boostqa_assets.configs import BenchmarkRef
from boostqa_assets.logic.decontam import BenchmarkIndex, DecontamConfig, decontaminate
from boostqa_assets_tests.cjk_fixture import benchmark_items, planted_qa, unrelated_qa, write_cmmlu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items-per-subject", type=int, default=200)
    ap.add_argument("--unrelated", type=int, default=5000)
    ap.add_argument("--planted", type=int, default=300)
    args = ap.parse_args()
    items = benchmark_items(args.items_per_subject)
    with tempfile.TemporaryDirectory() as tmp:
        write_cmmlu(Path(tmp) / "cmmlu", items)
        ref = BenchmarkRef(name="cmmlu", path=str(Path(tmp) / "cmmlu" / "*.csv"), layout="cmmlu")
        planted = planted_qa(items, args.planted)
        unrelated = unrelated_qa(args.unrelated)
        df = pl.DataFrame(
            {
                "question": [q for q, _, _ in planted] + [q for q, _ in unrelated],
                "answer": [a for _, a, _ in planted] + [a for _, a in unrelated],
            }
        )
        n_items = sum(len(v) for v in items.values())
        print(f"{n_items} CMMLU-style items, {len(planted)} planted copies, {len(unrelated)} unrelated QA rows")
        print("cjk_n cjk_min  recall  false_pos  fp_rate   fp_by_kind           scan_s")
        for cjk_n, cjk_min in [(10, 8), (13, 8), (15, 8), (20, 8), (20, 10), (20, 12), (20, 16), (20, 20), (30, 10)]:
            cfg = DecontamConfig(cjk_n=cjk_n, cjk_min_chars=cjk_min)
            index = BenchmarkIndex.build([ref], cfg)
            t0 = time.perf_counter()
            _, matches = decontaminate(df, index, cfg)
            seconds = time.perf_counter() - t0
            hits = [m is not None for m in matches]
            recall = sum(hits[: len(planted)]) / len(planted)
            exact = sum(
                1 for m, (_, _, item) in zip(matches[: len(planted)], planted, strict=True) if m and m.item_id == item
            )
            fps = [m for m in matches[len(planted) :] if m is not None]
            kinds: dict[str, int] = {}
            for m in fps:
                kind = "window" if m.n_words == cjk_n else f"whole<{cjk_n}"
                kinds[kind] = kinds.get(kind, 0) + 1
            print(
                f"{cjk_n:5d} {cjk_min:7d}  {recall:6.1%}  {len(fps):9d}  {len(fps) / len(unrelated):7.2%}   "
                f"{kinds!s:20s} {seconds:6.2f}   (right item: {exact}/{len(planted)})"
            )


if __name__ == "__main__":
    main()
