"""The deficiency probe: ask the target model (``probe`` role) annotated seed questions that have reference
answers, grade its replies, and report accuracy per discipline x grade cell with a confidence interval.

- Candidates: annotated seeds with a non-empty ``question`` and a reference ``answer`` that normalizes to
  something (QA items; problems with a solution), whose one-line question fits ``max_chars_in_prompt``.
- Sampling: at most ``samples_per_cell`` per (discipline, grade) cell, chosen by a hash of (``seed``,
  ``seed_id``): the choice does not depend on input order and stays stable when unrelated seeds are added.
- Grading (``grading``): ``normalized`` = normalized match (SQuAD-style normalization, numbers canonical;
  equal, or the reference contained as whole words in a short reply); ``judge`` = the ``judge`` role says
  whether the reply agrees with the reference; ``auto`` = normalized for QA references of at most
  ``short_answer_max_words`` words, the judge for longer references and for problems (free-form solutions).
  An empty reply is graded incorrect without a judge (method ``empty``).
- Failed requests (errors after retries, ``budget_exhausted``) are not graded: they count in ``n_sampled``
  but not ``n_graded``, and go to rejects with their reason.
- Per cell: ``accuracy = n_correct / n_graded`` with a Wilson score interval at ``confidence``; a cell with
  fewer than ``min_samples`` graded replies reports ``insufficient_samples`` and null numbers.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from statistics import NormalDist
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from boostqa_assets.checks import CheckOutcome
from boostqa_assets.configs import ProbeConfig, TaxonomyConfig
from boostqa_assets.llm.types import LLMRequest, LLMResult
from boostqa_assets.prompting import render
from boostqa_assets.records import (
    PROBE_CELL_SCHEMA,
    PROBE_ITEM_SCHEMA,
    REJECT_SCHEMA,
    frame,
    stable_hash,
    to_json,
)
from boostqa_assets.storage import Store

PROBE_PROMPT_ID = "probe"
JUDGE_PROMPT_ID = "judge"
ASSET = "deficiency_probe"
ITEMS_ASSET = "deficiency_probe_items"
REJECTS_PARTITION = "all"

# A reply may contain the normalized reference as whole words and still count as a match only while it is
# this short (in normalized words): a long reply listing many candidates must not pass by containment.
SHORT_REPLY_MAX_WORDS = 12

# --- normalization and matching --------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
_TENS = {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_UNITS.split())} | _TENS
# A number token: optional sign (not after a letter or digit, so "1-2" is two numbers), thousands groups or
# plain digits, optional decimals; or a bare decimal like ".5". Everything else that is a word is a token.
_TOKEN = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+|[^\W_]+")


def _canonical_number(token: str) -> str:
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:  # a word that starts with a non-ASCII digit, e.g. a superscript
        return token
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def normalize_tokens(text: str | None) -> list[str]:
    """SQuAD-style answer tokens: NFKC, lower case, punctuation and articles dropped, numbers canonical
    (``1,000`` -> ``1000``, ``5.0`` -> ``5``, ``five`` -> ``5``)."""
    if not text:
        return []
    text = unicodedata.normalize("NFKC", text).lower()
    tokens = []
    for tok in _TOKEN.findall(text):
        if tok[0].isdigit() or tok[0] in "-.":
            tokens.append(_canonical_number(tok))
        elif tok not in _ARTICLES:
            tokens.append(_NUMBER_WORDS.get(tok, tok))
    return tokens


def normalize_answer(text: str | None) -> str:
    """The normalized form of an answer (tokens joined by one space)."""
    return " ".join(normalize_tokens(text))


def normalized_match(reply: str | None, reference: str | None, max_reply_words: int = SHORT_REPLY_MAX_WORDS) -> bool:
    """True when the normalized reply equals the normalized reference, or a short reply (at most
    ``max_reply_words`` normalized words) contains the normalized reference as whole, consecutive words."""
    ref = normalize_tokens(reference)
    got = normalize_tokens(reply)
    if not ref or not got:
        return False
    if got == ref:
        return True
    if len(got) > max_reply_words or len(ref) > len(got):
        return False
    n = len(ref)
    return any(got[i : i + n] == ref for i in range(len(got) - n + 1))


def grading_method(reference: str, kind: str | None, mode: str, short_answer_max_words: int) -> str:
    """``normalized`` or ``judge`` for one item (see the module docstring for ``auto``)."""
    if mode in ("normalized", "judge"):
        return mode
    if kind == "problem":
        return "judge"
    return "normalized" if len(reference.split()) <= short_answer_max_words else "judge"


def one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."


# --- confidence interval --------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (``successes`` of ``n``) at ``confidence``."""
    if n <= 0:
        raise ValueError("the Wilson interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..n, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    z2n = z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clamp float noise: the interval always lies within [0, 1] and contains p.
    return max(0.0, min(center - half, p)), min(1.0, max(center + half, p))


# --- sampling -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """How many probe candidates each cell has, and what was left out (reported, not rejected)."""

    counts: dict[tuple[str, str], int]
    without_reference: int = 0
    too_long: int = 0
    seeds_read: int = 0


def sample_cell(rows: list[dict[str, Any]], cap: int, seed: int) -> list[dict[str, Any]]:
    """At most ``cap`` rows, chosen by a hash of (``seed``, ``seed_id``); returned in ``seed_id`` order."""
    chosen = sorted(rows, key=lambda r: (stable_hash(str(seed), r["seed_id"]), r["seed_id"]))[:cap]
    return sorted(chosen, key=lambda r: r["seed_id"])


def stratified_sample(
    frames: Iterable[pl.DataFrame], cfg: ProbeConfig
) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], Candidates]:
    """The probe sample per cell (only cells with candidates) from annotated seeds read a frame at a time, and
    how many candidates each cell had.

    A cell keeps the ``samples_per_cell`` candidates with the lowest (hash, ``seed_id``) seen so far, pruned as
    it grows, so memory holds one frame plus a few rows per cell however many seeds there are (the sample is the
    one ``sample_cell`` would draw from all of them). Seed ids are unique across annotated partitions (the id
    hashes the source; a shard holds its own hash bucket; the annotated check enforces it per partition): a
    seed read twice counts once within a frame or while it is among a cell's kept rows."""
    cap = cfg.samples_per_cell
    kept: dict[tuple[str, str], dict[str, tuple[tuple[str, str], dict[str, Any]]]] = {}
    counts: Counter[tuple[str, str]] = Counter()
    without_reference = too_long = seeds_read = 0
    for df in frames:
        seeds_read += df.height
        for row in df.unique(subset="seed_id", keep="first", maintain_order=True).iter_rows(named=True):
            cell = (row["discipline"], row["grade"])
            rows = kept.setdefault(cell, {})
            if row["seed_id"] in rows:
                continue
            question = one_line(row.get("question"))
            if not question or not normalize_tokens(row.get("answer")):
                without_reference += 1
                continue
            if len(question) > cfg.max_chars_in_prompt:
                too_long += 1
                continue
            counts[cell] += 1
            rows[row["seed_id"]] = ((stable_hash(str(cfg.seed), row["seed_id"]), row["seed_id"]), row)
            if len(rows) >= 2 * cap + 64:  # prune to the cap lowest now and then: O(n log cap) over a cell
                kept[cell] = dict(heapq.nsmallest(cap, rows.items(), key=lambda item: item[1][0]))
    sample = {
        cell: sample_cell([row for _, row in rows.values()], cap, cfg.seed)
        for cell, rows in sorted(kept.items())
        if counts[cell]
    }
    return sample, Candidates(dict(sorted(counts.items())), without_reference, too_long, seeds_read)


