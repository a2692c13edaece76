"""Tests for boostqa_assets.logic.synthesize: planning rules, requests, assembly of results."""

from __future__ import annotations

import json
import random
from typing import Any

import polars as pl
import pytest

from boostqa_assets.configs import SynthesisConfig, TaxonomyConfig, load_config
from boostqa_assets.llm.types import LLMResult
from boostqa_assets.logic import synthesize
from boostqa_assets.logic.synthesize import QAReply, SynthTask, assemble, build_requests, plan_tasks
from boostqa_assets.records import ANNOTATED_SCHEMA, REJECT_SCHEMA, SYNTHESIZED_SCHEMA, frame
from boostqa_assets.settings import DEFAULT_CONFIG_DIR

GRADES = ["primary", "middle", "high", "undergraduate", "graduate"]


@pytest.fixture(scope="module")
def tax() -> TaxonomyConfig:
    t = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(t, TaxonomyConfig)
    return t


def seed(seed_id: str, discipline: str, grade: str, difficulty: str = "medium", **kw: Any) -> dict[str, Any]:
    category = {"physics": "stem", "mathematics": "stem", "history": "humanities"}[discipline]
    return {
        "seed_id": seed_id,
        "source": "src",
        "native_id": seed_id,
        "kind": "qa",
        "language": "en",
        "question": f"Question of {seed_id} about {discipline}?",
        "answer": f"Answer of {seed_id}.",
        "text": None,
        "title": None,
        "url": None,
        "license": "MIT",
        "meta": "{}",
        "discipline": discipline,
        "category": category,
        "grade": grade,
        "difficulty": difficulty,
        "annotation_status": "ok",
        "annotate_model": "m",
        "annotate_prompt_id": "annotate",
        "annotate_prompt_version": "v1",
        "annotate_request_hash": f"ah_{seed_id}",
        **kw,
    }


