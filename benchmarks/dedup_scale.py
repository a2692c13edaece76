"""Benchmark of ``logic.dedup`` at scale: wall time, peak RSS and planted-duplicate recall.

For each ``--rows`` count the script writes a synthetic generated-QA frame to a temporary Parquet file
(questions from 24 templates filled with words from a 3,000-word random vocabulary plus a random tail,
~60-260 characters; ``--exact-share`` of the rows are planted exact duplicates of another row with case,
whitespace and NFKC changes, ``--near-share`` planted near duplicates: one word replaced, punctuation changed
or a few words appended), then runs ``dedup`` on it in a fresh child process, so the peak RSS printed
(``ru_maxrss`` of the child) is the frame read from Parquet plus everything dedup holds. Prints figures, no
asserts.

    .venv/bin/python benchmarks/dedup_scale.py                       # 100k and 1M rows, default config
    .venv/bin/python benchmarks/dedup_scale.py --rows 20000 --threshold 0.7 --shingle word --ngram 3

Measured on the 2-core machine (load ~2.7 from other work; default config: char 5-grams, threshold 0.8,
64 perms, 10 bands x 6; questions ~130 characters):

    100,000 rows    dedup 2.4 s (42k rows/s), peak RSS 400 MB (frame alone 129 MB)
    1,000,000 rows  dedup 28 s (35k rows/s), peak RSS 1.30 GB (frame alone 0.66 GB); exact plants 50,000 of
                    50,000 caught; near plants at J >= 0.8: 49,147 of 49,199 caught; 46 removals outside
                    their planted cluster (template siblings with J 0.80-0.87: near duplicates by the rule)
    1,000,000 rows  --no-verify: 17 s, 1.17 GB, 48,219 near plants caught, 135 outside-cluster removals
    1,000,000 rows  --threshold 0.85: 24 s, 1.27 GB, 45,172 of 45,334 catchable caught, 3 outside-cluster
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEMPLATES = [
    "What is the role of {a} in the formation of {b}, according to the models usually taught at this level?",
    "Explain how {a} affects {b} and give one everyday example of this effect.",
    "Why does {a} change when {b} increases, and what does this tell us about {c}?",
    "Describe the relationship between {a}, {b} and {c} in a short paragraph.",
    "How would you measure {a} in an experiment involving {b}?",
    "Which of the following best describes {a}: {b}, {c} or {d}?",
    "A student claims that {a} is caused by {b}. Is the claim correct? Justify your answer.",
    "Compare {a} and {b}: name two similarities and one difference.",
    "What happens to {a} if {b} is removed from the system?",
    "In what year did {a} first become important for {b}, and why?",
    "Calculate the {a} of a {b} given that its {c} doubles.",
    "Summarize the main argument of {a} about {b}.",
    "How did {a} influence the development of {b} during the {c} period?",
    "Give three reasons why {a} is considered essential to {b}.",
    "What is the difference between {a} and {b} in the context of {c}?",
    "Define {a} and explain its importance for {b}.",
    "Under what conditions can {a} be converted into {b}?",
    "Why is {a} more common than {b} in {c}?",
    "Who first described {a}, and how did this change the study of {b}?",
    "Solve for {a} when {b} equals {c} and {d} is held constant.",
    "What evidence supports the idea that {a} depends on {b}?",
    "List the steps needed to prepare {a} from {b}.",
    "How does {a} differ between {b} and {c}?",
    "What would be the effect of doubling {a} on {b}?",
]
TAILS = [
    "",
    " Explain your reasoning.",
    " Use a diagram if it helps.",
    " Answer in two sentences.",
    " Assume ideal conditions.",
]


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    syll = ["ka", "lo", "mi", "ter", "on", "si", "ra", "pho", "gen", "tri", "vel", "du", "nex", "or", "ca", "ble"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syll) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def question(rng: random.Random, vocab: list[str]) -> str:
    tpl = rng.choice(TEMPLATES)
    fill = {k: " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3))) for k in "abcd"}
    extra = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 10)))
    return tpl.format(**fill) + (f" Consider {extra}." if extra else "") + rng.choice(TAILS)


def exact_variant(rng: random.Random, q: str) -> str:
    choice = rng.randrange(3)
    if choice == 0:
        return q.upper()
    if choice == 1:
        return "  " + q.replace(" ", "   ", 2) + "\n"
    return q.replace("A", "\uff21").replace("e", "e", 1)  # fullwidth A: equal after NFKC


def near_variant(rng: random.Random, q: str, vocab: list[str]) -> str:
    choice = rng.randrange(3)
    words = q.split(" ")
    if choice == 0:
        k = rng.randrange(len(words))
        words[k] = rng.choice(vocab)
        return " ".join(words)
    if choice == 1:
        return q.replace(",", "").replace("?", ".").replace(":", " -") + "!"
    return q + " " + rng.choice(["Give one example.", "Be brief.", "Show your work.", "Explain each step."])


def generate(rows: int, exact_share: float, near_share: float, seed: int = 7) -> dict[str, list]:
    rng = random.Random(seed)
    vocab = vocabulary(rng)
    n_exact, n_near = int(rows * exact_share), int(rows * near_share)
    n_base = rows - n_exact - n_near
    questions = [question(rng, vocab) for _ in range(n_base)]
    planted: list[str | None] = [None] * n_base
    source: list[int] = list(range(n_base))
    for _ in range(n_exact):
        k = rng.randrange(n_base)
        questions.append(exact_variant(rng, questions[k]))
        planted.append("exact")
        source.append(k)
    for _ in range(n_near):
        k = rng.randrange(n_base)
        questions.append(near_variant(rng, questions[k], vocab))
        planted.append("near")
        source.append(k)
    perm = list(range(rows))
    rng.shuffle(perm)
    qa_ids = ["q_" + hashlib.sha256(f"{seed}|{i}".encode()).hexdigest()[:16] for i in range(rows)]
    return {
        "qa_id": [qa_ids[p] for p in perm],
        "question": [questions[p] for p in perm],
        "planted": [planted[p] for p in perm],
        "planted_from": [qa_ids[source[p]] for p in perm],
    }


def run_child(path: str, cfg_json: str) -> None:
    import numpy as np
    import polars as pl

    from boostqa_assets.logic import dedup as dd

    cfg = dd.DedupConfig(**json.loads(cfg_json))
    df = pl.read_parquet(path)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    res = dd.dedup(df, cfg)
    wall = time.perf_counter() - t
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    # a planted row and the row it was made from form a cluster (base rows: their own id); a planted
    # duplicate is caught when it and its base row are not both kept; a removal is false when the kept row
    # it points at is in another cluster
    keep = res.keep.to_numpy()
    planted = df["planted"].to_numpy()
    cluster = dict(zip(df["qa_id"].to_list(), df["planted_from"].to_list(), strict=True))
    kept_ids = set(df["qa_id"].filter(res.keep).to_list())
    base_is_kept = np.array([q in kept_ids for q in df["planted_from"].to_list()])
    caught = ~(keep & base_is_kept)
    false_removed = sum(
        1
        for q, d in zip(df["qa_id"].to_list(), res.duplicate_of.to_list(), strict=True)
        if d is not None and cluster[q] != cluster[d]
    )
    out = {
        "wall_s": round(wall, 2),
        "rows_per_s": round(df.height / wall),
        "peak_rss_mb": round(cpu.ru_maxrss / 1024),
        "rss_after_load_mb": round(rss_loaded),
        "stats": res.stats,
        "planted_exact": int((planted == "exact").sum()),
        "planted_exact_caught": int((caught & (planted == "exact")).sum()),
        "planted_near": int((planted == "near").sum()),
        "planted_near_caught": int((caught & (planted == "near")).sum()),
        "false_removed": false_removed,
    }
    # the true Jaccard of the planted near pairs: how many are at or above the threshold (catchable)
    near_rows = df.filter(pl.col("planted") == "near")
    base = df.select("qa_id", "question").rename({"qa_id": "planted_from", "question": "base_q"})
    pairs = near_rows.join(base, on="planted_from", how="left")
    texts = [dd.normalize_text(t) for pair in zip(pairs["question"], pairs["base_q"], strict=True) for t in pair]
    flat, off = dd._unique_rows(*dd.shingle_hashes(texts, cfg))
    above = 0
    for k in range(0, len(texts), 2):
        a, b = flat[off[k] : off[k + 1]], flat[off[k + 1] : off[k + 2]]
        inter = np.intersect1d(a, b, assume_unique=True).size
        above += inter / max(1, a.size + b.size - inter) >= cfg.threshold
    out["planted_near_at_or_above_threshold"] = int(above)
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--exact-share", type=float, default=0.05)
    ap.add_argument("--near-share", type=float, default=0.05)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=64)
    ap.add_argument("--shingle", choices=["char", "word"], default="char")
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--chunk-rows", type=int, default=50_000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(*args.child)
        return
    cfg = {
        "threshold": args.threshold,
        "num_perm": args.num_perm,
        "shingle": args.shingle,
        "ngram": args.ngram,
        "verify_jaccard": not args.no_verify,
        "chunk_rows": args.chunk_rows,
    }
    print(f"config {cfg}; {os.cpu_count()} cpus")
    import polars as pl

    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            t = time.perf_counter()
            path = str(Path(tmp) / f"qa_{rows}.parquet")
            pl.DataFrame(generate(rows, args.exact_share, args.near_share)).write_parquet(path)
            gen_s = time.perf_counter() - t
            proc = subprocess.run(
                [sys.executable, __file__, "--child", path, json.dumps(cfg)], capture_output=True, text=True
            )
            if proc.returncode:
                print(proc.stdout, proc.stderr)
                raise SystemExit(proc.returncode)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            res = json.loads(line[len("RESULT ") :])
            st = res.pop("stats")
            print(f"\n== {rows:,} rows (generated in {gen_s:.1f} s)")
            print(
                f"dedup wall {res['wall_s']} s ({res['rows_per_s']:,} rows/s), peak RSS {res['peak_rss_mb']} MB "
                f"(frame loaded: {res['rss_after_load_mb']} MB)"
            )
            print(
                f"kept {st['rows_kept']:,}; exact removed {st['exact_removed']:,} "
                f"(planted {res['planted_exact']:,}, caught {res['planted_exact_caught']:,}); "
                f"near removed {st['near_removed']:,} (planted {res['planted_near']:,}, "
                f"{res['planted_near_at_or_above_threshold']:,} at J >= threshold, "
                f"caught {res['planted_near_caught']:,}); removals pointing outside their planted cluster "
                f"{res['false_removed']:,}"
            )
            print(
                "phases: "
                + ", ".join(f"{k[len('seconds_') :]} {v} s" for k, v in st.items() if k.startswith("seconds_"))
            )
            print(
                f"lsh pairs {st['lsh_pairs']:,}, screened {st['screened_pairs']:,}, "
                f"checked {st['candidates_checked']:,}, rows re-shingled for verification {st['verify_rows']:,}; "
                f"bands {st['bands']} x {st['rows_per_band']}"
            )


if __name__ == "__main__":
    main()
