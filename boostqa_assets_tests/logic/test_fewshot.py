"""Tests for boostqa_assets.logic.fewshot: examples derived from the prompt files, the echo score and threshold,
and the gate in synthesis and refinement against a model (the fake server) that copies its prompt's example."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest

from boostqa_assets.configs import RefinementConfig, RoleConfig, TaxonomyConfig, load_config
from boostqa_assets.llm.client import LLMClient
from boostqa_assets.logic import fewshot, refine, synthesize
from boostqa_assets.logic.synthesize import SynthTask
from boostqa_assets.prompting import render, versions
from boostqa_assets.records import SYNTHESIZED_SCHEMA, frame
from boostqa_assets.settings import DEFAULT_CONFIG_DIR, PROMPTS_DIR
from boostqa_assets.testing.fake_server import FakeOpenAIServer, FaultConfig, prompt_text

QA_PROMPTS = ["synthesize_multi_grade", "synthesize_high_difficulty", "refine"]
NATRIUM = "The chemical symbol of sodium is Na, from its Latin name natrium."


@pytest.mark.parametrize(("prompt_id", "version"), [(p, v) for p in QA_PROMPTS for v in versions(p)])
def test_every_qa_prompt_version_has_examples_read_from_its_own_file(prompt_id: str, version: str) -> None:
    found = fewshot.examples(prompt_id, version)
    assert found, "a QA prompt without parsed examples would let echoes through: check the template's layout"
    source = (PROMPTS_DIR / prompt_id / f"{version}.j2").read_text(encoding="utf-8")
    rendered = render(
        prompt_id,
        version,
        discipline="physics",
        grade="high",
        grade_hint="",
        seed="S",
        variant=0,
        language="English",
        question="Q",
        answer="A",
    ).text
    for ex in found:
        assert ex.answer and ex.answer in source and ex.answer in rendered  # derived from the file, not copied
        assert ex.question and ex.question in source
        assert "\x00" not in ex.answer + ex.question  # no slot of the live task leaked into an example
    assert [ex.index for ex in found] == list(range(1, len(found) + 1))


def test_examples_of_the_refine_and_synthesis_prompts() -> None:
    [en, zh] = fewshot.examples("refine", "v2")
    assert (en.question, en.answer) == ("What is the chemical symbol of sodium?", NATRIUM)
    assert dict(en.fields)["Draft answer"] == "its Na i think"
    assert zh.question == "钠的化学符号是什么？" and zh.answer.startswith("钠的化学符号是Na")
    multi = fewshot.examples("synthesize_multi_grade", "v2")
    assert [ex.question for ex in multi] == [
        "At what temperature does water boil at sea level?",
        "植物进行光合作用时从空气中吸收哪种气体？",
        "为什么在高山上水的沸点低于100摄氏度？",
    ]
    assert fewshot.examples("annotate", "v1") == ()  # label examples: no question or answer to echo
    assert fewshot.examples("no_such_prompt", "v1") == ()


@pytest.mark.parametrize(
    ("text", "example", "echo"),
    [
        pytest.param(NATRIUM, NATRIUM, True, id="verbatim"),
        pytest.param("the chemical symbol of SODIUM is na from its latin name natrium", NATRIUM, True, id="case-punct"),
        pytest.param("Refined: " + NATRIUM, NATRIUM, True, id="prefix"),
        pytest.param(NATRIUM + " It is an alkali metal used in street lamps.", NATRIUM, True, id="suffix"),
        pytest.param(NATRIUM.replace("Latin", "old"), NATRIUM, True, id="one-word-changed"),
        pytest.param("The chemical symbol of sodium is Na, from its Latin", NATRIUM, True, id="tail-cut"),
        pytest.param(
            "钠的化学符号是Na，来自它的拉丁文名称natrium。",
            "钠的化学符号是Na，来自它的拉丁文名称natrium。",
            True,
            id="zh",
        ),
        pytest.param(
            "The chemical symbol of potassium is K, from its Latin name kalium.", NATRIUM, False, id="same-form"
        ),
        pytest.param("Sodium reacts violently with water to form sodium hydroxide.", NATRIUM, False, id="same-topic"),
        pytest.param(
            "atmospheric pressure",
            "Lower atmospheric pressure at altitude means the vapour pressure of water equals the ambient pressure",
            False,
            id="short-phrase-inside-example",
        ),
        pytest.param("its na i think", "its Na i think", True, id="short-exact"),
        pytest.param("its na", "its Na i think", False, id="short-piece"),
    ],
)
def test_echo_score_threshold(text: str, example: str, echo: bool) -> None:
    assert (fewshot.echo_score(text, example) >= fewshot.THRESHOLD) is echo, fewshot.echo_score(text, example)


def test_find_echo_names_the_example_and_exempts_what_the_input_says() -> None:
    detail = fewshot.find_echo({"answer": NATRIUM}, "refine", "v2", context=["Why is the sky blue?"])
    assert detail is not None and "answer repeats the answer of few-shot example 1 of refine/v2" in detail
    assert fewshot.find_echo({"answer": NATRIUM}, "refine", "v2", ["What is the chemical symbol of sodium?"]) is None
    assert fewshot.find_echo({"answer": "Rayleigh scattering."}, "refine", "v2", ["Why is the sky blue?"]) is None
    question = "At what temperature does water boil at sea level?"
    assert fewshot.find_echo({"question": question}, "synthesize_multi_grade", "v1") is not None
    assert fewshot.find_echo({"question": question}, "synthesize_multi_grade", "v1", [f"{question} 100 C"]) is None


# --- through the LLM client: a model that copies the first example of whatever prompt it gets -----------------


def copy_first_example(body: dict[str, Any]) -> str:
    """A small model at its worst: the reply is the first ``JSON:`` line of the prompt's few-shot examples."""
    return re.findall(r"\nJSON: (\{.*\})", prompt_text(body))[0]


