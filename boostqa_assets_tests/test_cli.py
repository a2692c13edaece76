"""The `boostqa` command: config validation, one-shot SQL, and the DuckDB shell over the views."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

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


def test_sql_and_duckdb_shell_read_the_views(project_env: dict[str, str], tmp_path: Path) -> None:
    from boostqa_assets.inspect import view_names, view_statements
    from boostqa_assets.settings import get_settings
    from boostqa_assets.storage import Store

    assert run_stage(build_definitions(), "seeds", dg.DagsterInstance.ephemeral()).success
    res = _run(["sql", "SELECT source, count(*) AS n FROM seeds GROUP BY ALL ORDER BY source"], project_env)
    assert res.returncode == 0, res.stderr
    assert "physics_qa" in res.stdout and "history_passages" in res.stdout
    temp = tmp_path / "system_temp"  # the shell's temporary folder: nothing may be left in it
    temp.mkdir()
    shell = _run(
        ["duckdb"],
        {**project_env, "TMPDIR": str(temp)},
        stdin=".mode csv\nSELECT count(*) AS n FROM seeds;\n"
        "SELECT count(*) AS n FROM rejects;\nSELECT count(*) AS cells FROM coverage;\n",
    )
    assert shell.returncode == 0, shell.stderr
    assert "n\n9\n" in shell.stdout and "n\n4\n" in shell.stdout  # 9 seeds; 4 seed rejects
    assert "cells\n110\n" in shell.stdout  # every taxonomy cell, the empty ones too
    banner = shell.stdout.splitlines()[0]
    views = view_names(view_statements(Store(get_settings().data_root)))
    assert f"{len(views)} views: {', '.join(views)}" in banner and len(views) >= 16
    assert list(temp.iterdir()) == []


@pytest.mark.slow  # the whole pipeline in-process: about a minute on 2 busy cores
@pytest.mark.small_taxonomy
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
    piped = _closed_pipe_run(["lineage", seed_id], project_env)  # `boostqa lineage X | head`
    assert piped.returncode == 141 and piped.stderr == ""


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


def _closed_pipe_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``boostqa ARGS | head`` after head has gone: stdout is a pipe whose reading end is already closed."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [BOOSTQA, *args], env={**os.environ, **env}, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write)


def test_version_and_a_misspelt_command(project_env: dict[str, str]) -> None:
    from importlib.metadata import version

    res = _run(["--version"], project_env)
    assert res.returncode == 0 and res.stdout.strip() == f"boostqa {version('boostqa-assets')}"
    typo = _run(["sq", "SELECT 1"], project_env)
    assert typo.returncode == 2 and typo.stdout == "" and len(typo.stderr.strip().splitlines()) == 1
    assert "unknown command 'sq' (did you mean 'sql'?)" in typo.stderr and "Traceback" not in typo.stderr


def test_a_sql_error_is_one_line_and_a_closed_pipe_ends_quietly(project_env: dict[str, str]) -> None:
    res = _run(["sql", "SELEC * FROM seeds"], project_env)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == 'boostqa sql: Parser Error: syntax error at or near "SELEC"\n'
    missing = _run(["sql", "SELECT * FROM seed"], project_env)
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1
    assert "Table with name seed does not exist" in missing.stderr and 'Did you mean "seeds' in missing.stderr
    piped = _closed_pipe_run(["sql", "SELECT * FROM range(5)"], project_env)
    assert piped.returncode == 141 and piped.stderr == ""


def test_unknown_boostqa_variables_are_named_with_the_closest_known_one(project_env: dict[str, str]) -> None:
    env = {**project_env, "BOOSTQA_LLM_MAX_CONCURENCY": "4", "BOOSTQA_SYNTHESIZER_API_KEY": "sk-x"}
    res = _run(["check-config"], env)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "boostqa: warning: BOOSTQA_LLM_MAX_CONCURENCY is set but not a BoostQA setting, so it is ignored "
        "(did you mean BOOSTQA_LLM_MAX_CONCURRENCY?)"
    ]


def test_known_variables_are_the_settings_and_every_role_override() -> None:
    import re

    from boostqa_assets import settings
    from boostqa_assets.configs import LLMConfig, env_override_names

    read = set(re.findall(r'env(?:\.get\(|\[)"(BOOSTQA_\w+)"', Path(settings.__file__).read_text()))
    assert read == set(settings.SETTINGS_ENV)
    names = env_override_names()
    assert {"BOOSTQA_LLM_MAX_CONCURRENCY", "BOOSTQA_JUDGE_BUDGET_USD", "BOOSTQA_PROBE_API_KEY"} <= set(names)
    # Every name is one that with_env_overrides applies: set them one at a time and the config changes.
    from boostqa_assets.configs import load_config
    from boostqa_assets.settings import DEFAULT_CONFIG_DIR

    llm = load_config("llm.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(llm, LLMConfig)
    assert llm.with_env_overrides({"BOOSTQA_JUDGE_MODEL": "m2"}).roles["judge"].model == "m2"  # type: ignore[index]
    assert settings.unknown_env_vars({n: "1" for n in names} | {"BOOSTQA_HOME": "/x"}) == []


def test_check_config_names_a_source_whose_file_is_missing(project_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "sources" / "history.csv").unlink()
    res = _run(["check-config"], project_env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "'history_passages'" in line
    assert str(tmp_path / "sources" / "history.csv") in line and "does not exist" in line and "fix:" in line
