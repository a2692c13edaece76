"""Source partitions are dynamic: the `new_source_files` sensor (configured sources + files appearing under watched
local and S3 prefixes) and the `seeds_refresh` schedule (re-read sources whose file changed), evaluated against
real Dagster instances, real seeds runs, a temporary folder and moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
import s3fs
import yaml

from boostqa_assets.configs import SLUG, ConfigError, SourcesConfig, load_config
from boostqa_assets.definitions import build_definitions
from boostqa_assets.defs.seeds import FINGERPRINT_KEY, recorded_fingerprint
from boostqa_assets.logic.source_watch import (
    SourceResolver,
    UnknownSourceError,
    refresh_reason,
    resolve_source,
    watch_key,
)
from boostqa_assets.resources import project_config
from boostqa_assets.runner import run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store

CONFIGURED = ["physics_qa", "history_passages", "code_problems"]
TEMPLATE = {"kind": "qa", "license": "CC-BY-4.0", "fields": {"id": "id", "question": "q", "answer": "a"}}


def _seeds(key: str) -> pl.DataFrame:
    settings = get_settings()
    return Store(settings.data_root, settings.storage_options).read_partition("seeds", {"source": key})


def add_watch(root: Path, **watch: Any) -> None:
    """Add a `watch:` entry to the test project's sources.yaml (before anything loads the configuration)."""
    path = root / "config" / "sources.yaml"
    data = yaml.safe_load(path.read_text())
    data.setdefault("watch", []).append({"name": "inbox", "source": TEMPLATE, **watch})
    path.write_text(yaml.safe_dump(data))


def write_qa(path: Path, rows: list[tuple[str, str, str]], age_s: float = 3600) -> None:
    """A JSONL file of QA rows whose mtime lies ``age_s`` seconds in the past."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "q": q, "a": a}) + "\n" for i, q, a in rows))
    then = time.time() - age_s
    os.utime(path, (then, then))


ROWS = [("n1", "What is the velocity of sound in air?", "About 343 m/s"), ("n2", "What is an integer?", "A whole")]


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A persistent instance in a temporary folder (sensor and schedule contexts need one)."""
    with dg.instance_for_test() as inst:
        yield inst


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None = None) -> Any:
    """One evaluation of the sensor as the daemon does it (run requests resolved against the definitions)."""
    sensor = defs.resolve_sensor_def("new_source_files")
    context = dg.build_sensor_context(
        instance=instance, instance_ref=instance.get_ref(), cursor=cursor, definitions=defs
    )
    return sensor.evaluate_tick(context)


def apply_partition_requests(instance: dg.DagsterInstance, result: Any) -> None:
    """What the daemon does with a tick's dynamic partition requests."""
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def schedule_tick(defs: dg.Definitions, instance: dg.DagsterInstance) -> Any:
    schedule = defs.resolve_schedule_def("seeds_refresh")
    return schedule.evaluate_tick(
        dg.build_schedule_context(
            instance=instance, instance_ref=instance.get_ref(), repository_def=defs.get_repository_def()
        )
    )


def sources_partitions(instance: dg.DagsterInstance) -> list[str]:
    return list(instance.get_dynamic_partitions("sources"))


# --- keys and resolution ---------------------------------------------------------------------------------


def test_watch_keys_are_deterministic_valid_and_distinct() -> None:
    key = watch_key("inbox", "batch-01.jsonl")
    assert key == watch_key("inbox", "batch-01.jsonl")
    assert key.startswith("inbox__batch_01_jsonl_") and re.match(SLUG, key)
    # Names the slug folds together still get their own keys; long names stay short.
    assert len({watch_key("inbox", n) for n in ("a-b.jsonl", "a_b.jsonl", "A_b.jsonl", "a/b.jsonl")}) == 4
    long = watch_key("inbox", "x" * 300 + ".jsonl")
    assert len(long) < 80 and re.match(SLUG, long)
    assert re.match(SLUG, watch_key("inbox", "---.jsonl"))


