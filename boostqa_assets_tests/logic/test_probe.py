"""Tests for boostqa_assets.logic.probe (normalization, matching, Wilson interval, sampling, grading,
aggregation, the cell check) and logic.heatmap; golden renderings of the probe and judge prompts.

Regenerate the golden files only for a deliberate change (a new template version):

    BOOSTQA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest boostqa_assets_tests/logic/test_probe.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from boostqa_assets import prompting
from boostqa_assets.configs import ProbeConfig, TaxonomyConfig, load_config
from boostqa_assets.llm.types import LLMResult
from boostqa_assets.logic import probe
from boostqa_assets.logic.heatmap import HeatmapPanel, png_markdown, render_heatmaps
from boostqa_assets.records import ANNOTATED_SCHEMA, PROBE_CELL_SCHEMA, PROBE_ITEM_SCHEMA, frame
from boostqa_assets.settings import DEFAULT_CONFIG_DIR
from boostqa_assets.storage import Store

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("BOOSTQA_UPDATE_GOLDEN", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def taxonomy() -> TaxonomyConfig:
    tax = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(tax, TaxonomyConfig)
    return tax


# --- normalization and matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower.", "eiffel tower"),
        ("  an   Apple, a day!  ", "apple day"),
        ("PARIS", "paris"),
        ("1,000", "1000"),
        ("1,000,000 people", "1000000 people"),
        ("5.0", "5"),
        ("3.50 m/s", "3.5 m s"),
        ("0.0", "0"),
        ("-0", "0"),
        ("-12.5", "-12.5"),
        ("x = -3", "x -3"),
        ("1-2", "1 2"),
        (".5", "0.5"),
        ("Five", "5"),
        ("twenty apples", "20 apples"),
        ("ninety", "90"),
        ("5 m/s^2", "5 m s 2"),
        ("Ｈｅｌｌｏ", "hello"),  # NFKC: full-width letters
        ("Na⁺", "na"),  # NFKC: the superscript plus is punctuation
        ("x²", "x2"),  # NFKC turns the superscript into a digit inside the word
        ("", ""),
        (None, ""),
        ("—", ""),
        ("the", ""),
        ("l'eau", "l eau"),
        ("mitochondria_dna", "mitochondria dna"),
    ],
)
def test_normalize_answer(text: str | None, expected: str) -> None:
    assert probe.normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("reply", "reference", "expected"),
    [
        ("Paris", "paris", True),
        ("Paris.", "The city of Paris", False),  # the reference is longer than the reply
        ("It is Paris.", "Paris", True),  # contained as whole words in a short reply
        ("Parisian food", "Paris", False),  # not a whole word
        ("5", "five", True),
        ("5.0 m/s^2", "5 m/s^2", True),
        ("1,000", "1000", True),
        ("10", "1", False),
        ("The answer is 12", "12", True),
        ("12 or 13 or 14 or 15 or 16 or 17 or 18 or 19 or 20", "12", False),  # too long to count as a match
        ("William Shakespeare", "Shakespeare", True),
        ("Shakespeare", "William Shakespeare", False),
        ("", "Paris", False),
        ("Paris", "", False),
        ("Paris", None, False),
        ("carbon dioxide", "Carbon Dioxide (CO2)", False),
    ],
)
def test_normalized_match(reply: str, reference: str | None, expected: bool) -> None:
    assert probe.normalized_match(reply, reference) is expected


def test_normalized_match_reply_length_bound() -> None:
    reply = "well " * 11 + "Paris"  # 12 normalized words
    assert probe.normalized_match(reply, "Paris")
    assert not probe.normalized_match("well " + reply, "Paris")
    assert probe.normalized_match("well " + reply, "Paris", max_reply_words=13)


@pytest.mark.parametrize(
    ("reference", "kind", "mode", "expected"),
    [
        ("Paris", "qa", "auto", "normalized"),
        ("one two three four five six", "qa", "auto", "normalized"),
        ("one two three four five six seven", "qa", "auto", "judge"),
        ("return a + b", "problem", "auto", "judge"),  # problems have free-form solutions
        ("one two three four five six seven", "qa", "normalized", "normalized"),
        ("Paris", "qa", "judge", "judge"),
    ],
)
def test_grading_method(reference: str, kind: str, mode: str, expected: str) -> None:
    assert probe.grading_method(reference, kind, mode, short_answer_max_words=6) == expected


# --- Wilson interval ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "confidence", "low", "high"),
    [
        (8, 10, 0.95, 0.4902, 0.9433),
        (0, 10, 0.95, 0.0, 0.2775),
        (10, 10, 0.95, 0.7225, 1.0),
        (5, 10, 0.95, 0.2366, 0.7634),
        (1, 1, 0.95, 0.2065, 1.0),
        (50, 100, 0.95, 0.4038, 0.5962),
        (8, 10, 0.90, 0.5408, 0.9314),
        (8, 10, 0.99, 0.4008, 0.9599),
    ],
)
def test_wilson_interval_known_values(k: int, n: int, confidence: float, low: float, high: float) -> None:
    lo, hi = probe.wilson_interval(k, n, confidence)
    assert lo == pytest.approx(low, abs=5e-4)
    assert hi == pytest.approx(high, abs=5e-4)
    assert 0 <= lo <= k / n <= hi <= 1


def test_wilson_interval_narrows_with_n_and_widens_with_confidence() -> None:
    w = [hi - lo for lo, hi in (probe.wilson_interval(k, n) for k, n in ((4, 5), (40, 50), (400, 500)))]
    assert w[0] > w[1] > w[2]
    lo90, hi90 = probe.wilson_interval(8, 10, 0.9)
    lo99, hi99 = probe.wilson_interval(8, 10, 0.99)
    assert hi99 - lo99 > hi90 - lo90


@pytest.mark.parametrize(("k", "n", "c"), [(1, 0, 0.95), (-1, 5, 0.95), (6, 5, 0.95), (1, 5, 1.0), (1, 5, 0.0)])
def test_wilson_interval_rejects_bad_input(k: int, n: int, c: float) -> None:
    with pytest.raises(ValueError):
        probe.wilson_interval(k, n, c)


# --- sampling -------------------------------------------------------------------------------------------


def _seed(i: int, discipline: str = "physics", grade: str = "high", **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "seed_id": f"s_{i:04d}",
        "source": "src",
        "native_id": str(i),
        "kind": "qa",
        "language": "en",
        "question": f"Question {i}?",
        "answer": f"answer {i}",
        "text": None,
        "title": None,
        "url": None,
        "license": "x",
        "meta": "{}",
        "discipline": discipline,
        "category": "stem",
        "grade": grade,
        "difficulty": "medium",
        "annotation_status": "ok",
        "annotate_model": "m",
        "annotate_prompt_id": "annotate",
        "annotate_prompt_version": "v1",
        "annotate_request_hash": f"h{i}",
    }
    row.update(kw)
    return row


def _annotated(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return frame(rows, ANNOTATED_SCHEMA)


def test_candidates_need_a_question_and_a_reference_answer() -> None:
    rows = [
        _seed(1),
        _seed(2, question=None, kind="passage", text="a passage"),
        _seed(3, answer=None, kind="problem"),
        _seed(4, answer="  "),
        _seed(5, answer="—"),  # nothing left after normalization: no reference to grade against
        _seed(6, question="x" * 200),
        _seed(7, kind="problem", answer="return a + b"),
        _seed(8, grade="primary"),
        _seed(1),  # the same seed twice (e.g. read twice) counts once
    ]
    sample, cands = probe.stratified_sample(
        [_annotated(rows)], ProbeConfig(samples_per_cell=50, max_chars_in_prompt=100)
    )
    assert {cell: [r["seed_id"] for r in rs] for cell, rs in sample.items()} == {
        ("physics", "high"): ["s_0001", "s_0007"],
        ("physics", "primary"): ["s_0008"],
    }
    assert cands.counts == {("physics", "high"): 2, ("physics", "primary"): 1}
    assert (cands.without_reference, cands.too_long, cands.seeds_read) == (4, 1, 9)


def test_stratified_sample_caps_each_cell_deterministically() -> None:
    rows = [_seed(i) for i in range(30)] + [_seed(100 + i, discipline="history") for i in range(3)]
    cfg = ProbeConfig(samples_per_cell=5, seed=7)
    sample, cands = probe.stratified_sample([_annotated(rows)], cfg)
    assert {cell: len(rs) for cell, rs in sample.items()} == {("history", "high"): 3, ("physics", "high"): 5}
    assert cands.counts[("physics", "high")] == 30
    ids = [r["seed_id"] for r in sample[("physics", "high")]]
    assert ids == sorted(ids)
    assert ids == [r["seed_id"] for r in probe.sample_cell([_seed(i) for i in range(30)], 5, seed=7)]
    # Order-independent: a shuffled input gives the same sample.
    shuffled = _annotated(rows).sample(fraction=1.0, shuffle=True, seed=3)
    again, _ = probe.stratified_sample([shuffled], cfg)
    assert [r["seed_id"] for r in again[("physics", "high")]] == ids
    # Stable when unrelated seeds are added: a chosen seed stays chosen unless a new one outranks it.
    more, _ = probe.stratified_sample([_annotated(rows + [_seed(500 + i, grade="graduate") for i in range(9)])], cfg)
    assert [r["seed_id"] for r in more[("physics", "high")]] == ids
    # Another seed draws another sample.
    other, _ = probe.stratified_sample([_annotated(rows)], ProbeConfig(samples_per_cell=5, seed=8))
    assert [r["seed_id"] for r in other[("physics", "high")]] != ids


def test_stratified_sample_streams_and_keeps_only_a_cells_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read a few rows at a time, with far more candidates than the cap, the sample is the one drawn from all
    of them at once, and no cell ever holds more than a pruning margin over its cap."""
    rows = [_seed(i) for i in range(700)] + [_seed(1000 + i, discipline="history") for i in range(40)]
    cfg = ProbeConfig(samples_per_cell=4, seed=11)
    df = _annotated(rows).sample(fraction=1.0, shuffle=True, seed=5)
    held: list[int] = []
    real_nsmallest = probe.heapq.nsmallest

    def spy(n: int, items: Any, key: Any = None) -> list[Any]:
        items = list(items)
        held.append(len(items))
        return real_nsmallest(n, items, key=key)

    monkeypatch.setattr(probe.heapq, "nsmallest", spy)
    streamed, cands = probe.stratified_sample((df.slice(i, 7) for i in range(0, df.height, 7)), cfg)
    monkeypatch.undo()
    whole, _ = probe.stratified_sample([_annotated(rows)], cfg)
    assert streamed == whole
    expected = probe.sample_cell([_seed(i) for i in range(700)], 4, seed=11)
    assert [r["seed_id"] for r in streamed[("physics", "high")]] == [r["seed_id"] for r in expected]
    assert cands.counts == {("history", "high"): 40, ("physics", "high"): 700} and cands.seeds_read == 740
    assert held and max(held) <= 2 * 4 + 64  # pruned as it went: never the 700 candidates at once


