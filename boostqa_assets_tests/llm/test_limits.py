"""Tests for the shared endpoint limits (pacing, concurrency cap, pause) and the run budget: the pacing rules as
pure functions, one process, and processes (``spawn``) sharing one limits directory against one fake server
process that enforces its per-minute limit over 1 s windows, as providers do."""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from boostqa_assets.configs import ROLES, ConfigError, LLMConfig, RoleConfig
from boostqa_assets.llm import pacing
from boostqa_assets.llm.budget import Budget
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.client import LLMClient
from boostqa_assets.llm.limits import (
    EndpointLimiter,
    endpoint_key,
    estimate_tokens,
    parse_duration_s,
    retry_after_s,
)
from boostqa_assets.llm.pacing import REQUESTS, TOKENS_IN, PacingRule
from boostqa_assets.llm.types import LLMRequest
from boostqa_assets.testing.fake_server import FakeOpenAIServer, FaultConfig, start_fake_server_process, stop_process

MODEL = "fake-model"
QA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}


def qa_validator(obj: Any) -> dict[str, str]:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("question", "answer")):
        raise ValueError(f"not a question/answer object: {str(obj)[:80]}")
    return {"question": obj["question"], "answer": obj["answer"]}


def make_requests(n: int, tag: str = "") -> list[LLMRequest]:
    return [
        LLMRequest(
            key=f"{tag}row-{i:03d}",
            prompt_id="qa",
            prompt_version="v1",
            prompt=f"Write one exam question about topic {tag}{i}.",
            schema=QA_SCHEMA,
        )
        for i in range(n)
    ]


def role(base_url: str, **kw: Any) -> RoleConfig:
    base: dict[str, Any] = {
        "base_url": base_url,
        "model": MODEL,
        "api": "chat",
        "structured_output": "json_schema",
        "max_tokens": 64,
        "timeout_s": 10.0,
        "max_concurrency": 8,
        "max_retries": 6,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.2,
    }
    return RoleConfig(**{**base, **kw})


def server_stats(base_url: str) -> dict[str, Any]:
    return httpx.get(base_url.removesuffix("/v1") + "/_stats", timeout=5).json()


@pytest.fixture
def server_process() -> Iterator[Any]:
    procs: list[Any] = []

    def start(config: FaultConfig) -> str:
        proc, url = start_fake_server_process(config)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        stop_process(proc)


# --- workers run in spawned processes ----------------------------------------------------------------------


def _batch_worker(spec: dict[str, Any], start: Any, out: Any) -> None:
    """One 'partition': a client with a limiter on the shared directory runs its own batch."""
    try:
        cfg = role(spec["url"], **spec.get("role", {}))
        limiter = EndpointLimiter(
            spec["dir"], spec["url"], MODEL, window_s=spec.get("window_s", 60.0), **spec["limits"]
        )
        client = LLMClient("synthesizer", cfg, spec["url"], limiter=limiter)
        reqs = make_requests(spec["n"], tag=spec["tag"])
        out.put(("ready", spec["tag"], time.time()))
        start.wait(60)
        started = time.time()
        results = client.run(reqs, qa_validator)
        limiter.close()
        out.put(
            (
                "done",
                spec["tag"],
                {
                    "started": started,
                    "finished": time.time(),
                    "ok": sum(r.ok for r in results),
                    "keys": [r.key for r in results],
                    "http_429": client.stats.http_429,
                    "http_requests": client.stats.http_requests,
                    "limiter_wait_s": client.stats.limiter_wait_s,
                    "pauses": client.stats.pauses,
                },
            )
        )
    except BaseException as exc:  # report, never hang the parent
        out.put(("error", spec["tag"], repr(exc)))