def annotated(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return frame(rows, ANNOTATED_SCHEMA)


def cfg(**kw: Any) -> SynthesisConfig:
    base: dict[str, Any] = {"qa_per_seed": 1, "max_seeds_per_partition": None}
    return SynthesisConfig.model_validate({**base, **kw})


def summary(tasks: list[SynthTask]) -> list[tuple[str, str, int]]:
    return [(t.track, t.seed["seed_id"], t.variant) for t in tasks]


# --- planning ------------------------------------------------------------------------------------------


def test_stem_seed_of_any_grade_yields_multi_grade_at_every_grade(tax: TaxonomyConfig) -> None:
    df = annotated([seed("s1", "physics", "primary", "easy")])
    for grade in GRADES:
        tasks = plan_tasks(df, "physics", grade, tax, cfg())
        assert summary(tasks) == [("multi_grade", "s1", 0)], grade
        assert tasks[0].grade == grade and tasks[0].discipline == "physics"


def test_plan_filters_on_the_discipline(tax: TaxonomyConfig) -> None:
    df = annotated([seed("s1", "physics", "high"), seed("s2", "mathematics", "high")])
    assert summary(plan_tasks(df, "mathematics", "high", tax, cfg())) == [("multi_grade", "s2", 0)]
    assert plan_tasks(df, "history", "high", tax, cfg()) == []


def test_non_stem_seed_only_at_its_own_grade(tax: TaxonomyConfig) -> None:
    df = annotated([seed("h1", "history", "middle"), seed("h2", "history", "high")])
    planned = {g: summary(plan_tasks(df, "history", g, tax, cfg(non_stem_grades="own"))) for g in GRADES}
    assert planned == {
        "primary": [],
        "middle": [("multi_grade", "h1", 0)],
        "high": [("multi_grade", "h2", 0)],
        "undergraduate": [],
        "graduate": [],
    }


def test_non_stem_seed_at_every_grade_with_all(tax: TaxonomyConfig) -> None:
    df = annotated([seed("h1", "history", "middle"), seed("h2", "history", "high")])
    for g in GRADES:
        tasks = plan_tasks(df, "history", g, tax, cfg(non_stem_grades="all"))
        assert summary(tasks) == [("multi_grade", "h1", 0), ("multi_grade", "h2", 0)], g


def test_multi_grade_categories_are_configurable(tax: TaxonomyConfig) -> None:
    df = annotated([seed("h1", "history", "middle"), seed("p1", "physics", "middle")])
    c = cfg(multi_grade_categories=["humanities"])
    assert summary(plan_tasks(df, "history", "primary", tax, c)) == [("multi_grade", "h1", 0)]
    assert plan_tasks(df, "physics", "primary", tax, c) == []


def test_high_difficulty_only_at_top_grades_and_for_hard_seeds(tax: TaxonomyConfig) -> None:
    df = annotated(
        [
            seed("e", "physics", "high", "easy"),
            seed("m", "physics", "high", "medium"),
            seed("h", "physics", "primary", "hard"),
        ]
    )
    c = cfg(high_difficulty_grades=["undergraduate", "graduate"], high_difficulty_min_seed_difficulty="hard")
    for grade in ("primary", "middle", "high"):
        assert {t.track for t in plan_tasks(df, "physics", grade, tax, c)} == {"multi_grade"}, grade
    for grade in ("undergraduate", "graduate"):
        hard = [t for t in plan_tasks(df, "physics", grade, tax, c) if t.track == "high_difficulty"]
        assert [t.seed["seed_id"] for t in hard] == ["h"], grade


def test_high_difficulty_floor_is_inclusive(tax: TaxonomyConfig) -> None:
    df = annotated(
        [
            seed("e", "physics", "high", "easy"),
            seed("m", "physics", "high", "medium"),
            seed("h", "physics", "high", "hard"),
        ]
    )
    c = cfg(high_difficulty_grades=["graduate"], high_difficulty_min_seed_difficulty="medium")
    hard = [t.seed["seed_id"] for t in plan_tasks(df, "physics", "graduate", tax, c) if t.track == "high_difficulty"]
    assert hard == ["h", "m"]  # sorted by seed id


def test_high_difficulty_for_non_stem_uses_every_hard_seed_of_the_discipline(tax: TaxonomyConfig) -> None:
    df = annotated([seed("h1", "history", "high", "hard"), seed("h2", "history", "graduate", "easy")])
    tasks = plan_tasks(df, "history", "graduate", tax, cfg())
    assert summary(tasks) == [("multi_grade", "h2", 0), ("high_difficulty", "h1", 0)]


def test_qa_per_seed_variants_have_distinct_ids(tax: TaxonomyConfig) -> None:
    df = annotated([seed("s1", "physics", "high", "hard")])
    tasks = plan_tasks(df, "physics", "graduate", tax, cfg(qa_per_seed=3))
    assert summary(tasks) == [
        ("multi_grade", "s1", 0),
        ("multi_grade", "s1", 1),
        ("multi_grade", "s1", 2),
        ("high_difficulty", "s1", 0),
        ("high_difficulty", "s1", 1),
        ("high_difficulty", "s1", 2),
    ]
    ids = [t.qa_id for t in tasks]
    assert len(set(ids)) == 6
    assert all(i.startswith("q_") for i in ids)


def test_qa_ids_are_stable_and_partition_specific(tax: TaxonomyConfig) -> None:
    df = annotated([seed("s1", "physics", "high"), seed("s2", "physics", "middle")])
    a = [t.qa_id for t in plan_tasks(df, "physics", "high", tax, cfg())]
    b = [t.qa_id for t in plan_tasks(df, "physics", "high", tax, cfg())]
    assert a == b
    other = [t.qa_id for t in plan_tasks(df, "physics", "middle", tax, cfg())]
    assert not set(a) & set(other)
    # a known value: ids are sha256-based, so they must not drift between releases
    assert a[0] == "q_" + synthesize.stable_hash("s1", "physics", "high", "multi_grade", "0")


def test_cap_is_deterministic_and_independent_of_row_order(tax: TaxonomyConfig) -> None:
    rows = [seed(f"s{i:02d}", "physics", GRADES[i % 5], "hard") for i in range(20)]
    c = cfg(max_seeds_per_partition=4)
    base = plan_tasks(annotated(rows), "physics", "graduate", tax, c)
    assert sum(t.track == "multi_grade" for t in base) == 4
    assert sum(t.track == "high_difficulty" for t in base) == 4
    rng = random.Random(0)
    for _ in range(5):
        shuffled = rows[:]
        rng.shuffle(shuffled)
        assert plan_tasks(annotated(shuffled), "physics", "graduate", tax, c) == base
    # unrelated seeds (another discipline) do not change the choice
    more = rows + [seed(f"m{i}", "mathematics", "high", "hard") for i in range(10)]
    assert plan_tasks(annotated(more), "physics", "graduate", tax, c) == base


def test_cap_differs_between_partitions(tax: TaxonomyConfig) -> None:
    rows = [seed(f"s{i:02d}", "physics", "high") for i in range(30)]
    c = cfg(max_seeds_per_partition=3)
    chosen = {g: {t.seed["seed_id"] for t in plan_tasks(annotated(rows), "physics", g, tax, c)} for g in GRADES}
    assert all(len(v) == 3 for v in chosen.values())
    assert len({frozenset(v) for v in chosen.values()}) > 1  # salted per partition, not the same few seeds


def test_cap_above_supply_keeps_everything(tax: TaxonomyConfig) -> None:
    rows = [seed(f"s{i}", "physics", "high") for i in range(3)]
    tasks = plan_tasks(annotated(rows), "physics", "high", tax, cfg(max_seeds_per_partition=10))
    assert [t.seed["seed_id"] for t in tasks] == ["s0", "s1", "s2"]


def test_plan_on_an_empty_frame(tax: TaxonomyConfig) -> None:
    assert plan_tasks(annotated([]), "physics", "graduate", tax, cfg()) == []


# --- requests ------------------------------------------------------------------------------------------


def test_build_requests_uses_the_track_prompt_and_prefill(tax: TaxonomyConfig) -> None:
    df = annotated([seed("s1", "physics", "high", "hard")])
    tasks = plan_tasks(df, "physics", "graduate", tax, cfg(qa_per_seed=2))
    requests = build_requests(tasks, max_chars=500)
    assert [r.key for r in requests] == [t.qa_id for t in tasks]
    assert [r.prompt_id for r in requests] == ["synthesize_multi_grade"] * 2 + ["synthesize_high_difficulty"] * 2
    assert {r.prompt_version for r in requests} == {"v2"}
    assert [r.seed_offset for r in requests] == [0, 1, 0, 1]
    for r in requests:
        assert r.prefill == '{"question": "'
        assert r.schema == synthesize.QA_SCHEMA
        assert "Seed: Question of s1 about physics? Answer: Answer of s1." in r.prompt
        assert "\nLevel: graduate" in r.prompt
    assert "research level" in requests[0].prompt  # the grade hint of the multi-grade prompt
    assert requests[1].prompt.endswith("Level: graduate (variant 2)\nLanguage: English\nJSON:")


def test_build_requests_truncates_the_seed(tax: TaxonomyConfig) -> None:
    long = seed("s1", "physics", "high", question="word " * 400, answer="long " * 400)
    tasks = plan_tasks(annotated([long]), "physics", "high", tax, cfg())
    prompt = build_requests(tasks, max_chars=100)[0].prompt
    line = next(ln for ln in prompt.splitlines() if ln.startswith("Seed: word"))
    question_part, answer_part = line.removeprefix("Seed: ").split(" Answer: ")
    assert len(question_part) <= 100 and question_part.endswith("...")
    assert len(answer_part) <= 50


def test_build_requests_pins_versions(tax: TaxonomyConfig) -> None:
    tasks = plan_tasks(annotated([seed("s1", "physics", "high")]), "physics", "high", tax, cfg())
    req = build_requests(tasks, 500, versions={"synthesize_multi_grade": "v1"})[0]
    assert req.prompt_version == "v1"


# --- assembly ------------------------------------------------------------------------------------------


def ok_result(task: SynthTask, question: str, answer: str, reasoning: str = "") -> LLMResult:
    pid = synthesize.TRACK_PROMPTS[task.track]
    return LLMResult(
        key=task.qa_id,
        prompt_id=pid,
        prompt_version="v1",
        model="synth-model",
        request_hash=f"rh_{task.qa_id}",
        ok=True,
        value=QAReply(question=question, answer=answer),
        content=json.dumps({"question": question, "answer": answer}),
        reasoning=reasoning,
        finish_reason="stop",
    )


def test_assemble_keeps_reasoning_apart_and_rejects_failures(tax: TaxonomyConfig) -> None:
    df = annotated([seed("s1", "physics", "high", "hard"), seed("s2", "physics", "middle", "easy")])
    tasks = plan_tasks(df, "physics", "graduate", tax, cfg())
    assert summary(tasks) == [
        ("multi_grade", "s1", 0),
        ("multi_grade", "s2", 0),
        ("high_difficulty", "s1", 0),
    ]
    t_ok, t_bad, t_hard = tasks
    results = [
        ok_result(
            t_ok,
            "What is a vector?",
            "A quantity with magnitude and direction.",
            reasoning="The user wants a definition; think about magnitude.",
        ),
        LLMResult(
            key=t_bad.qa_id,
            prompt_id="synthesize_multi_grade",
            prompt_version="v1",
            model="synth-model",
            request_hash="rh_bad",
            ok=False,
            error="invalid_json",
            detail="not JSON: Expecting value",
            raw_output='{"question": "half a repl',
        ),
        ok_result(t_hard, "Derive the wave equation.", "From Maxwell's equations ...", reasoning="hard thoughts"),
    ]
    kept, rejects = assemble(tasks, results, tax, "physics|graduate", top_difficulty="hard")
    assert kept.schema == SYNTHESIZED_SCHEMA
    assert rejects.schema == REJECT_SCHEMA
    by_id = {r["qa_id"]: r for r in kept.to_dicts()}
    assert set(by_id) == {t_ok.qa_id, t_hard.qa_id}

    row = by_id[t_ok.qa_id]
    assert row["answer"] == "A quantity with magnitude and direction."
    assert row["reasoning"] == "The user wants a definition; think about magnitude."
    assert "magnitude." not in row["question"] and "think" not in row["answer"]
    assert (row["discipline"], row["category"], row["grade"], row["track"]) == (
        "physics",
        "stem",
        "graduate",
        "multi_grade",
    )
    assert (row["seed_grade"], row["seed_difficulty"], row["difficulty"]) == ("high", "hard", "hard")
    assert (
        row["synth_model"],
        row["synth_prompt_id"],
        row["synth_prompt_version"],
        row["synth_request_hash"],
    ) == ("synth-model", "synthesize_multi_grade", "v1", f"rh_{t_ok.qa_id}")
    assert row["annotate_request_hash"] == "ah_s1"
    assert row["language"] == "en" and row["source"] == "src"

    hard = by_id[t_hard.qa_id]
    assert hard["track"] == "high_difficulty"
    assert hard["difficulty"] == "hard"  # the top difficulty, whatever the seed's
    assert hard["synth_prompt_id"] == "synthesize_high_difficulty"

    [rej] = rejects.to_dicts()
    assert (rej["stage"], rej["partition"], rej["qa_id"], rej["seed_id"]) == (
        "synthesized_qa",
        "physics|graduate",
        t_bad.qa_id,
        "s2",
    )
    assert (rej["reason"], rej["detail"]) == ("invalid_json", "not JSON: Expecting value")
    assert rej["raw_output"] == '{"question": "half a repl'
    assert rej["request_hash"] == "rh_bad"
    record = json.loads(rej["record"])
    assert record["track"] == "multi_grade" and record["seed"]["seed_id"] == "s2"


def test_assemble_top_difficulty_applies_only_to_the_high_difficulty_track(tax: TaxonomyConfig) -> None:
    df = annotated([seed("s1", "physics", "high", "medium")])
    c = cfg(high_difficulty_min_seed_difficulty="medium")
    tasks = plan_tasks(df, "physics", "graduate", tax, c)
    kept, _ = assemble(tasks, [ok_result(t, "Q?", "A.") for t in tasks], tax, "physics|graduate", "hard")
    assert dict(zip(kept["track"], kept["difficulty"], strict=True)) == {
        "multi_grade": "medium",
        "high_difficulty": "hard",
    }


def test_assemble_missing_result_is_a_reject(tax: TaxonomyConfig) -> None:
    tasks = plan_tasks(annotated([seed("s1", "physics", "high")]), "physics", "high", tax, cfg())
    kept, rejects = assemble(tasks, [], tax, "physics|high", "hard")
    assert kept.height == 0 and kept.schema == SYNTHESIZED_SCHEMA
    [rej] = rejects.to_dicts()
    assert rej["reason"] == "no_result" and rej["raw_output"] is None and rej["request_hash"] is None


def test_assemble_failure_without_error_code(tax: TaxonomyConfig) -> None:
    tasks = plan_tasks(annotated([seed("s1", "physics", "high")]), "physics", "high", tax, cfg())
    res = LLMResult(key=tasks[0].qa_id, prompt_id="p", prompt_version="v1", model="m", request_hash="rh", ok=False)
    _, rejects = assemble(tasks, [res], tax, "physics|high", "hard")
    assert rejects["reason"].to_list() == ["llm_error"]
