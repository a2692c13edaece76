"""The scale-out profile (`deploy/`): the Dagster instance in a real PostgreSQL server, the data and the compute
logs on S3 (moto), and the cluster settings (K8sRunLauncher, Helm values) checked against the schemas that load
them. Two processes share the instance the way two machines would: one runs stages, the other sees those runs
and continues the pipeline from the data on S3.

The server is Debian's `postgresql` package (`make services` installs it; `make test` depends on it), started on
127.0.0.1 on a free port in a temporary folder, as the `postgres` user when the tests run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import psycopg2
import pytest
import s3fs
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.ref import InstanceRef
from dagster._serdes.config_class import ConfigurableClassData

from boostqa_assets.configs import LLMConfig, load_config
from boostqa_assets.definitions import STAGES, build_definitions
from boostqa_assets.runner import run_pipeline
from boostqa_assets.settings import DEFAULT_CONFIG_DIR, get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer
from boostqa_assets_tests.conftest import write_project
from boostqa_assets_tests.servers import PostgresServer, running_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PG_ENV = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")
# The variables settings.py reads (LLM role variables are checked by applying them, below).
DISCIPLINES = ("mathematics", "physics", "biology", "history", "economics", "general_knowledge")
SETTINGS_ENV = ("BOOSTQA_HOME", "BOOSTQA_DATA_ROOT", "BOOSTQA_CONFIG_DIR", "BOOSTQA_S3_ENDPOINT_URL")


# --- a real PostgreSQL server (servers.py) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def database(postgres_server: PostgresServer) -> str:
    """A fresh database per test in the shared server."""
    name = f"boostqa_{uuid.uuid4().hex[:8]}"
    con = postgres_server.connect()
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    con.close()
    return name


# --- the production profile: deploy/production/dagster.yaml, data on S3 ---------------------------------------


@dataclass(frozen=True)
class Production:
    bucket: str
    database: str
    fs: s3fs.S3FileSystem


@pytest.fixture
def production(
    tmp_path: Path,
    postgres_server: PostgresServer,
    database: str,
    moto_endpoint: str,
    fake_llm: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Production:
    """DAGSTER_HOME with deploy/production/dagster.yaml as is, and the environment it and the project read."""
    bucket = f"boostqa-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})
    fs.mkdir(bucket)
    env = write_project(tmp_path, fake_llm.base_url, data_root=f"s3://{bucket}/data")
    # The disciplines the test seeds get, and one per category: 30 discipline x grade partitions instead of 110
    # keep the test short; every stage and every kind of partition is still there.
    taxonomy_file = tmp_path / "config" / "taxonomy.yaml"
    taxonomy = yaml.safe_load(taxonomy_file.read_text())
    taxonomy["disciplines"] = [d for d in taxonomy["disciplines"] if d["name"] in DISCIPLINES]
    taxonomy_file.write_text(yaml.safe_dump(taxonomy))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "production" / "dagster.yaml", home / "dagster.yaml")
    env.update(
        {
            "BOOSTQA_S3_ENDPOINT_URL": moto_endpoint,
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_HOST": postgres_server.host,
            "DAGSTER_PG_PORT": str(postgres_server.port),
            "DAGSTER_PG_USER": postgres_server.user,
            "DAGSTER_PG_PASSWORD": postgres_server.password,
            "DAGSTER_PG_DB": database,
            "DAGSTER_COMPUTE_LOGS_BUCKET": bucket,
            # botocore's own variable: the compute log manager's S3 client talks to moto.
            "AWS_ENDPOINT_URL_S3": moto_endpoint,
        }
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Production(bucket, database, fs)


# Run by a second process: it loads the same instance from the same dagster.yaml and environment, lists the runs
# it can see, and materializes one stage from the data the first process left on S3.
OTHER_MACHINE = """
import json, sys
import dagster as dg
from boostqa_assets.definitions import build_definitions
from boostqa_assets.runner import run_stage

