"""The in-process runner's runs: who launched them, whether that process still lives, and the pool slots they hold.

Dagster's daemon fails the runs of run workers it launched once they die, and run monitoring
(`free_slots_after_run_end_seconds`, dagster.yaml) then frees their pool slots. Nothing watches the runs that
`boostqa demo` executes in its own process: after a SIGKILL they stay STARTED and keep their slots, and every later
run waits for those slots forever. So each run the runner launches carries its process's identity (pid, host and
the process's start time, which tells a reused pid apart), and the runner, before it waits for anything, fails
the runs of its host whose process is gone and frees their slots (`reconcile_dead_runs`).

Waiting for a slot is done here too (`wait_for_slot`, `SlotWatch`): Dagster 1.13's in-process executor spins on a
full pool without sleeping, logs that it is blocked once per 5 minutes, and never looks at interrupts while it
spins; the runner waits before it launches a stage, saying every `LOG_EVERY_S` which runs hold the pool.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

logger = logging.getLogger(__name__)

PID_TAG = "boostqa/runner_pid"
HOST_TAG = "boostqa/runner_host"
START_TAG = "boostqa/runner_started"
LAUNCH_TAG = "boostqa/launch"
STAGE_TAG = "boostqa/stage"
LOG_EVERY_S = 15.0
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def process_start_token(pid: int) -> str | None:
    """The incarnation of process ``pid``: boot id and start time in clock ticks since boot (Linux ``/proc``).

    None if there is no such process, or no ``/proc`` to ask."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 of proc_pid_stat(5); the command name (field 2) may hold spaces, so count after its ')'.
    fields = stat.rsplit(")", 1)[1].split()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "-"
    return f"{boot}:{fields[19]}"


def runner_tags(pid: int | None = None) -> dict[str, str]:
    """Tags that let a later runner tell whether the process that launched a run is still that process."""
    pid = os.getpid() if pid is None else pid
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), START_TAG: process_start_token(pid) or ""}


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def launcher_alive(tags: Mapping[str, str]) -> bool | None:
    """True if the runner process that launched a run (per its tags) still runs; False if it is gone (exited,
    killed, or its pid now belongs to a later process); None if this machine cannot tell (another host, no tags)."""
    if tags.get(HOST_TAG) != socket.gethostname():
        return None
    try:
        pid = int(tags.get(PID_TAG, ""))
    except ValueError:
        return None
    recorded = tags.get(START_TAG) or ""
    current = process_start_token(pid)
    if current is not None:
        return not recorded or current == recorded
    if Path("/proc/self/stat").exists():
        return False  # /proc works here and has no such process
    return _pid_exists(pid)  # no /proc: a pid that exists may be reused, but it is the best this machine can do


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    status: str
    pid: str
    asset: str
    slots_freed: bool


def _asset_of(run: dg.DagsterRun) -> str:
    """What a run materializes, for log lines: ``annotated_seeds[physics_qa..code_problems]``."""
    keys = run.asset_selection or set()
    name = run.tags.get(STAGE_TAG) or ", ".join(sorted("/".join(k.path) for k in keys)) or run.job_name
    start, end = run.tags.get("dagster/asset_partition_range_start"), run.tags.get("dagster/asset_partition_range_end")
    if start and end:
        return f"{name}[{start}..{end}]" if start != end else f"{name}[{start}]"
    key = run.tags.get("dagster/partition")
    return f"{name}[{key}]" if key else name


