"""Grade fidelity and difficulty degradation rules (no Dagster, no server)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from boostqa_assets.configs import TaxonomyConfig, load_config
from boostqa_assets.llm.types import LLMResult
from boostqa_assets.logic import fidelity
from boostqa_assets.logic.annotate import AnnotationReply
from boostqa_assets.records import SYNTHESIZED_SCHEMA, frame
from boostqa_assets.settings import DEFAULT_CONFIG_DIR

TAX = load_config("taxonomy.yaml", Path(DEFAULT_CONFIG_DIR))
assert isinstance(TAX, TaxonomyConfig)


def _row(qa_id: str, track: str, grade: str, seed_grade: str = "high", seed_difficulty: str = "hard") -> dict:
    return {c: "x" for c, t in SYNTHESIZED_SCHEMA.items() if t == pl.Utf8} | {
        "qa_id": qa_id,
        "track": track,
        "grade": grade,
        "discipline": "physics",
        "seed_grade": seed_grade,
        "seed_difficulty": seed_difficulty,
        "question": f"question {qa_id}",
        "check_grade": None,
        "check_difficulty": None,
        "check_request_hash": None,
    }


def _result(qa_id: str, grade: str, difficulty: str) -> LLMResult:
    return LLMResult(
        key=qa_id,
        prompt_id="annotate",
        prompt_version="v1",
        model="m",
        request_hash="h" * 64,
        ok=True,
        value=AnnotationReply(discipline="physics", grade=grade, difficulty=difficulty),
        raw_output=f'{{"grade": "{grade}"}}',
    )


def test_sample_takes_every_high_difficulty_row_and_a_stable_multi_grade_sample() -> None:
    rows = frame(
        [_row(f"q{i}", "multi_grade", "high") for i in range(10)] + [_row("h1", "high_difficulty", "graduate")],
        SYNTHESIZED_SCHEMA,
    )
    picked = fidelity.sample(rows, 3)
    assert "h1" in picked["qa_id"].to_list() and picked.height == 4
    assert set(fidelity.sample(rows.reverse(), 3)["qa_id"]) == set(picked["qa_id"])


def test_degraded_high_difficulty_rows_are_rejected_and_fidelity_is_counted() -> None:
    rows = frame(
        [
            _row("m1", "multi_grade", "high"),
            _row("m2", "multi_grade", "graduate"),
            _row("h1", "high_difficulty", "graduate"),
            _row("h2", "high_difficulty", "graduate"),
        ],
        SYNTHESIZED_SCHEMA,
    )
    results = [
        _result("m1", "high", "medium"),
        _result("m2", "undergraduate", "hard"),
        _result("h1", "graduate", "hard"),  # harder than its high/hard seed: kept
        _result("h2", "middle", "easy"),
    ]  # easier than its seed: degraded
    kept, rejects, checked = fidelity.apply(rows, results, TAX, "physics|graduate", drop_degraded=True)
    assert sorted(kept["qa_id"]) == ["h1", "m1", "m2"]
    assert rejects["reason"].to_list() == ["difficulty_degraded"] and rejects["qa_id"].to_list() == ["h2"]
    assert "middle/easy" in rejects["detail"][0] and rejects["raw_output"][0]
    assert kept.filter(pl.col("qa_id") == "m2")["check_grade"][0] == "undergraduate"
    table = fidelity.fidelity_table(checked)
    assert table == [
        {"discipline": "physics", "sampled": 4, "grade_matches": 2, "degraded": 1, "grade_match_rate": 0.5}
    ]
    kept_all, none, _ = fidelity.apply(rows, results, TAX, "physics|graduate", drop_degraded=False)
    assert kept_all.height == 4 and none.height == 0
