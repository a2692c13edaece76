"""Refinement: the refiner role rewrites each answer, then rule filters flag what must not be kept.

Flags (``pipeline.yaml`` ``refinement``): ``refusal`` (refusal phrases), ``empty``, ``truncated`` (the reply
hit max_tokens, or the answer ends inside an open code block or bracket), ``too_short`` / ``too_long``
(absolute character bounds), ``length_outlier`` (beyond Q3 + k*IQR of the partition's answer lengths, only
with at least ``min_rows_for_outliers`` rows), ``language_mismatch`` (the answer's script differs from the
question's, or the refined answer is detected in another language than the row's ``language``, its target:
``language.mismatches``, batched per chunk; the question too unless synthesis's gate already detected it),
``fewshot_echo`` (the refined answer repeats an answer of the refine prompt's own few-shot examples:
``logic/fewshot.py``; the demo's 270M model answered 3 of 6 questions with "... from its Latin name natrium").
Flags listed in ``reject_flags`` send the row to rejects; other flags are kept on the row.
"""

from __future__ import annotations

import re
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from boostqa_assets.configs import LanguageDetectionSettings, RefinementConfig
from boostqa_assets.llm.types import LLMRequest, LLMResult
from boostqa_assets.logic import fewshot, language
from boostqa_assets.prompting import latest_version, render
from boostqa_assets.records import REFINED_SCHEMA, REJECT_SCHEMA, SYNTHESIZED_SCHEMA, frame, to_json

PROMPT_ID = "refine"

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 1}},
    "required": ["answer"],
    "additionalProperties": False,
}


class AnswerReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    answer: str


def validate_answer(obj: Any) -> AnswerReply:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    reply = AnswerReply.model_validate(obj)
    return AnswerReply(answer=reply.answer.strip())


def build_requests(qa: pl.DataFrame, version: str | None = None, max_chars: int = 2000) -> list[LLMRequest]:
    version = version or latest_version(PROMPT_ID)  # once per batch: it lists the prompt's folder
    requests = []
    for row in qa.iter_rows(named=True):
        prompt = render(
            PROMPT_ID,
            version,
            grade=row["grade"],
            language=language.language_name(row["language"]),  # v2+ (v1 ignores it)
            question=" ".join(row["question"].split()),
            answer=" ".join(row["answer"].split())[:max_chars],
        )
        requests.append(
            LLMRequest(
                key=row["qa_id"],
                prompt_id=prompt.prompt_id,
                prompt_version=prompt.version,
                prompt=prompt.text,
                schema=ANSWER_SCHEMA,
                prefill='{"answer": "',
            )
        )
    return requests


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def detect_script(text: str) -> str:
    """``zh`` when CJK characters dominate the letters, ``en`` for Latin script, ``unknown`` otherwise.

    Enough to catch an answer in the wrong language for the paper's English/Chinese seeds; swap in a
    language-id model for more languages.
    """
    cjk = len(_CJK.findall(text))
    latin = len(_LATIN.findall(text))
    if cjk + latin < 3:
        return "unknown"
    return "zh" if cjk * 3 >= latin else "en"


def looks_truncated(answer: str) -> bool:
    if answer.count("```") % 2 == 1:
        return True
    return any(answer.count(open_) - answer.count(close) >= 2 for open_, close in ("()", "[]", "{}"))


def rule_flags(
    question: str,
    answer: str,
    finish_reason: str | None,
    cfg: RefinementConfig,
    refusal_res: list[re.Pattern[str]] | None = None,
    prompt: tuple[str, str] | None = None,
    draft: str | None = None,
) -> list[str]:
    """Flags of one refined answer, independent of the other rows. ``prompt`` (prompt id, version): the refine
    prompt that made it, whose few-shot answers it must not repeat (``fewshot_echo``; not when the question or the
    ``draft`` answer it was given already carries that example)."""
    flags = []
    text = answer.strip()
    if not text:
        return ["empty"]
    if prompt is not None and fewshot.find_echo({"answer": text}, *prompt, context=[question, draft]):
        flags.append(fewshot.REASON)
    patterns = refusal_res if refusal_res is not None else [re.compile(p, re.IGNORECASE) for p in cfg.refusal_patterns]
    if any(p.search(text) for p in patterns):
        flags.append("refusal")
    if finish_reason == "length" or looks_truncated(text):
        flags.append("truncated")
    if len(text) < cfg.min_answer_chars:
        flags.append("too_short")
    if len(text) > cfg.max_answer_chars:
        flags.append("too_long")
    if cfg.check_language:
        q, a = detect_script(question), detect_script(text)
        if "unknown" not in (q, a) and q != a:
            flags.append("language_mismatch")
    return flags


def length_fence(lengths: list[int] | pl.Series, k: float, min_rows: int) -> float | None:
    """Tukey's fence ``Q3 + k*IQR`` of a partition's answer lengths; None (no outliers) in tiny partitions."""
    if len(lengths) < min_rows:
        return None
    s = pl.Series(lengths, dtype=pl.Float64)
    q1, q3 = s.quantile(0.25, "linear"), s.quantile(0.75, "linear")
    assert q1 is not None and q3 is not None
    return q3 + k * max(q3 - q1, 1.0)