def test_sample_is_the_lowest_hashes() -> None:
    rows = [_seed(i) for i in range(20)]
    chosen = probe.sample_cell(rows, 4, seed=0)
    ranked = sorted(rows, key=lambda r: probe.stable_hash("0", r["seed_id"]))
    assert {r["seed_id"] for r in chosen} == {r["seed_id"] for r in ranked[:4]}


# --- requests and validators ----------------------------------------------------------------------------


def test_probe_requests_one_line_per_question() -> None:
    sample = {("physics", "high"): [_seed(1, question="What is\n the   speed\tof light?"), _seed(2)]}
    reqs = probe.build_probe_requests(sample, max_chars=1000)
    assert [r.key for r in reqs] == ["s_0001", "s_0002"]
    assert reqs[0].prompt.endswith("Question: What is the speed of light?\nAnswer:")
    assert (reqs[0].prompt_id, reqs[0].prompt_version, reqs[0].schema) == ("probe", "v1", None)


def test_judge_request_has_the_verdict_schema() -> None:
    req = probe.build_judge_request("k", "Q?", "the\nreference", "a reply", max_chars=1000)
    assert req.schema == probe.VERDICT_SCHEMA
    assert req.schema["properties"]["verdict"]["enum"] == ["correct", "incorrect"]
    assert req.prompt.endswith("Question: Q?\nReference: the reference\nReply: a reply\nJSON:")
    long = probe.build_judge_request("k", "Q?", "r" * 500, "a", max_chars=100)
    assert "Reference: " + "r" * 97 + "...\n" in long.prompt


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" Paris\n", "Paris"), ("\n\n Paris \nLondon", "Paris"), ("", ""), ("  \n ", "")],
)
def test_validate_reply(text: str, expected: str) -> None:
    assert probe.validate_reply(text) == expected


