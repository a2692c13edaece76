"""``boostqa export RECIPE DIR``: a recipe's mixture as a Hugging Face ``datasets`` folder, for training or the Hub.

::

    DIR/README.md                                  dataset card: Hub YAML header (configs, features, licence, ...)
    DIR/text/train-00000-of-00001.parquet          config ``text``: the mixture document + lineage columns
    DIR/messages/train-00000-of-00001.parquet      config ``messages``: user question, assistant answer + lineage
    DIR/.boostqa-export.json                       what was exported, from which mixture (marks DIR as an export)

What it reads: the committed mixture of the recipe (``qa_mixture/recipe=<r>/manifest.json`` and the Parquet shards
``Store.partition_files`` lists, which must be the manifest's), joined in DuckDB to ``refined_qa`` by ``qa_id`` (the
question and refined answer for the chat form, the synthesis and refinement lineage) and to ``annotated_seeds`` by
``seed_id`` (the seed's licence, the annotation model and prompt). The rows stream out in the mixture's sampled order,
a batch at a time: DuckDB joins the mixture's keys to the lineage under a memory limit (spilling to a work folder
beside DIR), partitioned by mixture shard, then reads each shard in order beside its partition, so memory does not
grow with the mixture (measured: ``benchmarks/export_scale.py``). Local and ``s3://`` data roots (s3fs registered
with DuckDB); DIR is local.

Every shard of both configs has one pinned Arrow schema (``TEXT_SCHEMA``, ``MESSAGES_SCHEMA``: ``string``, never
``large_string``, so shards never differ and ``datasets`` loads them without a cast), the same types the card's
``dataset_info`` declares. A document whose text is no longer the recipe's template over its refined row (the QA
was refined again after the mixture was built), or whose QA is gone, stops the export: the two configs would
disagree. DIR is written beside itself and swapped in whole; an existing DIR is replaced only if it is an export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from boostqa_assets.logic.hf_card import STEPS, ConfigFiles, ExportStats, dataset_card
from boostqa_assets.logic.spill import Progress, SpillConfig, duckdb_connect
from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)

MARKER = ".boostqa-export.json"
_S = pa.string()
# Beside the text in both configs: the row's identity, labels and the lineage of every LLM step.
LINEAGE = pa.schema(
    [
        ("doc_id", _S),
        ("qa_id", _S),
        ("seed_id", _S),
        ("source", _S),
        ("license", _S),
        ("recipe", _S),
        ("discipline", _S),
        ("category", _S),
        ("grade", _S),
        ("difficulty", _S),
        ("track", _S),
        ("language", _S),
        ("n_tokens", pa.int64()),
        *[
            (f"{step}_{what}", _S)
            for step in STEPS
            for what in ("model", "prompt_id", "prompt_version", "request_hash")
        ],
    ]
)
MESSAGE = pa.struct([("role", _S), ("content", _S)])
TEXT_SCHEMA = pa.schema([("text", _S), *LINEAGE])
MESSAGES_SCHEMA = pa.schema([("messages", pa.list_(MESSAGE)), *LINEAGE])
CONFIGS = (
    ("text", "one training document: the recipe's template over a question and its refined answer", TEXT_SCHEMA),
    ("messages", "the same QA as a chat: a `user` question and the `assistant` answer", MESSAGES_SCHEMA),
)


class ExportError(Exception):
    """The export cannot be made as asked; the message names what is wrong and the fix."""


@dataclass
class ExportResult:
    out_dir: Path
    rows: int
    tokens: int
    configs: list[ConfigFiles]
    seconds: float


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _mixture(store: Store, recipe: str) -> tuple[dict[str, Any], list[str]]:
    """The mixture's manifest and its committed Parquet shards (as the manifest lists them)."""
    folder = store.path("qa_mixture", f"recipe={recipe}")
    try:
        manifest: dict[str, Any] = json.loads(store.read_bytes(posixpath.join(folder, "manifest.json")))
    except FileNotFoundError:
        base = store.path("qa_mixture")
        found = (
            sorted(posixpath.basename(p).removeprefix("recipe=") for p in store.fs.ls(base, detail=False))
            if store.exists(base)
            else []
        )
        have = f"mixtures here: {', '.join(found)}" if found else "no mixture has been built here"
        raise ExportError(
            f"no mixture of recipe {recipe!r} under {folder} (no manifest.json; {have}); fix: materialize "
            f"qa_mixture[{recipe}] first (boostqa demo, or the Dagster UI), or name a built recipe"
        ) from None
    files = store.partition_files("qa_mixture", {"recipe": recipe})
    listed = sorted(posixpath.join(folder, f) for f in manifest.get("files", []) if f.endswith(".parquet"))
    if sorted(files) != listed:
        raise ExportError(
            f"{folder} holds Parquet shards {[posixpath.basename(f) for f in files]} but its manifest.json lists "
            f"{[posixpath.basename(f) for f in listed]} (a mixture being replaced now?); fix: export again when "
            "qa_mixture has finished"
        )
    return manifest, listed