instance = dg.DagsterInstance.get()
seen = [r.run_id for r in instance.get_runs()]
result = run_stage(build_definitions(), sys.argv[1], instance)
print(json.dumps({"seen": seen, "run_id": result.run_id, "success": result.success}))
"""


def _query(con: Any, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with con.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


@pytest.mark.slow
def test_pipeline_with_postgres_instance_and_s3_data(
    production: Production, postgres_server: PostgresServer, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    instance = dg.DagsterInstance.get()  # DAGSTER_HOME/dagster.yaml = deploy/production/dagster.yaml
    request.addfinalizer(instance.dispose)
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
    defs = build_definitions()

    # The whole pipeline in three legs: this process runs the stages before refined_qa...
    split = STAGES.index("refined_qa")
    first = run_pipeline(defs, instance, stages=STAGES[:split])
    assert [r.asset for r in first] == list(STAGES[:split])
    assert all(r.success for r in first), [(r.asset, r.success) for r in first]
    # ...another process (another machine, as far as Dagster can tell) sees those runs and refines their output...
    # Its output goes to files, not pipes: Dagster's compute-log capture leaves watch_orphans.py helpers that hold
    # copies of the process's stdout and stderr until they see it gone, and a zombie (not yet reaped, because
    # communicate() waits for EOF on those pipes first) never looks gone: subprocess.run(capture_output=True)
    # then waited for its own timeout.
    logs = tmp_path / "other-process"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        code = subprocess.run(
            [sys.executable, "-c", OTHER_MACHINE, STAGES[split]], stdout=out, stderr=err, timeout=300
        ).returncode
    stdout, stderr = (logs / "stdout").read_text(), (logs / "stderr").read_text()
    assert code == 0, stderr[-4000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["success"], stderr[-4000:]
    assert {r.run_id for r in first} <= set(report["seen"])
    # ...and this process finishes from what the other one wrote (the mixture also reads refined_qa's check
    # results, which the other process recorded in PostgreSQL).
    last = run_pipeline(defs, instance, stages=STAGES[split + 1 :])
    assert all(r.success for r in last), [(r.asset, r.success) for r in last]
    run_ids = [*(r.run_id for r in first), report["run_id"], *(r.run_id for r in last)]
    assert {r.run_id for r in instance.get_runs()} >= set(run_ids)  # the other process's run, seen from here

    # The runs, their events and the asset catalogue are rows in PostgreSQL.
    con = postgres_server.connect(production.database)
    try:
        statuses = dict(_query(con, "SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", run_ids))
        assert statuses == dict.fromkeys(run_ids, "SUCCESS")
        materialized = dict(
            _query(
                con,
                "SELECT asset_key, count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
                " AND run_id = ANY(%s) GROUP BY asset_key",
                run_ids,
            )
        )
        for asset in STAGES:
            assert materialized.get(json.dumps([asset]), 0) >= 1, (asset, materialized)
        keys = {k for (k,) in _query(con, "SELECT asset_key FROM asset_keys")}
        assert {json.dumps(["synthesized_qa"]), json.dumps(["qa_mixture"])} <= keys
        checks = _query(con, "SELECT count(*) FROM asset_check_executions WHERE run_id = ANY(%s)", run_ids)[0][0]
        assert checks >= len(run_ids)
        pools = {k for (k,) in _query(con, "SELECT concurrency_key FROM concurrency_limits")}
        assert any(p.startswith("llm_127_0_0_1_") for p in pools), pools  # the fake endpoint's pool
    finally:
        con.close()

    # The data, the LLM cache and the compute logs are objects in the bucket.
    settings = get_settings()
    store = Store(settings.data_root, settings.storage_options)
    files = store.list_partition_files("refined_qa")
    assert files and all(f.startswith(f"s3://{production.bucket}/data/refined_qa/") for f in files)
    assert all(f.endswith(".parquet") for f in files)
    assert production.fs.glob(f"{production.bucket}/data/qa_mixture/recipe=*/manifest.json")
    assert production.fs.find(f"{production.bucket}/data/_llm_cache/segments")
    for run_id in run_ids:
        logs = production.fs.glob(f"{production.bucket}/dagster/compute-logs/storage/{run_id}/compute_logs/*")
        assert logs, f"no compute logs on S3 for run {run_id}"

    # A third view: a fresh instance object over the same database (a webserver or daemon elsewhere).
    fresh = dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"])
    try:
        partitions = fresh.get_materialized_partitions(dg.AssetKey("refined_qa"))
        assert len(partitions) >= len(files)
        assert fresh.get_latest_materialization_event(dg.AssetKey("qa_mixture")) is not None
    finally:
        fresh.dispose()


# --- the cluster settings, checked by the schemas that load them ----------------------------------------------


def _class(data: ConfigurableClassData) -> type:
    import importlib

    return getattr(importlib.import_module(data.module_name), data.class_name)


@pytest.mark.parametrize("profile", ["production", "kubernetes"])
def test_instance_yaml_validates(profile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dagster.yaml passes Dagster's instance schema, and every configurable class in it (storage, compute logs,
    run launcher) passes its own `config_type()` with the env references resolved: what DagsterInstance does
    when it loads, without instantiating anything (K8sRunLauncher's __init__ loads a kube config)."""
    for name in PG_ENV:
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else "x")
    monkeypatch.setenv("DAGSTER_COMPUTE_LOGS_BUCKET", "boostqa-logs")
    shutil.copy(DEPLOY / profile / "dagster.yaml", tmp_path / "dagster.yaml")
    ref = InstanceRef.from_dir(str(tmp_path))  # the instance schema; raises DagsterInvalidConfigError

    loaded: dict[str, dict[str, Any]] = {}
    for field in ("storage_data", "run_storage_data", "compute_logs_data", "run_coordinator_data", "run_launcher_data"):
        data = getattr(ref, field)
        klass = _class(data)
        result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
        assert result.success, (field, [e.message for e in result.errors])
        loaded[f"{data.module_name}.{data.class_name}"] = result.value

    assert "dagster_postgres.DagsterPostgresStorage" in loaded
    assert loaded["dagster_postgres.DagsterPostgresStorage"]["postgres_db"]["port"] == 5432
    assert loaded["dagster_aws.s3.compute_log_manager.S3ComputeLogManager"]["bucket"] == "boostqa-logs"
    assert ref.settings["telemetry"] == {"enabled": False}
    assert ref.settings["run_retries"]["enabled"] is True
    assert ref.settings["concurrency"]["pools"]["granularity"] == "op"
    if profile == "kubernetes":
        launcher = loaded["dagster_k8s.K8sRunLauncher"]
        assert launcher["instance_config_map"] and launcher["job_namespace"] and launcher["service_account_name"]
        assert launcher["env_secrets"] and launcher["load_incluster_config"] is True
    else:
        assert ref.run_launcher_data.class_name == "DefaultRunLauncher"


