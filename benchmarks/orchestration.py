"""Benchmark of orchestration overhead: a backfill of synthesized_qa + refined_qa (and their checks) over the
110 discipline x grade partitions of the shipped taxonomy (22 x 5), against a zero-latency fake OpenAI-compatible
endpoint in its own process (127.0.0.1), so what is left is the pipeline's own work plus Dagster's.

Scenarios, each on a fresh copy of the same upstream data (seeds ... synthesis_plan, materialized once
in-process), so every one sends the same LLM requests (the response cache lives under the data root):

- ``inprocess``: one ``dg.materialize`` run over all 110 partitions (partition range tags, in-process executor,
  as ``boostqa_assets.runner`` does): the work itself, next to no orchestration. The reference.
- ``single_run``: ``launchPartitionBackfill`` through ``dagster dev`` (webserver + daemon) with the default
  policy (``BackfillPolicy.single_run()``). Dagster 1.13 still launches one run per grade (5): a run's
  partitions are a range, a 2-D range is a rectangle, and the daemon cuts the selection by its smaller dimension.
- ``per_partition``: the same with ``orchestration.max_partitions_per_run: 1``: one run per partition, over
  ``--per-partition`` partitions (a seeded sample of 16; all 110 take the better part of an hour on 2 cores)
  and extrapolated to 110 linearly, printed as such.
- ``per_partition_inproc``: one run per partition with the in-process executor (run config on the backfill):
  how much of a run's cost is the multiprocess executor's process per step.

Figures per scenario: wall time (launch to the backfill done), runs launched, wall per partition, overhead per
partition ((wall - in-process wall for the same partitions) / partitions), the daemon's pickup and finish
latency (its backfill loop ticks every 30 s), summed run time, and LLM requests (equal work). Runs follow the
project's dagster.yaml (at most 4 runs at once, LLM steps in a pool of 2). No asserts.

    .venv/bin/python benchmarks/orchestration.py                      # ~10-15 minutes on 2 cores
    .venv/bin/python benchmarks/orchestration.py --per-partition 110  # every partition in its own run (~1 h)
    .venv/bin/python benchmarks/orchestration.py --scenarios inprocess,single_run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg

from boostqa_assets.devserver import BackfillRun, DagsterDev, write_instance_yaml
from boostqa_assets.settings import DEFAULT_CONFIG_DIR
from boostqa_assets.testing.fake_server import FaultConfig, start_fake_server_process, stop_process

BACKFILLED = ("synthesized_qa", "refined_qa")
ALL_SCENARIOS = ("inprocess", "single_run", "per_partition", "per_partition_inproc")
IN_PROCESS_EXECUTOR = {"execution": {"config": {"in_process": {}}}}
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
TOPICS = [
    "the speed of a falling stone",
    "prime numbers below one hundred",
    "the causes of the French Revolution",
    "how vaccines train the immune system",
    "supply and demand in a small market",
    "the structure of a sonnet",
    "plate tectonics and earthquakes",
    "recursion in computer programs",
    "the role of a constitution",
    "photosynthesis in green plants",
    "balancing a chemical equation",
    "the water cycle",
]


def load() -> str:
    """The 1-minute load average: on 2 cores, anything else running inflates every figure."""
    return f"{os.getloadavg()[0]:.1f}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the project: config folder, seeds, environment --------------------------------------------------------


def write_config(folder: Path, seeds_file: Path, seeds_per_partition: int, max_per_run: int | None) -> None:
    """The shipped taxonomy and LLM roles; one JSONL seed source; every discipline at every grade (the
    multi-grade track for all categories) with at most ``seeds_per_partition`` seeds per cell; no QA budget."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("taxonomy.yaml", "llm.yaml", "recipes.yaml", "pipeline.yaml"):
        shutil.copy(DEFAULT_CONFIG_DIR / name, folder / name)
    source = {
        "name": "bench_qa",
        "path": str(seeds_file),
        "kind": "qa",
        "fields": {"id": "id", "question": "q", "answer": "a"},
    }
    (folder / "sources.yaml").write_text(yaml.safe_dump({"sources": [source]}))
    recipes = yaml.safe_load((folder / "recipes.yaml").read_text())
    for recipe in recipes["recipes"]:
        recipe["qa_budget"] = None
        recipe["token_budget"] = 10_000_000
    (folder / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    pipeline = yaml.safe_load((folder / "pipeline.yaml").read_text())
    pipeline["synthesis"]["non_stem_grades"] = "all"
    pipeline["synthesis"]["max_seeds_per_partition"] = seeds_per_partition
    # The automation sensor's eager conditions would launch backfills of their own: only ours is measured.
    pipeline.setdefault("orchestration", {}).update({"max_partitions_per_run": max_per_run, "automation": False})
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))


