"""The `boostqa` command: config validation, one-shot SQL, and the DuckDB shell over the views."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from boostqa_assets.definitions import build_definitions
from boostqa_assets.runner import run_stage

BOOSTQA = str(Path(sys.executable).parent / "boostqa")


def _run(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BOOSTQA, *args], env={**os.environ, **env}, input=stdin, capture_output=True, text=True, timeout=120
    )


def test_check_config_reports_and_fails_clearly(project_env: dict[str, str], tmp_path: Path) -> None:
    ok = _run(["check-config"], project_env)
    assert ok.returncode == 0 and "22 disciplines x 5 grades" in ok.stdout
    bad = tmp_path / "config" / "recipes.yaml"
    bad.write_text(bad.read_text().replace("token_budget", "token_budgt"))
    res = _run(["check-config"], project_env)
    assert res.returncode == 2
    assert "recipes.yaml" in res.stderr and "token_budgt" in res.stderr and "fix:" in res.stderr
    assert "Traceback" not in res.stderr


def test_sql_and_duckdb_shell_read_the_views(project_env: dict[str, str]) -> None:
    assert run_stage(build_definitions(), "seeds", dg.DagsterInstance.ephemeral()).success
    res = _run(["sql", "SELECT source, count(*) AS n FROM seeds GROUP BY ALL ORDER BY source"], project_env)
    assert res.returncode == 0, res.stderr
    assert "physics_qa" in res.stdout and "history_passages" in res.stdout
    shell = _run(
        ["duckdb"],
        project_env,
        stdin=".mode csv\nSELECT count(*) AS n FROM seeds;\n"
        "SELECT count(*) AS n FROM rejects;\nSELECT count(*) FROM coverage;\n",
    )
    assert shell.returncode == 0, shell.stderr
    assert "n\n9\n" in shell.stdout and "n\n4\n" in shell.stdout  # 9 seeds; 4 seed rejects


def test_lineage_prints_seed_and_every_llm_call(project_env: dict[str, str]) -> None:
    from boostqa_assets.inspect import connect
    from boostqa_assets.runner import run_pipeline
    from boostqa_assets.settings import get_settings
    from boostqa_assets.storage import Store

    assert all(r.success for r in run_pipeline(build_definitions(), dg.DagsterInstance.ephemeral()))
    con = connect(Store(get_settings().data_root))
    doc_id, qa_id, seed_id, synth_hash = con.sql(
        "SELECT doc_id, qa_id, seed_id, synth_request_hash FROM lineage ORDER BY doc_id LIMIT 1"
    ).fetchall()[0]
    res = _run(["lineage", doc_id], project_env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"== {qa_id}" in out and f"seed {seed_id}" in out and synth_hash in out
    assert all(step in out for step in ("annotate: model fake-model", "synthesize:", "refine:"))
    assert out.count("raw output:") == 3 and "<not in the cache>" not in out
    missing = _run(["lineage", "q_does_not_exist"], project_env)
    assert missing.returncode == 1 and "rejects" in missing.stderr


def test_user_mistakes_get_one_line_and_a_nonzero_exit(project_env: dict[str, str], tmp_path: Path) -> None:
    typo = _run(["demo", "--stages", "seeds", "qa_mixtur"], project_env)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "unknown stage 'qa_mixtur'" in typo.stderr and "did you mean 'qa_mixture'" in typo.stderr
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    for root in (a_file / "data", a_file):
        res = _run(["demo", "--stages", "seeds"], {**project_env, "BOOSTQA_DATA_ROOT": str(root)})
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert f"{a_file} is a file, not a folder" in res.stderr and "BOOSTQA_DATA_ROOT" in res.stderr
    sql = _run(["sql", "SELECT 1"], {**project_env, "BOOSTQA_DATA_ROOT": str(a_file / "data")})
    assert sql.returncode == 2 and "is a file, not a folder" in sql.stderr and "Traceback" not in sql.stderr