def test_validate_reply_needs_text() -> None:
    with pytest.raises(ValueError, match="expected text"):
        probe.validate_reply({"answer": "x"})


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"verdict": "correct"}, True),
        ({"verdict": "incorrect"}, False),
        ({"verdict": " Correct "}, True),
        ({"verdict": "INCORRECT", "why": "ignored"}, False),
    ],
)
def test_validate_verdict(obj: dict[str, Any], expected: bool) -> None:
    assert probe.validate_verdict(obj) is expected


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"verdict": "maybe"}, "verdict 'maybe' is not one of"),
        ({"answer": "correct"}, "verdict"),
        ({"verdict": True}, "verdict"),
        ("correct", "expected a JSON object, got str"),
        (None, "expected a JSON object, got NoneType"),
    ],
)
def test_validate_verdict_rejects(obj: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        probe.validate_verdict(obj)


# --- grading and aggregation ----------------------------------------------------------------------------


def _result(key: str, value: Any = None, ok: bool = True, error: str | None = None, pid: str = "probe") -> LLMResult:
    return LLMResult(
        key=key,
        prompt_id=pid,
        prompt_version="v1",
        model="target",
        request_hash="rh_" + pid + "_" + key,
        ok=ok,
        value=value,
        error=error,
        detail="" if ok else f"{error} detail",
        raw_output=None if ok else "raw",
    )


def test_grade_replies_and_verdicts() -> None:
    long_ref = "Supply equals demand where the two curves cross on the chart."
    sample = {
        ("physics", "high"): [
            _seed(1, answer="Paris"),
            _seed(2, answer="Paris"),
            _seed(3, answer="Paris"),
            _seed(4, answer="Paris"),
            _seed(5, answer=long_ref),
            _seed(6, answer=long_ref),
            _seed(7, answer="return a + b", kind="problem"),
        ]
    }
    results = [
        _result("s_0001", "It is Paris."),
        _result("s_0002", "London"),
        _result("s_0003", ""),
        _result("s_0004", ok=False, error="budget_exhausted"),
        _result("s_0005", "They meet."),
        _result("s_0006", "Where the curves cross."),
        _result("s_0007", "a + b"),
    ]
    cfg = ProbeConfig(min_samples=3)
    graded = probe.grade_replies(sample, results, cfg)
    assert [r.key for r in graded.judge_requests] == ["s_0005", "s_0006", "s_0007"]
    assert [r["reason"] for r in graded.rejects] == ["budget_exhausted"]
    assert graded.rejects[0]["raw_output"] == "raw" and graded.rejects[0]["request_hash"] == "rh_probe_s_0004"
    verdicts = [
        _result("s_0005", False, pid="judge"),
        _result("s_0006", True, pid="judge"),
        _result("s_0007", ok=False, error="schema_mismatch", pid="judge"),
    ]
    graded = probe.apply_verdicts(graded, verdicts)
    items = probe.items_frame(graded)
    assert items.schema == PROBE_ITEM_SCHEMA
    got = {r["seed_id"]: (r["method"], r["correct"], r["judge_request_hash"]) for r in items.iter_rows(named=True)}
    assert got == {
        "s_0001": ("normalized", True, None),
        "s_0002": ("normalized", False, None),
        "s_0003": ("empty", False, None),
        "s_0004": ("not_graded", None, None),
        "s_0005": ("judge", False, "rh_judge_s_0005"),
        "s_0006": ("judge", True, "rh_judge_s_0006"),
        "s_0007": ("not_graded", None, "rh_judge_s_0007"),
    }
    assert [r["reason"] for r in graded.rejects] == ["budget_exhausted", "judge_schema_mismatch"]
    assert probe.rejects_frame(graded).height == 2
    assert items.filter(pl.col("seed_id") == "s_0004")["reply"].to_list() == [None]
    assert set(items["probe_request_hash"]) == {f"rh_probe_s_000{i}" for i in range(1, 8)}

    cells = probe.aggregate(items, cfg, {("physics", "high"): 9})
    assert cells.schema == PROBE_CELL_SCHEMA
    row = cells.row(0, named=True)
    assert (row["n_candidates"], row["n_sampled"], row["n_graded"], row["n_correct"]) == (9, 7, 5, 2)
    assert row["status"] == "ok" and row["accuracy"] == pytest.approx(0.4)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(probe.wilson_interval(2, 5, 0.95))
    assert json.loads(row["grading"]) == {"empty": 1, "judge": 2, "normalized": 2}
    assert probe.validate_cells(cells, cfg.min_samples).passed
    assert probe.items_match_cells(items, cells).passed


def _items(cell_results: dict[tuple[str, str], list[bool | None]]) -> pl.DataFrame:
    rows = []
    for (d, g), results in cell_results.items():
        for i, correct in enumerate(results):
            rows.append(
                {
                    "seed_id": f"{d}{g}{i}",
                    "source": "s",
                    "discipline": d,
                    "grade": g,
                    "question": "q",
                    "reference": "r",
                    "reply": None if correct is None else "x",
                    "method": "not_graded" if correct is None else "normalized",
                    "correct": correct,
                    "probe_model": "m",
                    "probe_prompt_id": "probe",
                    "probe_prompt_version": "v1",
                    "probe_request_hash": "h",
                    "judge_request_hash": None,
                }
            )
    return frame(rows, PROBE_ITEM_SCHEMA)


def test_insufficient_cells_report_no_number() -> None:
    items = _items(
        {
            ("physics", "high"): [True] * 8 + [False] * 2,
            ("history", "high"): [True, True, None, None, None, None],  # 6 sampled, 2 graded
            ("biology", "primary"): [False] * 5,
        }
    )
    cfg = ProbeConfig(min_samples=5)
    cells = probe.aggregate(items, cfg, cells=[("biology", "primary"), ("history", "high"), ("physics", "high")])
    by = {(r["discipline"], r["grade"]): r for r in cells.iter_rows(named=True)}
    hist = by[("history", "high")]
    assert hist["status"] == "insufficient_samples"
    assert (hist["accuracy"], hist["ci_low"], hist["ci_high"]) == (None, None, None)
    assert (hist["n_sampled"], hist["n_graded"], hist["n_correct"]) == (6, 2, 2)
    phys = by[("physics", "high")]
    assert phys["status"] == "ok" and phys["accuracy"] == pytest.approx(0.8)
    assert (phys["ci_low"], phys["ci_high"]) == pytest.approx((0.4902, 0.9433), abs=5e-4)
    bio = by[("biology", "primary")]
    assert (bio["status"], bio["accuracy"], bio["ci_low"]) == ("ok", 0.0, 0.0)
    assert probe.overall_accuracy(cells) == pytest.approx(10 / 17)
    assert probe.validate_cells(cells, 5).passed


def test_listed_cells_without_items_have_no_candidates() -> None:
    items = _items({("physics", "high"): [True] * 5})
    cells = probe.aggregate(items, ProbeConfig(min_samples=5), cells=[("physics", "high"), ("law", "graduate")])
    law = cells.filter(pl.col("discipline") == "law").row(0, named=True)
    assert (law["status"], law["n_sampled"], law["accuracy"], law["grading"]) == ("no_candidates", 0, None, "{}")
    assert probe.validate_cells(cells, 5).passed


def test_overall_accuracy_none_without_graded_replies() -> None:
    assert probe.overall_accuracy(pl.DataFrame(schema=PROBE_CELL_SCHEMA)) is None
    cells = probe.aggregate(_items({("physics", "high"): [None, None]}), ProbeConfig())
    assert probe.overall_accuracy(cells) is None


# --- the cell check -------------------------------------------------------------------------------------


def _good_cells() -> pl.DataFrame:
    items = _items({("physics", "high"): [True] * 8 + [False] * 2, ("history", "high"): [True, None]})
    return probe.aggregate(items, ProbeConfig(min_samples=5))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"accuracy": 1.5, "ci_high": 1.6}, "accuracy_outside_0_1"),
        ({"ci_low": 0.85}, "accuracy_outside_interval"),
        ({"ci_high": 0.7}, "accuracy_outside_interval"),
        ({"accuracy": 0.7}, "accuracy_not_n_correct_over_n_graded"),
        ({"n_correct": 11}, "counts_out_of_order"),
        ({"n_graded": 11}, "counts_out_of_order"),
        ({"n_sampled": 12}, "counts_out_of_order"),
        ({"status": "insufficient_samples"}, "status_insufficient_samples_expected_ok"),
        ({"accuracy": None}, "ok_without_accuracy"),
        ({"grading": "not json"}, "grading_not_json"),
        ({"grading": '{"normalized": 3}'}, "grading_counts_not_n_graded"),
        ({"discipline": "astrology"}, "cell_outside_taxonomy"),
        ({"discipline": "history"}, "duplicate_cell"),
    ],
)
def test_validate_cells_catches(taxonomy: TaxonomyConfig, change: dict[str, Any], problem: str) -> None:
    cells = _good_cells()
    assert probe.validate_cells(cells, 5, taxonomy).passed
    bad = cells.with_columns(
        [
            pl.when(pl.col("discipline") == "physics")
            .then(pl.lit(v))
            .otherwise(pl.col(k))
            .cast(cells.schema[k])
            .alias(k)
            for k, v in change.items()
        ]
    )
    outcome = probe.validate_cells(bad, 5, taxonomy)
    assert not outcome.passed
    assert problem in outcome.metadata["problems"]