# --- requests and validators ----------------------------------------------------------------------------

VERDICTS = ("correct", "incorrect")
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": list(VERDICTS)}},
    "required": ["verdict"],
    "additionalProperties": False,
}


class Verdict(BaseModel):
    model_config = ConfigDict(extra="ignore")

    verdict: str


def validate_reply(text: Any) -> str:
    """The probe reply: its first non-empty line, stripped (an empty reply is a valid, wrong answer)."""
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def validate_verdict(obj: Any) -> bool:
    """The judge's verdict as a bool: ``{"verdict": "correct"}`` -> True, ``"incorrect"`` -> False."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    reply = Verdict.model_validate(obj)
    verdict = reply.verdict.strip().lower()
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {reply.verdict!r} is not one of {list(VERDICTS)}")
    return verdict == "correct"


def build_probe_requests(
    sample: dict[tuple[str, str], list[dict[str, Any]]], max_chars: int, version: str | None = None
) -> list[LLMRequest]:
    """One ``probe`` request per sampled seed (key: ``seed_id``), in cell then ``seed_id`` order."""
    requests = []
    for rows in sample.values():
        for row in rows:
            prompt = render(PROBE_PROMPT_ID, version, question=_clip(one_line(row["question"]), max_chars))
            requests.append(
                LLMRequest(
                    key=row["seed_id"],
                    prompt_id=prompt.prompt_id,
                    prompt_version=prompt.version,
                    prompt=prompt.text,
                )
            )
    return requests


def build_judge_request(
    key: str, question: str, reference: str, reply: str, max_chars: int, version: str | None = None
) -> LLMRequest:
    prompt = render(
        JUDGE_PROMPT_ID,
        version,
        question=_clip(one_line(question), max_chars),
        reference=_clip(one_line(reference), max_chars),
        reply=_clip(one_line(reply), max_chars),
    )
    return LLMRequest(
        key=key,
        prompt_id=prompt.prompt_id,
        prompt_version=prompt.version,
        prompt=prompt.text,
        schema=VERDICT_SCHEMA,
    )


# --- grading --------------------------------------------------------------------------------------------


@dataclass
class Graded:
    """Probe items after the probe replies (and before the judge): rows, judge requests, rejects."""

    items: list[dict[str, Any]] = field(default_factory=list)
    judge_requests: list[LLMRequest] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


_RECORD_FIELDS = ("seed_id", "source", "kind", "discipline", "grade", "question", "answer")
# What the probe reads of an annotated seed (passage texts, titles and the annotation's own fields stay on disk).
SEED_COLUMNS = list(_RECORD_FIELDS)


def _reject(row: dict[str, Any], reason: str, detail: str, raw: str | None, rhash: str | None) -> dict[str, Any]:
    return {
        "stage": ASSET,
        "partition": REJECTS_PARTITION,
        "source": row.get("source"),
        "seed_id": row.get("seed_id"),
        "qa_id": None,
        "reason": reason,
        "detail": f"{row.get('discipline')}|{row.get('grade')}: {detail}"[:500],
        "raw_output": raw,
        "request_hash": rhash or None,
        "record": to_json({k: row.get(k) for k in _RECORD_FIELDS}),
    }


def grade_replies(
    sample: dict[tuple[str, str], list[dict[str, Any]]], results: list[LLMResult], cfg: ProbeConfig
) -> Graded:
    """Grade what normalized match can grade; queue judge requests for the rest; reject failed requests."""
    by_key = {r.key: r for r in results}
    out = Graded()
    for rows in sample.values():
        for row in rows:
            res = by_key.get(row["seed_id"])
            reference = str(row["answer"])
            item: dict[str, Any] = {
                "seed_id": row["seed_id"],
                "source": row["source"],
                "discipline": row["discipline"],
                "grade": row["grade"],
                "question": row["question"],
                "reference": reference,
                "reply": None,
                "method": "not_graded",
                "correct": None,
                "probe_model": res.model if res else "",
                "probe_prompt_id": res.prompt_id if res else PROBE_PROMPT_ID,
                "probe_prompt_version": res.prompt_version if res else "",
                "probe_request_hash": res.request_hash if res else "",
                "judge_request_hash": None,
            }
            out.items.append(item)
            if res is None:
                out.rejects.append(_reject(row, "no_result", "no LLM result for this probe question", None, None))
                continue
            if not res.ok:
                out.rejects.append(
                    _reject(row, res.error or "llm_error", f"probe: {res.detail}", res.raw_output, res.request_hash)
                )
                continue
            reply: str = res.value
            item["reply"] = reply
            if not normalize_tokens(reply):
                item["method"], item["correct"] = "empty", False
                continue
            method = grading_method(reference, row.get("kind"), cfg.grading, cfg.short_answer_max_words)
            if method == "normalized":
                item["method"], item["correct"] = "normalized", normalized_match(reply, reference)
            else:
                out.judge_requests.append(
                    build_judge_request(row["seed_id"], row["question"], reference, reply, cfg.max_chars_in_prompt)
                )
    return out


def apply_verdicts(graded: Graded, results: list[LLMResult]) -> Graded:
    """Put the judge's verdicts on the items; a failed judge request leaves the item not graded (a reject)."""
    by_key = {r.key: r for r in results}
    pending = {r.key for r in graded.judge_requests}
    for item in graded.items:
        if item["seed_id"] not in pending:
            continue
        res = by_key.get(item["seed_id"])
        if res is None:
            graded.rejects.append(
                _reject(item | {"answer": item["reference"]}, "judge_no_result", "no judge result", None, None)
            )
            continue
        item["judge_request_hash"] = res.request_hash or None
        if not res.ok:
            graded.rejects.append(
                _reject(
                    item | {"answer": item["reference"]},
                    "judge_" + (res.error or "llm_error"),
                    f"judge: {res.detail}",
                    res.raw_output,
                    res.request_hash,
                )
            )
            continue
        item["method"], item["correct"] = "judge", bool(res.value)
    return graded