def _source(store: Store, asset: str, columns: dict[str, str]) -> str:
    """A SQL relation of ``columns`` (name -> SQL type) over every committed partition of ``asset`` (empty if none)."""
    files = store.list_partition_files(asset)
    if not files:
        cols = ", ".join(f"NULL::{t} AS {c}" for c, t in columns.items())
        return f"(SELECT {cols} WHERE false)"
    return f"(SELECT {', '.join(columns)} FROM read_parquet({_sql_list(files)}, union_by_name = true))"


def _lineage_query(store: Store, shards: list[str]) -> str:
    """Per mixture row (its shard file ``_file``, 1-based, and row ``_row``): the refined QA, the seed's licence and
    the lineage. Only the mixture's key columns enter the join, never its text: the narrow side is the hash table."""
    lineage = {f"{s}_{w}": "VARCHAR" for s in ("synth", "refine") for w in ("model", "prompt_id", "prompt_version")}
    lineage |= {f"{s}_request_hash": "VARCHAR" for s in STEPS}
    refined = _source(
        store,
        "refined_qa",
        {"qa_id": "VARCHAR", "question": "VARCHAR", "refined_answer": "VARCHAR", "difficulty": "VARCHAR", **lineage},
    )
    annotated = _source(
        store,
        "annotated_seeds",
        {
            "seed_id": "VARCHAR",
            "license": "VARCHAR",
            "annotate_model": "VARCHAR",
            "annotate_prompt_id": "VARCHAR",
            "annotate_prompt_version": "VARCHAR",
            "annotate_request_hash": "VARCHAR",
        },
    )
    files = _sql_list(shards)
    return f"""
        SELECT list_position({files}, k.filename) AS _file, k._row,
               r.question, r.refined_answer AS answer, r.difficulty, a.license,
               a.annotate_model, a.annotate_prompt_id, a.annotate_prompt_version, r.annotate_request_hash,
               r.synth_model, r.synth_prompt_id, r.synth_prompt_version, r.synth_request_hash,
               r.refine_model, r.refine_prompt_id, r.refine_prompt_version, r.refine_request_hash,
               a.annotate_request_hash IS DISTINCT FROM r.annotate_request_hash AS _annotation_changed
        FROM (SELECT qa_id, seed_id, filename, file_row_number AS _row
              FROM read_parquet({files}, filename = true, file_row_number = true)) k
        LEFT JOIN {refined} r ON r.qa_id = k.qa_id
        LEFT JOIN {annotated} a ON a.seed_id = k.seed_id
    """


