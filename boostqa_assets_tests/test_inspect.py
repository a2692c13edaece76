"""DuckDB anywhere: the catalog file any DuckDB shell opens (every view, refreshed atomically under an open
reader, no leftovers), and the coverage report over every taxonomy cell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb

from boostqa_assets.definitions import build_definitions
from boostqa_assets.inspect import connect, refresh_catalog, view_names, view_statements
from boostqa_assets.runner import run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store

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
