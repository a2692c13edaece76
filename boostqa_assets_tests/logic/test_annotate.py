"""Tests for boostqa_assets.logic.annotate: requests, the item text, assembly of results."""

from __future__ import annotations

import json
from typing import Any

import pytest

from boostqa_assets.configs import TaxonomyConfig, load_config
from boostqa_assets.llm.types import LLMResult
from boostqa_assets.logic.annotate import (
    PROMPT_ID,
    AnnotationReply,
    annotation_schema,
    assemble,
    build_requests,
    make_validator,
    seed_item_text,
)
from boostqa_assets.records import ANNOTATED_SCHEMA, REJECT_SCHEMA, SEED_SCHEMA, frame
from boostqa_assets.settings import DEFAULT_CONFIG_DIR


@pytest.fixture(scope="module")
def tax() -> TaxonomyConfig:
    t = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(t, TaxonomyConfig)
    return t


def seed_row(seed_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "seed_id": seed_id,
        "source": "src",
        "native_id": seed_id.upper(),
        "kind": "qa",
        "language": "en",
        "question": f"What is {seed_id}?",
        "answer": f"{seed_id} is a thing.",
        "text": None,
        "title": None,
        "url": f"https://example.org/{seed_id}",
        "license": "MIT",
        "meta": json.dumps({"topic": seed_id}),
        **kw,
    }


def ok(seed_id: str, discipline: str, grade: str, difficulty: str) -> LLMResult:
    reply = AnnotationReply(discipline=discipline, grade=grade, difficulty=difficulty)
    return LLMResult(
        key=seed_id,
        prompt_id=PROMPT_ID,
        prompt_version="v1",
        model="annotator-model",
        request_hash=f"rh_{seed_id}",
        ok=True,
        value=reply,
        content=reply.model_dump_json(),
        finish_reason="stop",
    )


# --- the item text -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        pytest.param({"question": "What  is\n\tgravity?", "text": "ignored"}, "What is gravity?", id="question"),
        pytest.param(
            {"question": None, "title": "Gravity", "text": "A force\nof attraction."},
            "Gravity: A force of attraction.",
            id="titled-passage",
        ),
        pytest.param({"question": "", "title": None, "text": "Just a passage."}, "Just a passage.", id="passage"),
        pytest.param({"question": None, "title": None, "text": None}, "", id="nothing"),
        pytest.param({"question": None, "title": "Only a title", "text": None}, "Only a title:", id="title-only"),
    ],
)
def test_seed_item_text(row: dict[str, Any], expected: str) -> None:
    assert seed_item_text(row, 1000) == expected


def test_seed_item_text_truncates_with_an_ellipsis() -> None:
    text = seed_item_text({"question": "word " * 100}, 50)
    assert len(text) <= 50
    assert text.endswith("...")
    assert text == ("word " * 10).strip()[:47].rstrip() + "..."
    assert seed_item_text({"question": "x" * 50}, 50) == "x" * 50  # exactly at the limit: untouched
    assert seed_item_text({"question": "x" * 51}, 50) == "x" * 47 + "..."


# --- requests ------------------------------------------------------------------------------------------


def test_build_requests_one_per_seed(tax: TaxonomyConfig) -> None:
    seeds = frame([seed_row("s1"), seed_row("s2", question=None, title="Rome", text="An empire.")], SEED_SCHEMA)
    requests = build_requests(seeds, tax, max_chars=200)
    assert [r.key for r in requests] == ["s1", "s2"]
    for r in requests:
        assert (r.prompt_id, r.prompt_version) == ("annotate", "v1")
        assert r.schema == annotation_schema(tax)
        assert r.prefill is None
        assert f"Disciplines: {', '.join(tax.discipline_names)}." in r.prompt
        assert "Grades, easiest first: primary, middle, high, undergraduate, graduate." in r.prompt
        assert "Difficulties: easy, medium, hard." in r.prompt
    assert requests[0].prompt.endswith("Item: What is s1?\nJSON:")
    assert requests[1].prompt.endswith("Item: Rome: An empire.\nJSON:")


def test_request_schema_enumerates_the_taxonomy(tax: TaxonomyConfig) -> None:
    schema = build_requests(frame([seed_row("s1")], SEED_SCHEMA), tax, 200)[0].schema
    assert schema is not None
    props = schema["properties"]
    assert props["discipline"]["enum"] == tax.discipline_names and len(tax.discipline_names) == 22
    assert props["grade"]["enum"] == tax.grades
    assert props["difficulty"]["enum"] == tax.difficulties
    assert schema["additionalProperties"] is False