def _shard_query(shard: str, part: Path) -> str:
    """One mixture shard in its order, beside its lineage rows (both at most the recipe's ``shard_rows``)."""
    return f"""
        SELECT m.text, j.question, j.answer,
               m.doc_id, m.qa_id, m.seed_id, m.source, j.license, m.recipe, m.discipline, m.category, m.grade,
               j.difficulty, m.track, m.language, m.n_tokens,
               j.annotate_model, j.annotate_prompt_id, j.annotate_prompt_version, j.annotate_request_hash,
               j.synth_model, j.synth_prompt_id, j.synth_prompt_version, j.synth_request_hash,
               j.refine_model, j.refine_prompt_id, j.refine_prompt_version, j.refine_request_hash,
               j._annotation_changed
        FROM read_parquet({_sql_list([shard])}, file_row_number = true) m
        LEFT JOIN read_parquet({_sql_list([str(part / "*.parquet")])}, hive_partitioning = false) j
          ON j._row = m.file_row_number
        ORDER BY m.file_row_number
    """


def _check(batch: pa.Table, template: str, done: int, recipe: str) -> None:
    """Every row's QA is still in refined_qa and its text is still the template over it."""
    missing = batch.column("question").null_count + batch.column("answer").null_count
    if missing:
        i = pc.index(pc.is_null(batch.column("answer")), True).as_py()
        raise ExportError(
            f"document {done + i + 1} of the mixture (qa_id {batch.column('qa_id')[i]}) has no kept row in refined_qa "
            f"any more; fix: materialize qa_mixture[{recipe}] again, then export"
        )
    texts = batch.column("text").to_pylist()
    for i, (q, a) in enumerate(
        zip(batch.column("question").to_pylist(), batch.column("answer").to_pylist(), strict=True)
    ):
        if template.format(question=q, answer=a) != texts[i]:
            raise ExportError(
                f"document {done + i + 1} of the mixture (qa_id {batch.column('qa_id')[i]}) is not the recipe's "
                "template over its refined_qa row (refined again after the mixture was built), so its chat form would "
                f"differ; fix: materialize qa_mixture[{recipe}] again, then export"
            )


def _messages(batch: pa.Table) -> pa.Array:
    """``[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]`` per row, built
    column-wise (question i at 2i, answer i at 2i + 1)."""
    n = batch.num_rows
    both = pa.concat_arrays([batch.column("question").combine_chunks(), batch.column("answer").combine_chunks()])
    order = np.empty(2 * n, dtype=np.int64)
    order[0::2], order[1::2] = np.arange(n), np.arange(n) + n
    roles = pa.array(["user", "assistant"] * n, _S)
    turns = pa.StructArray.from_arrays([roles, pc.take(both, pa.array(order)).cast(_S)], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns)


def _tables(batch: pa.Table) -> dict[str, pa.Table]:
    lineage = [batch.column(f.name).cast(f.type) for f in LINEAGE]
    return {
        "text": pa.Table.from_arrays([batch.column("text").cast(_S), *lineage], schema=TEXT_SCHEMA),
        "messages": pa.Table.from_arrays([_messages(batch), *lineage], schema=MESSAGES_SCHEMA),
    }


def _count(stats: ExportStats, batch: pa.Table) -> None:
    df = pl.from_arrow(batch.drop_columns(["text", "question", "answer"]))
    assert isinstance(df, pl.DataFrame)
    stats.rows += df.height
    stats.tokens += int(df["n_tokens"].sum())
    stats.annotation_changed += int(df["_annotation_changed"].sum())
    for step in STEPS:
        cols = [f"{step}_model", f"{step}_prompt_id", f"{step}_prompt_version"]
        for model, pid, version, n in df.group_by(cols).len().iter_rows():
            key = (step, str(model), str(pid), str(version))
            stats.models[key] = stats.models.get(key, 0) + n
    for src, lic, n, tokens in df.group_by("source", "license").agg(pl.len(), pl.col("n_tokens").sum()).iter_rows():
        acc = stats.sources.setdefault((str(src), str(lic)), [0, 0])
        acc[0], acc[1] = acc[0] + n, acc[1] + int(tokens)
    for lang, n, tokens in df.group_by("language").agg(pl.len(), pl.col("n_tokens").sum()).iter_rows():
        acc = stats.languages.setdefault(str(lang), [0, 0])
        acc[0], acc[1] = acc[0] + n, acc[1] + int(tokens)