# --- aggregation ----------------------------------------------------------------------------------------


def aggregate(
    items: pl.DataFrame,
    cfg: ProbeConfig,
    candidate_counts: dict[tuple[str, str], int] | None = None,
    cells: list[tuple[str, str]] | None = None,
) -> pl.DataFrame:
    """The cell table (``PROBE_CELL_SCHEMA``) from the item table.

    ``cells``: the cells to report (default: those with items, sorted); a listed cell without items is
    ``no_candidates``. Accuracy and its interval are null unless ``n_graded >= min_samples``.
    """
    counts = candidate_counts or {}
    per_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in items.iter_rows(named=True):
        per_cell.setdefault((row["discipline"], row["grade"]), []).append(row)
    wanted = cells if cells is not None else sorted(per_cell)
    rows = []
    for cell in wanted:
        cell_items = per_cell.get(cell, [])
        graded = [r for r in cell_items if r["correct"] is not None]
        n_graded = len(graded)
        n_correct = sum(1 for r in graded if r["correct"])
        accuracy = ci_low = ci_high = None
        if not cell_items and not counts.get(cell):
            status = "no_candidates"
        elif n_graded < cfg.min_samples:
            status = "insufficient_samples"
        else:
            status = "ok"
            accuracy = n_correct / n_graded
            ci_low, ci_high = wilson_interval(n_correct, n_graded, cfg.confidence)
        rows.append(
            {
                "discipline": cell[0],
                "grade": cell[1],
                "n_candidates": counts.get(cell, len(cell_items)),
                "n_sampled": len(cell_items),
                "n_graded": n_graded,
                "n_correct": n_correct,
                "accuracy": accuracy,
                "ci_low": ci_low,
                "ci_high": ci_high,
                "status": status,
                "grading": json.dumps(dict(sorted(Counter(r["method"] for r in graded).items()))),
            }
        )
    return frame(rows, PROBE_CELL_SCHEMA)


