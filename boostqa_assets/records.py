"""Records: the columns every stage writes, as pydantic models with a matching polars schema.

One module, one place. Each LLM step carries its lineage as ``<step>_model``, ``<step>_prompt_id``,
``<step>_prompt_version`` and ``<step>_request_hash`` so a mixture row joins back to its seed and to every
request that shaped it in one DuckDB query.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
import unicodedata
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel

Kind = Literal["qa", "problem", "passage"]
Track = Literal["multi_grade", "high_difficulty"]
# Where a seed's `language` came from: the source's `language:`, the record's own language field, or detection
# (logic/language.py). Only detection has a confidence; the other two leave `language_confidence` null.
LanguageOrigin = Literal["source", "record", "detected"]


class Seed(BaseModel):
    """One normalized seed: a QA item, a problem or a passage."""

    seed_id: str
    source: str
    native_id: str
    kind: Kind
    language: str  # ISO 639-1 code, or `mixed` (CJK and alphabetic text both substantial) or `und` (undetermined)
    language_confidence: float | None = None  # the detector's score for `language`; null unless detected
    language_origin: LanguageOrigin | None = None
    question: str | None
    answer: str | None
    text: str | None
    title: str | None
    url: str | None
    license: str
    meta: str  # JSON object of the source's extra columns


class AnnotatedSeed(Seed):
    discipline: str
    category: str
    grade: str
    difficulty: str
    annotation_status: Literal["ok"]
    annotate_model: str
    annotate_prompt_id: str
    annotate_prompt_version: str
    annotate_request_hash: str


class SynthesizedQA(BaseModel):
    """A new QA pair at the partition's grade, made from one seed."""

    qa_id: str
    seed_id: str
    source: str
    discipline: str
    category: str
    grade: str
    difficulty: str
    seed_grade: str
    seed_difficulty: str
    track: Track
    language: str  # the QA's language: its target language (the language gate rejects rows written in another)
    seed_language: str | None = None  # the seed's language (differs from `language` in cross-lingual synthesis)
    target_language: str | None = None  # what the prompt asked for (seed language, cross-lingual pick or fallback)
    question: str
    answer: str
    reasoning: str  # the reasoning model's thinking, never inside `answer`
    annotate_request_hash: str
    synth_model: str
    synth_prompt_id: str
    synth_prompt_version: str
    synth_request_hash: str
    # Grade-fidelity re-annotation (a sample of rows, every high-difficulty row); null where not checked.
    check_grade: str | None = None
    check_difficulty: str | None = None
    check_request_hash: str | None = None


class RefinedQA(SynthesizedQA):
    refined_answer: str
    flags: list[str]
    status: Literal["kept"]
    refine_model: str
    refine_prompt_id: str
    refine_prompt_version: str
    refine_request_hash: str


class MixtureDoc(BaseModel):
    """One training document of a recipe's mixture."""

    doc_id: str
    recipe: str
    qa_id: str
    seed_id: str
    source: str
    discipline: str
    category: str
    grade: str
    track: str
    language: str | None = None  # the QA's language
    text: str
    n_tokens: int
    shard: int


class Reject(BaseModel):
    """A row a stage could not keep, with the reason. Nothing is dropped without one of these."""

    stage: str
    partition: str
    source: str | None
    seed_id: str | None
    qa_id: str | None
    reason: str
    detail: str
    raw_output: str | None
    request_hash: str | None
    record: str  # JSON of the input row (or the raw source line)


_PL_TYPES: dict[Any, pl.DataType] = {str: pl.Utf8(), int: pl.Int64(), float: pl.Float64(), bool: pl.Boolean()}


