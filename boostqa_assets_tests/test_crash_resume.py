"""Never pay twice: `kill -9` the pipeline mid-run, run it again, and count what the endpoint answered twice.

The fake OpenAI server runs in its own process with some latency; `boostqa demo` runs as a child process and
is killed with SIGKILL while LLM requests are in flight. The request cache buffers replies and writes a segment
every 1,000 replies or 5 s (one storage object per ~1,000 replies instead of one per reply), so a SIGKILL, which
skips every clean-up, loses at most the replies of the last flush interval: the second run re-sends those and the
requests that were in flight (the concurrency cap), nothing more."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from boostqa_assets.testing.fake_server import FaultConfig, start_fake_server_process, stop_process
from boostqa_assets_tests.conftest import write_project

pytestmark = pytest.mark.slow

CAP = 2
FLUSH_INTERVAL_S = 5.0  # ResponseCache's default flush_interval_s


def test_kill_9_mid_run_then_rerun_pays_at_most_the_in_flight_requests_twice(tmp_path: Path) -> None:
    proc, base_url = start_fake_server_process(FaultConfig(latency_s=0.1))
    try:
        env = {**os.environ, **write_project(tmp_path, base_url, all_disciplines=False)}
        env.update({"BOOSTQA_LLM_MAX_CONCURRENCY": str(CAP), "DAGSTER_HOME": str(tmp_path / "dagster_home")})
        boostqa = str(Path(sys.executable).parent / "boostqa")
        stats_url = base_url.removesuffix("/v1") + "/_stats"

        first = subprocess.Popen(
            [boostqa, "demo"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 120
        answered: list[tuple[float, int]] = []  # (time, replies so far), to count the last flush interval's
        while time.monotonic() < deadline and first.poll() is None:
            answered.append((time.monotonic(), httpx.get(stats_url, timeout=5).json()["answered_ok"]))
            if answered[-1][1] >= 25:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run finished before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(timeout=30)
        answered_before = httpx.get(stats_url, timeout=5).json()["answered_ok"]
        # Replies answered in the last flush interval (plus a margin) before the kill may not have reached storage.
        window_start = killed_at - FLUSH_INTERVAL_S - 1.0
        unflushed = answered_before - max([n for t, n in answered if t <= window_start], default=0)

        second = subprocess.run([boostqa, "demo"], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        stats = httpx.get(stats_url, timeout=5).json()
        paid_twice = sum(n - 1 for n in stats["ok_by_body"].values() if n > 1)
        assert paid_twice <= CAP + unflushed, f"{paid_twice} requests answered twice (cap {CAP}, unflushed {unflushed})"
        assert paid_twice < answered_before, "nothing answered before the kill was reused"
        assert stats["answered_ok"] > answered_before  # the second run did finish the rest
        assert "qa_mixture" in second.stdout and "pipeline finished" in second.stdout
    finally:
        stop_process(proc)