class _ShardedWriter:
    """One config's Parquet shards, ``train-NNNNN-of-MMMMM.parquet`` of ``shard_rows`` rows, one schema for all."""

    def __init__(self, root: Path, config: ConfigFiles, shard_rows: int, n_shards: int, row_group: int) -> None:
        self.root, self.config, self.shard_rows, self.n_shards, self.row_group = (
            root,
            config,
            shard_rows,
            n_shards,
            row_group,
        )
        (root / config.name).mkdir(parents=True, exist_ok=True)
        self.writer: pq.ParquetWriter | None = None
        self.in_shard = 0

    def _open(self) -> pq.ParquetWriter:
        name = f"{self.config.name}/train-{len(self.config.files):05d}-of-{self.n_shards:05d}.parquet"
        self.config.files.append(name)
        return pq.ParquetWriter(self.root / name, self.config.schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self.writer is None:
                self.writer, self.in_shard = self._open(), 0
            part = table.slice(start, self.shard_rows - self.in_shard)
            self.writer.write_table(part, row_group_size=self.row_group)
            self.config.rows += part.num_rows
            self.config.num_bytes += part.nbytes
            self.in_shard += part.num_rows
            start += part.num_rows
            if self.in_shard == self.shard_rows:
                self.writer.close()
                self.writer = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.config.download_size = sum((self.root / f).stat().st_size for f in self.config.files)


def _summary(con: duckdb.DuckDBPyConnection, store: Store, asset: str, sql: str) -> list[tuple[Any, ...]]:
    files = store.list_partition_files(asset)
    if not files:
        return []
    return con.execute(sql.format(src=f"read_parquet({_sql_list(files)}, union_by_name = true)")).fetchall()


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Make ``staging`` the folder ``out_dir``: one rename, the old export (if any) removed after."""
    trash = None
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
        os.replace(out_dir, trash)
    os.replace(staging, out_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _joined_batches(
    con: duckdb.DuckDBPyConnection, store: Store, shards: list[str], work: Path, batch_rows: int
) -> Iterator[pa.Table]:
    """The mixture's rows with their refined QA and lineage, in the mixture's order, ``batch_rows`` at a time.

    Two passes keep memory bounded by DuckDB's limit, whatever the mixture's size. One ORDER BY over a join of
    everything would sort every document at once (DuckDB ran out of a 256 MB limit at 10^6 documents). Instead the
    lineage join (mixture keys against refined_qa and annotated_seeds; its hash tables spill) is written once to the
    work folder, partitioned by mixture shard; then each shard file is joined to its partition by row number and
    read in order."""
    joined = work / "joined"
    # A partitioned write buffers rows per partition outside DuckDB's memory limit (by default up to 524,288 rows
    # per thread, then a row group per open file). Small flushes, small row groups and few open files bound it.
    con.execute(f"SET partitioned_write_flush_threshold = {int(batch_rows)}")
    con.execute("SET partitioned_write_max_open_files = 16")
    lineage = _lineage_query(store, shards)
    con.execute(f"COPY ({lineage}) TO '{joined}' (FORMAT parquet, PARTITION_BY (_file), ROW_GROUP_SIZE 4096)")
    for i, shard in enumerate(shards, start=1):
        part = joined / f"_file={i}"
        if not part.exists():  # a shard without rows
            continue
        reader = con.sql(_shard_query(shard, part)).to_arrow_reader(batch_rows)
        for batch in reader:
            if batch.num_rows:
                yield pa.Table.from_batches([batch])
        reader.close()
        shutil.rmtree(part)  # the work folder shrinks as the export goes


def export_recipe(
    store: Store,
    recipe: str,
    out_dir: Path | str,
    shard_rows: int | None = None,
    batch_rows: int = 20_000,
    memory_limit: str = "1GB",
) -> ExportResult:
    """Write the export of ``recipe``'s mixture into the local folder ``out_dir`` (see the module docstring).
    ``shard_rows``: rows per Parquet file (default: the recipe's ``shard_rows``); ``batch_rows``: rows per batch
    and Parquet row group."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise ExportError(
            f"{out_dir} exists and is not a boostqa export (no {MARKER}); fix: name a new or empty folder, or remove it"
        )
    if store.is_local and out_dir.is_relative_to(Path(store.root).resolve()):
        raise ExportError(
            f"{out_dir} is inside the data root {store.root}, which only the pipeline writes; fix: name a folder "
            "outside it"
        )
    manifest, shards = _mixture(store, recipe)
    expected = int(manifest["rows"])
    if not expected:  # datasets cannot load a split without rows ("corresponds to no data"): nothing to hand over
        raise ExportError(
            f"the mixture of recipe {recipe!r} has no documents (budget {manifest['token_budget']}, "
            f"{manifest.get('available_rows', 0)} kept QA available); fix: materialize refined_qa, then "
            f"qa_mixture[{recipe}]"
        )
    shard_rows = shard_rows or int(manifest["recipe"].get("shard_rows") or 100_000)
    n_shards = max(1, math.ceil(expected / shard_rows))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{uuid.uuid4().hex}")
    work = staging / ".work"
    configs = [ConfigFiles(name, what, schema, f"{name}/train-*.parquet") for name, what, schema in CONFIGS]
    stats = ExportStats()
    try:
        con = duckdb_connect(SpillConfig(work_dir=work, memory_limit=memory_limit), "export.duckdb")
        con.execute("SET enable_progress_bar = false")  # DuckDB's own bar would print on stdout; Progress logs
        if not store.is_local:
            con.register_filesystem(store.fs)  # DuckDB's httpfs cannot be installed offline; s3fs reads for it
        writers = [_ShardedWriter(staging, c, shard_rows, n_shards, batch_rows) for c in configs]
        progress = Progress(f"export {recipe}", expected, "docs")
        template = manifest["recipe"]["template"]
        for batch in _joined_batches(con, store, shards, work, batch_rows):
            _check(batch, template, stats.rows, recipe)
            _count(stats, batch)
            for writer, table in zip(writers, _tables(batch).values(), strict=True):
                writer.write(table)
            progress.add(batch.num_rows)
        for writer in writers:
            writer.close()
        if stats.rows != expected or stats.tokens != int(manifest["tokens_total"]):
            raise ExportError(
                f"read {stats.rows} documents and {stats.tokens} tokens, but the mixture's manifest says {expected} "
                f"and {manifest['tokens_total']} (duplicate qa_id in refined_qa, or seed_id in annotated_seeds?); "
                f"fix: check those tables (boostqa sql), materialize qa_mixture[{recipe}] again"
            )
        rejects = _summary(
            con, store, "rejects", "SELECT stage, reason, count(*) FROM {src} GROUP BY ALL ORDER BY 1, 3 DESC"
        )
        seeds = _summary(con, store, "seeds", "SELECT source, license, count(*) FROM {src} GROUP BY ALL")
        con.close()
        shutil.rmtree(work, ignore_errors=True)
        card = dataset_card(manifest, stats, configs, rejects, {(s, lic): n for s, lic, n in seeds})
        (staging / "README.md").write_text(card, encoding="utf-8")
        marker = {
            "recipe": recipe,
            "mixture": store.path("qa_mixture", f"recipe={recipe}"),
            "recipe_hash": manifest["recipe_hash"],
            "rows": stats.rows,
            "tokens": stats.tokens,
            "configs": {c.name: c.files for c in configs},
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True), encoding="utf-8")
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after the swap; a failed export leaves nothing
    seconds = time.perf_counter() - t0
    logger.info(
        "export %s: %d documents, %d tokens, %d + %d files in %s (%.1f s)",
        recipe,
        stats.rows,
        stats.tokens,
        len(configs[0].files),
        len(configs[1].files),
        out_dir,
        seconds,
    )
    return ExportResult(out_dir, stats.rows, stats.tokens, configs, seconds)
