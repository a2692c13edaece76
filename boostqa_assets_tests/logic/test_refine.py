"""Tests for boostqa_assets.logic.refine: rule flags, the length-outlier fence, requests and assembly."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import pytest

from boostqa_assets.configs import RefinementConfig
from boostqa_assets.llm.types import LLMResult
from boostqa_assets.logic.refine import (
    ANSWER_SCHEMA,
    AnswerReply,
    assemble,
    build_requests,
    detect_script,
    length_outlier_mask,
    looks_truncated,
    rule_flags,
    stage,
)
from boostqa_assets.records import REFINED_SCHEMA, REJECT_SCHEMA, SYNTHESIZED_SCHEMA, frame

CFG = RefinementConfig(min_answer_chars=5, max_answer_chars=200)
EN_Q = "What is the boiling point of water at sea level?"
ZH_Q = "水在海平面上的沸点是多少摄氏度？"


@pytest.mark.parametrize(
    ("question", "answer", "finish_reason", "flags"),
    [
        pytest.param(EN_Q, "Water boils at 100 degrees Celsius at sea level.", "stop", [], id="clean"),
        pytest.param(ZH_Q, "水在海平面上的沸点是一百摄氏度。", "stop", [], id="clean-zh"),
        pytest.param(EN_Q, "", "stop", ["empty"], id="empty"),
        pytest.param(EN_Q, "   \n\t ", "stop", ["empty"], id="whitespace-only"),
        pytest.param(EN_Q, "I'm sorry, but I cannot help with that.", "stop", ["refusal"], id="refusal-sorry"),
        pytest.param(EN_Q, "I am unable to determine this.", "stop", ["refusal"], id="refusal-unable"),
        pytest.param(EN_Q, "As an AI language model, I think it is 100 C.", "stop", ["refusal"], id="refusal-ai"),
        pytest.param(EN_Q, "i can't answer questions about water.", "stop", ["refusal"], id="refusal-case"),
        pytest.param(EN_Q, "I will not answer that here.", "stop", ["refusal"], id="refusal-will-not"),
        pytest.param(EN_Q, "Sorry-free answer: water boils at 100 C.", "stop", [], id="sorry-is-not-refusal"),
        pytest.param(EN_Q, "Water boils at 100 degrees Celsius at", "length", ["truncated"], id="finish-length"),
        pytest.param(EN_Q, "Use this code:\n```python\nprint(100)\n", "stop", ["truncated"], id="open-fence"),
        pytest.param(EN_Q, "Use this code:\n```python\nprint(100)\n```", "stop", [], id="closed-fence"),
        pytest.param(EN_Q, "It is f(g(h(x", "stop", ["truncated"], id="open-brackets"),
        pytest.param(EN_Q, "It is f(x)", "stop", [], id="balanced-brackets"),
        pytest.param(EN_Q, "100", "stop", ["too_short"], id="too-short"),
        pytest.param(EN_Q, "Water boils at 100 C. " * 20, "stop", ["too_long"], id="too-long"),
        pytest.param(ZH_Q, "Water boils at 100 degrees Celsius.", "stop", ["language_mismatch"], id="zh-q-en-a"),
        pytest.param(EN_Q, "水在海平面上的沸点是一百摄氏度。", "stop", ["language_mismatch"], id="en-q-zh-a"),
        pytest.param(EN_Q, "100 °C = 212 °F", "stop", [], id="no-letters-is-unknown-script"),
        pytest.param(EN_Q, "I'm sorry ```", "length", ["refusal", "truncated"], id="several-flags"),
    ],
)
def test_rule_flags(question: str, answer: str, finish_reason: str | None, flags: list[str]) -> None:
    assert rule_flags(question, answer, finish_reason, CFG) == flags


def test_language_check_can_be_switched_off() -> None:
    cfg = CFG.model_copy(update={"check_language": False})
    assert rule_flags(ZH_Q, "Water boils at 100 degrees Celsius.", "stop", cfg) == []


def test_custom_refusal_patterns() -> None:
    cfg = CFG.model_copy(update={"refusal_patterns": [r"\bno comment\b"]})
    assert rule_flags(EN_Q, "No comment on boiling water.", "stop", cfg) == ["refusal"]
    assert rule_flags(EN_Q, "I'm sorry, water boils at 100 C.", "stop", cfg) == []


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("Hello world", "en"),
        ("你好，世界", "zh"),
        ("ok", "unknown"),
        ("12345 !!", "unknown"),
        ("DNA 是遗传物质", "zh"),
        ("The character 水 means water", "en"),
    ],
)
def test_detect_script(text: str, script: str) -> None:
    assert detect_script(text) == script


def test_looks_truncated() -> None:
    assert looks_truncated("```x")
    assert not looks_truncated("```x``` and ```y```")
    assert looks_truncated("[[1, 2")
    assert not looks_truncated("[1, 2")  # one open bracket is common in prose (e.g. a range "[0, 1)")


# --- length outliers -----------------------------------------------------------------------------------


def test_no_outliers_below_min_rows() -> None:
    assert length_outlier_mask([10, 10, 10, 5000], k=3.0, min_rows=8) == [False] * 4
    assert length_outlier_mask([], k=3.0, min_rows=8) == []


def test_a_much_longer_answer_is_an_outlier() -> None:
    lengths = [100, 104, 98, 120, 90, 110, 101, 5000, 95, 99]
    mask = length_outlier_mask(lengths, k=3.0, min_rows=8)
    assert mask == [length == 5000 for length in lengths]


def test_identical_lengths_have_no_outliers() -> None:
    assert not any(length_outlier_mask([50] * 20, k=3.0, min_rows=8))


def test_short_answers_are_never_length_outliers() -> None:
    lengths = [100, 104, 98, 120, 90, 110, 101, 1, 95, 99]
    assert not any(length_outlier_mask(lengths, k=3.0, min_rows=8))


# --- requests and assembly -----------------------------------------------------------------------------


def qa_row(i: int, question: str = EN_Q, answer: str = "Draft answer about boiling.") -> dict[str, Any]:
    return {
        "qa_id": f"q{i:03d}",
        "seed_id": f"s{i:03d}",
        "source": "src",
        "discipline": "physics",
        "category": "stem",
        "grade": "high",
        "difficulty": "medium",
        "seed_grade": "high",
        "seed_difficulty": "medium",
        "track": "multi_grade",
        "language": "en",
        "question": question,
        "answer": answer,
        "reasoning": "r",
        "annotate_request_hash": "ah",
        "synth_model": "sm",
        "synth_prompt_id": "synthesize_multi_grade",
        "synth_prompt_version": "v1",
        "synth_request_hash": f"sh{i}",
    }


def result(qa_id: str, answer: str, finish_reason: str = "stop") -> LLMResult:
    return LLMResult(
        key=qa_id,
        prompt_id="refine",
        prompt_version="v1",
        model="refiner-model",
        request_hash=f"rh_{qa_id}",
        ok=True,
        value=AnswerReply(answer=answer),
        content=json.dumps({"answer": answer}),
        finish_reason=finish_reason,
    )


def test_build_requests() -> None:
    qa = frame([qa_row(1, question="What  is\nheat?", answer="energy   in\ttransit " * 5)], SYNTHESIZED_SCHEMA)
    [req] = build_requests(qa, max_chars=30)
    assert (req.key, req.prompt_id, req.prompt_version) == ("q001", "refine", "v2")
    assert "\nLanguage: English\n" in req.prompt  # the row's language, named for the model
    assert req.prefill == '{"answer": "'
    assert req.schema == ANSWER_SCHEMA
    assert "\nQuestion: What is heat?\n" in req.prompt
    assert "\nDraft answer: energy in transit energy in tr\n" in req.prompt
    assert "for a high level student" in req.prompt


def test_assemble_routes_flagged_rows_to_rejects() -> None:
    rows = [qa_row(i) for i in range(10)]
    qa = frame(rows, SYNTHESIZED_SCHEMA)
    normal = "Water boils at 100 degrees Celsius at sea level."
    answers = {f"q{i:03d}": normal for i in range(10)}
    answers["q001"] = "I'm sorry, I cannot help with that request."
    answers["q002"] = normal[:20]
    answers["q003"] = ("Water boils at 100 degrees Celsius at sea level, because " * 3)[:180]
    results = [result(k, v, "length" if k == "q002" else "stop") for k, v in answers.items() if k != "q004"]
    results.append(
        LLMResult(
            key="q004",
            prompt_id="refine",
            prompt_version="v1",
            model="refiner-model",
            request_hash="rh_q004",
            ok=False,
            error="schema_mismatch",
            detail="answer: missing",
            raw_output='{"text": "x"}',
        )
    )
    kept, rejects = assemble(qa, results, CFG, "physics|high")
    assert kept.schema == REFINED_SCHEMA and rejects.schema == REJECT_SCHEMA

    rej = {r["qa_id"]: r for r in rejects.to_dicts()}
    assert set(rej) == {"q001", "q002", "q003", "q004"}
    assert (rej["q001"]["reason"], rej["q001"]["detail"]) == ("refusal", "flags: refusal")
    assert (rej["q002"]["reason"], rej["q002"]["detail"]) == ("truncated", "flags: truncated")
    assert (rej["q003"]["reason"], rej["q003"]["detail"]) == ("length_outlier", "flags: length_outlier")
    assert (rej["q004"]["reason"], rej["q004"]["raw_output"]) == ("schema_mismatch", '{"text": "x"}')
    for r in rej.values():
        assert r["stage"] == "refined_qa" and r["partition"] == "physics|high"
        assert r["request_hash"] == f"rh_{r['qa_id']}"
        assert json.loads(r["record"])["qa_id"] == r["qa_id"]

    assert sorted(kept["qa_id"].to_list()) == ["q000", "q005", "q006", "q007", "q008", "q009"]
    assert set(kept["status"]) == {"kept"}
    row = kept.filter(pl.col("qa_id") == "q005").to_dicts()[0]
    assert row["refined_answer"] == normal
    assert row["answer"] == "Draft answer about boiling."  # the draft is kept for lineage
    assert row["flags"] == []
    assert (
        row["refine_model"],
        row["refine_prompt_id"],
        row["refine_prompt_version"],
        row["refine_request_hash"],
    ) == ("refiner-model", "refine", "v1", "rh_q005")
    assert row["synth_request_hash"] == "sh5"


def test_assemble_keeps_non_blocking_flags_on_the_row() -> None:
    cfg = CFG.model_copy(update={"reject_flags": ["refusal"]})
    qa = frame([qa_row(0, question=ZH_Q)], SYNTHESIZED_SCHEMA)
    kept, rejects = assemble(qa, [result("q000", "Water boils at 100 C.")], cfg, "physics|high")
    assert rejects.height == 0
    assert kept["flags"].to_list() == [["language_mismatch"]]


def test_stage_detects_the_question_only_when_synthesis_did_not() -> None:
    # A French question with an English answer: the same script, so only the language model tells them apart.
    fr_q = "Quelle est la température d'ébullition de l'eau au niveau de la mer ?"
    answer = "Water boils at 100 degrees Celsius at sea level."
    qa = frame([qa_row(0, question=fr_q)], SYNTHESIZED_SCHEMA)
    stats: list[list[dict[str, Any]]] = []
    staged, _ = stage(qa, [result("q000", answer)], CFG, "physics|high", language_stats=stats)
    assert staged["flags"].to_list() == [["language_mismatch"]]
    assert stats == [[{"language": "en", "checked": 1, "language_mismatch": 1, "mismatch_rate": 1.0}]]
    # Synthesis's gate checked the question already: only the refined answer is detected here.
    stats = []
    staged, _ = stage(qa, [result("q000", answer)], CFG, "physics|high", language_stats=stats, question_checked=True)
    assert staged["flags"].to_list() == [[]]
    assert stats == [[{"language": "en", "checked": 1, "language_mismatch": 0, "mismatch_rate": 0.0}]]
    # ...and a refined answer in another language is still caught.
    staged, _ = stage(
        qa,
        [result("q000", "L'eau bout à cent degrés au niveau de la mer.")],
        CFG,
        "physics|high",
        question_checked=True,
    )
    assert staged["flags"].to_list() == [["language_mismatch"]]


def test_assemble_reports_every_flag_in_the_detail() -> None:
    qa = frame([qa_row(0)], SYNTHESIZED_SCHEMA)
    _, rejects = assemble(qa, [result("q000", "I'm sorry ```", "length")], CFG, "physics|high")
    [rej] = rejects.to_dicts()
    assert (rej["reason"], rej["detail"]) == ("refusal", "flags: refusal, truncated")


def test_assemble_missing_result_and_empty_input() -> None:
    qa = frame([qa_row(0)], SYNTHESIZED_SCHEMA)
    kept, rejects = assemble(qa, [], CFG, "physics|high")
    assert kept.height == 0
    assert rejects["reason"].to_list() == ["no_result"]
    kept, rejects = assemble(frame([], SYNTHESIZED_SCHEMA), [], CFG, "physics|high")
    assert (kept.height, rejects.height) == (0, 0)
    assert kept.schema == REFINED_SCHEMA and rejects.schema == REJECT_SCHEMA