def reconcile_dead_runs(instance: dg.DagsterInstance) -> list[DeadRun]:
    """Fail this host's runner-launched runs whose process is gone, and free every pool slot held by a run that has
    already ended (a killed run that something else marked failed keeps its slots too). Returns the runs failed."""
    dead: list[DeadRun] = []
    host = socket.gethostname()
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=ACTIVE_STATUSES, tags={HOST_TAG: host}))
    storage = instance.event_log_storage
    pools = storage.supports_global_concurrency_limits
    for record in records:
        run = record.dagster_run
        if launcher_alive(run.tags) is not False:
            continue
        message = (
            f"The boostqa runner that executed this run (pid {run.tags.get(PID_TAG)} on {host}) is gone: it was killed "
            f"or crashed. Marked failed by the boostqa runner pid {os.getpid()}, which freed the run's pool slots."
        )
        instance.report_run_failed(run, message)
        if pools:
            storage.free_concurrency_slots_for_run(run.run_id)
        dead.append(DeadRun(run.run_id, run.status.value, run.tags.get(PID_TAG, "?"), _asset_of(run), pools))
        logger.warning(
            "run %s (%s, %s) belonged to boostqa runner pid %s, which is gone: marked failed, pool slots freed",
            run.run_id[:8],
            _asset_of(run),
            run.status.value,
            run.tags.get(PID_TAG, "?"),
        )
    if pools:
        _free_slots_of_ended_runs(instance)
    return dead


def _free_slots_of_ended_runs(instance: dg.DagsterInstance) -> None:
    """A run that has ended cannot use a slot: free what ended runs still hold (run monitoring does the same after
    `free_slots_after_run_end_seconds`, when the daemon runs)."""
    storage = instance.event_log_storage
    run_ids = storage.get_concurrency_run_ids()
    if not run_ids:
        return
    ended = instance.get_run_records(
        filters=dg.RunsFilter(
            run_ids=list(run_ids),
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED],
        )
    )
    for record in ended:
        storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
        logger.info("freed the pool slots of ended run %s", record.dagster_run.run_id[:8])


@dataclass
class PoolState:
    pool: str
    limit: int | None  # None: no limit (the pool is not limited in this instance)
    holders: list[str] = field(default_factory=list)  # run ids holding a slot, one entry per slot
    waiting: list[str] = field(default_factory=list)  # run ids with a step queued for a slot

    @property
    def free(self) -> int | None:
        return None if self.limit is None else max(self.limit - len(self.holders), 0)