def test_any_key_resolves_to_a_source_with_its_path(project_env: dict[str, str], tmp_path: Path) -> None:
    add_watch(tmp_path, prefix="../inbox", glob="**/*.jsonl")  # relative to the config folder
    write_qa(tmp_path / "inbox" / "day1.jsonl", ROWS)
    write_qa(tmp_path / "inbox" / "sub" / "day2.jsonl", ROWS)
    (tmp_path / "inbox" / ".hidden.jsonl").write_text("{}\n")  # e.g. a writer's temporary file
    project = project_config()
    resolver = SourceResolver(project.sources, project.config_dir)

    assert resolver.resolve("physics_qa") == project.sources.get("physics_qa")
    listed = resolver.files(project.sources.watch[0])
    assert sorted(f.relative for f in listed.values()) == ["day1.jsonl", "sub/day2.jsonl"]
    key = watch_key("inbox", "sub/day2.jsonl")
    cfg = resolve_source(project.sources, key, project.config_dir)
    assert cfg.name == key and cfg.path == str(tmp_path / "inbox" / "sub" / "day2.jsonl")
    assert cfg.kind == "qa" and cfg.license == "CC-BY-4.0" and cfg.resolved_format() == "jsonl"
    fingerprint = resolver.fingerprint(key)
    assert fingerprint and fingerprint.startswith("size=") and "mtime_ns=" in fingerprint
    assert resolver.fingerprint("physics_qa") != fingerprint

    with pytest.raises(UnknownSourceError, match=r"neither a source in sources.yaml .* fix:"):
        resolver.resolve("no_such_source")
    with pytest.raises(UnknownSourceError, match=r"belongs to watch 'inbox'.*deleted\?\); fix:"):
        resolver.resolve(watch_key("inbox", "gone.jsonl"))


def test_refresh_reasons() -> None:
    assert refresh_reason("a", materialized=False, recorded=None) == "never materialized"
    assert refresh_reason(None, materialized=False, recorded=None) == "never materialized"
    assert refresh_reason("a", materialized=True, recorded=None) == "no fingerprint recorded"
    assert refresh_reason("b", materialized=True, recorded="a") == "changed"
    assert refresh_reason("a", materialized=True, recorded="a") is None
    assert refresh_reason(None, materialized=True, recorded="a") is None  # cannot tell: leave it


# --- configuration errors --------------------------------------------------------------------------------


def _sources(**watch: Any) -> dict[str, Any]:
    source = {"name": "physics_qa", "path": "x.jsonl", **TEMPLATE}
    return {"sources": [source], "watch": [{"name": "inbox", "prefix": "inbox/", "source": TEMPLATE, **watch}]}


@pytest.mark.parametrize(
    ("data", "field", "fix"),
    [
        pytest.param(_sources(prefix="https://example.org/seeds/"), "watch.0.prefix", "s3://", id="not-listable"),
        pytest.param(_sources(prefix="s3://"), "watch.0.prefix", "s3://<bucket>", id="no-bucket"),
        pytest.param(_sources(name="in__box"), "watch.0.name", "lower_snake_case", id="double-underscore"),
        pytest.param(
            _sources(source={**TEMPLATE, "name": "x"}), "watch.0.source.name", "unknown field", id="name-in-template"
        ),
        pytest.param(
            _sources(source={"kind": "qa", "fields": {"question": "q"}}), "watch.0.source", "answer", id="kind"
        ),
        pytest.param(_sources(glob="*"), "watch.0", "source.format", id="format-unknown"),
        pytest.param(
            {**_sources(), "sources": [{"name": "inbox__old", "path": "x.jsonl", **TEMPLATE}]},
            "<top level>",
            "rename the source or the watch",
            id="key-clash",
        ),
        pytest.param(
            {**_sources(), "watch": [_sources()["watch"][0]] * 2}, "watch", "rename one of them", id="duplicate"
        ),
    ],
)
def test_watch_config_errors_name_the_field_and_the_fix(tmp_path: Path, data: dict[str, Any], field: str, fix: str):
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config("sources.yaml", tmp_path)
    message = str(info.value)
    assert "sources.yaml" in message and f"field `{field}`" in message and "fix:" in message and fix in message


def test_watch_defaults(tmp_path: Path) -> None:
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump(_sources()))
    cfg = load_config("sources.yaml", tmp_path)
    assert isinstance(cfg, SourcesConfig)
    watch = cfg.watch[0]
    assert (watch.glob, watch.min_age_s, watch.source.format) == ("*.jsonl", 10.0, None)
    assert cfg.watch_for_key("inbox__a_jsonl_00000000") is watch and cfg.watch_for_key("physics_qa") is None


# --- the sensor ------------------------------------------------------------------------------------------