def test_build_requests_truncates_the_item(tax: TaxonomyConfig) -> None:
    seeds = frame([seed_row("s1", question="long " * 500)], SEED_SCHEMA)
    prompt = build_requests(seeds, tax, max_chars=120)[0].prompt
    item = prompt.rsplit("\nItem: ", 1)[1].removesuffix("\nJSON:")
    assert len(item) <= 120 and item.endswith("...")


def test_build_requests_on_no_seeds(tax: TaxonomyConfig) -> None:
    assert build_requests(frame([], SEED_SCHEMA), tax, 200) == []


def test_requests_and_validator_agree_on_the_taxonomy(tax: TaxonomyConfig) -> None:
    validate = make_validator(tax)
    for name in tax.discipline_names:
        assert validate({"discipline": name, "grade": "high", "difficulty": "easy"}).discipline == name


# --- assembly ------------------------------------------------------------------------------------------


def test_assemble_ok_and_failed(tax: TaxonomyConfig) -> None:
    seeds = frame([seed_row("s1"), seed_row("s2"), seed_row("s3"), seed_row("s4")], SEED_SCHEMA)
    results = [
        ok("s1", "physics", "high", "hard"),
        LLMResult(
            key="s2",
            prompt_id=PROMPT_ID,
            prompt_version="v1",
            model="annotator-model",
            request_hash="rh_s2",
            ok=False,
            error="schema_mismatch",
            detail="discipline 'astrology' is not in the taxonomy",
            raw_output='{"discipline": "astrology", "grade": "high", "difficulty": "easy"}',
            attempts=3,
        ),
        ok("s3", "history", "primary", "easy"),
        # s4: no result at all
    ]
    kept, rejects = assemble(seeds, results, tax, "src")
    assert kept.schema == ANNOTATED_SCHEMA and rejects.schema == REJECT_SCHEMA

    by_id = {r["seed_id"]: r for r in kept.to_dicts()}
    assert set(by_id) == {"s1", "s3"}
    s1 = by_id["s1"]
    assert (s1["discipline"], s1["category"], s1["grade"], s1["difficulty"]) == (
        "physics",
        "stem",
        "high",
        "hard",
    )
    assert by_id["s3"]["category"] == "humanities"
    assert s1["annotation_status"] == "ok"
    assert (s1["annotate_model"], s1["annotate_prompt_id"], s1["annotate_prompt_version"]) == (
        "annotator-model",
        "annotate",
        "v1",
    )
    assert s1["annotate_request_hash"] == "rh_s1"
    # the seed's own columns pass through untouched
    original = seeds.filter(seeds["seed_id"] == "s1").to_dicts()[0]
    assert {k: s1[k] for k in SEED_SCHEMA} == original

    rej = {r["seed_id"]: r for r in rejects.to_dicts()}
    assert set(rej) == {"s2", "s4"}
    s2 = rej["s2"]
    assert (s2["stage"], s2["partition"], s2["source"], s2["qa_id"]) == (
        "annotated_seeds",
        "src",
        "src",
        None,
    )
    assert (s2["reason"], s2["detail"]) == (
        "schema_mismatch",
        "discipline 'astrology' is not in the taxonomy",
    )
    assert s2["raw_output"] == '{"discipline": "astrology", "grade": "high", "difficulty": "easy"}'
    assert s2["request_hash"] == "rh_s2"
    assert json.loads(s2["record"])["question"] == "What is s2?"
    s4 = rej["s4"]
    assert (s4["reason"], s4["raw_output"], s4["request_hash"]) == ("no_result", None, None)


def test_assemble_failure_without_details(tax: TaxonomyConfig) -> None:
    seeds = frame([seed_row("s1")], SEED_SCHEMA)
    res = LLMResult(key="s1", prompt_id=PROMPT_ID, prompt_version="v1", model="m", request_hash="", ok=False)
    kept, rejects = assemble(seeds, [res], tax, "src")
    assert kept.height == 0
    [r] = rejects.to_dicts()
    assert (r["reason"], r["request_hash"], r["raw_output"]) == ("llm_error", None, None)


def test_assemble_ignores_results_for_unknown_seeds(tax: TaxonomyConfig) -> None:
    seeds = frame([seed_row("s1")], SEED_SCHEMA)
    kept, rejects = assemble(seeds, [ok("s1", "physics", "high", "easy"), ok("zz", "law", "high", "easy")], tax, "src")
    assert kept["seed_id"].to_list() == ["s1"] and rejects.height == 0


def test_assemble_empty(tax: TaxonomyConfig) -> None:
    kept, rejects = assemble(frame([], SEED_SCHEMA), [], tax, "src")
    assert (kept.height, rejects.height) == (0, 0)
    assert kept.schema == ANNOTATED_SCHEMA