def _run_workers(specs: list[dict[str, Any]], timeout_s: float = 60.0) -> tuple[dict[str, Any], float]:
    """Start one spawned process per spec, release them together, return their reports and the wall time."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_batch_worker, args=(spec, start, out), daemon=True) for spec in specs]
    for p in procs:
        p.start()
    try:
        for _ in specs:
            kind, tag, payload = out.get(timeout=timeout_s)
            assert kind == "ready", (kind, tag, payload)
        released = time.time()
        start.set()
        reports: dict[str, Any] = {}
        for _ in specs:
            kind, tag, payload = out.get(timeout=timeout_s)
            assert kind == "done", (kind, tag, payload)
            reports[tag] = payload
        return reports, time.time() - released
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)


# --- parsing and units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("6m0s", 360.0),
        ("1h2m", 3720.0),
        ("0s", 0.0),
        (" 20ms ", 0.02),
        ("soon", None),
        ("", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("5x", None),
    ],
)
def test_parse_duration(value: str | None, expected: float | None) -> None:
    assert parse_duration_s(value) == (pytest.approx(expected) if expected is not None else None)


def test_endpoint_key_and_token_estimate() -> None:
    assert endpoint_key("http://h/v1/", "m") == endpoint_key("http://h/v1", "m") != endpoint_key("http://h/v1", "n")
    assert len(endpoint_key("http://h/v1", "m")) == 16
    assert estimate_tokens("") == 1 and estimate_tokens("x" * 400) == 101


def test_retry_after_prefers_the_precise_header_and_reads_http_dates() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "1"}) == pytest.approx(0.25)
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412478.0) == pytest.approx(2.0)
    assert retry_after_s({"x-ratelimit-reset-tokens": "1.5s"}) == 1.5
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None


# --- pacing rules (pure) -------------------------------------------------------------------------------------


def _departures(rule: PacingRule, n: int, state: dict[str, Any], start: float = 1000.0) -> list[float]:
    """Departure times of ``n`` requests all asking at ``start`` (a backlog), one request weight each."""
    return [pacing.reserve(state, start, {REQUESTS: 1.0}, rule)[0] for _ in range(n)]


def test_a_backlog_leaves_evenly_spaced_at_the_rate() -> None:
    rule = PacingRule({REQUESTS: 10.0})  # 600 per minute
    times = _departures(rule, 30, pacing.new_state(1000.0))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 1000.0 and all(g == pytest.approx(0.1) for g in gaps)  # no burst on a fresh state
    # in any 1 s (the window a quantizing provider counts over), never more than a second's quota
    assert max(sum(1 for t in times if a <= t < a + 1.0 - 1e-9) for a in times) == 10


def test_the_burst_is_earned_and_bounded_by_burst_s() -> None:
    rule = PacingRule({REQUESTS: 10.0}, burst_s=1.0, burst_recover_s=600.0)
    state = pacing.new_state(0.0)
    later = 700.0  # long enough without a 429: the burst is earned
    times = _departures(rule, 15, state, later)
    assert times[:10] == pytest.approx([later] * 10)  # one second's worth at once...
    assert times[10] == pytest.approx(later + 0.1) and times[14] == pytest.approx(later + 0.5)  # ...then paced


def test_big_requests_and_token_rates() -> None:
    rule = PacingRule({TOKENS_IN: 100.0})  # 6,000 tokens a minute
    state = pacing.new_state(0.0)
    first, ok = pacing.reserve(state, 0.0, {TOKENS_IN: 500.0}, rule)  # bigger than a second's worth
    second, _ = pacing.reserve(state, 0.0, {TOKENS_IN: 100.0}, rule)
    assert ok and first == 0.0 and second == pytest.approx(5.0)  # the big one goes, the next waits its 5 s
    pacing.settle(state, 0.0, {TOKENS_IN: -300.0}, rule)  # the big one used 200 tokens: 3 s credited back
    third, _ = pacing.reserve(state, 0.0, {TOKENS_IN: 100.0}, rule)
    assert third == pytest.approx(3.0)


def test_a_reservation_beyond_the_horizon_is_not_taken() -> None:
    rule = PacingRule({REQUESTS: 10.0})
    state = pacing.new_state(0.0)
    _departures(rule, 10, state, 0.0)  # the schedule runs to 1.0
    before = json.dumps(state)
    when, reserved = pacing.reserve(state, 0.0, {REQUESTS: 1.0}, rule, horizon=0.5)
    assert not reserved and when == pytest.approx(1.0) and json.dumps(state) == before


def test_a_429_slows_the_pace_down_then_it_recovers_to_a_ceiling_under_it() -> None:
    rule = PacingRule({REQUESTS: 10.0}, decrease=0.9, margin=0.03, recover_per_s=0.05, probe_per_s=0.001)
    state = pacing.new_state(0.0)
    assert pacing.factor(state, 0.0, rule) == 1.0
    assert pacing.slow_down(state, 10.0, rule)
    assert not pacing.slow_down(state, 10.5, rule)  # the same burst's other 429s: one decrease only
    assert pacing.factor(state, 10.0, rule) == pytest.approx(0.9)
    assert pacing.burst_scale(state, 10.0, rule) == 0.0  # and no burst for a while
    assert pacing.factor(state, 11.0, rule) == pytest.approx(0.95)  # fast recovery...
    assert pacing.factor(state, 12.0, rule) == pytest.approx(0.97, abs=2e-3)  # ...up to 3% under the 429's pace
    assert pacing.factor(state, 42.0, rule) == pytest.approx(1.0, abs=2e-3)  # then slow probing, back to 1
    times = _departures(rule, 3, state, 10.0)
    assert times[2] - times[1] == pytest.approx(0.1 / 0.9)  # the slower pace spaces requests wider
    for t in range(20):  # 429s every few seconds, at the ceiling: it gives way, never below the floor
        pacing.slow_down(state, 100.0 + 3 * t, rule)
    assert rule.floor <= pacing.factor(state, 160.0, rule) < 0.9


def test_a_quantized_endpoint_never_lets_more_than_a_seconds_quota_leave_in_a_second() -> None:
    rule = PacingRule({REQUESTS: 10.0}, quantum_slack=0.0)
    state = pacing.new_state(0.0)
    assert pacing.depart(state, 5.0, rule) == 0.0 and "bins" not in state  # no 429 yet: nothing counted
    pacing.slow_down(state, 5.0, rule)
    late = [pacing.depart(state, 10.0 + i * 0.001, rule) for i in range(10)]  # ten late requests leave together
    assert late == [0.0] * 10
    wait = pacing.depart(state, 10.5, rule)  # the eleventh within the same second waits for the first to age out
    assert wait == pytest.approx(0.51, abs=0.011)
    assert pacing.depart(state, 10.5 + wait, rule) == 0.0


def test_a_pause_holds_every_departure() -> None:
    rule = PacingRule({REQUESTS: 10.0})
    state = pacing.new_state(0.0)
    assert pacing.extend_pause(state, 5.0) and not pacing.extend_pause(state, 3.0)
    assert pacing.reserve(state, 1.0, {REQUESTS: 1.0}, rule)[0] == 5.0
    assert pacing.reserve(state, 1.0, {}, PacingRule({}))[0] == 5.0  # also with nothing paced


def test_after_a_pause_the_first_request_leaves_alone_and_the_others_wait_for_its_reply() -> None:
    rule = PacingRule({})
    state = pacing.new_state(0.0)
    assert pacing.leave(state, 1.0, rule) == (0.0, False)  # never paused: everyone goes, nobody is first
    pacing.extend_pause(state, 5.0)
    assert pacing.leave(state, 2.0, rule) == (3.0, False)  # nothing leaves during the pause
    assert pacing.leave(state, 5.0, rule) == (0.0, True)  # the first one after it goes alone...
    wait, first = pacing.leave(state, 5.001, rule)  # ...the next looks again soon, until its reply is in
    assert 0 < wait <= pacing.HOLD_POLL_S and not first
    pacing.end_probe(state)
    assert pacing.leave(state, 5.1, rule) == (0.0, False)  # then the rest go (no second "first")
    pacing.extend_pause(state, 8.0)  # its reply paused again: the same after that pause
    assert pacing.leave(state, 8.0, rule) == (0.0, True)
    assert pacing.leave(state, 8.0 + pacing.PROBE_HOLD_S, rule) == (0.0, False)  # a reply that never came


def test_the_state_file_survives_garbage_and_is_shared(tmp_path: Path) -> None:
    path = tmp_path / "k.pacing"
    path.write_bytes(b"\x00not json")
    a, b = pacing.FileStore(path), pacing.FileStore(path)
    rule = PacingRule({REQUESTS: 10.0})
    t0 = time.time()
    first = a.update(lambda s: pacing.reserve(s, t0, {REQUESTS: 1.0}, rule))
    second = b.update(lambda s: pacing.reserve(s, t0, {REQUESTS: 1.0}, rule))
    assert first[1] and second[0] - first[0] == pytest.approx(0.1)  # b saw a's reservation
    a.close()
    b.close()


def test_limiter_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rpm"):
        EndpointLimiter(tmp_path, "http://h/v1", "m", rpm=0)
    with pytest.raises(ValueError, match="not supported"):
        EndpointLimiter(tmp_path, "http://h/v1", "m", backend_url="mysql://db")
    with pytest.raises(ConfigError):
        LLMConfig(roles={r: RoleConfig() for r in ROLES}).with_env_overrides(
            {"BOOSTQA_SYNTHESIZER_LIMITS_BACKEND_URL": "mysql://db"}
        )


def test_role_config_limits_and_env_overrides() -> None:
    cfg = LLMConfig(roles={r: RoleConfig() for r in ROLES})
    env = {
        "BOOSTQA_SYNTHESIZER_RPM": "600",
        "BOOSTQA_SYNTHESIZER_TPM_IN": "100000",
        "BOOSTQA_LLM_TPM_OUT": "50000",
        "BOOSTQA_SYNTHESIZER_BUDGET_USD": "2.5",
        "BOOSTQA_ANNOTATOR_BUDGET_TOKENS": "1000",
        "BOOSTQA_REFINER_LIMITS_BACKEND_URL": "redis://127.0.0.1:6379/0",
    }
    roles = cfg.with_env_overrides(env).roles
    syn = roles["synthesizer"]
    assert (syn.rpm, syn.tpm_in, syn.tpm_out, syn.budget_usd) == (600, 100_000, 50_000, 2.5)
    assert roles["annotator"].budget_tokens == 1000 and roles["annotator"].rpm is None
    assert roles["refiner"].limits_backend_url == "redis://127.0.0.1:6379/0"
    assert RoleConfig().rpm is None and RoleConfig().limits_window_s == 60.0  # default: no limit
    lim = EndpointLimiter.from_role(syn, "http://h/v1", "/tmp/unused")
    assert (lim.rpm, lim.tpm_in, lim.tpm_out, lim.max_concurrency, lim.window_s) == (600, 100_000, 50_000, 4, 60.0)
    assert lim.rule.rates == {"requests": 10.0, "tokens_in": 100_000 / 60, "tokens_out": 50_000 / 60}
    assert lim.rule.burst_s == 1.0
    assert (
        EndpointLimiter.from_role(syn.model_copy(update={"limits_burst_s": 0.0}), "http://h/v1", "/x").rule.burst_s == 0
    )


# --- one process -------------------------------------------------------------------------------------------


def _max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if a <= t < a + window) for a in times)


def test_requests_leave_paced_within_one_process(tmp_path: Path) -> None:
    rpm, window, n = 10, 0.5, 35  # 20 a second

    async def main() -> list[float]:
        limiter = EndpointLimiter(tmp_path, "http://h/v1", "m", rpm=rpm, window_s=window)
        t0, times = time.perf_counter(), []

        async def one() -> None:
            permit = await limiter.acquire(10, 10)
            times.append(time.perf_counter() - t0)
            limiter.release(permit, 10, 10)

        await asyncio.gather(*(one() for _ in range(n)))
        limiter.close()
        return times

    times = asyncio.run(main())
    assert _max_in_window(times, window) <= rpm + 1  # +1: the window's edge, with timer jitter
    assert max(times) >= (n - 1) * window / rpm * 0.95  # spaced one interval (50 ms) apart...
    assert max(times) <= (n - 1) * window / rpm + 1.0  # ...and not much slower: the limit is used


def test_input_and_output_token_rates_hold(tmp_path: Path) -> None:
    async def main() -> tuple[float, float]:
        lim_in = EndpointLimiter(tmp_path, "http://h/v1", "in", tpm_in=1000, window_s=0.5)
        t0 = time.perf_counter()
        for _ in range(25):  # 2,500 tokens at 1,000 per 0.5 s: two full windows of waiting
            lim_in.release(await lim_in.acquire(100, 1), 100, 1)
        t_in = time.perf_counter() - t0
        lim_out = EndpointLimiter(tmp_path, "http://h/v1", "out", tpm_out=1000, window_s=0.5)
        t0 = time.perf_counter()
        for _ in range(25):  # max_tokens 500 is reserved at first, then the mean of what came back (100)
            lim_out.release(await lim_out.acquire(1, 500), 1, 100)
        t_out = time.perf_counter() - t0
        lim_in.close()
        lim_out.close()
        return t_in, t_out

    t_in, t_out = asyncio.run(main())
    assert 0.95 <= t_in <= 2.5
    assert 0.95 <= t_out <= 3.0


def test_headers_pause_the_endpoint(tmp_path: Path) -> None:
    limiter = EndpointLimiter(tmp_path, "http://h/v1", "m")
    assert limiter.paused_until() == 0.0
    assert limiter.observe(200, {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s"}) is None
    assert limiter.paused_until() == 0.0
    before = time.time()
    assert limiter.observe(200, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1.5s"}) == 1.5
    assert before + 1.4 < limiter.paused_until() < time.time() + 1.6
    assert limiter.observe(429, {"retry-after": "3"}) == 3.0
    assert limiter.paused_until() > before + 2.9
    until = limiter.paused_until()
    limiter.observe(429, {"retry-after": "1"})  # a shorter pause never cuts a longer one
    assert limiter.paused_until() == until
    assert limiter.observe(500, {"retry-after": "9"}) is None  # a plain server error pauses nobody
    other = EndpointLimiter(tmp_path, "http://h/v1", "m")  # same endpoint, another client: same pause
    assert other.paused_until() == until
    assert EndpointLimiter(tmp_path, "http://h/v1", "other-model").paused_until() == 0.0
    limiter.close()
    other.close()


def test_slots_are_shared_and_freed_when_the_holder_dies(tmp_path: Path) -> None:
    holder = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from boostqa_assets.llm.limits import EndpointLimiter
        lim = EndpointLimiter({str(tmp_path)!r}, "http://h/v1", "m", max_concurrency=2)
        async def main():
            await lim.acquire(1, 1)
            await lim.acquire(1, 1)
            print("held", flush=True)
            time.sleep(60)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"

        async def try_take(timeout: float) -> bool:
            limiter = EndpointLimiter(tmp_path, "http://h/v1", "m", max_concurrency=2)
            try:
                permit = await asyncio.wait_for(limiter.acquire(1, 1), timeout)
            except TimeoutError:
                return False
            finally:
                limiter.close()
            limiter.release(permit)
            return True

        assert not asyncio.run(try_take(0.3))  # both slots are held by the other process
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops its locks
        proc.wait(10)
        assert asyncio.run(try_take(2.0))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --- across processes --------------------------------------------------------------------------------------


def test_four_processes_share_the_pace_of_a_server_with_1s_windows(server_process: Any, tmp_path: Path) -> None:
    """The server allows 1,200 a minute but counts them over 1 s windows (20 in any second), as providers that
    quantize a per-minute limit do; four processes configured with that very limit share one pace. Nothing is
    lost, the limit is used, and 429s stay rare (the 1% target is measured by benchmarks/llm_gateway.py)."""
    rpm, per_process = 1200, 50
    url = server_process(FaultConfig(rpm=rpm, window_s=60.0, enforce_window_s=1.0, latency_s=0.2))
    specs = [
        {
            "url": url,
            "dir": str(tmp_path / "limits"),
            "tag": f"p{i}-",
            "n": per_process,
            "limits": {"rpm": rpm, "max_concurrency": 16},
            "role": {"max_concurrency": 16, "max_retries": 2},
        }
        for i in range(4)
    ]
    reports, elapsed = _run_workers(specs)
    total = 4 * per_process
    st = server_stats(url)
    assert sum(r["ok"] for r in reports.values()) == total and st["answered_ok"] == total  # nothing lost
    for spec in specs:  # every row came back, in order, in its own process
        assert reports[spec["tag"]]["keys"] == [r.key for r in make_requests(per_process, spec["tag"])]
    rejected = st["by_status"].get("429", 0)
    # Bounds for a machine whose two cores are busy (run 10 times beside a CPU hog: at most 4 429s seen).
    assert rejected <= 0.05 * total, f"{rejected} 429s for {total} requests"
    floor = (total - 1) / (rpm / 60)  # one every 50 ms
    print(f"four processes, 1 s windows: {rejected} 429s of {total} requests, {elapsed:.2f} s (floor {floor:.2f} s)")
    assert elapsed >= floor * 0.95, f"{total} requests in {elapsed:.2f}s: faster than {rpm}/min"
    assert elapsed <= floor * 1.6 + 3, f"{total} requests in {elapsed:.2f}s: far below the limit"


def test_concurrency_cap_holds_across_processes(server_process: Any, tmp_path: Path) -> None:
    cap = 3
    url = server_process(FaultConfig(latency_s=0.2))
    specs = [
        {
            "url": url,
            "dir": str(tmp_path / "limits"),
            "tag": f"c{i}-",
            "n": 6,
            "limits": {"max_concurrency": cap},
            "role": {"max_concurrency": cap},
        }
        for i in range(4)
    ]
    reports, elapsed = _run_workers(specs)
    st = server_stats(url)
    assert st["answered_ok"] == 24 and all(r["ok"] == 6 for r in reports.values())
    assert st["max_in_flight"] <= cap  # 4 processes x 3 local slots, but never more than 3 on the wire
    assert st["max_in_flight"] == cap  # and the cap is used
    assert elapsed >= 24 / cap * 0.2 * 0.9


def test_a_retry_after_pause_reaches_every_process(server_process: Any, tmp_path: Path) -> None:
    """Process A gets a 429 with Retry-After; process B, started during the pause, waits it out and is never
    rate limited itself."""
    url = server_process(FaultConfig(rpm=2, window_s=3.0))
    directory = tmp_path / "limits"
    ctx = mp.get_context("spawn")
    start_a, start_b, out = ctx.Event(), ctx.Event(), ctx.Queue()
    spec = {"url": url, "dir": str(directory), "n": 1, "limits": {}, "role": {"max_concurrency": 1}}
    proc_a = ctx.Process(target=_batch_worker, args=({**spec, "tag": "a-"}, start_a, out), daemon=True)
    proc_b = ctx.Process(target=_batch_worker, args=({**spec, "tag": "b-"}, start_b, out), daemon=True)
    proc_a.start()
    proc_b.start()
    try:
        assert [out.get(timeout=60)[0] for _ in range(2)] == ["ready", "ready"]
        for i in range(2):  # fill the server's window from outside the limiter
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"fill {i}"}]}
            assert httpx.post(url + "/chat/completions", json=body, timeout=5).status_code == 200
        watcher = EndpointLimiter(directory, url, MODEL)
        start_a.set()
        deadline = time.time() + 10
        while watcher.paused_until() <= time.time():  # A's 429 pauses the endpoint
            assert time.time() < deadline, "process A never paused the endpoint"
            time.sleep(0.01)
        until = watcher.paused_until()
        start_b.set()
        reports = {}
        for _ in range(2):
            kind, tag, payload = out.get(timeout=30)
            assert kind == "done", (kind, tag, payload)
            reports[tag] = payload
        a, b = reports["a-"], reports["b-"]
        # (the second of A's retry and B's request also sees the window full again, "remaining 0": a pause too)
        assert a["ok"] == 1 and a["http_429"] == 1 and a["pauses"] >= 1
        assert b["ok"] == 1 and b["http_429"] == 0 and b["http_requests"] == 1  # B honoured A's pause
        assert b["finished"] >= until - 0.05 and b["limiter_wait_s"] > 0.3
        assert server_stats(url)["by_status"].get("429", 0) == 1
        watcher.close()
    finally:
        for p in (proc_a, proc_b):
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)


# --- the budget ---------------------------------------------------------------------------------------------


def test_budget_rules() -> None:
    budget = Budget(tokens=100)
    assert budget.try_reserve(60, 0.0)
    assert not budget.try_reserve(50, 0.0) and budget.exhausted  # 60 in flight + 50 > 100
    assert not budget.try_reserve(1, 0.0)  # exhausted for good, even though 1 would fit
    budget.settle(60, 0.0, 30, 0.0)
    assert budget.spent_tokens == 30 and "30 of 100 tokens" in budget.describe()
    money = Budget(usd=0.01)
    assert money.try_reserve(10, 0.006) and not money.try_reserve(10, 0.006)
    with pytest.raises(ValueError):
        Budget(tokens=0)


@pytest.mark.parametrize("kind", ["tokens", "usd"])
def test_budget_exhaustion_stops_sending_and_keeps_every_row(tmp_path: Path, kind: str) -> None:
    n = 12
    reqs = make_requests(n)
    with FakeOpenAIServer() as srv:
        prices = {"price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}
        # each request reserves ~16 prompt + 64 output tokens and really costs ~16 + ~25
        limit = {"budget_tokens": 300} if kind == "tokens" else {"budget_usd": 300 * 2.0 / 1e6}
        cfg = role(srv.base_url, max_concurrency=1, **prices, **limit)
        client = LLMClient("synthesizer", cfg, srv.base_url, cache=ResponseCache(str(tmp_path / "cache")))
        results = client.run(reqs, qa_validator)
        sent = srv.stats()["requests"]
        assert [r.key for r in results] == [q.key for q in reqs]  # no row lost, none duplicated
        paid = [r for r in results if r.ok]
        refused = [r for r in results if not r.ok]
        assert 0 < len(paid) < n and len(paid) == sent  # it stopped, and only what was sent was paid for
        assert all(r.error == "budget_exhausted" and "not sent" in r.detail for r in refused)
        assert [r.ok for r in results] == [True] * len(paid) + [False] * len(refused)  # one at a time: a clean cut
        st = client.stats
        assert st.budget_exhausted and st.failures_by_reason == {"budget_exhausted": len(refused)}
        assert st.to_metadata()["budget_exhausted"] is True
        assert client.budget is not None
        if kind == "tokens":
            assert st.tokens_in + st.tokens_out == client.budget.spent_tokens <= 300
        else:
            assert st.cost_usd == pytest.approx(client.budget.spent_usd) and st.cost_usd <= 300 * 2.0 / 1e6
        # a re-run with a larger budget re-uses what was paid for (the cache) and pays only for the rest
        bigger = role(srv.base_url, max_concurrency=1, **prices, budget_tokens=10_000)
        again = LLMClient("synthesizer", bigger, srv.base_url, cache=ResponseCache(str(tmp_path / "cache")))
        second = again.run(reqs, qa_validator)
        assert all(r.ok for r in second) and again.stats.cache_hits == len(paid)
        assert srv.stats()["requests"] == n and not again.stats.budget_exhausted


def test_a_shared_budget_stops_every_client_using_it() -> None:
    with FakeOpenAIServer() as srv:
        budget = Budget(tokens=250)
        a = LLMClient("annotator", role(srv.base_url, max_concurrency=1), srv.base_url, budget=budget)
        b = LLMClient("synthesizer", role(srv.base_url, max_concurrency=1), srv.base_url, budget=budget)
        ra = a.run(make_requests(4, "a"), qa_validator)
        rb = b.run(make_requests(4, "b"), qa_validator)
        assert sum(r.ok for r in ra + rb) == srv.stats()["requests"] < 8
        assert budget.exhausted and b.stats.budget_exhausted
        assert budget.spent_tokens <= 250
        assert json.dumps(b.stats.to_metadata())  # still plain JSON
