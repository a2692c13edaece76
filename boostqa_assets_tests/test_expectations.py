"""The Great Expectations suites of ``boostqa_assets/expectations.py``: each passes on good rows and fails, with
the right numbers in its metadata, on planted bad rows."""

from __future__ import annotations

import time
from typing import Any

import polars as pl
import pytest

from boostqa_assets import expectations
from boostqa_assets.configs import TaxonomyConfig, load_config
from boostqa_assets.records import (
    ANNOTATED_SCHEMA,
    MIXTURE_SCHEMA,
    PLAN_SCHEMA,
    PROBE_CELL_SCHEMA,
    REFINED_SCHEMA,
    SEED_SCHEMA,
    SYNTHESIZED_SCHEMA,
    frame,
)
from boostqa_assets.settings import DEFAULT_CONFIG_DIR


@pytest.fixture(scope="module")
def tax() -> TaxonomyConfig:
    t = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(t, TaxonomyConfig)
    return t


def _seed(i: int) -> dict[str, Any]:
    return {
        "seed_id": f"s_{i:06d}",
        "source": "physics_qa",
        "native_id": str(i),
        "kind": "qa",
        "language": "en",
        "question": f"What is the net force on body {i}?",
        "answer": "Mass times acceleration.",
        "text": None,
        "title": None,
        "url": None,
        "license": "MIT",
        "meta": "{}",
    }


def _labels(tax: TaxonomyConfig) -> dict[str, str]:
    d = tax.discipline_names[0]
    return {"discipline": d, "category": tax.category_of(d), "grade": tax.grades[0], "difficulty": tax.difficulties[0]}


def _annotated(i: int, tax: TaxonomyConfig) -> dict[str, Any]:
    return (
        _seed(i)
        | _labels(tax)
        | {
            "annotation_status": "ok",
            "annotate_model": "m",
            "annotate_prompt_id": "annotate",
            "annotate_prompt_version": "1",
            "annotate_request_hash": "a" * 64,
        }
    )


def _synth(i: int, tax: TaxonomyConfig) -> dict[str, Any]:
    return _labels(tax) | {
        "qa_id": f"q_{i:06d}",
        "seed_id": f"s_{i:06d}",
        "source": "physics_qa",
        "seed_grade": tax.grades[0],
        "seed_difficulty": tax.difficulties[0],
        "track": "multi_grade",
        "language": "en",
        "question": f"Explain why a ball of mass {i} kg falls.",
        "answer": "Gravity pulls it down with force m g.",
        "reasoning": "think",
        "annotate_request_hash": "a" * 64,
        "synth_model": "m",
        "synth_prompt_id": "synth",
        "synth_prompt_version": "1",
        "synth_request_hash": "b" * 64,
    }


def _refined(i: int, tax: TaxonomyConfig) -> dict[str, Any]:
    return _synth(i, tax) | {
        "refined_answer": "Gravity pulls it down with a force of m times g.",
        "flags": [],
        "status": "kept",
        "refine_model": "m",
        "refine_prompt_id": "refine",
        "refine_prompt_version": "1",
        "refine_request_hash": "c" * 64,
    }


def _doc(i: int, tax: TaxonomyConfig) -> dict[str, Any]:
    lab = _labels(tax)
    return {
        "doc_id": f"d_{i:06d}",
        "recipe": "stem_heavy",
        "qa_id": f"q_{i:06d}",
        "seed_id": f"s_{i:06d}",
        "source": "physics_qa",
        "discipline": lab["discipline"],
        "category": lab["category"],
        "grade": lab["grade"],
        "track": "multi_grade",
        "text": f"Question: why does ball {i} fall?\nAnswer: gravity.",
        "n_tokens": 12,
        "shard": 0,
    }


