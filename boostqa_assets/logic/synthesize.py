"""Synthesis: new QA pairs for one discipline x grade partition (synthesizer role, a reasoning model).

Rules (all from ``pipeline.yaml``):
- multi-grade track: seeds of discipline ``d`` in a multi-grade category (STEM by default), of any grade,
  yield QA at the partition's grade ``g``; other categories only from seeds whose own grade is ``g``
  (``non_stem_grades: own``) or from all of them (``all``).
- high-difficulty track: for ``g`` in ``high_difficulty_grades``, seeds of ``d`` whose difficulty is at
  least ``high_difficulty_min_seed_difficulty`` yield a harder variant at ``g``.
- ``qa_per_seed`` variants per (seed, track); ``max_seeds_per_partition`` caps seeds per track with a
  seeded, order-independent choice.
The model's thinking (``reasoning_content`` or ``<think>`` blocks) goes to ``reasoning``, never ``answer``.

Language: each task writes its QA in a target language (``language.target_language``: the seed's language, a
cross-lingual pick, or the fallback for ``mixed``/``und`` seeds), named in the prompt; with ``check_language`` a
reply whose question or answer is detected in another language is rejected as ``language_mismatch``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, field_validator

from boostqa_assets.configs import LanguagesConfig, SynthesisConfig, TaxonomyConfig
from boostqa_assets.llm.types import LLMRequest, LLMResult
from boostqa_assets.logic import fewshot, language
from boostqa_assets.logic.annotate import seed_item_text
from boostqa_assets.prompting import latest_version, render
from boostqa_assets.records import REJECT_SCHEMA, SYNTHESIZED_SCHEMA, frame, stable_hash, to_json

# What a synthesizer is shown of its seed: an example these already repeat is not an echo (logic/fewshot.py).
SEED_TEXT_FIELDS = ("question", "answer", "text", "title")

TRACK_PROMPTS = {"multi_grade": "synthesize_multi_grade", "high_difficulty": "synthesize_high_difficulty"}

GRADE_HINTS = {
    "primary": "plain words, one step, everyday examples.",
    "middle": "a few steps, basic terms defined in the question.",
    "high": "several steps and standard school terminology.",
    "undergraduate": "university level: formal methods, derivations or analysis.",
    "graduate": "research level: advanced theory, proofs or multi-part analysis.",
}

# A question outside these bounds is a bad reply (re-asked, then rejected), never a row for the checks to block.
QUESTION_MIN_CHARS = 8
QUESTION_MAX_CHARS = 4000

QA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "minLength": QUESTION_MIN_CHARS, "maxLength": QUESTION_MAX_CHARS},
        "answer": {"type": "string", "minLength": 1},
    },
    "required": ["question", "answer"],
    "additionalProperties": False,
}


class QAReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    question: str
    answer: str

    @field_validator("question", "answer")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        return v


def validate_qa(obj: Any) -> QAReply:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    reply = QAReply.model_validate(obj)
    if not QUESTION_MIN_CHARS <= len(reply.question) <= QUESTION_MAX_CHARS:
        raise ValueError(
            f"question has {len(reply.question)} characters; expected {QUESTION_MIN_CHARS}..{QUESTION_MAX_CHARS}"
        )
    return reply


@dataclass(frozen=True)
class SynthTask:
    qa_id: str
    track: str
    discipline: str
    grade: str
    variant: int
    seed: dict[str, Any]


def _capped(rows: list[dict[str, Any]], cap: int | None, salt: str) -> list[dict[str, Any]]:
    if cap is None or len(rows) <= cap:
        return rows
    # Order by a hash of (partition, seed): the choice does not depend on input order and stays stable
    # when unrelated seeds are added.
    return sorted(rows, key=lambda r: stable_hash(salt, r["seed_id"]))[:cap]


def track_salt(discipline: str, grade: str, track: str) -> str:
    """What a capped track's seeds are ordered by the hash of, with their ``seed_id`` (``_capped``)."""
    return f"{discipline}|{grade}|{track}"


def track_rules(
    discipline: str, grade: str, tax: TaxonomyConfig, cfg: SynthesisConfig
) -> list[tuple[str, Callable[[str, str], bool]]]:
    """The tracks of partition (discipline, grade), in order, each with which of the discipline's seeds it takes
    (a test on the seed's grade and difficulty). The one statement of the rules of the module docstring: the
    synthesis plan counts and picks seeds with it without reading them whole (``logic/plan.py``)."""
    category = tax.category_of(discipline)
    any_grade = category in cfg.multi_grade_categories or cfg.non_stem_grades == "all"
    rules: list[tuple[str, Callable[[str, str], bool]]] = [("multi_grade", lambda g, d: any_grade or g == grade)]
    if grade in cfg.high_difficulty_grades:
        floor = tax.difficulty_rank(cfg.high_difficulty_min_seed_difficulty)
        rules.append(("high_difficulty", lambda g, d: tax.difficulty_rank(d) >= floor))
    return rules


