"""Annotation: label each seed with discipline, category, grade and difficulty (annotator role).

The reply is JSON constrained by a schema built from the taxonomy and validated again here, because some
servers (DeepSeek's ``json_object`` mode) do not enforce a schema. A bad reply is re-asked a bounded number
of times by the client; then the seed goes to rejects with the raw output.
"""

from __future__ import annotations

from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from boostqa_assets.configs import TaxonomyConfig
from boostqa_assets.llm.types import LLMRequest, LLMResult, Validator
from boostqa_assets.prompting import latest_version, render
from boostqa_assets.records import ANNOTATED_SCHEMA, REJECT_SCHEMA, frame, to_json

PROMPT_ID = "annotate"


class AnnotationReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    discipline: str
    grade: str
    difficulty: str


def annotation_schema(tax: TaxonomyConfig) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "discipline": {"type": "string", "enum": tax.discipline_names},
            "grade": {"type": "string", "enum": tax.grades},
            "difficulty": {"type": "string", "enum": tax.difficulties},
        },
        "required": ["discipline", "grade", "difficulty"],
        "additionalProperties": False,
    }


def make_validator(tax: TaxonomyConfig) -> Validator:
    """Accept a reply only if every label is inside the taxonomy (values are matched case-insensitively)."""

    def validate(obj: Any) -> AnnotationReply:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        norm = {k: str(v).strip().lower().replace(" ", "_") for k, v in obj.items() if isinstance(v, str)}
        reply = AnnotationReply.model_validate(norm)
        if reply.discipline not in tax.discipline_names:
            raise ValueError(f"discipline {reply.discipline!r} is not in the taxonomy")
        if reply.grade not in tax.grades:
            raise ValueError(f"grade {reply.grade!r} is not one of {tax.grades}")
        if reply.difficulty not in tax.difficulties:
            raise ValueError(f"difficulty {reply.difficulty!r} is not one of {tax.difficulties}")
        return reply

    return validate


def seed_item_text(row: dict[str, Any], max_chars: int) -> str:
    """What the annotator sees of a seed: the question (problems, QA) or the titled passage, one line."""
    if row.get("question"):
        text = row["question"]
    else:
        title = row.get("title") or ""
        text = f"{title}: {row.get('text') or ''}" if title else (row.get("text") or "")
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."


def build_requests(
    seeds: pl.DataFrame, tax: TaxonomyConfig, max_chars: int, version: str | None = None
) -> list[LLMRequest]:
    schema = annotation_schema(tax)
    version = version or latest_version(PROMPT_ID)  # once per batch: it lists the prompt's folder
    requests = []
    for row in seeds.iter_rows(named=True):
        prompt = render(
            PROMPT_ID,
            version,
            disciplines=tax.discipline_names,
            grades=tax.grades,
            difficulties=tax.difficulties,
            item=seed_item_text(row, max_chars),
        )
        requests.append(
            LLMRequest(
                key=row["seed_id"],
                prompt_id=prompt.prompt_id,
                prompt_version=prompt.version,
                prompt=prompt.text,
                schema=schema,
            )
        )
    return requests


def assemble(
    seeds: pl.DataFrame, results: list[LLMResult], tax: TaxonomyConfig, partition: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Join replies back onto seeds: annotated rows, and rejects (with the raw output) for failed ones."""
    by_key = {r.key: r for r in results}
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for row in seeds.iter_rows(named=True):
        res = by_key.get(row["seed_id"])
        if res is None:
            rejects.append(_reject(row, partition, "no_result", "no LLM result for this seed", None, None))
            continue
        if not res.ok:
            rejects.append(
                _reject(row, partition, res.error or "llm_error", res.detail, res.raw_output, res.request_hash)
            )
            continue
        reply: AnnotationReply = res.value
        kept.append(
            {
                **row,
                "discipline": reply.discipline,
                "category": tax.category_of(reply.discipline),
                "grade": reply.grade,
                "difficulty": reply.difficulty,
                "annotation_status": "ok",
                "annotate_model": res.model,
                "annotate_prompt_id": res.prompt_id,
                "annotate_prompt_version": res.prompt_version,
                "annotate_request_hash": res.request_hash,
            }
        )
    return frame(kept, ANNOTATED_SCHEMA), frame(rejects, REJECT_SCHEMA)


def _reject(
    row: dict[str, Any], partition: str, reason: str, detail: str, raw: str | None, rhash: str | None
) -> dict[str, Any]:
    return {
        "stage": "annotated_seeds",
        "partition": partition,
        "source": row.get("source"),
        "seed_id": row.get("seed_id"),
        "qa_id": None,
        "reason": reason,
        "detail": detail,
        "raw_output": raw,
        "request_hash": rhash or None,
        "record": to_json(row),
    }