def _cell_at(i: int, tax: TaxonomyConfig) -> tuple[str, str]:
    """The i-th discipline x grade cell of the taxonomy: distinct cells for distinct i."""
    return tax.discipline_names[i // len(tax.grades)], tax.grades[i % len(tax.grades)]


def _probe_cell(i: int, tax: TaxonomyConfig) -> dict[str, Any]:
    discipline, grade = _cell_at(i, tax)
    ok = i % 3 != 2  # every third cell has too few graded replies: null numbers
    return {
        "discipline": discipline,
        "grade": grade,
        "n_candidates": 40,
        "n_sampled": 20,
        "n_graded": 16 if ok else 3,
        "n_correct": 12 if ok else 1,
        "accuracy": 0.75 if ok else None,
        "ci_low": 0.5 if ok else None,
        "ci_high": 0.9 if ok else None,
        "status": "ok" if ok else "insufficient_samples",
        "grading": '{"normalized": 16}' if ok else '{"normalized": 3}',
    }


def _plan_cell(i: int, tax: TaxonomyConfig) -> dict[str, Any]:
    discipline, grade = _cell_at(i, tax)
    measured = i % 2 == 0
    return {
        "discipline": discipline,
        "grade": grade,
        "category": tax.category_of(discipline),
        "is_stem": tax.is_stem(discipline),
        "is_high_difficulty": False,
        "candidates": 10,
        "capacity": 40,
        "accuracy": 0.75 if measured else None,
        "ci_low": 0.5 if measured else None,
        "ci_high": 0.9 if measured else None,
        "probe_n": 16 if measured else 0,
        "probe_status": "ok" if measured else "not_probed",
        "static_weight": 1.5,
        "need": 0.25 if measured else 0.4,
        "weight": 0.375 if measured else 0.6,
        "basis": "probe" if measured else "probe_mean",
        "recipe": "stem_heavy",
        "budget": 12,
        "seed_ids": '["s_000001", "s_000002", "s_000003"]',
        "fingerprint": f"f{i:015d}",
    }


GOOD = {
    "seeds": (lambda i, tax: _seed(i), SEED_SCHEMA),
    "annotated_seeds": (_annotated, ANNOTATED_SCHEMA),
    "synthesized_qa": (_synth, SYNTHESIZED_SCHEMA),
    "refined_qa": (_refined, REFINED_SCHEMA),
    "qa_mixture": (_doc, MIXTURE_SCHEMA),
    "deficiency_probe": (_probe_cell, PROBE_CELL_SCHEMA),
    "synthesis_plan": (_plan_cell, PLAN_SCHEMA),
}


def _frame(asset: str, tax: TaxonomyConfig, n: int = 20) -> pl.DataFrame:
    make, schema = GOOD[asset]
    return frame([make(i, tax) for i in range(n)], schema)


@pytest.mark.parametrize("asset", list(GOOD))
def test_suite_passes_on_good_rows(asset: str, tax: TaxonomyConfig) -> None:
    outcome = expectations.validate(asset, _frame(asset, tax), tax)
    assert outcome.passed, outcome.metadata["gx_failed"]
    meta = outcome.metadata
    assert meta["rows"] == 20 and meta["gx_failed_expectations"] == 0 and meta["gx_success_percent"] == 100.0
    assert meta["gx_evaluated_expectations"] > 10
    numbers = {k: v for k, v in meta.items() if k.endswith("_unexpected")}
    assert numbers and all(v == 0 for v in numbers.values())
    assert all(isinstance(v, (str, int, float, bool)) for v in meta.values())


@pytest.mark.parametrize("asset", list(GOOD))
def test_empty_partition_passes(asset: str, tax: TaxonomyConfig) -> None:
    outcome = expectations.validate(asset, _frame(asset, tax).head(0), tax)
    assert outcome.passed and outcome.metadata["rows"] == 0


def test_refined_suite_counts_planted_bad_rows(tax: TaxonomyConfig) -> None:
    rows = [_refined(i, tax) for i in range(10)]
    rows[1]["question"] = None
    rows[2]["discipline"] = "astrology"
    rows[3]["qa_id"] = rows[4]["qa_id"]  # one duplicate pair: GX counts both rows
    rows[5]["refined_answer"] = "x" * 10_000
    rows[6]["status"] = "dropped"
    rows[7]["question"] = "Why?"  # 4 chars, under the 8-char minimum
    outcome = expectations.validate("refined_qa", frame(rows, REFINED_SCHEMA), tax)
    meta = outcome.metadata
    assert not outcome.passed
    assert meta["gx_not_null_question_unexpected"] == 1
    assert meta["gx_in_set_discipline_unexpected"] == 1
    assert meta["gx_unique_qa_id_unexpected"] == 2
    assert meta["gx_length_refined_answer_unexpected"] == 1
    assert meta["gx_in_set_status_unexpected"] == 1
    assert meta["gx_length_question_unexpected"] == 1
    assert meta["gx_not_null_answer_unexpected"] == 0 and meta["gx_in_set_grade_unexpected"] == 0
    assert meta["gx_failed_expectations"] == 6
    for name in ("not_null_question", "in_set_discipline", "unique_qa_id", "length_refined_answer"):
        assert name in meta["gx_failed"]
    assert meta["refined_answer_len_max"] == 10_000 and meta["refined_answer_len_p95"] == 10_000
    assert meta["gx_mean_refined_answer"] == meta["refined_answer_len_mean"] > 1000
    assert meta["question_len_p50"] > 8


def test_synthesized_suite_reports_long_drafts_and_flags_labels(tax: TaxonomyConfig) -> None:
    rows = [_synth(i, tax) for i in range(5)]
    rows[0]["answer"] = "y" * 10_000
    rows[1]["track"] = "sideways"
    rows[2]["seed_grade"] = "kindergarten"
    outcome = expectations.validate("synthesized_qa", frame(rows, SYNTHESIZED_SCHEMA), tax)
    meta = outcome.metadata
    assert not outcome.passed
    assert "gx_length_answer_unexpected" not in meta  # drafts' lengths are reported, refinement filters them
    assert meta["gx_in_set_track_unexpected"] == 1
    assert meta["gx_in_set_seed_grade_unexpected"] == 1
    assert meta["answer_len_max"] == 10_000


def test_mixture_suite_flags_zero_tokens_and_duplicates(tax: TaxonomyConfig) -> None:
    rows = [_doc(i, tax) for i in range(6)]
    rows[0]["n_tokens"] = 0
    rows[1]["doc_id"] = rows[2]["doc_id"]
    rows[3]["grade"] = "postdoc"
    outcome = expectations.validate("qa_mixture", frame(rows, MIXTURE_SCHEMA), tax)
    meta = outcome.metadata
    assert not outcome.passed
    assert meta["gx_between_n_tokens_unexpected"] == 1
    assert meta["gx_between_shard_unexpected"] == 0
    assert meta["gx_unique_doc_id_unexpected"] == 2 and meta["gx_unique_qa_id_unexpected"] == 0
    assert meta["gx_in_set_grade_unexpected"] == 1


def test_annotated_and_seed_suites_flag_labels_and_nulls(tax: TaxonomyConfig) -> None:
    rows = [_annotated(i, tax) for i in range(4)]
    rows[0]["discipline"] = "astrology"
    rows[1]["difficulty"] = "impossible"
    rows[2]["annotate_request_hash"] = None
    meta = expectations.validate("annotated_seeds", frame(rows, ANNOTATED_SCHEMA), tax).metadata
    assert meta["gx_in_set_discipline_unexpected"] == 1
    assert meta["gx_in_set_difficulty_unexpected"] == 1
    assert meta["gx_not_null_annotate_request_hash_unexpected"] == 1

    seeds = [_seed(i) for i in range(4)]
    seeds[0]["kind"] = "poem"
    seeds[1]["seed_id"] = seeds[2]["seed_id"]
    seeds[3]["license"] = None
    outcome = expectations.validate("seeds", frame(seeds, SEED_SCHEMA), tax)
    assert not outcome.passed
    meta = outcome.metadata
    assert meta["gx_in_set_kind_unexpected"] == 1
    assert meta["gx_unique_seed_id_unexpected"] == 2
    assert meta["gx_not_null_license_unexpected"] == 1


def test_probe_suite_flags_out_of_range_numbers_and_duplicate_cells(tax: TaxonomyConfig) -> None:
    rows = [_probe_cell(i, tax) for i in range(9)]
    rows[0]["accuracy"] = 1.25
    rows[1]["ci_high"] = 1.5
    rows[3]["n_correct"] = -1
    rows[4]["status"] = "unknown"
    rows[5]["discipline"] = "astrology"
    rows[7]["grade"] = rows[6]["grade"]  # the same discipline x grade twice: GX counts both rows
    rows[8]["grading"] = None
    outcome = expectations.validate("deficiency_probe", frame(rows, PROBE_CELL_SCHEMA), tax)
    meta = outcome.metadata
    assert not outcome.passed
    assert meta["gx_between_accuracy_unexpected"] == 1
    assert meta["gx_between_ci_high_unexpected"] == 1
    assert meta["gx_between_ci_low_unexpected"] == 0  # nulls (insufficient cells) are not out of range
    assert meta["gx_between_n_correct_unexpected"] == 1 and meta["gx_between_n_graded_unexpected"] == 0
    assert meta["gx_in_set_status_unexpected"] == 1
    assert meta["gx_in_set_discipline_unexpected"] == 1 and meta["gx_in_set_grade_unexpected"] == 0
    assert meta["gx_unique_discipline_grade_unexpected"] == 2
    assert meta["gx_not_null_grading_unexpected"] == 1 and meta["gx_not_null_status_unexpected"] == 0
    assert meta["gx_failed_expectations"] == 7
    for name in ("between_accuracy", "between_ci_high", "in_set_status", "unique_discipline_grade"):
        assert name in meta["gx_failed"]


def test_plan_suite_flags_need_weights_basis_and_budget(tax: TaxonomyConfig) -> None:
    rows = [_plan_cell(i, tax) for i in range(8)]
    rows[0]["need"] = 0.0  # need is in (0, 1]: a zero need would starve the cell
    rows[1]["need"] = 1.0  # the closed end: allowed
    rows[2]["weight"] = -0.5
    rows[3]["basis"] = "guess"
    rows[4]["budget"] = -3
    rows[5]["accuracy"] = -0.1
    rows[6]["grade"] = "postdoc"
    outcome = expectations.validate("synthesis_plan", frame(rows, PLAN_SCHEMA), tax)
    meta = outcome.metadata
    assert not outcome.passed
    assert meta["gx_between_need_unexpected"] == 1
    assert meta["gx_between_weight_unexpected"] == 1 and meta["gx_between_static_weight_unexpected"] == 0
    assert meta["gx_in_set_basis_unexpected"] == 1
    assert meta["gx_between_budget_unexpected"] == 1 and meta["gx_between_capacity_unexpected"] == 0
    assert meta["gx_between_accuracy_unexpected"] == 1
    assert meta["gx_in_set_grade_unexpected"] == 1
    assert meta["gx_unique_discipline_grade_unexpected"] == 0
    assert meta["gx_failed_expectations"] == 6


def test_plan_suite_passes_on_one_cell_partitions(tax: TaxonomyConfig) -> None:
    """The check validates one cell per partition; static and unbudgeted cells (need 1, no probe) pass."""
    for basis in ("static", "unbudgeted"):
        row = _plan_cell(1, tax) | {"basis": basis, "need": 1.0, "weight": 1.5, "probe_status": "not_probed"}
        outcome = expectations.validate("synthesis_plan", frame([row], PLAN_SCHEMA), tax)
        assert outcome.passed, outcome.metadata["gx_failed"]
        assert outcome.metadata["rows"] == 1


def test_schema_drift_fails(tax: TaxonomyConfig) -> None:
    df = _frame("refined_qa", tax).drop("status").with_columns(pl.lit(1).alias("extra"))
    outcome = expectations.validate("refined_qa", df, tax)
    assert not outcome.passed
    assert "columns" in outcome.metadata["gx_failed"]
    assert outcome.metadata["gx_not_null_status_unexpected"] == -1  # could not run: the column is missing


def test_timing_100k_rows(tax: TaxonomyConfig) -> None:
    """Not asserted: prints how long the refined_qa and mixture suites take on 100k rows."""
    for asset in ("refined_qa", "qa_mixture"):
        df = _frame(asset, tax, n=100_000)
        started = time.perf_counter()
        outcome = expectations.validate(asset, df, tax)
        total = time.perf_counter() - started
        print(
            f"\n{asset}: 100k rows, {outcome.metadata['gx_evaluated_expectations']} expectations, "
            f"GX {outcome.metadata['gx_seconds']:.2f} s, validate() {total:.2f} s"
        )
        assert outcome.passed


def test_suite_sees_an_even_sample_of_a_big_frame(tax: TaxonomyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past GX_SAMPLE_ROWS the suite validates every k-th row (bounded memory); the rows' own figures stay whole."""
    monkeypatch.setattr(expectations, "GX_SAMPLE_ROWS", 100)
    rows = [_refined(i, tax) for i in range(1000)]
    for i in range(0, 1000, 10):  # every 10th row is bad: an even sample must see them
        rows[i]["discipline"] = "astrology"
    rows[995]["refined_answer"] = "x" * 10_000
    outcome = expectations.validate("refined_qa", frame(rows, REFINED_SCHEMA), tax)
    meta = outcome.metadata
    assert meta["rows"] == 1000 and meta["gx_rows"] == 100
    assert meta["gx_in_set_discipline_unexpected"] == 100 and not outcome.passed
    assert meta["refined_answer_len_max"] == 10_000  # the length figures are the whole frame's
    sample = expectations.spread_sample(pl.DataFrame({"i": range(1001)}), 100)
    assert 90 <= sample.height <= 100 and sample["i"][0] == 0 and sample["i"][-1] > 900


def test_no_validated_frame_is_kept_once_its_suite_has_run(tax: TaxonomyConfig) -> None:
    """GX's engine would keep each asset's last batch (its pandas frame) for good: a one-process run carried
    one per asset into every later stage. After ``validate`` none of the frames it handed GX is alive."""
    import gc

    import pandas as pd

    def validated_frames_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, pd.DataFrame) and len(o) == 777)

    for asset, rows, schema in (
        ("seeds", [_seed(i) for i in range(777)], SEED_SCHEMA),
        ("refined_qa", [_refined(i, tax) for i in range(777)], REFINED_SCHEMA),
    ):
        assert expectations.validate(asset, frame(rows, schema), tax).passed
    assert validated_frames_alive() == 0