def candidates(
    annotated: pl.DataFrame, discipline: str, grade: str, tax: TaxonomyConfig, cfg: SynthesisConfig
) -> list[tuple[str, dict[str, Any]]]:
    """The (track, seed row) pairs partition (discipline, grade) may synthesize from, in a deterministic order:
    track by track, a track's seeds by ``seed_id`` (or, above ``max_seeds_per_partition``, the first of them by
    a hash of (partition, track, seed))."""
    rows = annotated.filter(pl.col("discipline") == discipline).sort("seed_id").to_dicts()
    pairs = []
    for track, takes in track_rules(discipline, grade, tax, cfg):
        seeds = [r for r in rows if takes(r["grade"], r["difficulty"])]
        pairs += [(track, s) for s in _capped(seeds, cfg.max_seeds_per_partition, track_salt(discipline, grade, track))]
    return pairs


def task_order(
    pairs: list[tuple[str, dict[str, Any]]], budget: int | None, qa_per_seed: int
) -> list[tuple[str, dict[str, Any], int]]:
    """The (track, seed, variant) of each task over candidate pairs, in order. ``budget`` None: ``qa_per_seed``
    variants of every pair. Otherwise exactly ``budget`` tasks (at most what the pairs hold at ``qa_per_seed``
    variants each), dealt round-robin: variant 0 of every pair, then variant 1, ... so a budget spreads over seeds
    before repeating one."""
    if budget is None:
        return [(track, seed, v) for track, seed in pairs for v in range(qa_per_seed)]
    return [(track, seed, v) for v in range(qa_per_seed) for track, seed in pairs][:budget]


def tasks_for(
    pairs: list[tuple[str, dict[str, Any]]], discipline: str, grade: str, budget: int | None, qa_per_seed: int
) -> list[SynthTask]:
    """Synthesis tasks over candidate pairs, in ``task_order``."""
    tasks = []
    for track, seed, variant in task_order(pairs, budget, qa_per_seed):
        qa_id = "q_" + stable_hash(seed["seed_id"], discipline, grade, track, str(variant))
        tasks.append(SynthTask(qa_id, track, discipline, grade, variant, seed))
    return tasks


def plan_tasks(
    annotated: pl.DataFrame, discipline: str, grade: str, tax: TaxonomyConfig, cfg: SynthesisConfig
) -> list[SynthTask]:
    """The synthesis tasks of partition (discipline, grade) without a plan budget: every candidate seed x
    ``qa_per_seed`` variants, in a deterministic order."""
    return tasks_for(candidates(annotated, discipline, grade, tax, cfg), discipline, grade, None, cfg.qa_per_seed)


def task_language(t: SynthTask, languages: LanguagesConfig | None) -> str:
    """The target language of a task (``language.target_language``; the seed's language without a config)."""
    seed_language = t.seed.get("language") or language.UNDETERMINED
    return language.target_language(seed_language, t.qa_id, languages) if languages is not None else seed_language


