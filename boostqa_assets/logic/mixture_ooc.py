"""The mixture of one recipe from its pool spill, out of core: ``mixture.build_mixture``'s rule and output.

The pool spill (``mixture.POOL_SCHEMA``, written chunk by chunk by ``gates_ooc``) holds each kept row's
document text, token count and sampling key. DuckDB sorts the rows of finite key by (key, qa_id) out of core
(``memory_limit``, spilling to the work folder); the sorted rows stream back in batches and are taken while
the running token total stays within the budget (a prefix: token counts are never negative), so the stream
stops at the first row that would overflow. Taken rows fill shards of ``shard_rows`` documents, written as
Parquet and JSONL as they come, with the same rows as ``mixture.shard_files`` writes.

Memory: DuckDB's limit, one Arrow batch and the manifest's per-label token totals (a shard of ``shard_rows``
documents, 100k by default, is written batch by batch).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow.parquet as pq

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
    writer = _ShardWriter(out_dir, recipe)
    try:
        paths = ", ".join(f"'{p}'" for p in (pool if isinstance(pool, list) else [pool]))
        src = f"read_parquet([{paths}])"
        available_rows, available_tokens = con.execute(f"SELECT count(*), sum(n_tokens) FROM {src}").fetchall()[0]
        cols = ", ".join([*POOL_COLUMNS, "text", "n_tokens"])
        reader = con.sql(f"SELECT {cols} FROM {src} WHERE isfinite(key) ORDER BY key, qa_id").to_arrow_reader(
            spill.chunk_rows
        )
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
        writer.abort()  # after a failure: the open shard's files are closed (the caller drops the folder)
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
    """Documents in sampled order into ``part-NNNNN.parquet`` / ``.jsonl`` shards of ``shard_rows`` each. A shard
    is written as its batches arrive (a Parquet row group and a run of JSONL lines per batch), so memory holds one
    batch, not one shard. A whole shard concatenated, cast and rendered to one JSONL string cost more: 100k
    documents of ~1 KB arriving in batches of 50k took 328 MB over the batches, 157 MB batch by batch."""

    def __init__(self, out_dir: Path, recipe: Recipe) -> None:
        self.out_dir, self.recipe = out_dir, recipe
        self.rows = 0
        self.shards = 0
        self.files: list[str] = []
        self.open_rows = 0  # documents in the shard being written
        self._parquet: pq.ParquetWriter | None = None
        self._jsonl: BinaryIO | None = None
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
            part = taken.slice(start, self.recipe.shard_rows - self.open_rows)
            self._append(part)
            start += part.height
            if self.open_rows == self.recipe.shard_rows:
                self._finish_shard()

    def _documents(self, part: pl.DataFrame) -> pl.DataFrame:
        recipe = self.recipe
        if not part.height:
            return pl.DataFrame(schema=MIXTURE_SCHEMA)
        docs = part.select(
            pl.col("qa_id").map_elements(lambda q: doc_id(recipe, q), return_dtype=pl.Utf8).alias("doc_id"),
            pl.lit(recipe.name).alias("recipe"),
            *[pl.col(c) for c in part.columns if c in MIXTURE_SCHEMA and c != "shard"],
            pl.lit(self.shards, pl.Int64).alias("shard"),
        )
        return docs.select([pl.col(c).cast(t) for c, t in MIXTURE_SCHEMA.items()])

    def _append(self, part: pl.DataFrame) -> None:
        docs = self._documents(part)
        table = docs.to_arrow()
        if self._parquet is None:
            stem = f"part-{self.shards:05d}"
            self._parquet = pq.ParquetWriter(self.out_dir / f"{stem}.parquet", table.schema, compression="zstd")
            self._jsonl = open(self.out_dir / f"{stem}.jsonl", "wb")  # noqa: SIM115 - closed by _finish_shard
        self._parquet.write_table(table)
        if docs.height:
            assert self._jsonl is not None
            docs.write_ndjson(self._jsonl)
        self.open_rows += docs.height

    def _finish_shard(self) -> None:
        assert self._parquet is not None and self._jsonl is not None
        self._parquet.close()
        self._jsonl.close()
        self._parquet = self._jsonl = None
        stem = f"part-{self.shards:05d}"
        self.files += [f"{stem}.parquet", f"{stem}.jsonl"]
        self.rows += self.open_rows
        self.shards += 1 if self.open_rows else 0
        self.open_rows = 0

    def abort(self) -> None:
        """Close the open shard's files without counting it (a no-op once ``close`` has run)."""
        for handle in (self._parquet, self._jsonl):
            if handle is not None:
                handle.close()
        self._parquet = self._jsonl = None

    def close(self) -> None:
        if self._parquet is None and self.shards == 0:  # an empty mixture has one empty shard
            self._append(pl.DataFrame())
        if self._parquet is not None:  # the last partial shard
            self._finish_shard()
