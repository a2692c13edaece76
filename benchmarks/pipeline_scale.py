"""Benchmark of the whole graph at growing sizes: per stage wall time, rows, peak RSS, the LLM's share of the time
and the storage objects written, against our fake OpenAI server with latency (no model, 127.0.0.1 only).

Each size runs in a fresh child process (its own data root and Dagster instance) so peak memory is its own;
``--process-per-stage`` starts a fresh process for every stage, as Dagster does (its run launcher starts a process
per run), where one process would carry into each stage what the stages before it left to the allocator. The
peak of each stage is read from /proc (VmHWM, reset before the stage by writing 5 to /proc/self/clear_refs), and
"w/ workers" is the peak of the whole process tree (sampled every 0.25 s: the gates fan out to worker processes
past ``spill.parallel_min_rows`` rows, and VmHWM does not see them). The
LLM's share is the wall time spent inside ``LLMClient.run`` over the stage's wall time; "non-LLM ms per QA row" is
the pipeline's wall time outside ``LLMClient.run`` over the QA rows kept by refinement. Objects written are the
files that appeared under the data root (parts, manifests, rejects, cache segments).

    .venv/bin/python benchmarks/pipeline_scale.py                 # 1k and 10k seeds (about 10 minutes)
    .venv/bin/python benchmarks/pipeline_scale.py --sizes 1000    # one size
    .venv/bin/python benchmarks/pipeline_scale.py --with-100k     # adds 100k seeds (about an hour on 2 cores)
    .venv/bin/python benchmarks/pipeline_scale.py --sizes 100000 --keep          # leaves its folder, then
    .venv/bin/python benchmarks/pipeline_scale.py --sizes 100000 --cache-from F  # a re-run: replies from F's cache
    .venv/bin/python benchmarks/pipeline_scale.py --process-per-stage           # each stage in its own process

Targets (issue 11, 2 cores): peak RSS from 10k to 100k seeds grows <= 1.5x; non-LLM time per QA row < 2 ms. The
synthetic seeds are spread over every discipline and grade by the fake annotator (a hash of the item), so all
110 synthesis partitions fill; STEM seeds are synthesized at every grade (the multi-grade track), as configured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boostqa_assets.settings import DEFAULT_CONFIG_DIR
from boostqa_assets.testing.fake_server import FakeOpenAIServer, FaultConfig, ResponderReply, prompt_text

TOPICS = ["force", "cell", "integer", "market", "empire", "poem", "acid", "circuit", "glacier", "contract", "neuron"]


def _h(*parts: str) -> int:
    return int(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest(), 16)


def _last(pattern: str, text: str) -> str:
    found = re.findall(pattern, text)
    return found[-1].strip() if found else ""


def make_responder(disciplines: list[str], grades: list[str], difficulties: list[str]) -> Any:
    """Answers the pipeline's prompts like a tidy model: labels spread by a hash of the item, QA text unique per
    request so the dedup gate keeps it."""

    def respond(body: dict[str, Any]) -> ResponderReply:
        text = prompt_text(body)
        if "Label each study item" in text:
            item = _last(r"\nItem: (.*)", text)
            h = _h(item)
            return ResponderReply(
                json.dumps(
                    {
                        "discipline": disciplines[h % len(disciplines)],
                        "grade": grades[(h >> 8) % len(grades)],
                        "difficulty": difficulties[(h >> 16) % len(difficulties)],
                    }
                )
            )
        if "exam question" in text or "harder variant" in text:
            seed = _last(r"\nSeed: (.*)", text)[:80]
            level = _last(r"\nLevel: (\w+)", text)
            tag = hashlib.sha1(text.encode()).hexdigest()[:10]
            return ResponderReply(
                json.dumps(
                    {
                        "question": f"At {level} level ({tag}), explain this: {seed}?",
                        "answer": f"Because {seed}, the {level} answer {tag} follows from first principles.",
                    }
                ),
                reasoning=f"Thinking about {seed} at {level}, step by step. " * 3,
            )
        if "Rewrite the draft answer" in text:
            draft = _last(r"\nDraft answer: (.*)", text)
            return ResponderReply(json.dumps({"answer": "Refined: " + draft}))
        if "Answer each question correctly and briefly" in text:
            return ResponderReply("I am not sure.")
        if "Decide whether the reply answers the question" in text:
            return ResponderReply(json.dumps({"verdict": "incorrect"}))
        return ResponderReply("unrecognised prompt")

    return respond


def write_project(root: Path, url: str, seeds: int, chunk_rows: int) -> dict[str, str]:
    """A config folder with one synthetic source of ``seeds`` QA items, every limit off, the probe small."""
    config = root / "config"
    config.mkdir(parents=True)
    for name in ("taxonomy.yaml", "pipeline.yaml", "recipes.yaml", "llm.yaml"):
        shutil.copy(DEFAULT_CONFIG_DIR / name, config / name)
    data = root / "sources"
    data.mkdir()
    with open(data / "synthetic.jsonl", "w", encoding="utf-8") as f:
        for i in range(seeds):
            topic = TOPICS[i % len(TOPICS)]
            f.write(
                json.dumps(
                    {
                        "id": i,
                        "q": f"Item {i}: what does the {topic} number {i * 7919 % 100003} tell us?",
                        "a": f"It tells us fact {i} about the {topic}.",
                    }
                )
                + "\n"
            )
    sources = {
        "sources": [
            {
                "name": "synthetic",
                "path": str(data / "synthetic.jsonl"),
                "kind": "qa",
                "license": "CC0-1.0",
                "fields": {"id": "id", "question": "q", "answer": "a"},
            }
        ]
    }
    (config / "sources.yaml").write_text(yaml.safe_dump(sources))
    recipes = yaml.safe_load((config / "recipes.yaml").read_text())
    for recipe in recipes["recipes"]:
        recipe.pop("qa_budget", None)
        recipe["token_budget"] = 10**9
    (config / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    pipeline = yaml.safe_load((config / "pipeline.yaml").read_text())
    pipeline["synthesis"]["max_seeds_per_partition"] = None
    pipeline.setdefault("streaming", {})["chunk_rows"] = chunk_rows
    pipeline["probe"]["samples_per_cell"] = 2
    (config / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return {
        "BOOSTQA_HOME": str(root / "home"),
        "BOOSTQA_DATA_ROOT": str(root / "data"),
        "BOOSTQA_CONFIG_DIR": str(config),
        "DAGSTER_HOME": str(root / "dagster_home"),
        "BOOSTQA_LLM_BASE_URL": url,
        "BOOSTQA_LLM_MODEL": "fake-model",
        "BOOSTQA_LLM_API": "chat",
        "BOOSTQA_LLM_STRUCTURED_OUTPUT": "json_schema",
        "BOOSTQA_LLM_MAX_CONCURRENCY": "64",
    }


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    # Not allowed on some kernels: the peak is then the process's since it started.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _children(pid: int) -> list[int]:
    """The direct children of ``pid``, from /proc/<pid>/task/<tid>/children (no scan of every process)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _tree_rss_mb(root_pid: int) -> float:
    """Resident memory of ``root_pid`` and every process below it (the gates' worker processes), from /proc.
    It walks the tree down from ``root_pid``: reading every process's stat file each 0.25 s took ~5% of the
    benchmark's own CPU time (py-spy), time it then counted as the pipeline's."""
    tree, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += _children(pid)
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


