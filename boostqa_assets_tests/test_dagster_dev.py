"""The real thing: `dagster dev -w workspace.yaml` (webserver, daemon, code server) on 127.0.0.1 with a
temporary DAGSTER_HOME holding a copy of the project's dagster.yaml, driven through its GraphQL API as the UI
drives it, and stopped by the PID of its process group (`boostqa_assets.devserver`).

- The webserver shows the assets, their partitions, descriptions and checks.
- A backfill of every synthesized_qa and refined_qa partition (with their checks), launched by
  `launchPartitionBackfill`, ends COMPLETED_SUCCESS in as many runs as the backfill policy says, with the
  Parquet files written and a passing check evaluation for every partition.
- With `max_partitions_per_run` set and the endpoint refusing one partition's requests, the backfill ends
  COMPLETED_FAILED with only that partition's run failed (and its automatic retry, `run_retries` in
  dagster.yaml); `reexecutePartitionBackfill` FROM_FAILURE then runs only that run's partitions again, and no
  request answered before the failure is paid a second time (the response cache under the data root).

Upstream stages run in-process first (the runner) against the same instance; the fake OpenAI server runs in a
thread of the test process, which the run workers reach over HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from starlette.requests import Request
from starlette.responses import Response

from boostqa_assets.devserver import DagsterDev, write_instance_yaml
from boostqa_assets.partitions import qa_key_parts
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer, FaultConfig
from boostqa_assets_tests.conftest import keep_answered_disciplines, pipeline_responder, write_project

pytestmark = pytest.mark.slow

IN_PROCESS_EXECUTOR = {"execution": {"config": {"in_process": {}}}}

BACKFILLED = ("synthesized_qa", "refined_qa")
CHECKS = {"synthesized_qa": "synthesized_qa_valid", "refined_qa": "refined_qa_valid"}
# Only the synthesis prompts of synthesized_qa[physics|graduate] contain this phrase (both tracks).
FAILING_PARTITION = "physics|graduate"
FAULT_MARKER = "in physics for a graduate level student"

QUERY = """
{
  assetNodes {
    assetKey { path }
    description
    isPartitioned
    partitionKeysByDimension { name partitionKeys }
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
  }
}
"""


class MarkedFaultServer(FakeOpenAIServer):
    """The pipeline's fake endpoint with a switch: while ``fail_marker`` is set, a completion request whose body
    contains it gets HTTP 401. The client stops the run at once on a 401, so this really fails a run (a bad
    reply would only become a rejects row, and a 5xx is retried and then rejected)."""

    fail_marker: str | None = None

    async def _handle(self, request: Request, chat: bool, st: Any) -> Response:
        if self.fail_marker and self.fail_marker.encode() in await request.body():
            return self._error(st, 401, "invalid_api_key", "injected: marked prompt refused", None)
        return await super()._handle(request, chat, st)


# --- helpers ------------------------------------------------------------------------------------------------


def qa_partitions() -> dg.MultiPartitionsDefinition:
    from boostqa_assets.definitions import build_definitions

    pdef = build_definitions().resolve_assets_def("synthesized_qa").partitions_def
    assert isinstance(pdef, dg.MultiPartitionsDefinition)
    return pdef


def expected_runs(pdef: dg.MultiPartitionsDefinition, max_partitions_per_run: int | None) -> int:
    """Runs Dagster 1.13's backfill daemon launches for every partition of a 2-D asset: a run covers a
    partition *range*, which for multi-partitions is a rectangle, and the daemon cuts the selection into one
    range per key of the dimension with fewer keys (5 grades), then chunks each range by the policy's
    ``max_partitions_per_run``. With the 9 disciplines these tests keep: single_run, 5 runs of 9;
    multi_run(N), 5 x ceil(9 / N)."""
    sizes = sorted(len(d.partitions_def.get_partition_keys()) for d in pdef.partitions_defs)
    small, large = sizes
    return small * (1 if max_partitions_per_run is None else math.ceil(large / max_partitions_per_run))


def keys_in_range(pdef: dg.MultiPartitionsDefinition, start: str, end: str) -> list[str]:
    return [str(k) for k in pdef.get_partition_keys_in_range(dg.PartitionKeyRange(start, end))]


def partition_rows(store: Store, asset: str, key: str) -> int:
    discipline, grade = qa_key_parts(key)
    return store.read_partition(asset, {"discipline": discipline, "grade": grade}).height


def partition_written(store: Store, asset: str, key: str) -> bool:
    discipline, grade = qa_key_parts(key)
    return bool(store.partition_files(asset, {"discipline": discipline, "grade": grade}))


def latest_check_results(dev: DagsterDev, asset: str) -> dict[str, bool]:
    """Partition -> passed, from the newest per-partition evaluation of the asset's check (GraphQL)."""
    latest: dict[str, bool] = {}
    for execution in dev.check_executions(asset, CHECKS[asset]):  # newest first
        evaluation = execution["evaluation"] or {}
        partition = execution["partition"] or evaluation.get("partition")
        if partition and partition not in latest:  # a multi-partition run's summary has no partition
            latest[partition] = execution["status"] == "SUCCEEDED" and bool(evaluation.get("success"))
    return latest