def test_validate_cells_insufficient_with_a_number_fails() -> None:
    cells = _good_cells().with_columns(
        pl.when(pl.col("discipline") == "history").then(1.0).otherwise(pl.col("accuracy")).alias("accuracy")
    )
    outcome = probe.validate_cells(cells, 5)
    assert not outcome.passed and "number_without_enough_samples" in outcome.metadata["problems"]
    # min_samples changed since the run: the status no longer fits.
    outcome = probe.validate_cells(_good_cells(), 11)
    assert not outcome.passed and "status_ok_expected_insufficient_samples" in outcome.metadata["problems"]


def test_validate_cells_schema_and_empty() -> None:
    assert probe.validate_cells(pl.DataFrame(schema=PROBE_CELL_SCHEMA), 5).passed
    outcome = probe.validate_cells(_good_cells().drop("ci_low"), 5)
    assert not outcome.passed and outcome.metadata["missing_columns"] == "ci_low"


def test_items_match_cells_catches_a_mismatch() -> None:
    items = _items({("physics", "high"): [True] * 6})
    cells = probe.aggregate(items, ProbeConfig(min_samples=5))
    assert probe.items_match_cells(items, cells).passed
    outcome = probe.items_match_cells(items.head(5), cells)
    assert not outcome.passed and outcome.metadata["mismatched_cells"] == "physics|high"