def length_outlier_mask(lengths: list[int], k: float, min_rows: int) -> list[bool]:
    """True where a length is above Q3 + k*IQR (Tukey's fence); nothing is an outlier in tiny partitions."""
    fence = length_fence(lengths, k, min_rows)
    return [False] * len(lengths) if fence is None else [x > fence for x in lengths]


# A refined row before the partition-wide length rule: the refined record plus the raw reply, which a reject keeps.
STAGED_SCHEMA = pl.Schema({**REFINED_SCHEMA, "raw_output": pl.Utf8()})


def stage(
    qa: pl.DataFrame,
    results: list[LLMResult],
    cfg: RefinementConfig,
    partition: str,
    detection: LanguageDetectionSettings | None = None,
    language_stats: list[list[dict[str, Any]]] | None = None,
    question_checked: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """First pass over a chunk: the rows the refiner answered (with their rule flags, not yet the length rule,
    which needs the whole partition) and the rejects of the rows it did not answer. The language check of the
    whole chunk runs in one batch; its per-language table is appended to ``language_stats``.
    ``question_checked``: synthesis's gate already detected each question (refinement does not change it), so
    only the refined answers are detected."""
    by_key = {r.key: r for r in results}
    refusal_res = [re.compile(p, re.IGNORECASE) for p in cfg.refusal_patterns]
    staged: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    answered: list[tuple[dict[str, Any], LLMResult]] = []
    for row in qa.iter_rows(named=True):
        res = by_key.get(row["qa_id"])
        if res is None or not res.ok:
            rejects.append(
                _reject(
                    row,
                    partition,
                    (res.error or "llm_error") if res else "no_result",
                    res.detail if res else "no LLM result",
                    res,
                )
            )
            continue
        answered.append((row, res))
    lang_details: list[str | None] = [None] * len(answered)
    if cfg.check_language and answered:
        targets = [row["language"] for row, _ in answered]
        # A question already checked is passed as None: undetermined, never a mismatch, no model call.
        questions = [None if question_checked else row["question"] for row, _ in answered]
        lang_details = language.mismatches(questions, [res.value.answer for _, res in answered], targets, detection)
        if language_stats is not None:
            language_stats.append(language.mismatch_table(targets, lang_details))
    for (row, res), lang_detail in zip(answered, lang_details, strict=True):
        answer = res.value.answer
        flags = rule_flags(
            row["question"],
            answer,
            res.finish_reason,
            cfg,
            refusal_res,
            (res.prompt_id, res.prompt_version),
            row["answer"],
        )
        if lang_detail is not None and language.REASON not in flags:
            flags.append(language.REASON)
        staged.append(
            {
                **row,
                "refined_answer": answer,
                "flags": flags,
                "status": "kept",
                "refine_model": res.model,
                "refine_prompt_id": res.prompt_id,
                "refine_prompt_version": res.prompt_version,
                "refine_request_hash": res.request_hash,
                "raw_output": res.raw_output,
            }
        )
    return frame(staged, STAGED_SCHEMA), frame(rejects, REJECT_SCHEMA)


def finish(
    staged: pl.DataFrame, fence: float | None, cfg: RefinementConfig, partition: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Second pass: the length rule with the partition's fence, then every blocking flag rejects its row."""
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    reject_flags = set(cfg.reject_flags)
    synth_cols = [c for c in SYNTHESIZED_SCHEMA]
    for row in staged.iter_rows(named=True):
        flags = list(row["flags"])
        if fence is not None and len(row["refined_answer"]) > fence:
            flags.append("length_outlier")
        blocking = [f for f in flags if f in reject_flags]
        if blocking:
            rejects.append(
                {
                    "stage": "refined_qa",
                    "partition": partition,
                    "source": row["source"],
                    "seed_id": row["seed_id"],
                    "qa_id": row["qa_id"],
                    "reason": blocking[0],
                    "detail": "flags: " + ", ".join(flags),
                    "raw_output": row["raw_output"],
                    "request_hash": row["refine_request_hash"],
                    "record": to_json({c: row[c] for c in synth_cols}),
                }
            )
            continue
        kept.append({**{k: v for k, v in row.items() if k != "raw_output"}, "flags": flags})
    return frame(kept, REFINED_SCHEMA), frame(rejects, REJECT_SCHEMA)


def assemble(
    qa: pl.DataFrame, results: list[LLMResult], cfg: RefinementConfig, partition: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Both passes over one frame (a partition that fits one chunk)."""
    staged, llm_rejects = stage(qa, results, cfg, partition)
    fence = length_fence(staged["refined_answer"].str.len_chars(), cfg.length_outlier_iqr, cfg.min_rows_for_outliers)
    kept, rejects = finish(staged, fence, cfg, partition)
    return kept, pl.concat([llm_rejects, rejects])


def _reject(row: dict[str, Any], partition: str, reason: str, detail: str, res: LLMResult | None) -> dict[str, Any]:
    return {
        "stage": "refined_qa",
        "partition": partition,
        "source": row["source"],
        "seed_id": row["seed_id"],
        "qa_id": row["qa_id"],
        "reason": reason,
        "detail": detail,
        "raw_output": res.raw_output if res else None,
        "request_hash": res.request_hash if res else None,
        "record": to_json(row),
    }