@pytest.fixture(scope="module")
def copier() -> Iterator[LLMClient]:
    cfg = RoleConfig.model_validate(
        {
            "base_url": "http://unused",
            "model": "copier",
            "api": "chat",
            "structured_output": "json_schema",
            "max_tokens": 256,
            "timeout_s": 5.0,
            "max_retries": 1,
            "max_parse_retries": 0,
        }
    )
    with FakeOpenAIServer(FaultConfig(), responder=copy_first_example) as server:
        yield LLMClient("synthesizer", cfg, server.base_url)


def _seed(seed_id: str, question: str) -> dict[str, Any]:
    return {
        "seed_id": seed_id,
        "source": "src",
        "kind": "qa",
        "language": "en",
        "question": question,
        "answer": None,
        "text": None,
        "title": None,
        "grade": "high",
        "difficulty": "hard",
        "annotate_request_hash": f"ah_{seed_id}",
    }


def test_synthesis_rejects_a_copied_example_unless_the_seed_carries_it(copier: LLMClient) -> None:
    tax = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(tax, TaxonomyConfig)
    seeds = {
        "s_cells": "Which organelle makes ATP in a cell?",
        "s_boil": "Water boils at 100 degrees Celsius at sea level.",  # the example's own seed: a copy is fair
        "s_calc": "Differentiate sin(x) twice and explain each step.",
    }
    tasks = [
        SynthTask(f"q_{sid}", track, "physics", grade, 0, _seed(sid, q))
        for (sid, q), (track, grade) in zip(
            seeds.items(),
            [("multi_grade", "high"), ("multi_grade", "primary"), ("high_difficulty", "graduate")],
            strict=True,
        )
    ]
    results = copier.run(synthesize.build_requests(tasks, 500), synthesize.validate_qa)
    assert all(r.ok for r in results)
    kept, rejects = synthesize.assemble(tasks, results, tax, "physics|high", "hard")
    assert kept["qa_id"].to_list() == ["q_s_boil"]
    assert sorted(rejects["qa_id"]) == ["q_s_calc", "q_s_cells"]
    assert set(rejects["reason"]) == {"fewshot_echo"}
    for rej in rejects.to_dicts():
        assert "few-shot example 1 of synthesize_" in rej["detail"] and rej["raw_output"]
        assert rej["request_hash"] and json.loads(rej["record"])["qa_id"] == rej["qa_id"]


def test_refinement_rejects_the_natrium_answer_unless_the_question_asks_it(copier: LLMClient) -> None:
    def row(i: int, question: str) -> dict[str, Any]:
        return {
            "qa_id": f"q{i}",
            "seed_id": f"s{i}",
            "source": "src",
            "discipline": "chemistry",
            "category": "stem",
            "grade": "high",
            "difficulty": "medium",
            "seed_grade": "high",
            "seed_difficulty": "medium",
            "track": "multi_grade",
            "language": "en",
            "question": question,
            "answer": "A draft answer.",
            "reasoning": "",
            "annotate_request_hash": "ah",
            "synth_model": "m",
            "synth_prompt_id": "p",
            "synth_prompt_version": "v2",
            "synth_request_hash": f"sh{i}",
        }

    qa = frame(
        [row(0, "Which gas do plants release in photosynthesis?"), row(1, "What is the chemical symbol of sodium?")],
        SYNTHESIZED_SCHEMA,
    )
    results = copier.run(refine.build_requests(qa), refine.validate_answer)
    assert [r.value.answer for r in results] == [NATRIUM, NATRIUM]  # what the demo's 270M model did
    kept, rejects = refine.assemble(qa, results, RefinementConfig(), "chemistry|high")
    assert kept["qa_id"].to_list() == ["q1"] and kept["flags"].to_list() == [[]]
    assert rejects.filter(pl.col("qa_id") == "q0")["reason"].to_list() == ["fewshot_echo"]
    # Listed in reject_flags by default; without it the flag stays on a kept row.
    cfg = RefinementConfig(reject_flags=["refusal"])
    kept, _ = refine.assemble(qa, results, cfg, "chemistry|high")
    assert kept.filter(pl.col("qa_id") == "q0")["flags"].to_list() == [["fewshot_echo"]]