# --- reading the cell table -----------------------------------------------------------------------------


def test_read_probe_cells(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert probe.read_probe_cells(store) is None  # never ran
    store.write_partition("deficiency_probe", {}, pl.DataFrame(schema=PROBE_CELL_SCHEMA))
    assert probe.read_probe_cells(store) is None  # ran, measured nothing (disabled)
    cells = _good_cells()
    path = store.write_partition("deficiency_probe", {}, cells)
    assert path == f"{tmp_path}/deficiency_probe"
    got = probe.read_probe_cells(store)
    assert got is not None and got.equals(cells) and got.schema == PROBE_CELL_SCHEMA


# --- heatmap --------------------------------------------------------------------------------------------


def test_render_heatmaps_full_taxonomy_is_a_small_png(taxonomy: TaxonomyConfig) -> None:
    cells = [(d, g) for d in taxonomy.discipline_names for g in taxonomy.grades]
    accuracy = {c: (i % 7) / 6 if i % 3 else None for i, c in enumerate(cells)}
    budget = {c: float(i) for i, c in enumerate(cells)}
    png = render_heatmaps(
        [
            HeatmapPanel("accuracy", accuracy, cmap="RdYlGn", vmin=0, vmax=1),
            HeatmapPanel("budget", budget, fmt="{:.0f}", cmap="Blues"),
        ],
        taxonomy.discipline_names,
        taxonomy.grades,
    )
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) < 150_000
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png))
    width, height = img.size
    assert width > height  # two panels side by side
    assert 400 < height < 900