def build_requests(
    tasks: list[SynthTask],
    max_chars: int,
    versions: dict[str, str] | None = None,
    languages: LanguagesConfig | None = None,
) -> list[LLMRequest]:
    versions = dict(versions or {})
    requests = []
    for t in tasks:
        pid = TRACK_PROMPTS[t.track]
        if pid not in versions:
            versions[pid] = latest_version(pid)  # once per batch: it lists the prompt's folder
        seed = seed_item_text(t.seed, max_chars)
        if t.seed.get("answer"):
            seed += " Answer: " + " ".join(str(t.seed["answer"]).split())[: max_chars // 2]
        prompt = render(
            pid,
            versions.get(pid),
            discipline=t.discipline,
            grade=t.grade,
            grade_hint=GRADE_HINTS.get(t.grade, ""),
            seed=seed,
            variant=t.variant,
            language=language.language_name(task_language(t, languages)),  # v2+ (v1 ignores it)
        )
        requests.append(
            LLMRequest(
                key=t.qa_id,
                prompt_id=prompt.prompt_id,
                prompt_version=prompt.version,
                prompt=prompt.text,
                schema=QA_SCHEMA,
                seed_offset=t.variant,
                prefill='{"question": "',
            )
        )
    return requests


def assemble(
    tasks: list[SynthTask],
    results: list[LLMResult],
    tax: TaxonomyConfig,
    partition: str,
    top_difficulty: str,
    languages: LanguagesConfig | None = None,
    check_language: bool = False,
    language_stats: list[list[dict[str, Any]]] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rows for the answered tasks and rejects for the others. A reply that repeats a few-shot example of its own
    prompt (question or answer, ``fewshot.find_echo``; not when the seed itself carries the example) becomes a
    ``fewshot_echo`` reject. With ``check_language``, rows whose question or answer is not in the target language
    become ``language_mismatch`` rejects (their per-language table is appended to ``language_stats``)."""
    by_key = {r.key: r for r in results}
    raw: dict[str, LLMResult] = {}
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for t in tasks:
        res = by_key.get(t.qa_id)
        seed = t.seed
        if res is None or not res.ok:
            rejects.append(
                {
                    "stage": "synthesized_qa",
                    "partition": partition,
                    "source": seed["source"],
                    "seed_id": seed["seed_id"],
                    "qa_id": t.qa_id,
                    "reason": (res.error or "llm_error") if res else "no_result",
                    "detail": res.detail if res else "no LLM result for this task",
                    "raw_output": res.raw_output if res else None,
                    "request_hash": res.request_hash if res else None,
                    "record": to_json({"track": t.track, "variant": t.variant, "seed": seed}),
                }
            )
            continue
        reply: QAReply = res.value
        target = task_language(t, languages)
        row = {
            "qa_id": t.qa_id,
            "seed_id": seed["seed_id"],
            "source": seed["source"],
            "discipline": t.discipline,
            "category": tax.category_of(t.discipline),
            "grade": t.grade,
            "difficulty": top_difficulty if t.track == "high_difficulty" else seed["difficulty"],
            "seed_grade": seed["grade"],
            "seed_difficulty": seed["difficulty"],
            "track": t.track,
            "language": target,
            "seed_language": seed["language"],
            "target_language": target,
            "question": reply.question,
            "answer": reply.answer,
            "reasoning": res.reasoning,
            "annotate_request_hash": seed["annotate_request_hash"],
            "synth_model": res.model,
            "synth_prompt_id": res.prompt_id,
            "synth_prompt_version": res.prompt_version,
            "synth_request_hash": res.request_hash,
        }
        echo = fewshot.find_echo(
            {"question": reply.question, "answer": reply.answer},
            res.prompt_id,
            res.prompt_version,
            context=[seed.get(k) for k in SEED_TEXT_FIELDS],
        )
        if echo is not None:  # a copy of the prompt's own example: caught here, before a refiner is paid for it
            rejects.append(
                {
                    "stage": "synthesized_qa",
                    "partition": partition,
                    "source": seed["source"],
                    "seed_id": seed["seed_id"],
                    "qa_id": t.qa_id,
                    "reason": fewshot.REASON,
                    "detail": echo,
                    "raw_output": res.raw_output,
                    "request_hash": res.request_hash,
                    "record": to_json(row),
                }
            )
            continue
        raw[t.qa_id] = res
        kept.append(row)
    if check_language and kept:
        kept = _language_gate(kept, raw, partition, languages, rejects, language_stats)
    return frame(kept, SYNTHESIZED_SCHEMA), frame(rejects, REJECT_SCHEMA)


def _language_gate(
    kept: list[dict[str, Any]],
    raw: dict[str, LLMResult],
    partition: str,
    languages: LanguagesConfig | None,
    rejects: list[dict[str, Any]],
    language_stats: list[list[dict[str, Any]]] | None,
) -> list[dict[str, Any]]:
    """The rows in their target language; the others appended to ``rejects`` as ``language_mismatch``."""
    detection = languages.detection if languages is not None else None
    targets = [r["target_language"] for r in kept]
    details = language.mismatches([r["question"] for r in kept], [r["answer"] for r in kept], targets, detection)
    if language_stats is not None:
        language_stats.append(language.mismatch_table(targets, details))
    out = []
    for row, detail in zip(kept, details, strict=True):
        if detail is None:
            out.append(row)
            continue
        res = raw[row["qa_id"]]
        rejects.append(
            {
                "stage": "synthesized_qa",
                "partition": partition,
                "source": row["source"],
                "seed_id": row["seed_id"],
                "qa_id": row["qa_id"],
                "reason": language.REASON,
                "detail": detail,
                "raw_output": res.raw_output,
                "request_hash": res.request_hash,
                "record": to_json(row),
            }
        )
    return out
