"""Tests for boostqa_assets.prompting and the reply validators: golden renderings, versions, fingerprints.

Golden files live in ``boostqa_assets_tests/golden/<prompt_id>_v1.txt``. A released template is never
edited, so a golden mismatch means a template (or its inputs) changed by accident. To accept a deliberate
change (a new template version, new fixed inputs), regenerate them:

    BOOSTQA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest boostqa_assets_tests/test_prompts.py
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
from pydantic import ValidationError

from boostqa_assets import prompting
from boostqa_assets.configs import TaxonomyConfig, load_config
from boostqa_assets.logic import annotate, refine, synthesize
from boostqa_assets.settings import DEFAULT_CONFIG_DIR, PROMPTS_DIR

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("BOOSTQA_UPDATE_GOLDEN", "").lower() in ("1", "true", "yes")
PROMPT_IDS = ["annotate", "refine", "synthesize_high_difficulty", "synthesize_multi_grade"]
# Every released version of each prompt has a golden file; v2 of the QA prompts names the QA's language.
SHIPPED = {
    "annotate": ["v1"],
    "refine": ["v1", "v2"],
    "synthesize_high_difficulty": ["v1", "v2"],
    "synthesize_multi_grade": ["v1", "v2"],
}
GOLDEN_CASES = [(pid, v) for pid, versions in SHIPPED.items() for v in versions]


@pytest.fixture(scope="module")
def taxonomy() -> TaxonomyConfig:
    tax = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(tax, TaxonomyConfig)
    return tax


def _golden_inputs(prompt_id: str) -> dict[str, Any]:
    tax = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(tax, TaxonomyConfig)
    return {
        "annotate": {
            "disciplines": tax.discipline_names,
            "grades": tax.grades,
            "difficulties": tax.difficulties,
            "item": "Why does ice float on liquid water?",
        },
        "synthesize_multi_grade": {
            "discipline": "earth_science",
            "grade": "middle",
            "grade_hint": synthesize.GRADE_HINTS["middle"],
            "seed": "Plate tectonics moves continents a few centimetres a year.",
            "variant": 0,
            "language": "English",
        },
        "synthesize_high_difficulty": {
            "discipline": "computer_science",
            "grade": "graduate",
            "grade_hint": synthesize.GRADE_HINTS["graduate"],
            "seed": "Sort a list of integers. Answer: use merge sort.",
            "variant": 2,
            "language": "Chinese",  # cross-lingual: an English seed, Chinese QA
        },
        "refine": {
            "grade": "high",
            "question": "What causes the seasons on Earth?",
            "answer": "the tilt i guess",
            "language": "English",
        },
    }[prompt_id]


@pytest.mark.parametrize(("prompt_id", "version"), GOLDEN_CASES)
def test_golden_rendering(prompt_id: str, version: str) -> None:
    prompt = prompting.render(prompt_id, version, **_golden_inputs(prompt_id))
    assert (prompt.prompt_id, prompt.version) == (prompt_id, version)
    golden = GOLDEN_DIR / f"{prompt_id}_{version}.txt"
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden.write_text(prompt.text, encoding="utf-8")
    how = (
        "regenerate with: BOOSTQA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest "
        "boostqa_assets_tests/test_prompts.py (only for a deliberate change: released templates are never "
        "edited, add a new version instead)"
    )
    assert golden.is_file(), f"missing golden file {golden}; {how}"
    expected = golden.read_text(encoding="utf-8")
    assert prompt.text == expected, f"{prompt_id} {version} no longer renders as {golden}; {how}"


def test_rendering_is_stripped_and_ends_with_the_json_cue() -> None:
    for pid in PROMPT_IDS:
        text = prompting.render(pid, **_golden_inputs(pid)).text
        assert text == text.strip()
        assert text.endswith("JSON:")
        assert "{#" not in text and "{{" not in text


def test_variant_marker_only_after_the_first_variant() -> None:
    base = _golden_inputs("synthesize_multi_grade")
    first = prompting.render("synthesize_multi_grade", **{**base, "variant": 0}).text
    third = prompting.render("synthesize_multi_grade", **{**base, "variant": 2}).text
    assert "(variant" not in first
    assert third.endswith("Level: middle (variant 3)\nLanguage: English\nJSON:")


def test_discipline_underscores_become_spaces() -> None:
    text = prompting.render("synthesize_multi_grade", **_golden_inputs("synthesize_multi_grade")).text
    assert "in earth science for a middle level student" in text


def test_missing_variable_is_an_error() -> None:
    with pytest.raises(jinja2.UndefinedError):
        prompting.render("refine", grade="high", question="q?")


def test_unknown_prompt_id() -> None:
    with pytest.raises(FileNotFoundError, match="no prompt templates for 'nope'"):
        prompting.render("nope")


# --- versions and fingerprints -------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_id", PROMPT_IDS)
def test_shipped_versions(prompt_id: str) -> None:
    assert prompting.versions(prompt_id) == SHIPPED[prompt_id]
    assert prompting.latest_version(prompt_id) == SHIPPED[prompt_id][-1]
    assert prompting.render(prompt_id, **_golden_inputs(prompt_id)).version == SHIPPED[prompt_id][-1]


@pytest.mark.parametrize("prompt_id", ["refine", "synthesize_high_difficulty", "synthesize_multi_grade"])
def test_v2_asks_for_the_language_with_examples_in_both(prompt_id: str) -> None:
    inputs = {**_golden_inputs(prompt_id), "language": "Chinese"}
    text = prompting.render(prompt_id, "v2", **inputs).text
    assert text.endswith("Language: Chinese\nJSON:") or "\nLanguage: Chinese\nDraft answer:" in text
    examples = text.split("\n\n")[1:-1]  # the few-shot examples between the instructions and the item
    assert {"Language: English", "Language: Chinese"} <= {ln for ex in examples for ln in ex.splitlines()}
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # a Chinese example, in Chinese
    # Short: the embedded model reads ~650 prompt tokens/s, so each prompt stays well under 2,000 characters.
    assert len(text) < 2000


def test_v2_without_a_language_is_an_error() -> None:
    with pytest.raises(jinja2.UndefinedError):
        prompting.render("refine", "v2", grade="high", question="q?", answer="a")


def test_fingerprint_is_stable_and_depends_on_the_prompt_ids() -> None:
    a = prompting.prompt_fingerprint("annotate")
    assert a == prompting.prompt_fingerprint("annotate")
    assert len(a) == 12
    assert a != prompting.prompt_fingerprint("refine")
    assert prompting.prompt_fingerprint("annotate", "refine") != prompting.prompt_fingerprint("refine", "annotate")


@pytest.fixture
def prompts_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the shipped prompts that prompting reads instead (versions, fingerprints and rendering)."""
    copy = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, copy)
    monkeypatch.setattr(prompting, "PROMPTS_DIR", copy)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(copy)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )
    monkeypatch.setattr(prompting, "_ENV", env)
    prompting._template.cache_clear()
    yield copy
    prompting._template.cache_clear()