def test_render_heatmaps_edge_cases() -> None:
    # Every value missing (all n/a), a constant panel, a key outside the grid (ignored), NaN as missing.
    one = render_heatmaps([HeatmapPanel("none", {})], ["physics"], ["high"])
    two = render_heatmaps(
        [HeatmapPanel("const", {("physics", "high"): 3.0, ("law", "x"): 1.0, ("physics", "low"): float("nan")})],
        ["physics"],
        ["high", "low"],
    )
    assert one.startswith(b"\x89PNG") and two.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="at least one panel"):
        render_heatmaps([], ["physics"], ["high"])


def test_png_markdown() -> None:
    md = png_markdown(b"\x89PNG\r\n\x1a\nabc", "acc [x]\nmap")
    assert md == "![acc (x) map](data:image/png;base64,iVBORw0KGgphYmM=)"
    assert md.endswith(")")


# --- prompts --------------------------------------------------------------------------------------------

GOLDEN_INPUTS: dict[str, dict[str, Any]] = {
    "probe": {"question": "What is the boiling point of water at sea level in degrees Celsius?"},
    "judge": {
        "question": "Why is the sky blue?",
        "reference": "Air molecules scatter blue sunlight more than red light (Rayleigh scattering).",
        "reply": "Because of Rayleigh scattering of blue light.",
    },
}


