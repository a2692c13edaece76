"""The mixture of one recipe from its pool spill, out of core: ``mixture.build_mixture``'s rule and output.

The pool spill (``mixture.POOL_SCHEMA``, written chunk by chunk by ``gates_ooc``) holds each kept row's
document text, token count and sampling key. DuckDB sorts the rows of finite key by (key, qa_id) out of core
(``memory_limit``, spilling to the work folder); the sorted rows stream back in batches and are taken while
the running token total stays within the budget (a prefix: token counts are never negative), so the stream
stops at the first row that would overflow. Taken rows fill shards of ``shard_rows`` documents, each written
as Parquet and JSONL as soon as it is full, exactly as ``mixture.shard_files`` writes them.

Memory: DuckDB's limit, one Arrow batch, one shard (``shard_rows`` documents, 100k by default) and the
manifest's per-label token totals.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from boostqa_assets.configs import Recipe
from boostqa_assets.logic.mixture import LABELS, POOL_COLUMNS, doc_id, manifest_of
from boostqa_assets.logic.spill import Progress, SpillConfig, duckdb_connect
from boostqa_assets.records import MIXTURE_SCHEMA

logger = logging.getLogger(__name__)

_LABELS = LABELS


@dataclass
class MixtureOutput:
    manifest: dict[str, Any]  # as ``build_mixture``'s (no ``files``: the caller adds them with the manifest file)
    files: list[str]  # shard file names written into the output folder
    coverage: pl.DataFrame  # discipline, grade, n_tokens (summed): the asset's coverage table


def build_mixture_streaming(
    pool: Path | list[Path], recipe: Recipe, spill: SpillConfig, out_dir: Path
) -> MixtureOutput:
    """Write the shards of ``recipe``'s mixture into ``out_dir`` from the pool spill file(s) ``pool``."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"mixture-{recipe.name}.duckdb"
    (spill.work_dir / name).unlink(missing_ok=True)
    con = duckdb_connect(spill, name)
    try:
        paths = ", ".join(f"'{p}'" for p in (pool if isinstance(pool, list) else [pool]))
        src = f"read_parquet([{paths}])"
        available_rows, available_tokens = con.execute(f"SELECT count(*), sum(n_tokens) FROM {src}").fetchall()[0]
        cols = ", ".join([*POOL_COLUMNS, "text", "n_tokens"])
        reader = con.sql(f"SELECT {cols} FROM {src} WHERE isfinite(key) ORDER BY key, qa_id").to_arrow_reader(
            spill.chunk_rows
        )
        writer = _ShardWriter(out_dir, recipe)
        progress = Progress(f"mixture {recipe.name}: documents", None, "docs")
        total, full = 0, False
        for batch in reader:
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            cum = frame["n_tokens"].cum_sum() + total
            fits = int((cum <= recipe.token_budget).sum())  # a prefix: the running total never decreases
            if fits:
                taken = frame.head(fits)
                total = int(cum[fits - 1])
                writer.add(taken)
                progress.add(fits)
            if fits < frame.height:
                full = True
                break
        reader.close()
        writer.close()
        progress.finish()
    finally:
        con.close()
    manifest = manifest_of(
        recipe,
        writer.rows,
        total,
        writer.shards,
        {f"tokens_by_{c}": dict(sorted(writer.totals[c].items())) for c in _LABELS},
        (int(available_rows or 0), int(available_tokens or 0)),
        dict(writer.rows_by_language),
    )
    coverage = pl.DataFrame(
        [(d, g, t) for (d, g), t in writer.coverage.items()],
        schema={"discipline": pl.Utf8, "grade": pl.Utf8, "n_tokens": pl.Int64},
        orient="row",
    )
    logger.info(
        "mixture %s: %d documents, %d tokens (budget %d%s) in %d shards from %d rows, %.1f s",
        recipe.name,
        writer.rows,
        total,
        recipe.token_budget,
        ", full" if full else "",
        writer.shards,
        int(available_rows or 0),
        time.perf_counter() - t0,
    )
    return MixtureOutput(manifest, writer.files, coverage)


class _ShardWriter:
    """Documents in sampled order into ``part-NNNNN.parquet`` / ``.jsonl`` shards of ``shard_rows`` each."""

    def __init__(self, out_dir: Path, recipe: Recipe) -> None:
        self.out_dir, self.recipe = out_dir, recipe
        self.rows = 0
        self.shards = 0
        self.files: list[str] = []
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0
        self.totals: dict[str, dict[str, int]] = {c: defaultdict(int) for c in _LABELS}
        self.coverage: dict[tuple[str, str], int] = defaultdict(int)
        self.rows_by_language: dict[str, int] = defaultdict(int)

    def add(self, taken: pl.DataFrame) -> None:
        for c in _LABELS:
            for label, tokens in taken.group_by(c).agg(pl.col("n_tokens").sum()).iter_rows():
                self.totals[c][label] += int(tokens)
        for label, n in taken.group_by("language").len().iter_rows():
            self.rows_by_language[label] += int(n)
        for d, g, tokens in taken.group_by("discipline", "grade").agg(pl.col("n_tokens").sum()).iter_rows():
            self.coverage[(d, g)] += int(tokens)
        start = 0
        while start < taken.height:
            room = self.recipe.shard_rows - self.pending_rows
            part = taken.slice(start, room)
            self.pending.append(part)
            self.pending_rows += part.height
            start += part.height
            if self.pending_rows == self.recipe.shard_rows:
                self._write()

    def _write(self) -> None:
        docs = pl.concat(self.pending) if self.pending else pl.DataFrame(schema=dict.fromkeys(POOL_COLUMNS, pl.Utf8))
        recipe = self.recipe
        docs = docs.select(
            pl.col("qa_id").map_elements(lambda q: doc_id(recipe, q), return_dtype=pl.Utf8).alias("doc_id")
            if docs.height
            else pl.lit(None, pl.Utf8).alias("doc_id"),
            pl.lit(recipe.name).alias("recipe"),
            *[pl.col(c) for c in docs.columns if c in MIXTURE_SCHEMA and c != "shard"],
            pl.lit(self.shards, pl.Int64).alias("shard"),
        )
        docs = pl.DataFrame(schema=MIXTURE_SCHEMA) if not docs.height else docs
        docs = docs.select([pl.col(c).cast(t) for c, t in MIXTURE_SCHEMA.items()])
        stem = f"part-{self.shards:05d}"
        docs.write_parquet(self.out_dir / f"{stem}.parquet", compression="zstd")
        (self.out_dir / f"{stem}.jsonl").write_bytes(docs.write_ndjson().encode("utf-8"))
        self.files += [f"{stem}.parquet", f"{stem}.jsonl"]
        self.rows += docs.height
        self.shards += 1 if docs.height else 0
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        if self.pending_rows or self.shards == 0:  # the last partial shard; an empty mixture has one empty shard
            self._write()
