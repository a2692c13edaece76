"""Grade fidelity and difficulty degradation: re-annotate synthesized questions with the annotator role.

Rules (``pipeline.yaml`` ``quality.fidelity``):
- Sample: every high-difficulty row, plus up to ``sample_per_partition`` multi-grade rows chosen by a hash of
  (seed, qa_id), so the sample is stable and independent of row order.
- Grade fidelity: a sampled row matches when its re-annotated grade equals the partition's target grade;
  reported per discipline as a rate with the sample size.
- Difficulty degradation: a high-difficulty row whose re-annotated level (grade, then difficulty within the
  grade) is below its seed's level came back easier than its seed; with ``drop_degraded`` it goes to rejects
  with reason ``difficulty_degraded``.
The re-annotation's request hash is kept on the row (``check_request_hash``), like every other LLM step.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from boostqa_assets.configs import TaxonomyConfig
from boostqa_assets.llm.types import LLMRequest, LLMResult
from boostqa_assets.logic.annotate import PROMPT_ID, AnnotationReply, annotation_schema
from boostqa_assets.prompting import latest_version, render
from boostqa_assets.records import REJECT_SCHEMA, frame, stable_hash, to_json

DEGRADED = "difficulty_degraded"


def sample(rows: pl.DataFrame, per_partition: int, seed: int = 0) -> pl.DataFrame:
    """All high-difficulty rows plus a stable hash-ordered sample of multi-grade rows."""
    if rows.is_empty():
        return rows
    hard = rows.filter(pl.col("track") == "high_difficulty")
    multi = rows.filter(pl.col("track") == "multi_grade")
    order = [stable_hash(str(seed), q) for q in multi["qa_id"]]
    picked = multi.with_columns(pl.Series("_o", order)).sort("_o").head(per_partition).drop("_o")
    return pl.concat([hard, picked])


def build_requests(rows: pl.DataFrame, tax: TaxonomyConfig, max_chars: int) -> list[LLMRequest]:
    schema = annotation_schema(tax)
    version = latest_version(PROMPT_ID)  # once per batch: it lists the prompt's folder
    out = []
    for row in rows.iter_rows(named=True):
        item = " ".join(row["question"].split())[:max_chars]
        prompt = render(
            PROMPT_ID,
            version,
            disciplines=tax.discipline_names,
            grades=tax.grades,
            difficulties=tax.difficulties,
            item=item,
        )
        out.append(
            LLMRequest(
                key=row["qa_id"],
                prompt_id=prompt.prompt_id,
                prompt_version=prompt.version,
                prompt=prompt.text,
                schema=schema,
            )
        )
    return out


def level(tax: TaxonomyConfig, grade: str, difficulty: str) -> int:
    return tax.grade_rank(grade) * len(tax.difficulties) + tax.difficulty_rank(difficulty)


def apply(
    rows: pl.DataFrame, results: list[LLMResult], tax: TaxonomyConfig, partition: str, drop_degraded: bool
) -> tuple[pl.DataFrame, pl.DataFrame, list[dict[str, Any]]]:
    """Rows with `check_*` columns filled where re-annotated, rejects for degraded rows, one record per check."""
    by_key = {r.key: r for r in results}
    kept, rejects, checked = [], [], []
    for row in rows.iter_rows(named=True):
        res = by_key.get(row["qa_id"])
        if res is None or not res.ok:
            kept.append(row)
            continue
        reply: AnnotationReply = res.value
        row = {
            **row,
            "check_grade": reply.grade,
            "check_difficulty": reply.difficulty,
            "check_request_hash": res.request_hash,
        }
        degraded = row["track"] == "high_difficulty" and (
            level(tax, reply.grade, reply.difficulty) < level(tax, row["seed_grade"], row["seed_difficulty"])
        )
        checked.append(
            {
                "discipline": row["discipline"],
                "grade": row["grade"],
                "track": row["track"],
                "grade_match": reply.grade == row["grade"],
                "degraded": degraded,
            }
        )
        if degraded and drop_degraded:
            rejects.append(
                {
                    "stage": "synthesized_qa",
                    "partition": partition,
                    "source": row["source"],
                    "seed_id": row["seed_id"],
                    "qa_id": row["qa_id"],
                    "reason": DEGRADED,
                    "detail": f"re-annotated {reply.grade}/{reply.difficulty}, below its seed's "
                    f"{row['seed_grade']}/{row['seed_difficulty']}",
                    "raw_output": res.raw_output,
                    "request_hash": res.request_hash,
                    "record": to_json(row),
                }
            )
            continue
        kept.append(row)
    schema = rows.schema
    return frame(kept, schema), frame(rejects, REJECT_SCHEMA), checked


def fidelity_table(checked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per discipline: rows re-annotated, grade matches, the rate, and degraded high-difficulty rows."""
    out: dict[str, dict[str, Any]] = {}
    for c in checked:
        d = out.setdefault(
            c["discipline"], {"discipline": c["discipline"], "sampled": 0, "grade_matches": 0, "degraded": 0}
        )
        d["sampled"] += 1
        d["grade_matches"] += int(c["grade_match"])
        d["degraded"] += int(c["degraded"])
    for d in out.values():
        d["grade_match_rate"] = round(d["grade_matches"] / d["sampled"], 3) if d["sampled"] else None
    return [out[k] for k in sorted(out)]