def items_frame(graded: Graded) -> pl.DataFrame:
    return frame(graded.items, PROBE_ITEM_SCHEMA)


def rejects_frame(graded: Graded) -> pl.DataFrame:
    return frame(graded.rejects, REJECT_SCHEMA)


def overall_accuracy(cells: pl.DataFrame) -> float | None:
    """Graded replies that were correct, over every cell (micro average); None when nothing was graded."""
    graded = int(cells["n_graded"].sum()) if cells.height else 0
    return int(cells["n_correct"].sum()) / graded if graded else None


# --- the check ------------------------------------------------------------------------------------------


def validate_cells(cells: pl.DataFrame, min_samples: int, tax: TaxonomyConfig | None = None) -> CheckOutcome:
    """The cell table's rules: schema, one row per cell, counts ordered (``n_correct <= n_graded <=
    n_sampled <= n_candidates``), ``accuracy`` in [0, 1] and equal to ``n_correct / n_graded``,
    ``ci_low <= accuracy <= ci_high``, and status consistent with ``min_samples`` (``ok`` iff at least
    ``min_samples`` graded replies; numbers null otherwise)."""
    from boostqa_assets.checks import schema_matches

    outcome = schema_matches(cells, PROBE_CELL_SCHEMA)
    if not outcome.passed:
        return outcome
    problems: Counter[str] = Counter()
    examples: list[str] = []
    seen: set[tuple[str, str]] = set()
    eps = 1e-9

    def bad(rule: str, row: dict[str, Any]) -> None:
        problems[rule] += 1
        if len(examples) < 5:
            examples.append(f"{row['discipline']}|{row['grade']}: {rule}")

    for row in cells.iter_rows(named=True):
        cell = (row["discipline"], row["grade"])
        if cell in seen:
            bad("duplicate_cell", row)
        seen.add(cell)
        if tax is not None and (row["discipline"] not in tax.discipline_names or row["grade"] not in tax.grades):
            bad("cell_outside_taxonomy", row)
        counts = (row["n_correct"], row["n_graded"], row["n_sampled"], row["n_candidates"])
        if any(c is None or c < 0 for c in counts) or not counts[0] <= counts[1] <= counts[2] <= counts[3]:
            bad("counts_out_of_order", row)
            continue
        acc, lo, hi, status = row["accuracy"], row["ci_low"], row["ci_high"], row["status"]
        expected = "ok" if row["n_graded"] >= min_samples else "insufficient_samples"
        if status == "no_candidates":
            expected = "no_candidates" if row["n_sampled"] == 0 else expected
        if status != expected:
            bad(f"status_{status}_expected_{expected}", row)
        if status == "ok":
            if acc is None or lo is None or hi is None:
                bad("ok_without_accuracy", row)
                continue
            if not 0 <= acc <= 1:
                bad("accuracy_outside_0_1", row)
            if not lo - eps <= acc <= hi + eps or lo < -eps or hi > 1 + eps:
                bad("accuracy_outside_interval", row)
            if abs(acc - row["n_correct"] / row["n_graded"]) > 1e-9:
                bad("accuracy_not_n_correct_over_n_graded", row)
        elif acc is not None or lo is not None or hi is not None:
            bad("number_without_enough_samples", row)
        try:
            grading = json.loads(row["grading"])
            if sum(grading.values()) != row["n_graded"]:
                bad("grading_counts_not_n_graded", row)
        except (TypeError, ValueError, AttributeError):
            bad("grading_not_json", row)
    return CheckOutcome(
        not problems,
        {
            "cells": cells.height,
            "cells_ok": int((cells["status"] == "ok").sum()) if cells.height else 0,
            "cells_insufficient": int((cells["status"] == "insufficient_samples").sum()) if cells.height else 0,
            "min_samples": min_samples,
            "problems": str(dict(problems)) if problems else "none",
            "examples": "; ".join(examples) or "-",
        },
    )