def test_sensor_registers_sources_and_adds_a_partition_per_new_local_file(
    project_env: dict[str, str], tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    inbox = tmp_path / "inbox"
    add_watch(tmp_path, prefix=str(inbox), min_age_s=30)
    defs = build_definitions()

    # The first tick registers the configured sources, even with nothing to watch yet.
    first = tick(defs, instance)
    assert not first.run_requests and "no new files" in first.skip_message
    assert sources_partitions(instance) == CONFIGURED

    write_qa(inbox / "batch-1.jsonl", ROWS)  # settled
    write_qa(inbox / "batch-2.jsonl", ROWS, age_s=0)  # still being written
    second = tick(defs, instance, first.cursor)
    key = watch_key("inbox", "batch-1.jsonl")
    assert [r.partition_key for r in second.run_requests] == [key]
    request = second.run_requests[0]
    assert request.asset_selection == [dg.AssetKey("seeds")]
    assert [c.name for c in request.asset_check_keys] == ["seeds_valid"]  # the blocking check runs too
    assert request.run_key and request.run_key.startswith(key + "@")
    assert [(r.partitions_def_name, list(r.partition_keys)) for r in second.dynamic_partitions_requests] == [
        ("sources", [key])
    ]
    apply_partition_requests(instance, second)

    # The same file again: nothing. The young file waits until it is old enough.
    third = tick(defs, instance, second.cursor)
    assert not third.run_requests and "1 still being written" in third.skip_message
    then = time.time() - 60
    os.utime(inbox / "batch-2.jsonl", (then, then))
    fourth = tick(defs, instance, third.cursor or second.cursor)
    key2 = watch_key("inbox", "batch-2.jsonl")
    assert [r.partition_key for r in fourth.run_requests] == [key2]
    apply_partition_requests(instance, fourth)
    assert sources_partitions(instance) == [*CONFIGURED, key, key2]
    assert not tick(defs, instance, fourth.cursor).run_requests

    # The run the sensor asked for reads the discovered file (the runner runs every partition).
    res = run_stage(defs, "seeds", instance)
    assert res.success and res.partitions == 5
    df = _seeds(key)
    assert df.height == 2 and set(df["source"]) == {key} and set(df["license"]) == {"CC-BY-4.0"}
    materialized, fingerprint = recorded_fingerprint(instance, key)
    assert materialized and fingerprint == SourceResolver(
        project_config().sources, project_config().config_dir
    ).fingerprint(key)


@pytest.mark.s3
def test_sensor_and_schedule_on_an_s3_prefix(
    project_env: dict[str, str],
    tmp_path: Path,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    instance: dg.DagsterInstance,
) -> None:
    bucket = f"boostqa-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})
    fs.mkdir(bucket)
    monkeypatch.setenv("BOOSTQA_S3_ENDPOINT_URL", moto_endpoint)
    add_watch(tmp_path, prefix=f"s3://{bucket}/inbox/", min_age_s=0)
    defs = build_definitions()

    first = tick(defs, instance)
    assert not first.run_requests
    fs.pipe(f"{bucket}/inbox/drop-1.jsonl", "".join(json.dumps({"id": i, "q": q, "a": a}) + "\n" for i, q, a in ROWS))
    fs.pipe(f"{bucket}/inbox/notes.txt", b"not matched by the glob")
    second = tick(defs, instance, first.cursor)
    key = watch_key("inbox", "drop-1.jsonl")
    assert [r.partition_key for r in second.run_requests] == [key]
    apply_partition_requests(instance, second)
    assert not tick(defs, instance, second.cursor).run_requests

    assert run_stage(defs, "seeds", instance).success
    df = _seeds(key)
    assert df.height == 2 and set(df["source"]) == {key}
    _, fingerprint = recorded_fingerprint(instance, key)
    assert fingerprint and fingerprint.startswith("etag=")

    # Unchanged on S3: nothing to refresh. Rewritten (new ETag): refreshed.
    assert not schedule_tick(defs, instance).run_requests
    fs.pipe(f"{bucket}/inbox/drop-1.jsonl", json.dumps({"id": "n3", "q": "What is a cell?", "a": "A unit"}) + "\n")
    refresh = schedule_tick(defs, instance)
    assert [(r.partition_key, r.tags["boostqa/refresh_reason"]) for r in refresh.run_requests] == [(key, "changed")]


# --- the schedule ----------------------------------------------------------------------------------------


def test_schedule_refreshes_changed_and_never_materialized_partitions(
    project_env: dict[str, str], tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    inbox = tmp_path / "inbox"
    add_watch(tmp_path, prefix=str(inbox))
    write_qa(inbox / "day-1.jsonl", ROWS)
    defs = build_definitions()
    schedule = defs.resolve_schedule_def("seeds_refresh")
    assert schedule.cron_schedule == project_config().pipeline.orchestration.seeds_refresh_cron

    # A fresh instance: every configured source was never materialized.
    before = schedule_tick(defs, instance)
    assert [r.partition_key for r in before.run_requests] == CONFIGURED

    assert run_stage(defs, "seeds", instance).success  # records each partition's fingerprint
    for name in CONFIGURED:
        materialized, fingerprint = recorded_fingerprint(instance, name)
        assert materialized and fingerprint and "mtime_ns=" in fingerprint
    unchanged = schedule_tick(defs, instance)
    assert not unchanged.run_requests
    assert unchanged.skip_message.startswith("nothing changed: 3 source partition(s) unchanged")

    # A source file rewritten, a file the sensor registered but nobody ran yet, and a partition whose source
    # was removed from sources.yaml.
    physics = tmp_path / "sources" / "physics.jsonl"
    with physics.open("a") as f:
        f.write(json.dumps({"id": "p9", "q": "What is the energy of a photon?", "a": "h times nu"}) + "\n")
    new_key = watch_key("inbox", "day-1.jsonl")
    instance.add_dynamic_partitions("sources", ["removed_source", new_key])
    refresh = schedule_tick(defs, instance)
    requested = {r.partition_key: r.tags["boostqa/refresh_reason"] for r in refresh.run_requests}
    assert requested == {"physics_qa": "changed", new_key: "never_materialized"}
    assert all(r.run_key == r.partition_key for r in refresh.run_requests)

    # The runner leaves the orphan out (runs the ranges around it) and the refresh settles.
    res = run_stage(defs, "seeds", instance)
    assert res.success and res.partitions == 4 and res.run_id.count(",") == 1
    assert run_stage(defs, "annotated_seeds", instance).success
    after = schedule_tick(defs, instance)
    assert not after.run_requests and "removed_source" in after.skip_message
    rows = _seeds("physics_qa").height
    assert rows == 6  # 5 before + the new line
    mats = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("seeds"), asset_partitions=["physics_qa"]), limit=5
    ).records
    fingerprints = [r.asset_materialization.metadata[FINGERPRINT_KEY].value for r in mats]  # type: ignore[union-attr]
    assert len(fingerprints) == 2 and fingerprints[0] != fingerprints[1]