def pool_state(instance: dg.DagsterInstance, pool: str) -> PoolState | None:
    """The pool's limit and who holds and waits for its slots; None if the instance has no pools."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return None
    info = storage.get_concurrency_info(pool)
    if info.limit is None and not info.slot_count:
        limit = None
    else:
        limit = info.limit if info.limit is not None else info.slot_count
    holders = [s.run_id for s in info.claimed_slots]
    claimed = {(s.run_id, s.step_key) for s in info.claimed_slots}
    waiting = [p.run_id for p in info.pending_steps if (p.run_id, p.step_key) not in claimed]
    return PoolState(pool, limit, holders, waiting)


def describe_runs(instance: dg.DagsterInstance, run_ids: list[str]) -> str:
    """``abcd1234 (annotated_seeds, STARTED, runner pid 41 on host-a)`` for each run, for log lines."""
    parts = []
    for run_id in dict.fromkeys(run_ids):
        run = instance.get_run_by_id(run_id)
        if run is None:
            parts.append(f"{run_id[:8]} (deleted run)")
            continue
        who = (
            f"runner pid {run.tags[PID_TAG]} on {run.tags.get(HOST_TAG, '?')}"
            if PID_TAG in run.tags
            else "not launched by a boostqa runner: if its process is gone, mark it failed in the Dagster UI"
        )
        parts.append(f"{run_id[:8]} ({_asset_of(run)}, {run.status.value}, {who})")
    return ", ".join(parts) or "nobody"


def wait_for_slot(
    instance: dg.DagsterInstance,
    pool: str,
    what: str,
    stop: threading.Event | None = None,
    log_every_s: float = LOG_EVERY_S,
    poll_s: float = 1.0,
) -> float:
    """Block until ``pool`` has a free slot; returns the seconds waited. Every ``log_every_s`` it logs which runs
    hold the pool and fails the ones whose runner is gone (which frees their slots). ``stop`` ends the wait early
    (the caller checks why); signals interrupt it as usual (the loop sleeps in short steps)."""
    started = time.monotonic()
    last_log = -log_every_s
    while True:
        state = pool_state(instance, pool)
        if state is None or state.free is None or state.free > 0:
            return time.monotonic() - started
        now = time.monotonic()
        if now - last_log >= log_every_s:
            if reconcile_dead_runs(instance):
                continue  # slots were freed: look again at once
            logger.warning(
                "%s waits for a slot of pool %s (%d slots, waited %.0fs): held by %s",
                what,
                pool,
                state.limit or 0,
                now - started,
                describe_runs(instance, state.holders),
            )
            last_log = now
        if stop is not None:
            if stop.wait(poll_s):
                return time.monotonic() - started
        else:
            time.sleep(poll_s)


class SlotWatch:
    """Called every second or so while a stage's run executes in a worker thread: if the run has a step queued for
    a pool slot (another process took the slot first), log every ``log_every_s`` which runs hold the pool, put the
    same line in the run's event log (the Dagster UI shows it), and fail holders whose runner is gone."""

    def __init__(
        self, instance: dg.DagsterInstance, pool: str | None, launch_id: str, log_every_s: float = LOG_EVERY_S
    ) -> None:
        self.instance = instance
        self.pool = pool
        self.launch_id = launch_id
        self.log_every_s = log_every_s
        self._last = time.monotonic()
        self._run: dg.DagsterRun | None = None

    def run(self) -> dg.DagsterRun | None:
        if self._run is None:
            found = self.instance.get_runs(filters=dg.RunsFilter(tags={LAUNCH_TAG: self.launch_id}), limit=1)
            self._run = found[0] if found else None
        return self._run

    def tick(self) -> None:
        if self.pool is None or time.monotonic() - self._last < self.log_every_s:
            return
        self._last = time.monotonic()
        run = self.run()
        state = pool_state(self.instance, self.pool)
        if run is None or state is None or run.run_id not in state.waiting:
            return
        if reconcile_dead_runs(self.instance):
            return
        message = (
            f"{_asset_of(run)} (run {run.run_id[:8]}) waits for a slot of pool {self.pool} ({state.limit} slots): "
            f"held by {describe_runs(self.instance, state.holders)}"
        )
        logger.warning("%s", message)
        self.instance.report_engine_event(message, run)

    def abandon(self, reason: str) -> None:
        """The runner stops before the run ended (SIGTERM, Ctrl-C): fail the run and free its slots, so nothing
        waits for a run that nobody executes any more."""
        run = self.run()
        if run is None:
            return
        current = self.instance.get_run_by_id(run.run_id)
        if current is not None and not current.is_finished:
            self.instance.report_run_failed(current, f"Stopped: {reason}.")
        if self.instance.event_log_storage.supports_global_concurrency_limits:
            self.instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


_PATCHED = False


def stop_spinning_on_full_pools() -> bool:
    """Make Dagster 1.13's in-process executor sleep while a step waits for a pool slot.

    ``InstanceConcurrencyContext.interval_to_next_pending_claim_check`` returns ``min([0, ...])``, never more than
    zero, so ``ActiveExecution.sleep_til_ready`` never sleeps and the run spins at 100% CPU until a slot frees. The
    replacement returns the time until the next claim check (the executor's own 1-15 s backoff), at most 5 s.
    Patched only while the original reads as described; returns whether the patch is in place."""
    global _PATCHED
    if _PATCHED:
        return True
    from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

    original = InstanceConcurrencyContext.interval_to_next_pending_claim_check
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "min([0," not in source.replace(" ", ""):
        return False

    def interval_to_next_pending_claim_check(self: InstanceConcurrencyContext) -> float:
        if not self._pending_claims:
            return 0.0
        now = time.time()
        return min(5.0, max(0.0, min((t - now for t in self._pending_timeouts.values()), default=0.0)))

    InstanceConcurrencyContext.interval_to_next_pending_claim_check = interval_to_next_pending_claim_check  # type: ignore[method-assign]
    _PATCHED = True
    return True