def backfill_ids(dev: DagsterDev) -> list[str]:
    with dg.DagsterInstance.from_config(str(dev.home)) as instance:
        return sorted(b.backfill_id for b in instance.get_backfills())


@pytest.fixture
def fault_llm() -> Iterator[MarkedFaultServer]:
    with MarkedFaultServer(FaultConfig(), responder=pipeline_responder) as server:
        yield server


def start_project(
    root: Path, llm: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, max_partitions_per_run: int | None = None
) -> DagsterDev:
    """A test project wired to ``llm``, its upstream stages materialized in-process into the instance, then
    ``dagster dev`` started on that instance (not yet waited for).

    The automation sensor is off (``orchestration.automation: false``): its eager conditions would otherwise
    launch their own backfill of synthesized_qa and refined_qa as soon as synthesis_plan is materialized, and
    the runs under test would share the instance with it. Upstream runs before ``dagster dev`` starts, so the
    plan sensor finds the plan already written and launches nothing either."""
    env = write_project(root, llm.base_url)
    assert keep_answered_disciplines(Path(env["BOOSTQA_CONFIG_DIR"])) == 9  # 45 QA partitions, not 110
    pipeline_yaml = Path(env["BOOSTQA_CONFIG_DIR"]) / "pipeline.yaml"
    pipeline = yaml.safe_load(pipeline_yaml.read_text())
    pipeline.setdefault("orchestration", {}).update(
        {"automation": False, "max_partitions_per_run": max_partitions_per_run}
    )
    pipeline_yaml.write_text(yaml.safe_dump(pipeline))
    home = root / "dagster_home"
    for k, v in {**env, "DAGSTER_HOME": str(home)}.items():
        monkeypatch.setenv(k, v)
    write_instance_yaml(home)  # the project's dagster.yaml as it is: run queue, pools, one automatic retry

    from boostqa_assets.definitions import STAGES, build_definitions
    from boostqa_assets.runner import run_pipeline

    upstream = STAGES[: STAGES.index("synthesized_qa")]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        results = run_pipeline(build_definitions(), instance, stages=upstream)
    assert [r.asset for r in results] == list(upstream) and all(r.success for r in results), results
    return DagsterDev(home, env=env).start()


# --- tests --------------------------------------------------------------------------------------------------


