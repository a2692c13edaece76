"""The code location loads, and its shape (assets, partitions, checks) does not change by accident."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy.exc import IntegrityError

from boostqa_assets.definitions import STAGES, build_definitions
from boostqa_assets.partitions import register_sources
from boostqa_assets.resources import project_config


def test_definitions_load_with_five_assets_and_a_check_each() -> None:
    defs = build_definitions()
    keys = sorted(k.to_user_string() for k in defs.resolve_all_asset_keys())
    # qa_signatures: the optional scale-out step of the mixture's dedup keys (its own job, not a demo stage and
    # without a check: the mixture uses a partition's keys only when they match the refined files, else its own).
    assert keys == sorted([*STAGES, "qa_signatures"])
    assert defs.resolve_job_def("qa_signatures_job").executor_def.name == "multiprocess"
    checked = sorted(c.asset_key.to_user_string() for ch in defs.asset_checks or [] for c in ch.check_keys)
    assert checked == sorted(STAGES)
    for name in [*STAGES, "qa_signatures"]:
        spec = defs.resolve_assets_def(name).specs_by_key[dg.AssetKey(name)]
        assert spec.description and "row" in spec.description.lower(), f"{name} needs a docstring saying what a row is"


def test_partitions_match_the_configuration() -> None:
    defs = build_definitions()
    qa = defs.resolve_assets_def("synthesized_qa").partitions_def
    assert qa is not None and len(qa.get_partition_keys()) == 22 * 5
    assert "physics|high" in qa.get_partition_keys()
    # Source partitions are dynamic: the configured sources are registered in the instance (by the runner and
    # the new_source_files sensor), files discovered under watched prefixes are added next to them.
    sources = defs.resolve_assets_def("seeds").partitions_def
    assert sources == dg.DynamicPartitionsDefinition(name="sources")
    assert defs.resolve_assets_def("annotated_seeds").partitions_def == sources
    instance = dg.DagsterInstance.ephemeral()
    configured = ["wikipedia", "fanoutqa", "zh_qa", "humaneval"]
    assert register_sources(instance, project_config()) == configured
    assert register_sources(instance, project_config()) == []
    assert sources.get_partition_keys(dynamic_partitions_store=instance) == configured
    recipes = defs.resolve_assets_def("qa_mixture").partitions_def
    assert recipes is not None and recipes.get_partition_keys() == ["stem_heavy"]


def test_sources_registered_by_two_runs_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two demos started together: the other run inserts the same sources between this run's storage check and
    its insert (the race, replayed in order on a real SQLite instance); this run must not fail."""
    configured = ["wikipedia", "fanoutqa", "zh_qa", "humaneval"]
    with (
        dg.DagsterInstance.local_temp(str(tmp_path)) as instance,
        dg.DagsterInstance.from_ref(instance.get_ref()) as other,
    ):
        storage = instance.event_log_storage
        real, real_add = storage.index_connection, storage.add_dynamic_partitions
        raced, adding = [], []

        def add(name: str, keys: list[str]) -> None:
            adding.append(True)
            try:
                real_add(name, keys)
            finally:
                adding.clear()

        @contextlib.contextmanager
        def racing_connection() -> Iterator[object]:
            with real() as conn:
                execute = conn.execute

                def execute_then_race(statement: object, *args: object) -> object:
                    result = execute(statement, *args)
                    if adding and not raced and str(statement).lstrip().upper().startswith("SELECT"):
                        raced.append(True)  # the storage has read what exists; now the other run inserts
                        other.add_dynamic_partitions("sources", configured[:2])
                    return result

                monkeypatch.setattr(conn, "execute", execute_then_race)
                yield conn

        monkeypatch.setattr(storage, "index_connection", racing_connection)
        monkeypatch.setattr(storage, "add_dynamic_partitions", add)
        with pytest.raises(IntegrityError):  # unguarded, the insert fails as a run's did in CI
            instance.add_dynamic_partitions("sources", configured)
        raced.clear()
        other.delete_dynamic_partition("sources", "wikipedia")
        other.delete_dynamic_partition("sources", "fanoutqa")
        assert register_sources(instance, project_config()) == configured and raced  # the race happened
        assert sorted(other.get_dynamic_partitions("sources")) == sorted(configured)