def test_fingerprint_changes_when_a_template_changes(prompts_copy: Path) -> None:
    before = prompting.prompt_fingerprint("annotate", "refine")
    assert before == prompting.prompt_fingerprint("annotate", "refine")
    path = prompts_copy / "refine" / f"{prompting.latest_version('refine')}.j2"  # the fingerprint reads the latest
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    after = prompting.prompt_fingerprint("annotate", "refine")
    assert after != before
    assert prompting.prompt_fingerprint("annotate") == prompting.prompt_fingerprint("annotate")


def test_a_new_version_becomes_the_latest(prompts_copy: Path) -> None:
    before = prompting.prompt_fingerprint("refine")
    (prompts_copy / "refine" / "v2.j2").write_text(
        "Refine v2 for {{ grade }}: {{ question }} / {{ answer }}\n", encoding="utf-8"
    )
    (prompts_copy / "refine" / "v10.j2").write_text("Refine v10: {{ answer }}", encoding="utf-8")
    (prompts_copy / "refine" / "v3_draft.j2").write_text("not a version", encoding="utf-8")
    (prompts_copy / "refine" / "notes.j2").write_text("not a version", encoding="utf-8")
    assert prompting.versions("refine") == ["v1", "v2", "v10"]  # numeric order, not string order
    assert prompting.latest_version("refine") == "v10"
    assert prompting.prompt_fingerprint("refine") != before
    latest = prompting.render("refine", grade="high", question="q?", answer="a")
    assert (latest.version, latest.text) == ("v10", "Refine v10: a")
    pinned = prompting.render("refine", "v2", grade="high", question="q?", answer="a")
    assert (pinned.version, pinned.text) == ("v2", "Refine v2 for high: q? / a")
    assert prompting.render("refine", "v1", **_golden_inputs("refine")).text.startswith("Rewrite the draft")


