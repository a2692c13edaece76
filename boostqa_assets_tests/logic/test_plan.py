"""The synthesis plan rule: allocation with floor, cap and capacity; probe need; static fallback; determinism."""

from __future__ import annotations

import json
import random

import polars as pl
import pytest

from boostqa_assets.configs import PlanConfig, ProjectConfig, load_project_config
from boostqa_assets.logic import plan as plan_logic
from boostqa_assets.partitions import contiguous_ranges, qa_key
from boostqa_assets.records import ANNOTATED_SCHEMA, frame
from boostqa_assets.settings import DEFAULT_CONFIG_DIR

# --- allocate ------------------------------------------------------------------------------------------


def test_allocate_is_proportional_and_sums_to_total() -> None:
    out = plan_logic.allocate({"a": 1.0, "b": 3.0}, {"a": 100, "b": 100}, 40)
    assert out == {"a": 10, "b": 30}


def test_allocate_respects_floor_cap_and_capacity_and_spills_the_excess() -> None:
    weights = {"a": 10.0, "b": 1.0, "c": 1.0, "d": 1.0}
    capacity = {"a": 100, "b": 100, "c": 3, "d": 0}
    out = plan_logic.allocate(weights, capacity, 50, floor=5, cap=20)
    assert out["d"] == 0  # no candidates, no budget
    assert out["a"] == 20  # capped
    assert out["c"] == 3  # capacity below the floor: all it can take
    assert out["b"] == 20  # capped too: 43 is all the cells can take
    assert sum(out.values()) == 43
    out = plan_logic.allocate(weights, capacity, 30, floor=5, cap=20)
    assert out == {"a": 20, "b": 7, "c": 3, "d": 0}


def test_allocate_never_exceeds_what_the_cells_can_take() -> None:
    out = plan_logic.allocate({"a": 1.0, "b": 1.0}, {"a": 2, "b": 3}, 100, cap=10)
    assert out == {"a": 2, "b": 3}


def test_allocate_floors_larger_than_the_budget_share_it_by_weight() -> None:
    out = plan_logic.allocate({"a": 3.0, "b": 1.0, "c": 0.0}, {"a": 9, "b": 9, "c": 9}, 4, floor=3)
    assert sum(out.values()) == 4
    assert out["a"] == 3 and out["b"] == 1 and out["c"] == 0


@pytest.mark.parametrize("seed", range(20))
def test_allocate_invariants_on_random_inputs(seed: int) -> None:
    rng = random.Random(seed)
    keys = [f"k{i:02d}" for i in range(rng.randint(1, 30))]
    weights = {k: rng.choice([0.0, rng.random() * 5]) for k in keys}
    capacity = {k: rng.randint(0, 12) for k in keys}
    floor, cap, total = rng.randint(0, 3), rng.choice([None, rng.randint(1, 10)]), rng.randint(0, 200)
    out = plan_logic.allocate(weights, capacity, total, floor, cap)
    upper = {k: min(capacity[k], cap if cap is not None else capacity[k]) for k in keys}
    assert all(0 <= out[k] <= upper[k] for k in keys)
    assert sum(out.values()) == min(total, sum(upper.values()))
    if sum(min(floor, upper[k]) for k in keys) <= total:
        assert all(out[k] >= min(floor, upper[k]) for k in keys)
    # Same inputs, same answer, whatever the dict order.
    shuffled = dict(sorted(weights.items(), key=lambda kv: rng.random()))
    assert plan_logic.allocate(shuffled, capacity, total, floor, cap) == out


# --- build_plan ----------------------------------------------------------------------------------------


