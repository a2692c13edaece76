"""Tests for boostqa_assets.configs: the shipped config folder, messages for bad files, env overrides."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from boostqa_assets.configs import (
    FILES,
    ConfigError,
    LLMConfig,
    ProjectConfig,
    load_config,
    load_project_config,
)
from boostqa_assets.settings import DEFAULT_CONFIG_DIR


def copy_config(tmp_path: Path) -> Path:
    config = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, config)
    return config


def edit_yaml(config: Path, filename: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = config / filename
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def load_error(config: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_project_config(config, env={} if env is None else env)
    return str(info.value)


# --- the shipped configuration -------------------------------------------------------------------------


def test_shipped_config_loads() -> None:
    project = load_project_config(DEFAULT_CONFIG_DIR, env={})
    assert isinstance(project, ProjectConfig)
    assert len(project.taxonomy.disciplines) == 22
    assert len(project.taxonomy.grades) == 5
    assert project.taxonomy.grades == ["primary", "middle", "high", "undergraduate", "graduate"]
    assert set(project.llm.roles) == {"annotator", "synthesizer", "refiner", "probe", "judge"}
    names = [s.name for s in project.sources.sources]
    assert names and len(set(names)) == len(names)
    assert project.recipes.get("stem_heavy").token_budget > 0
    assert project.taxonomy.is_stem("physics") and not project.taxonomy.is_stem("history")
    assert project.taxonomy.categories == ["humanities", "other", "social_science", "stem"]


def test_every_shipped_file_loads_alone() -> None:
    for filename, model in FILES.items():
        assert isinstance(load_config(filename, DEFAULT_CONFIG_DIR), model)


def test_shipped_roles_default_to_embedded() -> None:
    project = load_project_config(DEFAULT_CONFIG_DIR, env={})
    assert all(role.is_embedded for role in project.llm.roles.values())
    assert all(role.api_key_env is None for role in project.llm.roles.values())


# --- bad files: the message names the file, the field and a fix ----------------------------------------


def _typo_in_role(d: dict[str, Any]) -> None:
    d["roles"]["annotator"]["max_token"] = 48  # meant max_tokens


def _article_kind(d: dict[str, Any]) -> None:
    d["sources"][0]["kind"] = "article"


def _bad_slug(d: dict[str, Any]) -> None:
    d["sources"].insert(1, {**d["sources"][0], "name": "Fanout-QA"})


def _qa_without_answer(d: dict[str, Any]) -> None:
    d["sources"].insert(1, {"name": "qa_src", "path": "qa.jsonl", "kind": "qa", "fields": {"question": "q"}})


def _duplicate_source(d: dict[str, Any]) -> None:
    d["sources"].append(dict(d["sources"][0]))


def _negative_weight(d: dict[str, Any]) -> None:
    d["recipes"][0]["category_weights"]["stem"] = -1.0


def _duplicate_discipline(d: dict[str, Any]) -> None:
    d["disciplines"].append({"name": "physics", "category": "stem"})


def _missing_role(d: dict[str, Any]) -> None:
    del d["roles"]["refiner"]


def _zero_budget(d: dict[str, Any]) -> None:
    d["recipes"][0]["token_budget"] = 0


@pytest.mark.parametrize(
    ("filename", "change", "field", "fix"),
    [
        pytest.param("llm.yaml", _typo_in_role, "roles.annotator.max_token", "check the spelling", id="typo"),
        pytest.param(
            "sources.yaml",
            _article_kind,
            "sources.0.kind",
            "use one of 'qa', 'problem' or 'passage'",
            id="wrong-enum",
        ),
        pytest.param("sources.yaml", _bad_slug, "sources.1.name", "lower_snake_case", id="bad-slug"),
        pytest.param(
            "sources.yaml",
            _qa_without_answer,
            "sources.1",
            "fields: {answer: <column>}",
            id="qa-missing-answer-mapping",
        ),
        pytest.param("sources.yaml", _duplicate_source, "sources", "rename", id="duplicate-source"),
        pytest.param("recipes.yaml", _negative_weight, "recipes.0.category_weights", ">= 0", id="negative-weight"),
        pytest.param("taxonomy.yaml", _duplicate_discipline, "disciplines", "rename", id="duplicate-discipline"),
        pytest.param("llm.yaml", _missing_role, "roles", "refiner", id="missing-role"),
        pytest.param("recipes.yaml", _zero_budget, "recipes.0.token_budget", "allowed range", id="zero-budget"),
    ],
)
def test_bad_file_message(
    tmp_path: Path, filename: str, change: Callable[[dict[str, Any]], None], field: str, fix: str
) -> None:
    config = copy_config(tmp_path)
    edit_yaml(config, filename, change)
    message = load_error(config)
    assert str(config / filename) in message
    assert f"field `{field}`" in message
    assert "fix:" in message
    assert fix in message
    assert "<top level>" not in message
    assert "pydantic" not in message.lower()  # no traceback-speak, no docs links


def test_unknown_key_message_names_the_key(tmp_path: Path) -> None:
    config = copy_config(tmp_path)
    edit_yaml(config, "pipeline.yaml", lambda d: d["synthesis"].update({"qa_per_sed": 2}))
    message = load_error(config)
    assert "pipeline.yaml" in message
    assert "synthesis.qa_per_sed" in message
    assert "remove it (unknown field: check the spelling)" in message


def test_several_errors_are_all_listed(tmp_path: Path) -> None:
    config = copy_config(tmp_path)

    def change(d: dict[str, Any]) -> None:
        d["sources"][0]["kind"] = "article"
        d["sources"].insert(1, {**d["sources"][0], "name": "second", "kind": "passage", "limit": 0})

    edit_yaml(config, "sources.yaml", change)
    message = load_error(config)
    assert "sources.0.kind" in message and "sources.1.limit" in message


def test_recipe_weight_key_outside_taxonomy(tmp_path: Path) -> None:
    config = copy_config(tmp_path)
    edit_yaml(config, "recipes.yaml", lambda d: d["recipes"][0]["category_weights"].update({"sciences": 2.0}))
    message = load_error(config)
    assert "recipes.yaml" in message
    assert "stem_heavy" in message and "category_weights" in message and "'sciences'" in message
    assert "use one of ['humanities', 'other', 'social_science', 'stem']" in message


def test_recipe_grade_and_track_keys_outside_taxonomy(tmp_path: Path) -> None:
    config = copy_config(tmp_path)

    def change(d: dict[str, Any]) -> None:
        d["recipes"][0]["grade_weights"]["phd"] = 1.0
        d["recipes"][0]["track_weights"]["easy_track"] = 1.0

    edit_yaml(config, "recipes.yaml", change)
    message = load_error(config)
    assert "grade_weights: 'phd' is unknown" in message
    assert "track_weights: 'easy_track' is unknown" in message
    assert "['multi_grade', 'high_difficulty']" in message


def test_high_difficulty_grade_not_a_grade(tmp_path: Path) -> None:
    config = copy_config(tmp_path)
    edit_yaml(config, "pipeline.yaml", lambda d: d["synthesis"].update({"high_difficulty_grades": ["phd"]}))
    message = load_error(config)
    assert "pipeline.yaml" in message
    assert "synthesis.high_difficulty_grades" in message and "'phd' is not a grade" in message
    assert "taxonomy.yaml" in message
    assert "use one of ['primary', 'middle', 'high', 'undergraduate', 'graduate']" in message


def test_other_cross_file_checks(tmp_path: Path) -> None:
    config = copy_config(tmp_path)

    def change(d: dict[str, Any]) -> None:
        d["synthesis"]["high_difficulty_min_seed_difficulty"] = "brutal"
        d["synthesis"]["multi_grade_categories"] = ["science"]

    edit_yaml(config, "pipeline.yaml", change)
    message = load_error(config)
    assert "high_difficulty_min_seed_difficulty: use one of ['easy', 'medium', 'hard']" in message
    assert "multi_grade_categories: 'science' is not a category" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    config = copy_config(tmp_path)
    (config / "taxonomy.yaml").write_text("grades: [primary, middle\ndifficulties: {\n", encoding="utf-8")
    message = load_error(config)
    assert str(config / "taxonomy.yaml") in message
    assert "not valid YAML" in message
    assert "line" in message  # where the syntax error is
    assert "fix:" in message


def test_empty_file(tmp_path: Path) -> None:
    config = copy_config(tmp_path)
    (config / "recipes.yaml").write_text("# nothing here yet\n", encoding="utf-8")
    message = load_error(config)
    assert str(config / "recipes.yaml") in message
    assert "is empty" in message and "fix:" in message


def test_missing_file(tmp_path: Path) -> None:
    config = copy_config(tmp_path)
    (config / "pipeline.yaml").unlink()
    message = load_error(config)
    assert str(config / "pipeline.yaml") in message
    assert "not found" in message and "BOOSTQA_CONFIG_DIR" in message and "fix:" in message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    config = copy_config(tmp_path)
    (config / "sources.yaml").write_text("- name: a\n- name: b\n", encoding="utf-8")
    message = load_error(config)
    assert str(config / "sources.yaml") in message and "fix:" in message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- environment overrides -----------------------------------------------------------------------------


def test_role_override_touches_only_that_role() -> None:
    project = load_project_config(DEFAULT_CONFIG_DIR, env={"BOOSTQA_SYNTHESIZER_BASE_URL": "http://llm:8000/v1"})
    roles = project.llm.roles
    assert roles["synthesizer"].base_url == "http://llm:8000/v1"
    assert not roles["synthesizer"].is_embedded
    assert roles["annotator"].is_embedded and roles["refiner"].is_embedded
    # the other fields of the role survive the override
    plain = load_project_config(DEFAULT_CONFIG_DIR, env={}).llm.roles
    assert roles["synthesizer"].model_dump(exclude={"base_url"}) == plain["synthesizer"].model_dump(
        exclude={"base_url"}
    )
    assert roles["annotator"] == plain["annotator"] and roles["refiner"] == plain["refiner"]


def test_llm_wide_override_applies_to_every_role() -> None:
    project = load_project_config(DEFAULT_CONFIG_DIR, env={"BOOSTQA_LLM_MODEL": "deepseek-chat"})
    assert {r.model for r in project.llm.roles.values()} == {"deepseek-chat"}


def test_role_override_beats_llm_wide_override() -> None:
    env = {
        "BOOSTQA_LLM_MODEL": "general",
        "BOOSTQA_REFINER_MODEL": "special",
        "BOOSTQA_LLM_MAX_TOKENS": "512",
    }
    roles = load_project_config(DEFAULT_CONFIG_DIR, env=env).llm.roles
    assert roles["refiner"].model == "special"
    assert roles["annotator"].model == roles["synthesizer"].model == "general"
    assert {r.max_tokens for r in roles.values()} == {512}  # strings are coerced to the field's type


def test_empty_override_is_ignored() -> None:
    roles = load_project_config(DEFAULT_CONFIG_DIR, env={"BOOSTQA_LLM_MODEL": ""}).llm.roles
    assert roles == load_project_config(DEFAULT_CONFIG_DIR, env={}).llm.roles


def test_api_key_override_stores_the_variable_name_not_the_secret() -> None:
    secret = "sk-test-0123456789-do-not-store"
    project = load_project_config(DEFAULT_CONFIG_DIR, env={"BOOSTQA_REFINER_API_KEY": secret})
    assert project.llm.roles["refiner"].api_key_env == "BOOSTQA_REFINER_API_KEY"
    assert project.llm.roles["annotator"].api_key_env is None
    assert secret not in project.model_dump_json()
    assert secret not in project.llm.model_dump_json()
    assert secret not in repr(project)


def test_llm_wide_api_key_points_every_role_at_it() -> None:
    env = {"BOOSTQA_LLM_API_KEY": "sk-wide", "BOOSTQA_SYNTHESIZER_API_KEY": "sk-synth"}
    roles = load_project_config(DEFAULT_CONFIG_DIR, env=env).llm.roles
    assert roles["annotator"].api_key_env == "BOOSTQA_LLM_API_KEY"
    assert roles["synthesizer"].api_key_env == "BOOSTQA_SYNTHESIZER_API_KEY"


def test_api_key_env_override_names_a_variable() -> None:
    roles = load_project_config(DEFAULT_CONFIG_DIR, env={"BOOSTQA_ANNOTATOR_API_KEY_ENV": "DEEPSEEK_API_KEY"}).llm.roles
    assert roles["annotator"].api_key_env == "DEEPSEEK_API_KEY"


@pytest.mark.parametrize(
    ("env", "role", "field"),
    [
        ({"BOOSTQA_SYNTHESIZER_API": "rest"}, "synthesizer", "api"),
        ({"BOOSTQA_REFINER_TEMPERATURE": "hot"}, "refiner", "temperature"),
        ({"BOOSTQA_ANNOTATOR_MAX_TOKENS": "-5"}, "annotator", "max_tokens"),
        ({"BOOSTQA_REFINER_STRUCTURED_OUTPUT": "xml"}, "refiner", "structured_output"),
    ],
)
def test_invalid_override_names_the_role(env: dict[str, str], role: str, field: str) -> None:
    message = load_error(DEFAULT_CONFIG_DIR, env)
    assert "environment overrides" in message
    assert f"role {role!r}" in message
    assert f"field `{field}`" in message and "fix:" in message


def test_with_env_overrides_returns_a_new_config() -> None:
    llm = load_config("llm.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(llm, LLMConfig)
    changed = llm.with_env_overrides({"BOOSTQA_LLM_BASE_URL": "http://x/v1"})
    assert llm.roles["annotator"].base_url == "embedded"
    assert changed.roles["annotator"].base_url == "http://x/v1"
    assert llm.with_env_overrides({}) == llm