def write_seeds(path: Path, n: int) -> None:
    """``n`` short QA seeds; the fake endpoint labels each with a discipline, grade and difficulty drawn from
    a hash of its prompt, so a few hundred cover every discipline."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            q = f"Question {i}: explain one fact about {topic}, case {i * 7919 % 1000}."
            f.write(json.dumps({"id": f"s{i}", "q": q, "a": f"Fact {i} about {topic}."}) + "\n")


def project_env(root: Path, config: Path, llm_url: str) -> dict[str, str]:
    return {
        "BOOSTQA_HOME": str(root / "home"),
        "BOOSTQA_DATA_ROOT": str(root / "data"),
        "BOOSTQA_CONFIG_DIR": str(config),
        "BOOSTQA_LLM_BASE_URL": llm_url,
        "BOOSTQA_LLM_MODEL": "fake-model",
        "BOOSTQA_LLM_API": "chat",
        "BOOSTQA_LLM_STRUCTURED_OUTPUT": "json_schema",
        "BOOSTQA_LLM_MAX_CONCURRENCY": "8",
        "GX_ANALYTICS_ENABLED": "false",
    }


def use_env(env: dict[str, str]) -> None:
    """Point this process at a project (the in-process scenario and the upstream stages run here)."""
    for key in [k for k in os.environ if k.startswith("BOOSTQA_")]:
        del os.environ[key]
    os.environ.update(env)


def server_requests(llm_url: str) -> int:
    return httpx.get(llm_url.removesuffix("/v1") + "/_stats", timeout=10).json()["requests"]


# --- scenarios ---------------------------------------------------------------------------------------------


def prepare_scenario(
    work: Path, name: str, base: Path, seeds_file: Path, args: argparse.Namespace, max_per_run: int | None
) -> tuple[Path, dict[str, str]]:
    """A scenario folder: a copy of the upstream data (cache included), its own config, homes, instance."""
    root = work / name
    write_config(root / "config", seeds_file, args.seeds_per_partition, max_per_run)
    shutil.copytree(base / "data", root / "data")
    write_instance_yaml(root / "dagster_home")
    return root, project_env(root, root / "config", args.llm_url)


def run_upstream(base: Path, env: dict[str, str]) -> list[str]:
    """Every stage before synthesized_qa, in-process, into the base folder."""
    from boostqa_assets.definitions import STAGES, build_definitions
    from boostqa_assets.runner import run_pipeline

    use_env(env)
    write_instance_yaml(base / "dagster_home")
    upstream = list(STAGES[: STAGES.index("synthesized_qa")])
    with dg.DagsterInstance.from_config(str(base / "dagster_home")) as instance:
        results = run_pipeline(build_definitions(), instance, stages=upstream)
    for r in results:
        log(f"  upstream {r.asset}: {'ok' if r.success else 'FAILED'} in {r.seconds:.1f}s")
    if not all(r.success for r in results) or len(results) != len(upstream):
        raise SystemExit("upstream stages failed; see the log above")
    return upstream


def qa_keys() -> list[str]:
    from boostqa_assets.definitions import build_definitions

    pdef = build_definitions().resolve_assets_def("synthesized_qa").partitions_def
    assert pdef is not None
    return [str(k) for k in pdef.get_partition_keys()]


def partition_rows(data_root: Path, keys: list[str]) -> tuple[int, int, int]:
    """(partitions with synthesized rows, synthesized rows, refined rows) over ``keys``."""

    from boostqa_assets.partitions import qa_key_parts
    from boostqa_assets.storage import Store

    def height(asset: str, key: str) -> int:
        d, g = qa_key_parts(key)
        return Store(str(data_root)).read_partition(asset, {"discipline": d, "grade": g}).height

    with_rows = synth = refined = 0
    for key in keys:
        n, m = height("synthesized_qa", key), height("refined_qa", key)
        with_rows += n > 0
        synth += n
        refined += m
    return with_rows, synth, refined


def run_inprocess(root: Path, env: dict[str, str], keys: list[str], llm_url: str) -> dict[str, Any]:
    """One in-process run over every partition of both assets and their checks (range tags)."""
    from boostqa_assets.definitions import build_definitions

    use_env(env)
    defs = build_definitions()
    before = server_requests(llm_url)
    started = time.perf_counter()
    with dg.DagsterInstance.from_config(str(root / "dagster_home")) as instance:
        result = dg.materialize(
            assets=[*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
            selection=dg.AssetSelection.assets(*BACKFILLED) | dg.AssetSelection.checks_for_assets(*BACKFILLED),
            instance=instance,
            resources=defs.resources,
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
            run_config=QUIET,
            raise_on_error=False,
        )
    wall = time.perf_counter() - started
    return {
        "partitions": len(keys),
        "runs": 1,
        "ok": result.success,
        "wall_s": wall,
        "llm_requests": server_requests(llm_url) - before,
        "rows": partition_rows(root / "data", keys),
    }


def run_daemon(
    root: Path,
    env: dict[str, str],
    keys: list[str],
    llm_url: str,
    run_config: dict[str, Any] | None,
    all_partitions: bool,
    timeout_s: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """``dagster dev`` on this scenario's instance; one backfill over ``keys`` of both assets, launched
    through GraphQL and waited for; figures from the backfill and its runs."""
    with DagsterDev(root / "dagster_home", env=env) as dev:
        ready_s = dev.wait_ready()
        progress(f"dagster dev ready in {ready_s:.1f}s (pid {dev.proc.pid if dev.proc else '?'}); launching")
        before = server_requests(llm_url)
        last = [0.0, ""]

        def on_poll(backfill: dict[str, Any], runs: list[BackfillRun]) -> None:
            counts: dict[str, int] = {}
            for r in runs:
                counts[r.status] = counts.get(r.status, 0) + 1
            line = f"{backfill['status']}: {len(runs)} runs {dict(sorted(counts.items()))}"
            if line != last[1] and time.monotonic() - last[0] > 10:
                progress(f"  {time.perf_counter() - started:6.1f}s {line}")
                last[0], last[1] = time.monotonic(), line

        names = None if all_partitions else keys
        started = time.perf_counter()
        backfill_id = dev.launch_asset_backfill(list(BACKFILLED), partition_names=names, run_config=run_config)
        backfill = dev.wait_for_backfill(backfill_id, timeout_s=timeout_s, on_poll=on_poll)
        wall = time.perf_counter() - started
        runs = dev.backfill_runs(backfill_id)
    created = min(r.created for r in runs)
    last_end = max(r.ended or 0 for r in runs)
    return {
        "partitions": len(keys),
        "runs": len(runs),
        "ok": backfill["status"] == "COMPLETED_SUCCESS",
        "status": backfill["status"],
        "wall_s": wall,
        "pickup_s": created - backfill["creationTime"],
        "span_s": last_end - created,
        "finish_s": (backfill["endTimestamp"] or last_end) - last_end,
        "run_s": sum((r.ended or 0) - (r.started or 0) for r in runs),
        "queued_s": sum((r.started or r.created) - r.created for r in runs) / len(runs),
        "ready_s": ready_s,
        "llm_requests": server_requests(llm_url) - before,
        "rows": partition_rows(root / "data", keys),
    }


# --- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help=",".join(ALL_SCENARIOS))
    parser.add_argument("--seeds", type=int, default=300, help="QA seeds (labelled by the fake endpoint)")
    parser.add_argument("--seeds-per-partition", type=int, default=2, help="synthesis.max_seeds_per_partition")
    parser.add_argument(
        "--per-partition", type=int, default=16, help="partitions backfilled one run each (a seeded sample)"
    )
    parser.add_argument("--timeout-s", type=float, default=1800, help="per backfill")
    parser.add_argument("--workdir", help="keep the scenario folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {ALL_SCENARIOS}")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="boostqa-orch-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, dagster {dg.__version__}; work folder {work}")
    proc, args.llm_url = start_fake_server_process(FaultConfig())
    log(f"fake endpoint (zero latency) pid {proc.pid} at {args.llm_url}")
    results: dict[str, dict[str, Any]] = {}
    bench_started = time.perf_counter()
    try:
        seeds_file = work / "seeds.jsonl"
        write_seeds(seeds_file, args.seeds)
        base = work / "base"
        write_config(base / "config", seeds_file, args.seeds_per_partition, None)
        log(f"upstream stages in-process over {args.seeds} seeds ...")
        run_upstream(base, project_env(base, base / "config", args.llm_url))
        keys = qa_keys()
        sample = sorted(random.Random(0).sample(keys, min(args.per_partition, len(keys))), key=keys.index)

        for name in scenarios:
            log(f"scenario {name} ... (load average {load()})")
            if name == "inprocess":
                root, env = prepare_scenario(work, name, base, seeds_file, args, None)
                results[name] = run_inprocess(root, env, keys, args.llm_url)
            else:
                per_run = None if name == "single_run" else 1
                run_config = IN_PROCESS_EXECUTOR if name == "per_partition_inproc" else None
                root, env = prepare_scenario(work, name, base, seeds_file, args, per_run)
                chosen = keys if name == "single_run" else sample
                results[name] = run_daemon(
                    root, env, chosen, args.llm_url, run_config, chosen == keys, args.timeout_s, log
                )
            r = results[name]
            r["load"] = load()
            log(
                f"scenario {name}: {'ok' if r['ok'] else 'NOT OK ' + str(r.get('status'))}, {r['runs']} runs, "
                f"{r['wall_s']:.1f}s wall, {r['llm_requests']} LLM requests, "
                f"partitions with rows / synthesized / refined rows: {r['rows']}"
            )
    finally:
        stop_process(proc)
    report(results, len(keys), args, time.perf_counter() - bench_started)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, Any]], n_keys: int, args: argparse.Namespace, total_s: float) -> None:
    ref = results.get("inprocess")
    ref_per_partition = ref["wall_s"] / ref["partitions"] if ref else None
    notes = {
        "inprocess": "1 dg.materialize run, in-process executor (reference)",
        "single_run": "BackfillPolicy.single_run(); the daemon cuts 2-D ranges per grade",
        "per_partition": "max_partitions_per_run: 1; multiprocess executor (a process per step)",
        "per_partition_inproc": "max_partitions_per_run: 1; in_process executor (run config)",
    }
    print("\nsummary (wall: launch to backfill done; ovh/part: wall per partition minus in-process wall per partition)")
    header = (
        f"{'scenario':<31} {'parts':>5} {'runs':>4} {'wall s':>7} {'s/part':>6} {'ovh/part':>8} {'pickup':>6} "
        f"{'finish':>6} {'s/run':>6} {'LLM req':>7} {'load':>4}  notes"
    )
    print(header)
    print("-" * len(header))
    extrapolated: dict[str, float] = {}
    for name, r in results.items():
        per_part = r["wall_s"] / r["partitions"]
        overhead = "-" if ref_per_partition is None else f"{per_part - ref_per_partition:.2f}"
        note = notes[name] if r["ok"] else f"NOT OK ({r.get('status')}); {notes[name]}"
        per_run = r.get("run_s", r["wall_s"]) / r["runs"]
        print(
            f"{name:<31} {r['partitions']:>5} {r['runs']:>4} {r['wall_s']:>7.1f} {per_part:>6.2f} {overhead:>8} "
            f"{r.get('pickup_s', 0):>6.1f} {r.get('finish_s', 0):>6.1f} {per_run:>6.1f} {r['llm_requests']:>7} "
            f"{r['load']:>4}  {note}"
        )
        if r["partitions"] < n_keys:
            # Runs go through a queue of 4 at a time, so the span of the runs grows with their number; the
            # daemon's pickup and finish latencies do not.
            fixed = r.get("pickup_s", 0) + r.get("finish_s", 0)
            extrapolated[name] = fixed + (r["wall_s"] - fixed) * n_keys / r["partitions"]
    for name, wall in extrapolated.items():
        overhead = "-" if ref_per_partition is None else f"{wall / n_keys - ref_per_partition:.2f}"
        print(
            f"{name + ' EXTRAPOLATED':<31} {n_keys:>5} {n_keys:>4} {wall:>7.1f} {wall / n_keys:>6.2f} {overhead:>8} "
            f"{'':>6} {'':>6} {'':>6} {'':>7} {'':>4}  linear from {results[name]['partitions']} partitions "
            "(pickup + finish kept fixed); not measured"
        )
    print()
    walls = {name: extrapolated.get(name, r["wall_s"]) for name, r in results.items()}
    pairs = [(name, "inprocess") for name in walls if name != "inprocess"]
    pairs += [(name, "single_run") for name in ("per_partition", "per_partition_inproc")]
    for name, base in pairs:
        if name in walls and base in walls:
            tag = " (extrapolated)" if name in extrapolated else ""
            print(f"{name} / {base}, wall for {n_keys} partitions: {walls[name] / walls[base]:.1f}x{tag}")
    print(
        f"\nseeds {args.seeds}, at most {args.seeds_per_partition} per partition; runs as in dagster.yaml (4 at once, "
        "LLM steps in a pool of 2); the daemon's backfill loop ticks every 30 s (pickup: backfill created to first "
        "run created; finish: last run ended to backfill done); s/run: mean run duration (start to end); load: "
        f"1-min load average after the scenario ({os.cpu_count()} CPUs). Total {total_s / 60:.1f} min."
    )


if __name__ == "__main__":
    sys.exit(main())