def _deployment_env(values: dict[str, Any]) -> dict[str, str]:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return {e["name"]: str(e["value"]) for e in deployment["env"]}


def test_helm_values_match_settings_and_instance() -> None:
    """Every BOOSTQA_ variable in the Helm values is one the project reads (settings or an LLM role override that
    changes the role), the data root is on S3, and the chart's instance matches deploy/kubernetes/dagster.yaml."""
    values = yaml.safe_load((DEPLOY / "kubernetes" / "values.yaml").read_text())
    env = _deployment_env(values)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "boostqa_assets.definitions"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True  # run pods get this env and these secrets
    assert deployment["envSecrets"]

    settings = get_settings(env)
    assert settings.is_s3 and settings.data_root == env["BOOSTQA_DATA_ROOT"]
    assert str(settings.home) == env["BOOSTQA_HOME"]
    assert str(settings.config_dir) == env["BOOSTQA_CONFIG_DIR"]

    base = load_config("llm.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(base, LLMConfig)
    for name, value in env.items():
        if not name.startswith("BOOSTQA_") or name in SETTINGS_ENV:
            continue
        changed = base.with_env_overrides({name: value})
        assert changed != base, f"{name} in values.yaml changes no LLM role: not a variable the project reads"
    roles = base.with_env_overrides(env).roles
    assert roles["synthesizer"].model == env["BOOSTQA_SYNTHESIZER_MODEL"]
    assert roles["annotator"].limits_backend_url == env["BOOSTQA_LLM_LIMITS_BACKEND_URL"]
    limits_url = urlsplit(env["BOOSTQA_LLM_LIMITS_BACKEND_URL"])
    assert limits_url.username and limits_url.password is None, "no password in values (PGPASSWORD is a secret)"
    assert not any("API_KEY" in name for name in env), "API keys come from envSecrets, never from values"

    instance = yaml.safe_load((DEPLOY / "kubernetes" / "dagster.yaml").read_text())
    assert values["runLauncher"]["type"] == instance["run_launcher"]["class"] == "K8sRunLauncher"
    assert values["computeLogManager"]["type"] == instance["compute_logs"]["class"] == "S3ComputeLogManager"
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    pools = values["concurrency"]["pools"]
    assert pools["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]
    assert pools["granularity"] == instance["concurrency"]["pools"]["granularity"]
    # The chart refuses a run limit in both places.
    assert values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] is None
    assert values["dagsterDaemon"]["runRetries"] == {
        "enabled": instance["run_retries"]["enabled"],
        "maxRetries": instance["run_retries"]["max_retries"],
    }
    assert values["telemetry"]["enabled"] is False and instance["telemetry"]["enabled"] is False


def test_postgres_server_fixture_is_real(postgres_server: PostgresServer, database: str) -> None:
    """The fixture is a PostgreSQL server on 127.0.0.1 that wants the password (scram-sha-256)."""
    con = postgres_server.connect(database)
    try:
        assert _query(con, "SELECT inet_server_addr()::text")[0][0].startswith("127.0.0.1")
        assert "PostgreSQL" in _query(con, "SELECT version()")[0][0]
    finally:
        con.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host=postgres_server.host, port=postgres_server.port, user="dagster", password="wrong", dbname=database
        )