class PlanCell(BaseModel):
    """One discipline x grade cell of the synthesis plan: how many QA ``synthesized_qa`` makes there, and why."""

    discipline: str
    grade: str
    category: str
    is_stem: bool
    is_high_difficulty: bool
    candidates: int  # (track, seed) pairs the cell may synthesize from
    capacity: int  # candidates x variants per pair: the most the cell can take
    accuracy: float | None  # probe accuracy of the target model (None: not measured)
    ci_low: float | None
    ci_high: float | None
    probe_n: int
    probe_status: str
    static_weight: float
    need: float
    weight: float
    basis: Literal["probe", "probe_mean", "static", "unbudgeted"]
    recipe: str
    budget: int
    seed_ids: str  # JSON list of the seeds the budget uses
    fingerprint: str  # hash of what synthesis will do here; unchanged -> nothing to redo


def _pl_type(annotation: Any) -> pl.DataType:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _pl_type(args[0])
    if origin is typing.Literal:
        return pl.Utf8()
    if origin is list:
        return pl.List(_pl_type(typing.get_args(annotation)[0]))
    return _PL_TYPES[annotation]


def polars_schema(model: type[BaseModel]) -> pl.Schema:
    """The polars schema matching a record model, field order preserved."""
    return pl.Schema({name: _pl_type(f.annotation) for name, f in model.model_fields.items()})


SEED_SCHEMA = polars_schema(Seed)
ANNOTATED_SCHEMA = polars_schema(AnnotatedSeed)
SYNTHESIZED_SCHEMA = polars_schema(SynthesizedQA)
REFINED_SCHEMA = polars_schema(RefinedQA)
MIXTURE_SCHEMA = polars_schema(MixtureDoc)
REJECT_SCHEMA = polars_schema(Reject)
PLAN_SCHEMA = polars_schema(PlanCell)


def frame(rows: list[dict[str, Any]] | list[BaseModel], schema: pl.Schema) -> pl.DataFrame:
    """Rows (dicts or models) to a DataFrame with exactly ``schema`` (missing optional columns are null)."""
    dicts = [r.model_dump() if isinstance(r, BaseModel) else r for r in rows]
    return pl.DataFrame(dicts, schema=schema, orient="row") if dicts else pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """Select and cast ``df`` to ``schema``; a missing column is an error, not a silent null."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns {missing}; expected {list(schema)}")
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])


def normalize_text(text: str) -> str:
    """Unicode NFKC, collapsed whitespace, lower case: the form exact dedup and ids compare."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def stable_hash(*parts: str, length: int = 16) -> str:
    """A sha256-based id over ``parts``; stable across runs, machines and Python versions."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:length]


def make_seed_id(source: str, native_id: str | None, content: str) -> str:
    """Stable seed id: the source plus its native id, or the normalized content when there is none."""
    key = native_id if native_id else "text:" + normalize_text(content)
    return "s_" + stable_hash(source, key)


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


# --- deficiency probe -----------------------------------------------------------------------------------

ProbeStatus = Literal["ok", "insufficient_samples", "no_candidates"]
ProbeMethod = Literal["normalized", "judge", "empty", "not_graded"]


class ProbeCell(BaseModel):
    """The target model's accuracy on one discipline x grade cell of the deficiency probe.

    ``accuracy`` and the Wilson interval (``ci_low``, ``ci_high``) are null unless ``status`` is ``ok``
    (at least ``probe.min_samples`` graded replies); ``grading`` is a JSON object of graded replies by method.
    """

    discipline: str
    grade: str
    n_candidates: int  # annotated seeds of the cell with a question and a reference answer
    n_sampled: int
    n_graded: int
    n_correct: int
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    status: ProbeStatus
    grading: str


class ProbeItem(BaseModel):
    """One probe question put to the target model, its reply and the grade (``correct`` null: not graded)."""

    seed_id: str
    source: str
    discipline: str
    grade: str
    question: str
    reference: str
    reply: str | None
    method: ProbeMethod
    correct: bool | None
    probe_model: str
    probe_prompt_id: str
    probe_prompt_version: str
    probe_request_hash: str
    judge_request_hash: str | None = None


PROBE_CELL_SCHEMA = polars_schema(ProbeCell)
PROBE_ITEM_SCHEMA = polars_schema(ProbeItem)
