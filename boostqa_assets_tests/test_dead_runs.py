"""Dead `boostqa demo` runs do not block later ones, and a demo stops at once on SIGTERM.

Real processes against one Dagster instance (SQLite, the project's dagster.yaml: pools of 2 slots) and the fake
OpenAI server in its own process, with latency so that LLM steps hold their pool slot for a while. Every process
is stopped by its own PID."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import dagster as dg
import pytest

from boostqa_assets.runs import PID_TAG
from boostqa_assets.testing.fake_server import FaultConfig, start_fake_server_process, stop_process
from boostqa_assets_tests.conftest import write_project

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

BOOSTQA = str(Path(sys.executable).parent / "boostqa")
STAGES = ["--stages", "seeds", "annotated_seeds"]
STOP_BOUND_S = 30  # measured well under a second; generous for a loaded 2-core machine


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[dict[str, str], str, dg.DagsterInstance]]:
    """(env for `boostqa demo`, the fake endpoint's pool, the instance) with a slow fake endpoint."""
    proc, base_url = start_fake_server_process(FaultConfig(latency_s=3.0))
    try:
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").symlink_to(Path(__file__).resolve().parents[1] / "dagster.yaml")
        env = {**os.environ, **write_project(tmp_path, base_url, all_disciplines=False), "DAGSTER_HOME": str(home)}
        env["BOOSTQA_LLM_MAX_CONCURRENCY"] = "1"  # each run holds its slot for several replies
        port = base_url.rsplit(":", 1)[1].split("/", 1)[0]
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield env, f"llm_127_0_0_1_{port}", instance
    finally:
        stop_process(proc)


def _start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    out = open(log, "wb")  # noqa: SIM115 - closed by the test once the process is gone
    proc = subprocess.Popen([BOOSTQA, "demo", *STAGES], env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, out


def _wait_for(
    predicate: object, timeout_s: float, what: str, procs: Sequence[tuple[subprocess.Popen[bytes], IO[bytes]]] = ()
) -> float:
    """Wait for ``predicate``; fail at once, with their logs, if every one of ``procs`` has exited meanwhile."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - started
        if procs and all(p.poll() is not None for p, _ in procs):
            logs = "\n".join(f"--- exit {p.returncode}:\n{Path(out.name).read_text()[-2000:]}" for p, out in procs)
            raise AssertionError(f"every demo exited while waiting for {what}\n{logs}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _holders(instance: dg.DagsterInstance, pool: str) -> set[str]:
    return {s.run_id for s in instance.event_log_storage.get_concurrency_info(pool).claimed_slots}


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_two_demos_killed_while_holding_both_slots_do_not_block_a_third(
    project: tuple[dict[str, str], str, dg.DagsterInstance], tmp_path: Path
) -> None:
    env, pool, instance = project
    started = [_start(env, tmp_path / f"killed{i}.log") for i in range(2)]
    try:
        _wait_for(lambda: len(_holders(instance, pool)) == 2, 240, "both demos to hold a slot of the pool", started)
        dead_runs = _holders(instance, pool)
        for proc, _ in started:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        for proc, out in started:
            _kill(proc)
            out.close()
    assert _holders(instance, pool) == dead_runs  # nobody freed them: a SIGKILLed process cannot

    began, began_wall = time.monotonic(), time.time()
    third = subprocess.run([BOOSTQA, "demo", *STAGES], env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - began

    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "annotated_seeds  ok" in third.stdout and "pipeline finished" in third.stdout
    for run_id in dead_runs:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        assert f"run {run_id[:8]}" in third.stderr and "is gone" in third.stderr  # the third run said so
    assert not _holders(instance, pool) & dead_runs
    failed_at = max(
        instance.all_logs(r, of_type=dg.DagsterEventType.RUN_FAILURE)[0].timestamp - began_wall for r in dead_runs
    )
    # Figures for the README (`--log-cli-level=INFO` shows them); not asserted beyond the bounds above.
    logger.info("third demo: dead runs failed and freed %.1fs after it started; finished in %.1fs", failed_at, took)


def test_sigterm_stops_a_demo_waiting_for_a_slot_and_one_in_an_llm_step(
    project: tuple[dict[str, str], str, dg.DagsterInstance], tmp_path: Path
) -> None:
    env, pool, instance = project
    instance.event_log_storage.set_concurrency_slots(pool, 1)
    holder, holder_out = _start(env, tmp_path / "holder.log")
    waiter, waiter_out = _start(env, tmp_path / "waiter.log")
    try:
        procs = [(holder, holder_out), (waiter, waiter_out)]
        _wait_for(lambda: len(_holders(instance, pool)) == 1, 240, "a demo to hold the pool's slot", procs)
        (held,) = _holders(instance, pool)
        holder_run = instance.get_run_by_id(held)
        assert holder_run is not None
        if holder_run.tags[PID_TAG] != str(holder.pid):  # the second one won the slot: swap roles
            holder, waiter, holder_out, waiter_out = waiter, holder, waiter_out, holder_out
        waiter_log = Path(waiter_out.name)
        _wait_for(lambda: "waits for a slot of pool" in waiter_log.read_text(), 120, "the waiting demo's log line")
        assert held[:8] in waiter_log.read_text()  # it names the run that holds the slot

        stopped = {}
        for name, proc in (("waiting for a slot", waiter), ("in an LLM step", holder)):
            began = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=STOP_BOUND_S)
            stopped[name] = time.monotonic() - began
            assert proc.returncode == 143
        run = instance.get_run_by_id(held)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE  # not left STARTED
        assert _holders(instance, pool) == set()  # and its slot is free
        assert "stopped (SIGTERM)" in Path(holder_out.name).read_text()
        logger.info("SIGTERM stop times: %s", {k: round(v, 2) for k, v in stopped.items()})
    finally:
        for proc, out in ((holder, holder_out), (waiter, waiter_out)):
            _kill(proc)
            out.close()