class TreePeak:
    """The peak of ``_tree_rss_mb`` over this process's tree, sampled every 0.25 s in a thread (VmHWM only
    covers this process; the gates fan out to worker processes past ``spill.parallel_min_rows`` rows)."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            self.peak = max(self.peak, _tree_rss_mb(pid))
            time.sleep(0.25)

    def take(self) -> int:
        peak, self.peak = self.peak, 0.0
        return round(peak)


def _files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root)) if root.exists() else 0


def _child(env: dict[str, str], out: Any, stages: list[str] | None = None) -> None:
    """Run ``stages`` (default: every stage) in this process and report per stage figures."""
    os.environ.update(env)
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    import warnings

    warnings.simplefilter("ignore")
    import dagster as dg

    from boostqa_assets.definitions import STAGES, build_definitions
    from boostqa_assets.llm import client as client_module
    from boostqa_assets.runner import run_stage

    llm_s = [0.0]
    original = client_module.LLMClient.run

    def timed_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            llm_s[0] += time.perf_counter() - started

    client_module.LLMClient.run = timed_run  # type: ignore[method-assign]
    defs = build_definitions()
    instance = dg.DagsterInstance.get()
    data_root = Path(env["BOOSTQA_DATA_ROOT"])
    rows = []
    tree = TreePeak()
    for stage in stages or STAGES:
        _reset_peak()
        tree.take()
        files_before, llm_before = _files(data_root), llm_s[0]
        started = time.perf_counter()
        res = run_stage(defs, stage, instance)
        wall = time.perf_counter() - started
        rows.append(
            {
                "stage": stage,
                "ok": res.success,
                "wall_s": round(wall, 1),
                "rows": res.metadata.get("rows", res.metadata.get("rows_written", "?")),
                "peak_rss_mb": round(_peak_rss_mb()),
                "tree_peak_mb": max(tree.take(), round(_peak_rss_mb())),
                "llm_s": round(llm_s[0] - llm_before, 1),
                "objects_written": _files(data_root) - files_before,
            }
        )
        out.put(("stage", rows[-1]))
        if not res.success:
            break
    out.put(("done", rows))


def _run_child(env: dict[str, str], stages: list[str] | None, seeds: int, timeout_s: float) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(env, out, stages))
    proc.start()
    while True:
        kind, payload = out.get(timeout=timeout_s)
        if kind == "stage":
            print(f"  {seeds:>7} seeds  {payload}", flush=True)
        else:
            proc.join(60)
            return payload  # type: ignore[no-any-return]


def run_size(seeds: int, args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix=f"boostqa-scale-{seeds}-"))
    try:
        env = write_project(root, url, seeds, args.chunk_rows)
        if args.cache_from:  # a re-run: the same project, its replies already paid for
            cache = Path(args.cache_from) / "data" / "_llm_cache"
            shutil.copytree(cache, Path(env["BOOSTQA_DATA_ROOT"]) / "_llm_cache")
        if not args.process_per_stage:
            return _run_child(env, None, seeds, args.timeout_s)
        from boostqa_assets.definitions import STAGES

        rows: list[dict[str, Any]] = []
        for stage in STAGES:  # each stage in a process of its own, as Dagster runs each run
            rows += _run_child(env, [stage], seeds, args.timeout_s)
            if not rows[-1]["ok"]:
                break
        return rows
    finally:
        if args.keep:
            print(f"  kept {root} (its data root, config and Dagster home)", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000], help="seed counts to run")
    parser.add_argument("--with-100k", action="store_true", help="also run 100,000 seeds")
    parser.add_argument("--latency-s", type=float, default=0.2, help="the fake server's latency per request")
    parser.add_argument("--chunk-rows", type=int, default=2000, help="pipeline.streaming.chunk_rows")
    parser.add_argument(
        "--cache-from",
        help="a folder --keep left at the same size: its LLM cache is copied in first, so the run is a re-run whose "
        "replies all come from the cache (the pipeline's own time and memory, no waiting on the model)",
    )
    parser.add_argument(
        "--process-per-stage",
        action="store_true",
        help="run each stage in a fresh process, as Dagster runs each run (its run launcher starts a process per "
        "run): a stage's peak is then its own, not the sum of what every stage before it left to the allocator",
    )
    parser.add_argument("--keep", action="store_true", help="keep each size's folder (to inspect it or rerun a stage)")
    parser.add_argument("--timeout-s", type=float, default=7200, help="give up on a stage after this long")
    args = parser.parse_args(argv)
    sizes = [*args.sizes, *([100_000] if args.with_100k else [])]
    taxonomy = yaml.safe_load((DEFAULT_CONFIG_DIR / "taxonomy.yaml").read_text())
    disciplines = [d["name"] if isinstance(d, dict) else d for d in taxonomy["disciplines"]]
    responder = make_responder(disciplines, taxonomy["grades"], taxonomy["difficulties"])
    mode = "each stage in its own process" if args.process_per_stage else "every stage in one process"
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; sizes {sizes}; latency {args.latency_s}s; {mode}")
    results: dict[int, list[dict[str, Any]]] = {}
    with FakeOpenAIServer(FaultConfig(latency_s=args.latency_s), responder=responder) as server:
        for seeds in sizes:
            results[seeds] = run_size(seeds, args, server.base_url)
    print("\nsummary")
    head = ["seeds", "QA kept", "wall s", "LLM s", "peak RSS MB", "w/ workers MB", "objects"]
    print("  ".join(f"{h:>11}" for h in head) + "  non-LLM ms/QA")
    peaks: dict[int, int] = {}
    tree_peaks: dict[int, int] = {}
    for seeds, rows in results.items():
        qa = next((r["rows"] for r in rows if r["stage"] == "refined_qa"), 0) or 0
        wall = sum(r["wall_s"] for r in rows)
        llm = sum(r["llm_s"] for r in rows)
        peak = max(r["peak_rss_mb"] for r in rows)
        tree_peak = max(r["tree_peak_mb"] for r in rows)
        peaks[seeds] = peak
        tree_peaks[seeds] = tree_peak
        objects = sum(r["objects_written"] for r in rows)
        per_qa = (wall - llm) * 1000 / qa if isinstance(qa, int) and qa else float("nan")
        cells = [seeds, qa, f"{wall:.1f}", f"{llm:.1f}", peak, tree_peak, objects]
        print("  ".join(f"{c!s:>11}" for c in cells) + f"  {per_qa:.2f}")
    for seeds, rows in results.items():
        print(f"\nper stage, {seeds} seeds")
        print(
            f"{'stage':<18}{'wall s':>8}{'rows':>9}{'LLM share':>11}{'peak RSS MB':>13}{'w/ workers':>11}{'objects':>9}"
        )
        for r in rows:
            share = r["llm_s"] / r["wall_s"] if r["wall_s"] else 0.0
            print(
                f"{r['stage']:<18}{r['wall_s']:>8}{r['rows']!s:>9}{share:>10.0%}{r['peak_rss_mb']:>13}"
                f"{r['tree_peak_mb']:>11}{r['objects_written']:>9}"
            )
    big = sorted(peaks)
    if len(big) >= 2:
        print(f"\npeak RSS {big[-1]} seeds / {big[-2]} seeds: {peaks[big[-1]] / peaks[big[-2]]:.2f}x (target <= 1.5x)")
        print(
            f"with worker processes: {tree_peaks[big[-1]]} / {tree_peaks[big[-2]]} MB = "
            f"{tree_peaks[big[-1]] / tree_peaks[big[-2]]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