# --- reply validators ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({"discipline": "physics", "grade": "high", "difficulty": "hard"}, ("physics", "high", "hard")),
        (
            {"discipline": " Computer Science ", "grade": "UNDERGRADUATE", "difficulty": "Easy"},
            ("computer_science", "undergraduate", "easy"),
        ),
        (
            {
                "discipline": "history",
                "grade": "primary",
                "difficulty": "medium",
                "why": "extra keys are ignored",
            },
            ("history", "primary", "medium"),
        ),
    ],
)
def test_annotation_validator_accepts(
    taxonomy: TaxonomyConfig, reply: dict[str, Any], expected: tuple[str, str, str]
) -> None:
    value = annotate.make_validator(taxonomy)(reply)
    assert (value.discipline, value.grade, value.difficulty) == expected


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (
            {"discipline": "astrology", "grade": "high", "difficulty": "hard"},
            "discipline 'astrology' is not in",
        ),
        ({"discipline": "physics", "grade": "kindergarten", "difficulty": "hard"}, "grade 'kindergarten'"),
        ({"discipline": "physics", "grade": "high", "difficulty": "insane"}, "difficulty 'insane'"),
        ({"discipline": "physics", "grade": "high"}, "difficulty"),
        ({"discipline": "physics", "grade": 3, "difficulty": "hard"}, "grade"),
        (["physics", "high", "hard"], "expected a JSON object, got list"),
        ("physics", "expected a JSON object, got str"),
        (None, "expected a JSON object, got NoneType"),
    ],
)
def test_annotation_validator_rejects(taxonomy: TaxonomyConfig, reply: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        annotate.make_validator(taxonomy)(reply)


def test_annotation_schema_enumerates_the_taxonomy(taxonomy: TaxonomyConfig) -> None:
    schema = annotate.annotation_schema(taxonomy)
    props = schema["properties"]
    assert props["discipline"]["enum"] == taxonomy.discipline_names
    assert props["grade"]["enum"] == taxonomy.grades
    assert props["difficulty"]["enum"] == taxonomy.difficulties
    assert schema["required"] == ["discipline", "grade", "difficulty"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({"question": "What is 2 + 2?", "answer": "4"}, ("What is 2 + 2?", "4")),
        (
            {"question": "  Padded question?  ", "answer": " yes \n", "note": "ignored"},
            ("Padded question?", "yes"),
        ),
    ],
)
def test_qa_validator_accepts(reply: dict[str, Any], expected: tuple[str, str]) -> None:
    value = synthesize.validate_qa(reply)
    assert (value.question, value.answer) == expected


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ({"question": "", "answer": "4"}, "must not be empty"),
        ({"question": "   ", "answer": "4"}, "must not be empty"),
        ({"question": "What is 2 + 2?", "answer": "  "}, "must not be empty"),
        ({"question": "What is 2 + 2?"}, "answer"),
        ({"answer": "4"}, "question"),
        ({"question": "What?", "answer": 4}, "answer"),
        ("What is 2 + 2? 4", "expected a JSON object, got str"),
        ([{"question": "q", "answer": "a"}], "expected a JSON object, got list"),
    ],
)
def test_qa_validator_rejects(reply: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        synthesize.validate_qa(reply)


def test_validation_errors_are_value_errors() -> None:
    # the client catches ValueError/TypeError/KeyError from validators; pydantic's error must be one of them
    assert issubclass(ValidationError, ValueError)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({"answer": "Na."}, "Na."),
        ({"answer": "  Sodium is Na.\n", "confidence": 1}, "Sodium is Na."),
        ({"answer": ""}, ""),  # kept as empty: rule_flags turns it into the `empty` flag with a reason
    ],
)
def test_answer_validator_accepts(reply: dict[str, Any], expected: str) -> None:
    assert refine.validate_answer(reply).answer == expected


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ({"text": "Na"}, "answer"),
        ({"answer": None}, "answer"),
        ({"answer": ["Na"]}, "answer"),
        ("Na", "expected a JSON object, got str"),
        (7, "expected a JSON object, got int"),
    ],
)
def test_answer_validator_rejects(reply: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        refine.validate_answer(reply)