@pytest.mark.parametrize("prompt_id", ["probe", "judge"])
def test_golden_rendering(prompt_id: str) -> None:
    prompt = prompting.render(prompt_id, "v1", **GOLDEN_INPUTS[prompt_id])
    assert (prompt.prompt_id, prompt.version) == (prompt_id, "v1")
    assert prompting.versions(prompt_id) == ["v1"]
    golden = GOLDEN_DIR / f"{prompt_id}_v1.txt"
    if UPDATE:
        golden.write_text(prompt.text, encoding="utf-8")
    how = (
        "regenerate with: BOOSTQA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest boostqa_assets_tests/logic/test_probe.py "
        "(only for a deliberate change: released templates are never edited, add a new version instead)"
    )
    assert golden.is_file(), f"missing golden file {golden}; {how}"
    assert prompt.text == golden.read_text(encoding="utf-8"), f"{prompt_id} v1 no longer renders as {golden}; {how}"
    assert "{{" not in prompt.text and "{#" not in prompt.text


def test_prompt_cues() -> None:
    probe_text = prompting.render("probe", **GOLDEN_INPUTS["probe"]).text
    assert probe_text.endswith("Question: What is the boiling point of water at sea level in degrees Celsius?\nAnswer:")
    judge_text = prompting.render("judge", **GOLDEN_INPUTS["judge"]).text
    assert judge_text.endswith("Reply: Because of Rayleigh scattering of blue light.\nJSON:")
    # The few-shot examples answer on one line, and the judge's examples are valid verdicts.
    for line in judge_text.splitlines():
        if line.startswith("JSON: "):
            assert probe.validate_verdict(json.loads(line[6:])) in (True, False)