def items_match_cells(items: pl.DataFrame, cells: pl.DataFrame) -> CheckOutcome:
    """The item table adds up to the cell table: per cell, items = ``n_sampled``, graded = ``n_graded``,
    correct = ``n_correct``."""
    if not items.height and not cells.height:
        return CheckOutcome(True, {"items": 0})
    agg = items.group_by("discipline", "grade").agg(
        pl.len().alias("i_sampled"),
        pl.col("correct").is_not_null().sum().alias("i_graded"),
        pl.col("correct").fill_null(False).sum().alias("i_correct"),
    )
    joined = cells.join(agg, on=["discipline", "grade"], how="full", coalesce=True).fill_null(0)
    mismatched = joined.filter(
        (pl.col("n_sampled") != pl.col("i_sampled"))
        | (pl.col("n_graded") != pl.col("i_graded"))
        | (pl.col("n_correct") != pl.col("i_correct"))
    )
    return CheckOutcome(
        mismatched.height == 0,
        {
            "items": items.height,
            "cells_not_matching_items": mismatched.height,
            "mismatched_cells": ", ".join(f"{d}|{g}" for d, g in mismatched.select("discipline", "grade").iter_rows())
            or "-",
        },
    )


# --- readers for downstream assets ----------------------------------------------------------------------


def read_probe_cells(store: Store) -> pl.DataFrame | None:
    """The latest probe's cell table (``PROBE_CELL_SCHEMA``), or None when the probe has never run or
    measured nothing (disabled, or no candidates): then the synthesis plan falls back to static weights.

    Only cells with ``status == "ok"`` carry an accuracy; the others have null ``accuracy``/``ci_*``.
    """
    files = store.partition_files(ASSET, {})
    if not files:
        return None
    cells = store.read_files(files, PROBE_CELL_SCHEMA)
    return cells if cells.height else None