def test_source_automation_shape() -> None:
    defs = build_definitions()
    sensor = defs.resolve_sensor_def("new_source_files")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING and sensor.minimum_interval_seconds == 30
    schedule = defs.resolve_schedule_def("seeds_refresh")
    assert schedule.cron_schedule == "0 3 * * *" and schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_lineage_edges() -> None:
    defs = build_definitions()
    graph = {name: sorted(k.to_user_string() for k in defs.resolve_assets_def(name).dependency_keys) for name in STAGES}
    assert graph == {
        "seeds": [],
        "annotated_seeds": ["seeds"],
        "deficiency_probe": ["annotated_seeds"],
        "synthesis_plan": ["annotated_seeds", "deficiency_probe"],
        "synthesized_qa": ["synthesis_plan"],
        "refined_qa": ["synthesized_qa"],
        "qa_mixture": ["refined_qa"],
    }


def test_llm_assets_declare_a_pool_per_endpoint(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    defs = build_definitions()
    pools = {name: defs.resolve_assets_def(name).node_def.pool for name in STAGES}  # type: ignore[union-attr]
    # All roles on the embedded model share one pool.
    assert {pools[a] for a in ("annotated_seeds", "synthesized_qa", "refined_qa")} == {"llm_embedded"}
    monkeypatch.setenv("BOOSTQA_SYNTHESIZER_BASE_URL", "https://api.deepseek.com/v1")
    monkeypatch.setenv("BOOSTQA_REFINER_BASE_URL", "http://10.0.0.5:8000/v1")
    defs = build_definitions()
    pools = {name: defs.resolve_assets_def(name).node_def.pool for name in STAGES}  # type: ignore[union-attr]
    assert pools["synthesized_qa"] == "llm_api_deepseek_com"
    assert pools["refined_qa"] == "llm_10_0_0_5_8000"
    assert pools["annotated_seeds"] == "llm_embedded"


def test_jobs_owners_and_tags_snapshot() -> None:
    """A named job per stage (runs say which stage ran), and every asset's owners and tags from pipeline.yaml `ui:`:
    a job, owner or tag that changes by accident fails here."""
    from boostqa_assets.configs import ASSET_NAMES

    defs = build_definitions()
    jobs = {j.name: j for j in defs.resolve_all_job_defs() if not j.name.startswith("__")}
    assert sorted(jobs) == sorted([*(f"{s}_job" for s in STAGES), "qa_signatures_job"])
    for stage in STAGES:
        job = jobs[f"{stage}_job"]
        assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {stage}
        assert {c.asset_key.to_user_string() for c in job.asset_layer.asset_graph.asset_check_keys} >= {stage}
        assert job.tags == {"boostqa/stage": stage} and job.owners == ["team:data"]
    stage_tags = {
        "seeds": "ingest",
        "annotated_seeds": "annotate",
        "deficiency_probe": "probe",
        "synthesis_plan": "plan",
        "synthesized_qa": "synthesize",
        "refined_qa": "refine",
        "qa_mixture": "mix",
        "qa_signatures": "dedup-keys",
    }
    for name in [*STAGES, "qa_signatures"]:
        spec = defs.resolve_assets_def(name).specs_by_key[dg.AssetKey(name)]
        assert spec.owners == ["team:data"], name
        user_tags = {k: v for k, v in spec.tags.items() if not k.startswith("dagster/")}
        assert user_tags == {"domain": "mid-training", "project": "boostqa", "stage": stage_tags[name]}, name
    # configs.ASSET_NAMES (what `ui.assets` may name) is exactly the assets the defs modules build.
    assert set(ASSET_NAMES) == {k.to_user_string() for k in defs.resolve_all_asset_keys()}
