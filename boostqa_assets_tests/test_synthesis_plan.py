"""The synthesis plan end to end: a fake target model perfect on some cells and wrong on others gets budgets
that favour the wrong cells (within floor and cap); synthesized_qa makes exactly the plan's budget; the plan
is deterministic, falls back to static weights without a probe, and a changed plan marks only the affected
synthesized_qa partitions stale, which eager automation then re-materializes (and only those)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from boostqa_assets import prompting, resources
from boostqa_assets.definitions import build_definitions
from boostqa_assets.defs.synthesis_plan import pending_ranges
from boostqa_assets.partitions import qa_key
from boostqa_assets.records import PLAN_SCHEMA, SYNTHESIZED_SCHEMA
from boostqa_assets.resources import project_config
from boostqa_assets.runner import run_pipeline, run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer
from boostqa_assets_tests.conftest import PROBE_QA_ROWS, add_probe_source, probe_answers, probe_target_responder

UP_TO_PLAN = ["seeds", "annotated_seeds", "deficiency_probe", "synthesis_plan"]
# The target knows every physics|primary answer and nothing about biology (see conftest: PROBE_QA_ROWS).
KNOWN = {r["q"] for r in PROBE_QA_ROWS if r["id"].startswith("pp")}
QA_BUDGET, FLOOR, CAP = 120, 1, 6


def _store() -> Store:
    s = get_settings()
    return Store(s.data_root, s.storage_options)


def _configure(config_dir: Path, **plan: object) -> None:
    pipeline = yaml.safe_load((config_dir / "pipeline.yaml").read_text())
    pipeline["plan"] = {"floor": FLOOR, "cap": CAP, "stem_weight": 1.0, "high_difficulty_weight": 1.0, **plan}
    pipeline["synthesis"]["max_seeds_per_partition"] = None
    (config_dir / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    recipes = yaml.safe_load((config_dir / "recipes.yaml").read_text())
    recipes["recipes"][0]["qa_budget"] = QA_BUDGET
    (config_dir / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    resources._project_config.cache_clear()


@pytest.fixture
def plan_project(project_env: dict[str, str], fake_llm: FakeOpenAIServer) -> dict[str, str]:
    config_dir = Path(project_env["BOOSTQA_CONFIG_DIR"])
    add_probe_source(config_dir)
    _configure(config_dir)
    fake_llm.responder = probe_target_responder(probe_answers(), lambda q: q in KNOWN)
    return project_env


def _plan() -> pl.DataFrame:
    return _store().read_asset("synthesis_plan", PLAN_SCHEMA)


def _cell(plan: pl.DataFrame, discipline: str, grade: str) -> dict:
    return plan.filter((pl.col("discipline") == discipline) & (pl.col("grade") == grade)).row(0, named=True)


def test_budgets_favour_the_cells_the_target_gets_wrong(plan_project: dict[str, str]) -> None:
    defs = build_definitions()
    results = run_pipeline(defs, dg.DagsterInstance.ephemeral(), stages=[*UP_TO_PLAN, "synthesized_qa"])
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]
    plan = _plan()
    assert plan.height == 22 * 5
    physics, biology = _cell(plan, "physics", "primary"), _cell(plan, "biology", "high")
    assert physics["accuracy"] == 1.0 and biology["accuracy"] == 0.0
    assert physics["basis"] == biology["basis"] == "probe"
    assert biology["need"] == 1.0 and physics["need"] == project_config().pipeline.plan.min_need
    # The wrong cell gets more than the perfect one; both stay within floor and cap.
    assert biology["budget"] > physics["budget"]
    assert FLOOR <= physics["budget"] <= CAP and FLOOR <= biology["budget"] <= CAP
    assert biology["budget"] == min(CAP, biology["capacity"])
    # Biology (wrong everywhere it was measured) outweighs physics (perfect) over all grades.
    by_disc = plan.group_by("discipline").agg(pl.col("budget").sum())
    total = dict(by_disc.iter_rows())
    assert total["biology"] > total["physics"]
    # A cell with too few probe answers is not "measured": it takes the mean need.
    assert _cell(plan, "chemistry", "high")["basis"] == "probe_mean"
    # The whole qa_budget is spent (every cell with candidates has room), every cell within its bounds.
    assert plan["budget"].sum() == QA_BUDGET
    assert (plan["budget"] <= CAP).all()
    assert (plan.filter(pl.col("candidates") > 0)["budget"] >= FLOOR).all()
    assert plan.filter(pl.col("candidates") == 0)["budget"].sum() == 0
    # synthesized_qa made exactly the plan's budget in every partition (the fake synthesizer never fails).
    synth = _store().read_asset("synthesized_qa", SYNTHESIZED_SCHEMA)
    made = {qa_key(d, g): n for d, g, n in synth.group_by("discipline", "grade").len().iter_rows()}
    for r in plan.iter_rows(named=True):
        assert made.get(qa_key(r["discipline"], r["grade"]), 0) == r["budget"], r
    # The picture: accuracy and budget heatmaps side by side, as a PNG inside markdown.
    plan_meta = next(r for r in results if r.asset == "synthesis_plan").metadata
    assert str(plan_meta["heatmaps"]).startswith("![") and "data:image/png;base64," in str(plan_meta["heatmaps"])
    assert plan_meta["basis"].startswith("probe accuracies")
    assert results[-1].metadata["plan_budget"] == QA_BUDGET


def test_the_plan_is_deterministic(plan_project: dict[str, str]) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert all(r.success for r in run_pipeline(defs, instance, stages=UP_TO_PLAN))
    first = _plan().sort("discipline", "grade")
    again = run_stage(defs, "synthesis_plan", instance)
    assert again.success and again.partitions == 0 and again.metadata["cells_changed"] == 0
    assert _plan().sort("discipline", "grade").equals(first)
    changed, ranges = pending_ranges(
        _store(), project_config(), defs.resolve_assets_def("synthesis_plan").partitions_def.get_partition_keys()
    )  # type: ignore[union-attr]
    assert changed == [] and ranges == []


def test_without_a_probe_run_the_plan_uses_static_weights_and_says_so(plan_project: dict[str, str]) -> None:
    defs = build_definitions()
    results = run_pipeline(defs, dg.DagsterInstance.ephemeral(), stages=["seeds", "annotated_seeds", "synthesis_plan"])
    assert all(r.success for r in results)
    plan = _plan()
    assert set(plan["basis"]) == {"static"}
    assert results[-1].metadata["probe_found"] is False
    assert "no probe run" in results[-1].metadata["basis"]
    assert plan["budget"].sum() == QA_BUDGET
    assert plan["accuracy"].is_null().all()


def _stale(defs: dg.Definitions, instance: dg.DagsterInstance, asset: str) -> set[str]:
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    keys = defs.resolve_assets_def(asset).partitions_def.get_partition_keys()  # type: ignore[union-attr]
    return {k for k in keys if resolver.get_status(dg.AssetKey(asset), k) == StaleStatus.STALE}


def test_a_changed_plan_marks_only_affected_partitions_stale_and_automation_redoes_only_those(
    plan_project: dict[str, str], monkeypatch: pytest.MonkeyPatch, fake_llm: FakeOpenAIServer
) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    results = run_pipeline(defs, instance, stages=[*UP_TO_PLAN, "synthesized_qa", "refined_qa", "qa_mixture"])
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]
    assert _stale(defs, instance, "synthesized_qa") == set()
    auto = dg.AssetSelection.assets("synthesized_qa", "refined_qa")
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=auto)
    assert tick.total_requested == 0  # everything is up to date

    # A new checkpoint of the target model (a new model name: new requests, nothing from the cache) that now
    # knows biology too. The probe changes, the plan changes in some cells only.
    before = {qa_key(r["discipline"], r["grade"]): r for r in _plan().to_dicts()}
    monkeypatch.setenv("BOOSTQA_PROBE_MODEL", "target-v2")
    resources._project_config.cache_clear()
    knows_biology = KNOWN | {r["q"] for r in PROBE_QA_ROWS if r["id"].startswith("bh")}
    fake_llm.responder = probe_target_responder(probe_answers(), lambda q: q in knows_biology)
    defs = build_definitions()
    assert run_stage(defs, "deficiency_probe", instance).success
    all_keys = defs.resolve_assets_def("synthesis_plan").partitions_def.get_partition_keys()  # type: ignore[union-attr]
    changed, ranges = pending_ranges(_store(), project_config(), all_keys)
    assert changed and len(changed) < len(all_keys) // 2
    assert "biology|high" in changed
    # The sensor asks for runs over exactly the changed cells, once.
    sensor = defs.get_sensor_def("synthesis_plan_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as ctx:
        out = sensor(ctx)
    asked = {
        k
        for rr in out.run_requests
        for k in all_keys[
            all_keys.index(rr.tags["dagster/asset_partition_range_start"]) : all_keys.index(
                rr.tags["dagster/asset_partition_range_end"]
            )
            + 1
        ]
    }
    assert asked == set(changed) and len(out.run_requests) == len(ranges)
    with dg.build_sensor_context(
        instance=instance, definitions=defs, resources=defs.resources, cursor=out.cursor
    ) as ctx:
        assert not sensor(ctx).run_requests
    replan = run_stage(defs, "synthesis_plan", instance)  # the runner, like the sensor, runs only those ranges
    assert replan.success and replan.partitions == len(changed) and replan.run_id.count(",") == len(ranges) - 1
    after = {qa_key(r["discipline"], r["grade"]): r for r in _plan().to_dicts()}
    moved = {
        k for k in after if (after[k]["budget"], after[k]["seed_ids"]) != (before[k]["budget"], before[k]["seed_ids"])
    }
    assert set(changed) == moved
    assert after["biology|high"]["budget"] < before["biology|high"]["budget"]

    # Exactly the changed cells are stale downstream; automation requests exactly those.
    assert _stale(defs, instance, "synthesized_qa") == set(changed)
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=auto, cursor=tick.cursor)
    assert tick.get_requested_partitions(dg.AssetKey("synthesized_qa")) == set(changed)
    # refined_qa follows in the same run, for the same partitions only.
    assert tick.get_requested_partitions(dg.AssetKey("refined_qa")) == set(changed)


def test_a_new_prompt_version_marks_the_llm_asset_stale(
    plan_project: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert all(r.success for r in run_pipeline(defs, instance, stages=[*UP_TO_PLAN, "synthesized_qa"]))
    assert _stale(defs, instance, "synthesized_qa") == set()
    # Release v2 of a synthesis prompt (a copy of the prompt folder, so the package stays untouched).
    prompts = tmp_path / "prompts"
    shutil.copytree(prompting.PROMPTS_DIR, prompts)
    v1 = (prompts / "synthesize_multi_grade" / "v1.j2").read_text()
    (prompts / "synthesize_multi_grade" / "v2.j2").write_text(v1.replace("exam question", "exam question (v2)"))
    monkeypatch.setattr(prompting, "PROMPTS_DIR", prompts)
    defs = build_definitions()
    stale = _stale(defs, instance, "synthesized_qa")
    assert stale == set(defs.resolve_assets_def("synthesized_qa").partitions_def.get_partition_keys())  # type: ignore[union-attr]
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    causes = resolver.get_stale_causes(dg.AssetKey("synthesized_qa"), "physics|high")
    assert any("code version" in c.reason for c in causes), [c.reason for c in causes]
    # The other stages' code is unchanged: the plan is not stale.
    assert _stale(defs, instance, "synthesis_plan") == set()
    assert json.dumps(sorted(stale))  # keys are plain strings (UI-friendly)
