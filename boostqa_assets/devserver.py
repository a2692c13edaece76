"""``dagster dev`` (webserver, daemon, code server) as a child process on 127.0.0.1, and the GraphQL calls
that drive asset backfills through it, as the UI does. Used by the integration tests and by
``benchmarks/orchestration.py``; nothing in the code location imports it.

The process is started in its own session (``dagster dev`` started from a script otherwise ignores SIGINT and
SIGTERM) and stopped by signalling that process group, by its PID, never by name.

    with DagsterDev(home, env=project_env) as dev:   # DAGSTER_HOME=home, a copy of dagster.yaml in it
        dev.wait_ready()
        backfill_id = dev.launch_asset_backfill(["synthesized_qa", "refined_qa"])
        backfill = dev.wait_for_backfill(backfill_id)
        runs = dev.backfill_runs(backfill_id)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# Backfill statuses after which the daemon does nothing more (COMPLETED is the deprecated name of
# COMPLETED_SUCCESS; FAILED means the daemon itself gave up, COMPLETED_FAILED that some runs failed).
BACKFILL_DONE = frozenset({"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"})
RUN_DONE = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

_LOCATIONS = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""
_LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""
_REEXECUTE = """
mutation Reexecute($params: ReexecutionParams!) {
  reexecutePartitionBackfill(reexecutionParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""
_BACKFILL = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      id status numPartitions creationTime endTimestamp
      tags { key value }
      error { message }
    }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""
_RUNS = """
query Runs($filter: RunsFilter!, $limit: Int) {
  runsOrError(filter: $filter, limit: $limit) {
    __typename
    ... on Runs { results {
      runId status creationTime startTime endTime parentRunId
      tags { key value }
      assetSelection { path }
    } }
    ... on PythonError { message }
  }
}
"""
_CHECK_EXECUTIONS = """
query Checks($asset: AssetKeyInput!, $check: String!, $limit: Int!) {
  assetCheckExecutions(assetKey: $asset, checkName: $check, limit: $limit) {
    runId status partition
    evaluation { success partition }
  }
}
"""


class GraphQLError(RuntimeError):
    """The webserver answered with GraphQL errors, or a mutation returned an error type."""


@dataclass(frozen=True)
class BackfillRun:
    """One run a backfill launched: status, partition range (tags), assets, and its timestamps (epoch s)."""

    run_id: str
    status: str
    tags: dict[str, str]
    assets: tuple[str, ...]
    created: float
    started: float | None
    ended: float | None
    parent_run_id: str | None = None

    @property
    def partition_range(self) -> tuple[str, str] | None:
        if RANGE_START_TAG in self.tags:
            return self.tags[RANGE_START_TAG], self.tags[RANGE_END_TAG]
        if "dagster/partition" in self.tags:
            return self.tags["dagster/partition"], self.tags["dagster/partition"]
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_instance_yaml(home: Path, source: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Path:
    """Copy the project's ``dagster.yaml`` into ``home`` (created), with top-level keys replaced by
    ``overrides`` (e.g. ``{"run_retries": {"enabled": False}}``)."""
    home.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((source or REPO_ROOT / "dagster.yaml").read_text()) or {}
    data.update(overrides or {})
    target = home / "dagster.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def init_instance_storage(home: Path) -> None:
    """Create (migrate) the instance's SQLite storage once, before several processes open it: the webserver,
    the daemon and an in-process run starting at the same moment on a fresh home race to stamp the schema
    (``UNIQUE constraint failed: alembic_version.version_num``)."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)):
        pass


@dataclass
class DagsterDev:
    """``dagster dev -w workspace.yaml -h 127.0.0.1 -p <port>`` with ``DAGSTER_HOME=home``.

    ``env`` is added to this process's environment (the project's ``BOOSTQA_*`` settings): the code server and
    every run worker the daemon launches inherit it. ``home`` gets a copy of the project's ``dagster.yaml``
    unless it already has one.
    """

    home: Path
    env: Mapping[str, str] = field(default_factory=dict)
    workspace: Path = REPO_ROOT / "workspace.yaml"
    port: int = 0
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> DagsterDev:
        """Spawn the process and return at once; ``wait_ready`` blocks until the code location has loaded."""
        self.home = Path(self.home)
        if not (self.home / "dagster.yaml").exists():
            write_instance_yaml(self.home)
        init_instance_storage(self.home)
        self.port = self.port or free_port()
        self.log_path = self.log_path or self.home / "dagster_dev.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        dagster = str(Path(sys.executable).parent / "dagster")
        cmd = [dagster, "dev", "-w", str(self.workspace), "-h", HOST, "-p", str(self.port)]
        env = {**os.environ, **self.env, "DAGSTER_HOME": str(self.home)}
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workspace.parent,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGTERM to it stops webserver, daemon, code server
        )
        logger.info("dagster dev pid %s on %s, DAGSTER_HOME=%s", self.proc.pid, self.url, self.home)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def _alive(self) -> None:
        if self.proc is None:
            raise RuntimeError("dagster dev is not started")
        if self.proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {self.proc.returncode}:\n{self.log_tail()}")

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Block until the webserver answers and every code location is LOADED; returns the seconds waited.
        A location that fails to load raises with its error."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            self._alive()
            try:
                data = self.graphql(_LOCATIONS, timeout=10)
                entries = data["workspaceOrError"].get("locationEntries") or []
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    for e in entries:
                        loaded = e.get("locationOrLoadError") or {}
                        if loaded.get("__typename") == "PythonError":
                            raise RuntimeError(f"code location {e['name']} failed to load: {loaded['message']}")
                    return time.monotonic() - started
            except (httpx.HTTPError, GraphQLError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dagster dev not ready after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the process group we started (by the PID of its leader), SIGKILL if it does not exit."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("dagster dev pid %s ignored SIGTERM; killing its group", self.proc.pid)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            # Children that outlived the leader (a run worker) are still in the group: end them too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DagsterDev:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- GraphQL ----------------------------------------------------------------------------------------

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        reply = httpx.post(
            self.url + "/graphql", json={"query": query, "variables": dict(variables or {})}, timeout=timeout
        )
        reply.raise_for_status()
        body = reply.json()
        if body.get("errors"):
            raise GraphQLError("; ".join(str(e.get("message")) for e in body["errors"]))
        return body["data"]

    @staticmethod
    def _backfill_id(result: dict[str, Any]) -> str:
        if result.get("__typename") != "LaunchBackfillSuccess":
            raise GraphQLError(f"{result.get('__typename')}: {result.get('message')}\n{result.get('stack') or ''}")
        return result["backfillId"]

    def launch_asset_backfill(
        self,
        assets: Sequence[str],
        partition_names: Sequence[str] | None = None,
        title: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> str:
        """``launchPartitionBackfill`` over ``assets`` (their checks come along): every partition, or
        ``partition_names``; ``run_config`` goes to every run (e.g. ``{"execution": {"config": {"in_process":
        {}}}}``). Returns the backfill id; the daemon launches the runs on its next tick (every 30 s)."""
        params: dict[str, Any] = {
            "assetSelection": [{"path": [a]} for a in assets],
            "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
        }
        if run_config is not None:
            params["runConfigData"] = dict(run_config)
        if partition_names is None:
            params["allPartitions"] = True
        else:
            params["partitionNames"] = list(partition_names)
        if title:
            params["title"] = title
        return self._backfill_id(self.graphql(_LAUNCH, {"params": params})["launchPartitionBackfill"])

    def reexecute_backfill(self, backfill_id: str, strategy: str = "FROM_FAILURE") -> str:
        """``reexecutePartitionBackfill``: a new backfill (tagged with its parent) over what the finished one
        did not materialize (``FROM_FAILURE``) or over all of it (``ALL_STEPS``). Returns the new id."""
        params = {"parentRunId": backfill_id, "strategy": strategy}
        return self._backfill_id(self.graphql(_REEXECUTE, {"params": params})["reexecutePartitionBackfill"])

    def backfill(self, backfill_id: str) -> dict[str, Any]:
        result = self.graphql(_BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
        if result.get("__typename") != "PartitionBackfill":
            raise GraphQLError(f"{result.get('__typename')}: {result.get('message')}")
        return result

    def wait_for_backfill(
        self,
        backfill_id: str,
        timeout_s: float = 600.0,
        poll_s: float = 1.0,
        on_poll: Callable[[dict[str, Any], list[BackfillRun]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the backfill reaches a final status and none of its runs is still going (the daemon
        can mark a backfill done a moment before the last run's status lands)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._alive()
            backfill = self.backfill(backfill_id)
            runs = self.backfill_runs(backfill_id)
            if on_poll is not None:
                on_poll(backfill, runs)
            if backfill["status"] in BACKFILL_DONE and all(r.status in RUN_DONE for r in runs):
                return backfill
            if time.monotonic() > deadline:
                counts = {s: sum(r.status == s for r in runs) for s in {r.status for r in runs}}
                raise TimeoutError(
                    f"backfill {backfill_id} still {backfill['status']} after {timeout_s:.0f}s; runs {counts}\n"
                    + self.log_tail()
                )
            time.sleep(poll_s)

    def runs(self, tags: Mapping[str, str], limit: int | None = None) -> list[BackfillRun]:
        """Runs carrying every tag in ``tags``, oldest first."""
        variables = {"filter": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}, "limit": limit}
        result = self.graphql(_RUNS, variables)["runsOrError"]
        if result.get("__typename") != "Runs":
            raise GraphQLError(f"{result.get('__typename')}: {result.get('message')}")
        runs = [
            BackfillRun(
                run_id=r["runId"],
                status=r["status"],
                tags={t["key"]: t["value"] for t in r["tags"]},
                assets=tuple(sorted("/".join(a["path"]) for a in (r["assetSelection"] or []))),
                created=r["creationTime"],
                started=r["startTime"],
                ended=r["endTime"],
                parent_run_id=r.get("parentRunId"),
            )
            for r in result["results"]
        ]
        return sorted(runs, key=lambda r: r.created)

    def backfill_runs(self, backfill_id: str) -> list[BackfillRun]:
        """Every run the backfill launched (automatic retries of its runs carry the same tag)."""
        return self.runs({"dagster/backfill": backfill_id})

    def check_executions(self, asset: str, check_name: str, limit: int = 1000) -> list[dict[str, Any]]:
        """``assetCheckExecutions`` of one check, newest first: ``runId``, ``status``, ``partition``,
        ``evaluation {success partition}``."""
        variables = {"asset": {"path": [asset]}, "check": check_name, "limit": limit}
        return self.graphql(_CHECK_EXECUTIONS, variables)["assetCheckExecutions"]