def test_webserver_shows_assets_partitions_descriptions_and_checks(tmp_path: Path) -> None:
    from boostqa_assets.definitions import STAGES
    from boostqa_assets.partitions import register_sources
    from boostqa_assets.resources import project_config

    home = tmp_path / "dagster_home"
    env = {"BOOSTQA_HOME": str(tmp_path / "boostqa")}
    write_instance_yaml(home)
    with DagsterDev(home, env=env) as dev:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            register_sources(instance, project_config())  # source partitions are dynamic: the runner/sensor add them
        dev.wait_ready()
        nodes = dev.graphql(QUERY)["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert set(by_key) == {*STAGES, "qa_signatures"}  # the mixture's optional scale-out step: no check of its own
    for name, node in ((k, v) for k, v in by_key.items() if k in STAGES):
        assert node["description"] and "row" in node["description"].lower()
        checks = node["assetChecksOrError"]["checks"]
        assert [c["name"] for c in checks] == [f"{name}_valid"] and checks[0]["blocking"]
    dims = {d["name"]: len(d["partitionKeys"]) for d in by_key["synthesized_qa"]["partitionKeysByDimension"]}
    assert dims == {"discipline": 22, "grade": 5}
    seed_keys = by_key["seeds"]["partitionKeysByDimension"][0]["partitionKeys"]
    assert seed_keys == ["wikipedia", "fanoutqa", "zh_qa", "humaneval"]


def test_backfill_of_every_qa_partition_through_graphql(
    tmp_path: Path, fault_llm: MarkedFaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = start_project(tmp_path, fault_llm, monkeypatch)
    with dev:
        dev.wait_ready()
        pdef = qa_partitions()
        every_key = [str(k) for k in pdef.get_partition_keys()]
        # In-process runs (one process per run, not one per step): the subject is which partitions the runs
        # cover and what they write; the multiprocess executor's step processes cost ~2.5 min here on 2 cores
        # (the seeds runs of test_source_automation's `dagster dev` test use it).
        backfill_id = dev.launch_asset_backfill(
            list(BACKFILLED), title="all qa partitions", run_config=IN_PROCESS_EXECUTOR
        )
        backfill = dev.wait_for_backfill(backfill_id, timeout_s=600)
        runs = dev.backfill_runs(backfill_id)
        checks = {asset: latest_check_results(dev, asset) for asset in BACKFILLED}

    assert backfill["status"] == "COMPLETED_SUCCESS", (backfill, dev.log_tail())
    assert backfill_ids(dev) == [backfill_id]  # nothing else (automation, sensors) backfilled meanwhile
    # Default policy (single_run): no run per partition; synthesized_qa and refined_qa share each run (same
    # policy, same partitions, identity mapping), and Dagster cuts the 2-D selection into one range per grade.
    assert len(runs) == expected_runs(pdef, None) == 5
    assert all(r.status == "SUCCESS" and r.assets == tuple(sorted(BACKFILLED)) for r in runs), runs
    covered = [k for r in runs for k in keys_in_range(pdef, *(r.partition_range or ("", "")))]
    assert sorted(covered) == sorted(every_key)  # every partition exactly once

    store = Store(get_settings().data_root, get_settings().storage_options)
    rows = {asset: {k: partition_rows(store, asset, k) for k in every_key} for asset in BACKFILLED}
    assert sum(rows["synthesized_qa"].values()) > 0 and sum(rows["refined_qa"].values()) > 0
    # The physics seeds are STEM: the multi-grade track gives them QA at every grade.
    assert all(rows["synthesized_qa"][k] > 0 for k in every_key if k.startswith("physics|"))
    assert all(rows["refined_qa"][k] <= rows["synthesized_qa"][k] for k in every_key)
    # One passing evaluation per partition and check (the multi-partition runs also record a summary each).
    for asset in BACKFILLED:
        assert set(checks[asset]) == set(every_key), asset
        assert all(checks[asset].values()), {k: v for k, v in checks[asset].items() if not v}


def test_failed_backfill_reexecuted_from_failure_redoes_only_the_failed_run(
    tmp_path: Path, fault_llm: MarkedFaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_run = 5
    dev = start_project(tmp_path, fault_llm, monkeypatch, max_partitions_per_run=per_run)
    retry_config = yaml.safe_load((dev.home / "dagster.yaml").read_text()).get("run_retries") or {}
    retries_per_failed_run = retry_config.get("max_retries", 0) if retry_config.get("enabled") else 0
    with dev:
        dev.wait_ready()
        pdef = qa_partitions()
        every_key = [str(k) for k in pdef.get_partition_keys()]

        fault_llm.fail_marker = FAULT_MARKER
        # In-process runs (one process per run, not per step): the subject here is which runs fail, retry and
        # re-execute, and four step processes per run tripled this test's time on 2 cores.
        first_id = dev.launch_asset_backfill(
            list(BACKFILLED), title="qa partitions, one refused", run_config=IN_PROCESS_EXECUTOR
        )
        first = dev.wait_for_backfill(first_id, timeout_s=900)
        first_runs = dev.backfill_runs(first_id)
        answered = fault_llm.stats()["ok_by_body"]
        refused = fault_llm.stats()["by_status"].get("401", 0)

        fault_llm.fail_marker = None  # the endpoint is fixed
        second_id = dev.reexecute_backfill(first_id, "FROM_FAILURE")
        second = dev.wait_for_backfill(second_id, timeout_s=600)
        second_runs = dev.backfill_runs(second_id)
        after = fault_llm.stats()["ok_by_body"]
        checks = {asset: latest_check_results(dev, asset) for asset in BACKFILLED}

    # The first backfill: 5 x ceil(9 / 5) = 10 runs; only the run holding physics|graduate failed, and the
    # daemon's automatic retries of it (dagster.yaml run_retries) failed too, since the endpoint still refused.
    assert first["status"] == "COMPLETED_FAILED", (first, dev.log_tail())
    originals = [r for r in first_runs if "dagster/retry_number" not in r.tags]
    retries = [r for r in first_runs if "dagster/retry_number" in r.tags]
    assert len(originals) == expected_runs(pdef, per_run) == 10
    failed = [r for r in originals if r.status != "SUCCESS"]
    assert len(failed) == 1 and FAILING_PARTITION in keys_in_range(pdef, *(failed[0].partition_range or ("", "")))
    failed_range = failed[0].partition_range
    failed_keys = keys_in_range(pdef, *(failed_range or ("", "")))
    assert 0 < len(failed_keys) <= per_run
    assert len(retries) == retries_per_failed_run and all(r.status == "FAILURE" for r in retries)
    assert all(r.partition_range == failed_range for r in retries)
    assert refused > 0

    # Re-execution from failure: a new backfill (tagged with its parent) over exactly the failed run's
    # partitions of both assets, in one run, that succeeds.
    assert second["status"] == "COMPLETED_SUCCESS", (second, dev.log_tail())
    assert backfill_ids(dev) == sorted([first_id, second_id])
    assert {"key": "dagster/parent_backfill_id", "value": first_id} in second["tags"]
    assert [(r.status, r.partition_range, r.assets) for r in second_runs] == [
        ("SUCCESS", failed_range, tuple(sorted(BACKFILLED)))
    ]
    # Nothing answered before the failure was paid again (the cache); the fixed partition's requests were.
    assert {body: after[body] for body in answered} == answered
    assert sum(after.values()) > sum(answered.values())

    store = Store(get_settings().data_root, get_settings().storage_options)
    for asset in BACKFILLED:
        assert all(partition_written(store, asset, k) for k in every_key), asset
        assert set(checks[asset]) == set(every_key) and all(checks[asset].values()), asset
    assert partition_rows(store, "synthesized_qa", FAILING_PARTITION) > 0