# --- the real thing: `dagster dev` (webserver + daemon) --------------------------------------------------

RUNS_QUERY = """{
  assetNodes(assetKeys: [{path: ["seeds"]}]) { partitionKeysByDimension { partitionKeys } }
  runsOrError { ... on Runs { results { status tags { key value } } } }
}"""


@pytest.mark.slow
def test_dagster_dev_sensor_and_schedule(tmp_path: Path) -> None:
    """The daemon runs the sensor (configured sources appear as partitions, a new file gets its partition and a
    seeds run) and the schedule (cron every minute here: the never-materialized sources get runs)."""
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    from boostqa_assets_tests.conftest import write_project

    env = write_project(tmp_path, "http://127.0.0.1:9/v1")  # nothing listens: LLM steps would fail fast
    add_watch(tmp_path, prefix=str(tmp_path / "inbox"), min_age_s=2)
    pipeline = tmp_path / "config" / "pipeline.yaml"
    data = yaml.safe_load(pipeline.read_text())
    data.setdefault("orchestration", {})["seeds_refresh_cron"] = "* * * * *"
    pipeline.write_text(yaml.safe_dump(data))
    (tmp_path / "inbox").mkdir()
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "dagster_dev.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    new_file = tmp_path / "inbox" / "drop.jsonl"
    key = watch_key("inbox", "drop.jsonl")
    keys: list[str] = []
    runs: list[tuple[str, dict[str, str]]] = []
    done: set[tuple[str | None, str | None]] = set()
    try:
        deadline = time.monotonic() + 360  # up to a minute to the first cron tick, more on a busy machine
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-3000:]
            time.sleep(3)
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": RUNS_QUERY}, timeout=10).json()
            except httpx.HTTPError:
                continue
            data = reply.get("data") or {}
            nodes = data.get("assetNodes") or []
            keys = nodes[0]["partitionKeysByDimension"][0]["partitionKeys"] if nodes else []
            results = (data.get("runsOrError") or {}).get("results") or []
            runs = [(r["status"], {t["key"]: t["value"] for t in r["tags"]}) for r in results]
            if keys and not new_file.exists():  # the first tick registered the configured sources
                assert keys == CONFIGURED
                write_qa(new_file, ROWS)
            done = {
                (tags.get("dagster/sensor_name") or tags.get("dagster/schedule_name"), tags.get("dagster/partition"))
                for status, tags in runs
                if status == "SUCCESS"
            }
            if ("new_source_files", key) in done and {("seeds_refresh", k) for k in CONFIGURED} <= done:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the process group we started, by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    assert keys == [*CONFIGURED, key], runs
    assert ("new_source_files", key) in done, runs
    assert {("seeds_refresh", k) for k in CONFIGURED} <= done, runs
