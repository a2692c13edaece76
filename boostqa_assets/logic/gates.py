"""The gates between refined QA and the mixture: exact and near-duplicate removal, then decontamination.

Rule: the pool is every kept `refined_qa` row of every partition. Dedup keeps, in each cluster of duplicates,
the row with the smallest `qa_id` (a stable hash), so the same input keeps the same rows on every run; the
others become rejects (`exact_duplicate` / `near_duplicate`, with the kept row and the similarity). Then every
row whose question or answer shares a word n-gram (default 13) with a benchmark item becomes a
`contaminated` reject naming the benchmark, the item and the n-gram.

``apply_gates`` holds the pool in memory (tests, small frames; ~3.7 GB at 10^6 rows). ``qa_mixture`` runs the
same rule out of core at every size (``gates_ooc.run_gates``: keys per partition, a DuckDB merge, one streaming
pass), with the same kept rows, rejects and counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from boostqa_assets.configs import QualityConfig
from boostqa_assets.logic.decontam import DEFAULT_BENCHMARKS, BenchmarkIndex, DecontamConfig, decontaminate, reject_rows
from boostqa_assets.logic.dedup import DedupConfig, dedup
from boostqa_assets.records import REJECT_SCHEMA, frame, to_json

STAGE = "qa_mixture"


def decontam_config(quality: QualityConfig) -> DecontamConfig:
    d = quality.decontamination
    return DecontamConfig(n=d.n, min_words=d.min_words, cjk_n=d.cjk_n, cjk_min_chars=d.cjk_min_chars)


def build_index(
    quality: QualityConfig, config_dir: Path, storage_options: dict[str, Any] | None = None
) -> BenchmarkIndex | None:
    """The benchmark n-gram index, or None when decontamination is off."""
    settings = quality.decontamination
    if not settings.enabled:
        return None
    refs = settings.benchmarks if settings.benchmarks is not None else DEFAULT_BENCHMARKS
    return BenchmarkIndex.build(list(refs), decontam_config(quality), storage_options, config_dir=config_dir)


def apply_gates(
    pool: pl.DataFrame, quality: QualityConfig, index: BenchmarkIndex | None, partition: str
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Rows that pass every gate, the rejects with reasons, and counts per gate."""
    counts = {"pool": pool.height, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0}
    rejects: list[pl.DataFrame] = []
    kept = pool
    if pool.height and (quality.dedup.exact or quality.dedup.near):
        result = dedup(pool, DedupConfig(**quality.dedup.model_dump()))
        flagged = pool.with_columns(
            result.keep.alias("_keep"),
            result.duplicate_of.alias("_of"),
            result.reason.alias("_reason"),
            result.similarity.alias("_sim"),
        )
        dups = flagged.filter(~pl.col("_keep"))
        rows = []
        for row in dups.iter_rows(named=True):
            counts[row["_reason"]] += 1
            record = {k: v for k, v in row.items() if not k.startswith("_")}
            rows.append(
                {
                    "stage": STAGE,
                    "partition": partition,
                    "source": row["source"],
                    "seed_id": row["seed_id"],
                    "qa_id": row["qa_id"],
                    "reason": row["_reason"],
                    "detail": f"duplicate of {row['_of']} (similarity {row['_sim']:.2f})",
                    "raw_output": None,
                    "request_hash": row.get("refine_request_hash"),
                    "record": to_json(record),
                }
            )
        rejects.append(frame(rows, REJECT_SCHEMA))
        kept = pool.filter(result.keep)
    if index is not None and kept.height:
        keep, matches = decontaminate(kept, index, decontam_config(quality))
        contaminated = reject_rows(kept, matches, STAGE, partition, request_hash_col="refine_request_hash")
        counts["contaminated"] = contaminated.height
        rejects.append(contaminated)
        kept = kept.filter(keep)
    all_rejects = pl.concat(rejects) if rejects else pl.DataFrame(schema=REJECT_SCHEMA)
    return kept, all_rejects, counts
