"""Benchmark of the LLM gateway: pacing under shared rate limits, client overhead, the cache, and what a crash
costs.

Runs against the fake OpenAI server in a separate process (127.0.0.1 only) and prints its figures (no asserts):

1. one process under an RPM limit (server and client both at ``--rpm`` per minute, ``--latency-s`` +-
   ``--latency-jitter-s`` per request, ``--requests`` requests), twice: the server enforcing the limit over
   1 s windows (``--enforce-window-s``: 600 RPM as 10 in any second, as OpenAI documents) and over 60 s
   windows; utilization of the limit, share of 429s, rows not returned;
2. the same with ``--processes`` processes sharing the limit through one limits directory;
3. client overhead against a zero-latency server: requests/s with no limiter and with the shared limiter
   (limits high enough never to bind, so every request still takes its turn in the shared schedule);
4. LLM calls made by a second materialization of a finished batch (response cache on; expect 0);
5. calls paid twice after a ``kill -9`` halfway through a batch: a child process runs the batch with the
   cache on, is killed when the server has answered half, the batch is run again; re-sent = server answers
   of both runs minus the batch size (expect at most the concurrency cap plus the replies of the cache's last
   flush interval, 5 s: a SIGKILL skips the flush; SIGTERM and Ctrl-C flush).

    .venv/bin/python benchmarks/llm_gateway.py                       # defaults: about 10 minutes
    .venv/bin/python benchmarks/llm_gateway.py --parts 1,2 --requests 600

Utilization: requests answered per second of the run, against the limit's rate (``rpm / 60``); a run's
seconds are from the release of the clients to the last reply, less one mean latency (the last request's own
time on the wire). Targets (issue 10): >= 0.95 of the limit, <= 1% 429s, 0 rows lost, with 1 s and 60 s
windows, 1 and 4 processes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boostqa_assets.configs import RoleConfig
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.client import LLMClient
from boostqa_assets.llm.types import LLMRequest
from boostqa_assets.testing.fake_server import FaultConfig, start_fake_server_process, stop_process

MODEL = "fake-model"
SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}


def validator(obj: Any) -> Any:
    if not isinstance(obj, dict) or not {"question", "answer"} <= obj.keys():
        raise ValueError("not a QA object")
    return obj


def requests_for(n: int, tag: str) -> list[LLMRequest]:
    return [
        LLMRequest(
            key=f"{tag}-{i}",
            prompt_id="qa",
            prompt_version="v1",
            prompt=f"Write one exam question about topic {tag} number {i}.",
            schema=SCHEMA,
        )
        for i in range(n)
    ]


def role(url: str, concurrency: int, **kw: Any) -> RoleConfig:
    return RoleConfig(
        base_url=url,
        model=MODEL,
        api="chat",
        structured_output="json_schema",
        max_tokens=64,
        timeout_s=30,
        max_concurrency=concurrency,
        max_retries=8,
        backoff_base_s=0.05,
        backoff_max_s=2,
        **kw,
    )


def stats(url: str) -> dict[str, Any]:
    return httpx.get(url.removesuffix("/v1") + "/_stats", timeout=10).json()


def reset(url: str) -> None:
    httpx.post(url.removesuffix("/v1") + "/_reset", timeout=10).raise_for_status()


# --- child processes (spawned) -----------------------------------------------------------------------------


def _share_worker(spec: dict[str, Any], start: Any, out: Any) -> None:
    """Parts 1-2: a client with the shared limiter runs its own batch once the parent says go."""
    cfg = role(spec["url"], spec["concurrency"], rpm=spec["rpm"])
    client = LLMClient("synthesizer", cfg, spec["url"], limits_dir=spec["dir"])
    reqs = requests_for(spec["n"], spec["tag"])
    out.put(("ready", spec["tag"]))
    start.wait(120)
    results = client.run(reqs, validator)
    out.put(("done", spec["tag"], sum(r.ok for r in results), client.stats.http_429, time.time()))


def _kill_worker(spec: dict[str, Any]) -> None:
    """Part 5: a batch with the cache on; the parent kills this process halfway."""
    cfg = role(spec["url"], spec["concurrency"])
    client = LLMClient("synthesizer", cfg, spec["url"], cache=ResponseCache(spec["cache"]))
    client.run(requests_for(spec["n"], "kill"), validator)


# --- the parts ---------------------------------------------------------------------------------------------


def rpm_share(url: str, args: argparse.Namespace, processes: int, limits_dir: str) -> dict[str, Any]:
    """Run ``--requests`` requests split over ``processes`` processes sharing the limit."""
    reset(url)
    total = args.requests
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    share = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    specs = [
        {
            "url": url,
            "dir": limits_dir,
            "tag": f"p{processes}x{i}",
            "n": n,
            "rpm": args.rpm,
            "concurrency": args.concurrency,
        }
        for i, n in enumerate(share)
    ]
    procs = [ctx.Process(target=_share_worker, args=(s, start, out), daemon=True) for s in specs]
    for p in procs:
        p.start()
    for _ in procs:
        out.get(timeout=120)
    released = time.time()
    start.set()
    done = [out.get(timeout=total / args.rpm * 60 * 3 + 300) for _ in procs]
    elapsed = max(d[4] for d in done) - released
    for p in procs:
        p.join(30)
    st = stats(url)
    achieved = total / max(1e-9, elapsed - args.latency_s)  # requests per second
    rejected = st["by_status"].get("429", 0)
    ok = sum(d[2] for d in done)
    return {
        "processes": processes,
        "requests": total,
        "ok": ok,
        "lost": total - ok,
        "elapsed_s": round(elapsed, 2),
        "achieved_rpm": round(achieved * 60, 1),
        "ratio": round(achieved / (args.rpm / 60), 3),
        "http_429": rejected,
        "share_429": round(rejected / max(1, st["requests"]), 4),
        "server_requests": st["requests"],
    }


def overhead(url: str, args: argparse.Namespace, limits_dir: str) -> dict[str, Any]:
    """Requests/s of one client process against a zero-latency server, without and with the SQLite limiter."""
    out: dict[str, Any] = {}
    n = args.overhead_requests
    # Never binding at this speed, yet each request is one count+insert per quantity in the database
    # (at most 5,000 units a window, so 1 request and ~1 token quantum per unit here).
    modes = {
        "no limiter": {},
        "shared limiter (rpm)": {"rpm": 6_000_000},
        "shared limiter (rpm+tpm_in+tpm_out)": {"rpm": 6_000_000, "tpm_in": 10**9, "tpm_out": 10**9},
    }
    for name, limits in modes.items():
        reset(url)
        cfg = role(url, args.concurrency, **limits)
        client = LLMClient("synthesizer", cfg, url, limits_dir=limits_dir if limits else None)
        reqs = requests_for(n, f"ovh-{len(out)}")
        client.run(reqs[:200], validator)  # warm-up: connections, imports
        reqs = reqs[200:]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        results = client.run(reqs, validator)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        out[name] = {
            "requests": len(reqs),
            "ok": sum(r.ok for r in results),
            "req_per_s": round(len(reqs) / dt),
            "client_cpu_us_per_req": round(cpu / len(reqs) * 1e6),
        }
    return out


def cache_rerun(url: str, args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    reset(url)
    reqs = requests_for(args.cache_requests, "cache")
    first = LLMClient("synthesizer", role(url, args.concurrency), url, cache=ResponseCache(cache_dir))
    first.run(reqs, validator)
    sent_first = stats(url)["requests"]
    second = LLMClient("synthesizer", role(url, args.concurrency), url, cache=ResponseCache(cache_dir))
    results = second.run(reqs, validator)
    return {
        "requests": len(reqs),
        "first_run_calls": sent_first,
        "second_run_calls": stats(url)["requests"] - sent_first,
        "second_run_cache_hits": second.stats.cache_hits,
        "second_run_ok": sum(r.ok for r in results),
    }


def kill_rerun(args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    proc, url = start_fake_server_process(FaultConfig(latency_s=args.kill_latency_s))
    try:
        n, cap = args.kill_requests, args.concurrency
        spec = {"url": url, "concurrency": cap, "n": n, "cache": cache_dir}
        child = mp.get_context("spawn").Process(target=_kill_worker, args=(spec,), daemon=True)
        child.start()
        deadline = time.time() + 120
        while stats(url)["answered_ok"] < n // 2 and child.is_alive() and time.time() < deadline:
            time.sleep(0.005)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        time.sleep(args.kill_latency_s * 3)  # let the server finish what was on the wire (it counts as paid)
        answered_first = stats(url)["answered_ok"]
        cached = sum(1 for _ in Path(cache_dir).rglob("*.json"))  # files of the old layout, if any
        cached += sum(pq.ParquetFile(p).metadata.num_rows for p in Path(cache_dir).rglob("*.parquet"))
        rerun = LLMClient("synthesizer", role(url, cap), url, cache=ResponseCache(cache_dir))
        results = rerun.run(requests_for(n, "kill"), validator)
        st = stats(url)
        rerun_calls = st["requests"] - answered_first
        return {
            "batch": n,
            "concurrency_cap": cap,
            "answered_before_kill": answered_first,
            "cached_before_kill": cached,
            "rerun_calls": rerun_calls,
            "re_sent": answered_first + rerun_calls - n,
            "rerun_ok": sum(r.ok for r in results),
        }
    finally:
        stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=600, help="requests per minute, server and client")
    parser.add_argument("--requests", type=int, default=1200, help="requests in each run of parts 1-2")
    parser.add_argument("--enforce-window-s", type=float, default=1.0, help="the server's short window, parts 1-2")
    parser.add_argument("--latency-s", type=float, default=1.0, help="server latency in parts 1-2")
    parser.add_argument("--latency-jitter-s", type=float, default=0.5, help="+- uniform jitter on that latency")
    parser.add_argument("--processes", type=int, default=4, help="processes sharing the limit in part 2")
    parser.add_argument("--concurrency", type=int, default=64, help="max_concurrency (the cross-process cap)")
    parser.add_argument("--overhead-requests", type=int, default=5000, help="requests per mode in part 3")
    parser.add_argument("--cache-requests", type=int, default=500, help="batch size in part 4")
    parser.add_argument("--kill-requests", type=int, default=1000, help="batch size in part 5")
    parser.add_argument("--kill-latency-s", type=float, default=0.05, help="server latency in part 5")
    parser.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run")
    args = parser.parse_args(argv)
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    summary: list[tuple[str, str, str]] = []
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; parts {sorted(parts)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="boostqa-gateway-") as tmp:
        if parts & {1, 2}:
            windows = {f"{args.enforce_window_s:g} s windows": args.enforce_window_s, "60 s windows": None}
            table: list[tuple[str, dict[str, Any]]] = []
            for label, enforce in windows.items():
                cfg = FaultConfig(
                    rpm=args.rpm,
                    window_s=60.0,
                    enforce_window_s=enforce,
                    latency_s=args.latency_s,
                    latency_jitter_s=args.latency_jitter_s,
                )
                proc, url = start_fake_server_process(cfg)
                try:
                    for part, n in ((1, 1), (2, args.processes)):
                        if part not in parts:
                            continue
                        res = rpm_share(url, args, n, str(Path(tmp) / f"limits-{part}-{label[:3].strip()}"))
                        print(f"[{part}] {n} process(es), {args.rpm} RPM, server {label}: {res}", flush=True)
                        table.append((f"{n} process(es), {label}", res))
                finally:
                    stop_process(proc)
            for name, res in table:
                summary.append(
                    (
                        f"1-2. {name}",
                        f"{res['ratio']:.3f} of the limit",
                        f"429s {res['share_429']:.2%} ({res['http_429']} of {res['server_requests']}), "
                        f"lost {res['lost']} of {res['requests']}",
                    )
                )
        if parts & {3, 4}:
            proc, url = start_fake_server_process(FaultConfig())
            try:
                if 3 in parts:
                    res3 = overhead(url, args, str(Path(tmp) / "limits-3"))
                    for name, r in res3.items():
                        print(f"[3] client overhead, {name}: {r}", flush=True)
                        summary.append(
                            (
                                f"3. client overhead, {name}",
                                f"{r['req_per_s']} req/s",
                                f"client CPU {r['client_cpu_us_per_req']} us/req, conc {args.concurrency}",
                            )
                        )
                if 4 in parts:
                    res4 = cache_rerun(url, args, str(Path(tmp) / "cache-4"))
                    print(f"[4] second materialization: {res4}", flush=True)
                    summary.append(
                        (
                            "4. LLM calls of a second materialization",
                            str(res4["second_run_calls"]),
                            f"of {res4['requests']} requests ({res4['second_run_cache_hits']} cache hits)",
                        )
                    )
            finally:
                stop_process(proc)
        if 5 in parts:
            print("[5] (the server may log a ClientDisconnect for a request cut by the kill: expected)", flush=True)
            res5 = kill_rerun(args, str(Path(tmp) / "cache-5"))
            print(f"[5] kill -9 at 50%: {res5}", flush=True)
            summary.append(
                (
                    "5. calls re-sent after kill -9 at 50%",
                    str(res5["re_sent"]),
                    f"cap {res5['concurrency_cap']}; batch {res5['batch']}, {res5['cached_before_kill']} cached",
                )
            )
    width = max(len(s[0]) for s in summary) if summary else 10
    print("\nsummary")
    print(f"{'figure':<{width}}  {'value':<30}  notes")
    for name, value, notes in summary:
        print(f"{name:<{width}}  {value:<30}  {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
