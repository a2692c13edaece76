"""Pacing shared across machines: processes that share no folder share one endpoint's pace through a real
PostgreSQL server or a real Redis server (started on 127.0.0.1 by the test), against the fake server counting
its limit over 1 s windows."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from boostqa_assets.configs import RoleConfig
from boostqa_assets.llm.client import LLMClient
from boostqa_assets.llm.types import LLMRequest
from boostqa_assets.testing.fake_server import FaultConfig, start_fake_server_process, stop_process
from boostqa_assets_tests.servers import running_postgres, running_redis

# 20 a second, over ~6 s: the 429s that teach the limiter the 1 s windows (2-3, whatever the length) stay well
# under 5%. Over 3 s (30 each) beside two CPU hogs, they reached 4 of 60 in 1 round of 10.
RPM, PER_PROCESS, PROCESSES = 1200, 60, 2


def _worker(url: str, backend: str, folder: str, tag: str, start: Any, out: Any) -> None:
    try:
        cfg = RoleConfig(
            base_url=url,
            model="fake-model",
            api="chat",
            structured_output="none",
            max_tokens=16,
            max_concurrency=8,
            rpm=RPM,
            limits_backend_url=backend,
            backoff_base_s=0.01,
        )
        client = LLMClient("synthesizer", cfg, url, limits_dir=folder)  # a folder of its own: no file shared
        reqs = [LLMRequest(f"{tag}{i}", "qa", "v1", f"question {tag} {i}") for i in range(PER_PROCESS)]
        out.put(("ready", tag))
        start.wait(60)
        results = client.run(reqs, lambda text: text)
        out.put(("done", tag, sum(r.ok for r in results), client.stats.http_429))
    except BaseException as exc:  # report, never hang the parent
        out.put(("error", tag, repr(exc)))


def _share(backend: str, tmp_path: Path) -> tuple[float, int, dict[str, Any]]:
    proc, url = start_fake_server_process(FaultConfig(rpm=RPM, window_s=60.0, enforce_window_s=1.0, latency_s=0.05))
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(url, backend, str(tmp_path / f"m{i}"), f"m{i}-", start, out), daemon=True)
        for i in range(PROCESSES)
    ]
    try:
        for w in workers:
            w.start()
        assert all(out.get(timeout=60)[0] == "ready" for _ in workers)
        released = time.time()
        start.set()
        reports = [out.get(timeout=120) for _ in workers]
        elapsed = time.time() - released
        assert all(r[0] == "done" for r in reports), reports
        stats = httpx.get(url.removesuffix("/v1") + "/_stats", timeout=5).json()
        return elapsed, sum(r[2] for r in reports), stats
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)  # type: ignore[arg-type]
        stop_process(proc)


def _assert_shared(elapsed: float, ok: int, stats: dict[str, Any]) -> None:
    total = PER_PROCESS * PROCESSES
    assert ok == total and stats["answered_ok"] == total  # nothing lost
    floor = (total - 1) / (RPM / 60)  # one request every 50 ms across both "machines"
    assert elapsed >= floor * 0.95, f"{total} requests in {elapsed:.2f}s: the pace was not shared"
    assert stats["by_status"].get("429", 0) <= 0.05 * total


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as server:
        database = server.create_database()
        os.environ["PGPASSWORD"] = server.password  # libpq reads it: the URL carries no password
        try:
            yield f"postgresql://{server.user}@{server.host}:{server.port}/{database}"
        finally:
            os.environ.pop("PGPASSWORD", None)


@pytest.mark.postgres
def test_processes_share_one_pace_through_postgresql(postgres_url: str, tmp_path: Path) -> None:
    _assert_shared(*_share(postgres_url, tmp_path))


@pytest.mark.redis
def test_processes_share_one_pace_through_redis(tmp_path: Path) -> None:
    with running_redis() as url:
        _assert_shared(*_share(url, tmp_path))
