"""Runs of dead runners: told apart from live ones (pid, host, process start time), failed, their pool slots freed;
a stage waiting for a slot says who holds it and goes on once a dead holder is reconciled.

A real Dagster instance on SQLite (pools need one), real processes for the runners (a child that exited, one that
sleeps and is then killed by its own pid)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from boostqa_assets import runs

POOL = "llm_test_pool"


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.local_temp(
        tempdir=str(tmp_path), overrides={"concurrency": {"pools": {"default_limit": 2}}}
    ) as inst:
        inst.event_log_storage.initialize_concurrency_limit_to_default(POOL)
        yield inst


def _exited_pid_tags() -> dict[str, str]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    tags = runs.runner_tags(child.pid)
    child.wait()
    return tags


def _run(instance: dg.DagsterInstance, tags: dict[str, str], status: dg.DagsterRunStatus) -> DagsterRun:
    run = DagsterRun(job_name="__ephemeral_asset_job__", run_id=str(uuid.uuid4()), status=status, tags=tags)
    instance.add_run(run)
    return run


def _hold(instance: dg.DagsterInstance, run: DagsterRun) -> None:
    claim = instance.event_log_storage.claim_concurrency_slot(POOL, run.run_id, "annotated_seeds")
    assert claim.is_claimed


def test_launcher_alive_tells_gone_reused_live_and_foreign() -> None:
    assert runs.launcher_alive(runs.runner_tags()) is True
    assert runs.launcher_alive(_exited_pid_tags()) is False
    # Our pid, but another incarnation: the pid was reused by a later process.
    reused = {**runs.runner_tags(), runs.START_TAG: "some-boot:1"}
    assert runs.launcher_alive(reused) is False
    assert runs.launcher_alive({**runs.runner_tags(), runs.HOST_TAG: "another-host"}) is None
    assert runs.launcher_alive({}) is None


def test_reconcile_fails_dead_runs_frees_their_slots_and_leaves_live_ones(instance: dg.DagsterInstance) -> None:
    instance.event_log_storage.set_concurrency_slots(POOL, 3)
    dead = [_run(instance, _exited_pid_tags(), dg.DagsterRunStatus.STARTED) for _ in range(2)]
    live = _run(instance, runs.runner_tags(), dg.DagsterRunStatus.STARTED)
    for run in (*dead, live):
        _hold(instance, run)
    assert runs.pool_state(instance, POOL).free == 0  # type: ignore[union-attr]

    found = runs.reconcile_dead_runs(instance)

    assert sorted(d.run_id for d in found) == sorted(r.run_id for r in dead)
    for run in dead:
        record = instance.get_run_by_id(run.run_id)
        assert record is not None and record.status == dg.DagsterRunStatus.FAILURE
    live_now = instance.get_run_by_id(live.run_id)
    assert live_now is not None and live_now.status == dg.DagsterRunStatus.STARTED
    state = runs.pool_state(instance, POOL)
    assert state is not None and state.holders == [live.run_id] and state.free == 2
    failure = instance.all_logs(dead[0].run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert "is gone" in (failure[0].dagster_event.message or "")  # type: ignore[union-attr]
    assert runs.reconcile_dead_runs(instance) == []  # idempotent


def test_reconcile_frees_slots_that_an_ended_run_still_holds(instance: dg.DagsterInstance) -> None:
    ended = _run(instance, {}, dg.DagsterRunStatus.STARTED)  # no runner tags: launched elsewhere
    _hold(instance, ended)
    instance.report_run_failed(ended, "killed; failed by its code server")
    assert runs.pool_state(instance, POOL).holders == [ended.run_id]  # type: ignore[union-attr]
    assert runs.reconcile_dead_runs(instance) == []
    assert runs.pool_state(instance, POOL).holders == []  # type: ignore[union-attr]


def test_wait_for_slot_names_the_holders_and_goes_on_once_the_holder_dies(
    instance: dg.DagsterInstance, caplog: pytest.LogCaptureFixture
) -> None:
    instance.event_log_storage.set_concurrency_slots(POOL, 1)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = _run(instance, runs.runner_tags(holder.pid), dg.DagsterRunStatus.STARTED)
        _hold(instance, run)
        waited: list[float] = []
        with caplog.at_level(logging.WARNING, logger="boostqa_assets.runs"):
            waiter = threading.Thread(
                target=lambda: waited.append(
                    runs.wait_for_slot(instance, POOL, "annotated_seeds[a..b]", log_every_s=0.3, poll_s=0.1)
                )
            )
            waiter.start()
            deadline = time.monotonic() + 60
            while "held by" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            assert waiter.is_alive()  # the slot is held by a live runner: it waits
            assert f"waits for a slot of pool {POOL}" in caplog.text and run.run_id[:8] in caplog.text
            assert f"runner pid {holder.pid}" in caplog.text
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
            waiter.join(timeout=60)
        assert not waiter.is_alive() and waited
        record = instance.get_run_by_id(run.run_id)
        assert record is not None and record.status == dg.DagsterRunStatus.FAILURE
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)


def test_in_process_wait_for_a_slot_sleeps_instead_of_spinning(instance: dg.DagsterInstance) -> None:
    from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

    assert runs.stop_spinning_on_full_pools()
    instance.event_log_storage.set_concurrency_slots(POOL, 1)
    _hold(instance, _run(instance, runs.runner_tags(), dg.DagsterRunStatus.STARTED))
    waiting = _run(instance, runs.runner_tags(), dg.DagsterRunStatus.STARTED)
    with InstanceConcurrencyContext(instance, waiting) as ctx:
        assert not ctx.claim(POOL, "annotated_seeds")
        interval = ctx.interval_to_next_pending_claim_check()
    # Dagster 1.13 returns min(0, ...) here, so its executor never sleeps; the patched check waits for the backoff.
    assert 0.0 < interval <= 5.0