def test_mixture_check_reads_shard_by_shard_and_still_sees_every_row(
    tax: TaxonomyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qa_mixture_valid over three shards: duplicates across shards, orphans and the token total are exact (every
    row); a null in one shard names that shard; the suite sees a sample."""
    from boostqa_assets.defs.qa_mixture import mixture_outcome

    monkeypatch.setattr(expectations, "GX_SAMPLE_ROWS", 30)
    rows = [_doc(i, tax) for i in range(90)]
    seeds = pl.Series([r["seed_id"] for r in rows])

    def shards(docs: list[dict[str, Any]]) -> list[pl.DataFrame]:
        return [frame(docs[i : i + 30], MIXTURE_SCHEMA) for i in range(0, 90, 30)]

    good = mixture_outcome(iter(shards(rows)), 3, 90 * 12, 10_000, seeds, tax)
    assert good.passed, good.metadata
    assert good.metadata["rows"] == 90 and good.metadata["gx_rows"] == 30 and good.metadata["tokens"] == 1080

    dup = [dict(r) for r in rows]
    dup[75]["qa_id"] = dup[5]["qa_id"]  # shard 2 repeats a row of shard 0
    out = mixture_outcome(iter(shards(dup)), 3, 1080, 10_000, seeds, tax)
    assert not out.passed and out.metadata["duplicate_qa_id"] == 1

    orphan = [dict(r) for r in rows]
    orphan[50]["seed_id"] = "s_gone"
    out = mixture_outcome(iter(shards(orphan)), 3, 1080, 10_000, seeds, tax)
    assert not out.passed and out.metadata["orphan_seed_ids"] == 1

    assert not mixture_outcome(iter(shards(rows)), 3, 1000, 10_000, seeds, tax).passed  # manifest disagrees

    empty_text = [dict(r) for r in rows]
    empty_text[40]["text"] = "  "
    out = mixture_outcome(iter(shards(empty_text)), 3, 1080, 10_000, seeds, tax)
    assert not out.passed and out.metadata["failing_shard"] == 1
