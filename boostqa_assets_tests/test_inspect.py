"""DuckDB anywhere: the catalog file any DuckDB shell opens (every view, refreshed atomically under an open
reader, no leftovers), and the coverage report over every taxonomy cell."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from boostqa_assets.definitions import build_definitions
from boostqa_assets.inspect import connect, refresh_catalog, view_names, view_statements
from boostqa_assets.runner import run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets_tests.conftest import write_project

DUCKDB_SHELL = str(Path(sys.executable).parent / "duckdb")  # duckdb-cli 1.5: older than the Python package


def _shell(catalog: Path, sql: str) -> str:
    res = subprocess.run(
        [DUCKDB_SHELL, "-readonly", "-csv", "-noheader", str(catalog), "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_catalog_opens_in_a_plain_duckdb_shell_with_every_view(project_env: dict[str, str]) -> None:
    store = Store(get_settings().data_root)
    catalog = get_settings().catalog_path
    assert catalog == Path(project_env["BOOSTQA_HOME"]) / "boostqa.duckdb"
    views = refresh_catalog(store)  # before any data: every view exists, empty
    assert views == view_names(view_statements(store))
    assert set(_shell(catalog, "SELECT view_name FROM duckdb_views() WHERE NOT internal").split()) == set(views)
    assert _shell(catalog, "SELECT count(*) FROM seeds") == "0"
    for view in views:  # each binds in the older shell
        _shell(catalog, f"SELECT * FROM {view} LIMIT 0")

    # A reader keeps the catalog open while a stage writes and the catalog is refreshed: neither blocks the other.
    reader = duckdb.connect(str(catalog), read_only=True)
    assert run_stage(build_definitions(), "seeds", dg.DagsterInstance.ephemeral()).success
    refresh_catalog(store)
    assert reader.sql("SELECT count(*) FROM seeds").fetchall() == [(0,)]  # its snapshot
    reader.close()
    assert _shell(catalog, "SELECT count(*) FROM seeds") == "9"
    assert _shell(catalog, "SELECT count(*) FROM rejects_summary") == "4"
    assert sorted(p.name for p in catalog.parent.iterdir() if "duckdb" in p.name) == ["boostqa.duckdb"]


def test_boostqa_catalog_prints_the_command_that_opens_it(project_env: dict[str, str]) -> None:
    res = subprocess.run(
        [str(Path(sys.executable).parent / "boostqa"), "catalog"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    catalog = get_settings().catalog_path
    assert f"duckdb -readonly {catalog}" in res.stdout and "coverage" in res.stdout
    assert _shell(catalog, "SELECT count(*) FROM coverage") == "110"


def test_coverage_lists_every_taxonomy_cell_with_the_empty_ones_as_zero(project_env: dict[str, str]) -> None:
    from boostqa_assets.resources import project_config

    taxonomy = project_config().taxonomy
    con = connect(Store(get_settings().data_root))
    rel = con.sql("SELECT * FROM coverage")
    columns = rel.columns
    rows = rel.fetchall()
    assert len(rows) == len(taxonomy.disciplines) * len(taxonomy.grades) == 110
    first = taxonomy.disciplines[0]
    assert rows[0][:3] == (first.name, first.category, taxonomy.grades[0])  # the taxonomy's order
    assert {r[3:8] for r in rows} == {(0, 0, 0, 0, 0)}
    assert columns[:8] == [  # columns after these may be added (per-language detail)
        "discipline",
        "category",
        "grade",
        "plan_budget",
        "synthesized_rows",
        "refined_rows",
        "mixture_docs",
        "mixture_tokens",
    ]


@pytest.mark.s3
def test_an_s3_catalog_reads_through_s3fs_and_a_plain_shell_only_lists_it(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    bucket = f"boostqa-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}).mkdir(bucket)
    for k, v in write_project(tmp_path, None, data_root=f"s3://{bucket}/data").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BOOSTQA_S3_ENDPOINT_URL", moto_endpoint)
    assert run_stage(build_definitions(), "seeds", dg.DagsterInstance.ephemeral()).success
    settings = get_settings()
    store = Store(settings.data_root, settings.storage_options)
    views = refresh_catalog(store)
    con = duckdb.connect(str(settings.catalog_path), read_only=True)
    con.register_filesystem(store.fs)  # what boostqa duckdb / sql do for S3
    assert con.sql("SELECT count(*) FROM seeds").fetchall() == [(9,)]
    con.close()
    # A plain shell has the views but, without httpfs and an S3 secret, cannot read s3:// files.
    assert set(_shell(settings.catalog_path, "SELECT view_name FROM duckdb_views() WHERE NOT internal").split()) == set(
        views
    )
    res = subprocess.run(
        [DUCKDB_SHELL, "-readonly", str(settings.catalog_path), "-c", "SELECT count(*) FROM seeds"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Offline, DuckDB's autoloader fails to download httpfs; online it would load it and still lack a secret.
    assert res.returncode != 0 and ("httpfs" in res.stderr or "s3://" in res.stderr), res.stderr


def test_a_run_that_ends_refreshes_the_catalog_through_the_sensor(project_env: dict[str, str]) -> None:
    """A materialization from the UI (a backfill, automation) is not the CLI's: the run-status sensor rebuilds the
    catalog after the run, so a shell opened next sees the new rows."""
    catalog = get_settings().catalog_path
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert run_stage(defs, "seeds", instance).success
    assert not catalog.exists()  # run_stage alone does not refresh it (the demo's CLI does)
    run = instance.get_runs(limit=1)[0]
    success = next(
        e.dagster_event
        for e in instance.all_logs(run.run_id)
        if e.dagster_event is not None and e.dagster_event.event_type == dg.DagsterEventType.RUN_SUCCESS
    )
    sensor = defs.get_sensor_def("duckdb_catalog_after_success")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=success, dagster_instance=instance, dagster_run=run
    )
    skip = sensor(context)
    assert "catalog refreshed" in str(skip)
    assert _shell(catalog, "SELECT count(*) FROM seeds") == "9"