def _annotated(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    out = []
    for i, (discipline, grade, difficulty) in enumerate(rows):
        out.append(
            {
                "seed_id": f"s_{i:03d}",
                "source": "src",
                "native_id": str(i),
                "kind": "qa",
                "language": "en",
                "question": f"question {i}",
                "answer": f"answer {i}",
                "text": None,
                "title": None,
                "url": None,
                "license": "unknown",
                "meta": "{}",
                "discipline": discipline,
                "category": "stem" if discipline in ("physics", "mathematics") else "humanities",
                "grade": grade,
                "difficulty": difficulty,
                "annotation_status": "ok",
                "annotate_model": "m",
                "annotate_prompt_id": "annotate",
                "annotate_prompt_version": "v1",
                "annotate_request_hash": f"h{i}",
            }
        )
    return frame(out, ANNOTATED_SCHEMA)


def _project(qa_budget: int | None = 60, **plan: object) -> ProjectConfig:
    base = load_project_config(DEFAULT_CONFIG_DIR, env={})
    recipe = base.recipes.recipes[0].model_copy(update={"qa_budget": qa_budget})
    recipes = base.recipes.model_copy(update={"recipes": [recipe]})
    pipeline = base.pipeline.model_copy(
        update={
            "plan": PlanConfig(**{"floor": 1, "cap": 12, "max_qa_per_seed": 4, **plan}),  # type: ignore[arg-type]
            "synthesis": base.pipeline.synthesis.model_copy(update={"max_seeds_per_partition": None}),
        }
    )
    return base.model_copy(update={"recipes": recipes, "pipeline": pipeline})


ANNOTATED = _annotated(
    [("physics", g, "hard") for g in ("high", "high", "undergraduate")]
    + [("mathematics", "high", "medium")] * 3
    + [("history", "high", "medium")] * 2
    + [("history", "middle", "medium")] * 2
)


def _probe(acc: dict[tuple[str, str], float | None]) -> pl.DataFrame:
    rows = []
    for (d, g), a in acc.items():
        rows.append(
            {
                "discipline": d,
                "grade": g,
                "n_sampled": 20,
                "n_graded": 20 if a is not None else 2,
                "n_correct": round((a or 0) * 20),
                "accuracy": a,
                "ci_low": None if a is None else max(0.0, a - 0.2),
                "ci_high": None if a is None else min(1.0, a + 0.2),
                "status": "ok" if a is not None else "insufficient_samples",
            }
        )
    return pl.DataFrame(rows)


def _stream(df: pl.DataFrame, size: int | None = None) -> plan_logic.SeedStream:
    """The seeds as the asset streams them: frames of ``size`` rows (whole without one), anew on each call."""
    step = size or max(df.height, 1)
    return lambda: (df.slice(i, step) for i in range(0, df.height, step))


def _budget(plan: pl.DataFrame, d: str, g: str) -> int:
    return plan.filter((pl.col("discipline") == d) & (pl.col("grade") == g))["budget"].item()


def test_without_a_probe_the_plan_uses_static_weights_and_says_so() -> None:
    project = _project()
    plan = plan_logic.build_plan(_stream(ANNOTATED), None, project)
    assert plan.height == 22 * 5
    assert set(plan["basis"]) == {"static"}
    assert "static weights" in plan_logic.plan_basis(plan)
    assert plan["budget"].sum() == 60
    # Cells with no candidate seeds get nothing.
    assert plan.filter(pl.col("candidates") == 0)["budget"].sum() == 0
    # Physics (STEM, weight x2 x recipe stem 3.0) gets more than history at the same grade.
    assert _budget(plan, "physics", "high") > _budget(plan, "history", "high")


def test_probe_budgets_favour_the_cells_the_target_gets_wrong() -> None:
    project = _project(stem_weight=1.0, high_difficulty_weight=1.0)
    # Physics is answered perfectly, mathematics always wrongly, at every grade.
    acc = {("physics", g): 1.0 for g in project.taxonomy.grades} | {
        ("mathematics", g): 0.0 for g in project.taxonomy.grades
    }
    plan = plan_logic.build_plan(_stream(ANNOTATED), _probe(acc), project)
    cfg = project.pipeline.plan
    for g in project.taxonomy.grades:
        phys, math = _budget(plan, "physics", g), _budget(plan, "mathematics", g)
        assert math >= phys, g
        for b in (phys, math):
            assert b <= cfg.cap  # type: ignore[operator]
    # Where both have room, the wrong cell gets strictly more and the perfect one keeps only about its floor.
    assert _budget(plan, "mathematics", "primary") > _budget(plan, "physics", "primary")
    assert _budget(plan, "physics", "primary") <= cfg.floor + 1
    math_total = plan.filter(pl.col("discipline") == "mathematics")["budget"].sum()
    phys_total = plan.filter(pl.col("discipline") == "physics")["budget"].sum()
    assert math_total > 2 * phys_total
    # Every cell with candidates gets at least the floor (the budget is large enough).
    with_candidates = plan.filter(pl.col("candidates") > 0)
    assert with_candidates["budget"].min() >= cfg.floor
    assert set(plan.filter(pl.col("discipline") == "physics")["basis"]) == {"probe"}
    # Cells the probe did not measure take the mean need of the measured ones.
    assert set(plan.filter(pl.col("discipline") == "history")["basis"]) == {"probe_mean"}
    assert plan.filter(pl.col("discipline") == "history")["need"].unique().to_list() == [pytest.approx(0.525)]


def test_insufficient_probe_cells_are_not_treated_as_measured() -> None:
    project = _project()
    acc = {("physics", "high"): None, ("mathematics", "high"): 0.5}
    plan = plan_logic.build_plan(_stream(ANNOTATED), _probe(acc), project)
    row = plan.filter((pl.col("discipline") == "physics") & (pl.col("grade") == "high")).row(0, named=True)
    assert row["basis"] == "probe_mean" and row["accuracy"] is None
    assert row["probe_status"] == "insufficient_samples"


def test_the_plan_is_deterministic_and_independent_of_row_order() -> None:
    project = _project()
    probe = _probe({("physics", "high"): 0.3, ("mathematics", "high"): 0.9})
    a = plan_logic.build_plan(_stream(ANNOTATED), probe, project)
    b = plan_logic.build_plan(_stream(ANNOTATED.sample(fraction=1.0, shuffle=True, seed=3)), probe.reverse(), project)
    assert a.equals(b)


def test_unbudgeted_recipe_keeps_every_candidate_times_qa_per_seed() -> None:
    project = _project(qa_budget=None)
    plan = plan_logic.build_plan(_stream(ANNOTATED), None, project)
    assert set(plan["basis"]) == {"unbudgeted"}
    assert (plan["budget"] == plan["candidates"] * project.pipeline.synthesis.qa_per_seed).all()


def test_fingerprints_change_only_where_synthesis_would_change() -> None:
    project = _project()
    before = plan_logic.build_plan(_stream(ANNOTATED), None, project)
    stored = {qa_key(r["discipline"], r["grade"]): r["fingerprint"] for r in before.to_dicts()}
    assert plan_logic.changed_cells(before, stored) == []
    # One more history seed at middle grade (history is not multi-grade: only cells whose budget or seeds
    # move may change, and those must).
    extra = _annotated([("history", "middle", "medium")]).with_columns(pl.lit("s_new").alias("seed_id"))
    more = pl.concat([ANNOTATED, extra])
    after = plan_logic.build_plan(_stream(more), None, project)
    changed = plan_logic.changed_cells(after, stored)
    changed_budget = {
        qa_key(r["discipline"], r["grade"])
        for r, o in zip(after.to_dicts(), before.to_dicts(), strict=True)
        if r["budget"] != o["budget"] or r["seed_ids"] != o["seed_ids"]
    }
    assert set(changed) == changed_budget
    # A seed the plan uses disappears: its cell must change, cells that never used it must not.
    used = json.loads(
        before.filter(pl.col("discipline") == "history").filter(pl.col("grade") == "middle")["seed_ids"][0]
    )
    fewer = ANNOTATED.filter(pl.col("seed_id") != used[0])
    changed = plan_logic.changed_cells(plan_logic.build_plan(_stream(fewer), None, project), stored)
    assert "history|middle" in changed
    assert not any(k.startswith("physics|") for k in changed)


def test_cell_tasks_follow_the_plan_budget_round_robin() -> None:
    project = _project()
    plan = plan_logic.build_plan(_stream(ANNOTATED), None, project)
    cell = plan.filter((pl.col("discipline") == "mathematics") & (pl.col("grade") == "high")).row(0, named=True)
    tasks, missing = plan_logic.cell_tasks(ANNOTATED, cell, project)
    assert missing == 0 and len(tasks) == cell["budget"]
    seeds = [t.seed["seed_id"] for t in tasks]
    # Variant 0 of every seed before any variant 1.
    assert seeds[:3] == sorted(set(seeds))[:3] or len(set(seeds[:3])) == min(3, len(seeds))
    assert sorted(set(seeds)) == json.loads(cell["seed_ids"])


@pytest.mark.parametrize("trial", range(12))
def test_the_streamed_plan_names_exactly_the_seeds_synthesis_uses(trial: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The plan counts and picks seeds from 7-row frames in any order; synthesis reads the cell's seeds whole.
    # Every cell's tasks must fill its budget from exactly the seeds the plan names, capped tracks included.
    rng = random.Random(trial)
    labels = [("physics", "mathematics", "history", "law"), ("primary", "middle", "high", "graduate")]
    rows = [(rng.choice(labels[0]), rng.choice(labels[1]), rng.choice(["easy", "medium", "hard"])) for _ in range(90)]
    annotated = _annotated(rows).with_columns(pl.Series([f"s{rng.random():.9f}" for _ in rows]).alias("seed_id"))
    project = _project(rng.choice([None, 7, 60, 400]), cap=rng.choice([None, 9]))
    syn = project.pipeline.synthesis.model_copy(
        update={"max_seeds_per_partition": rng.choice([None, 2, 5]), "non_stem_grades": rng.choice(["own", "all"])}
    )
    project = project.model_copy(update={"pipeline": project.pipeline.model_copy(update={"synthesis": syn})})
    shuffled = annotated.sample(fraction=1.0, shuffle=True, seed=trial)
    whole = plan_logic.build_plan(_stream(annotated), None, project)
    # With room for 10 picked seeds per pass, the cells are picked over several passes: the same plan.
    monkeypatch.setattr(plan_logic, "PICKS_PER_PASS", 10)
    calls = []
    stream = _stream(shuffled, 7)
    plan = plan_logic.build_plan(lambda: calls.append(1) or stream(), None, project)
    assert plan.equals(whole)
    assert len(calls) - 1 >= whole["seed_ids"].str.json_decode().list.len().sum() / 2 / 10
    for cell in plan.to_dicts():
        tasks, missing = plan_logic.cell_tasks(annotated, cell, project)
        assert missing == 0
        assert len(tasks) == cell["budget"], cell
        assert sorted({t.seed["seed_id"] for t in tasks}) == json.loads(cell["seed_ids"])


def test_picking_a_tracks_first_seeds_holds_at_most_twice_its_take_and_a_frame() -> None:
    rng = random.Random(5)
    ids = [f"s{rng.random():.9f}" for _ in range(1000)]
    firsts = plan_logic._FirstRows(take=25)
    for i in range(0, len(ids), 10):
        frame_ids = ids[i : i + 10]
        firsts.add(pl.DataFrame({"seed_id": frame_ids, "_order": frame_ids}))
        assert firsts.rows <= 2 * 25 + 10
    assert firsts.result()["seed_id"].to_list() == sorted(ids)[:25]


def test_contiguous_ranges() -> None:
    keys = ["a", "b", "c", "d", "e"]
    assert contiguous_ranges(keys, ["b", "c", "e"]) == [("b", "c"), ("e", "e")]
    assert contiguous_ranges(keys, []) == []
    assert contiguous_ranges(keys, keys) == [("a", "e")]
