"""DuckDB over the Parquet assets: a read-only connection with one view per asset plus the reports.

Views come from ``boostqa_assets/sql/views/<name>.sql`` (``{files}`` is the list of the asset's committed part
files, read from the partitions' manifests); reports from ``boostqa_assets/sql/reports``;
``taxonomy_cells`` from ``taxonomy.yaml``.
An asset with no files yet gets an empty view with its record's columns, so every query binds. For
``s3://`` roots the s3fs filesystem is registered with DuckDB (its httpfs extension is not installable
offline).

The same views are kept in a DuckDB file, the catalog (``$BOOSTQA_HOME/boostqa.duckdb``, ``refresh_catalog``),
so any DuckDB shell opens them: ``duckdb -readonly .boostqa/boostqa.duckdb``. A view lists the files committed
when it was made, so the catalog is a snapshot: ``boostqa demo`` refreshes it after each stage, ``boostqa duckdb``
and ``boostqa catalog`` before use, and anything else that materializes can call ``refresh_catalog``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from boostqa_assets.llm.cache import Storage, stored_forms
from boostqa_assets.records import (
    ANNOTATED_SCHEMA,
    MIXTURE_SCHEMA,
    PLAN_SCHEMA,
    PROBE_CELL_SCHEMA,
    PROBE_ITEM_SCHEMA,
    REFINED_SCHEMA,
    REJECT_SCHEMA,
    SEED_SCHEMA,
    SYNTHESIZED_SCHEMA,
)
from boostqa_assets.settings import SQL_DIR, get_settings
from boostqa_assets.storage import Store

if TYPE_CHECKING:
    from boostqa_assets.configs import TaxonomyConfig

logger = logging.getLogger(__name__)

# Files older DuckDB shells can open: DuckDB 2.0 writes storage version 69 by default, which the 1.x shells
# (duckdb-cli 1.5, most system packages) refuse. Views are stored as SQL text, so nothing is lost.
CATALOG_STORAGE_VERSION = "v1.0.0"

VIEW_SCHEMAS: dict[str, pl.Schema] = {
    "seeds": SEED_SCHEMA,
    "annotated_seeds": ANNOTATED_SCHEMA,
    "deficiency_probe": PROBE_CELL_SCHEMA,
    "deficiency_probe_items": PROBE_ITEM_SCHEMA,
    "synthesis_plan": PLAN_SCHEMA,
    "synthesized_qa": SYNTHESIZED_SCHEMA,
    "refined_qa": REFINED_SCHEMA,
    "qa_mixture": MIXTURE_SCHEMA,
    "rejects": REJECT_SCHEMA,
    # Cache entries (Parquet segments and shards, older JSON files: see llm/cache/); `request` is JSON in the view,
    # text when empty; `created_at` is null for JSON files.
    "llm_cache": pl.Schema(
        {
            "request_hash": pl.Utf8,
            "role": pl.Utf8,
            "model": pl.Utf8,
            "request": pl.Utf8,
            "content": pl.Utf8,
            "reasoning": pl.Utf8,
            "finish_reason": pl.Utf8,
            "tokens_in": pl.Int64,
            "tokens_out": pl.Int64,
            "latency_s": pl.Float64,
            "created_at": pl.Datetime("us", "UTC"),
        }
    ),
}

_DUCK_TYPES: dict[type, str] = {
    pl.Utf8: "VARCHAR",
    pl.Int64: "BIGINT",
    pl.Float64: "DOUBLE",
    pl.Boolean: "BOOLEAN",
    pl.Datetime: "TIMESTAMPTZ",
}


def _duck_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.List):
        return _duck_type(dtype.inner) + "[]"
    return _DUCK_TYPES[type(dtype)]


def _empty_view(schema: pl.Schema) -> str:
    cols = ", ".join(f"CAST(NULL AS {_duck_type(t)}) AS {name}" for name, t in schema.items())
    return f"SELECT {cols} WHERE false"


def _file_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _llm_cache_view(store: Store, body: str, root: str, schema: pl.Schema) -> str:
    """The cache's query with the ``-- part: <layout>`` selects whose layout holds files (``{parts}``)."""
    head, *chunks = re.split(r"^-- part: (\w+)\n", body, flags=re.M)
    forms = stored_forms(Storage.of(f"{store.root}/_llm_cache", store.fs))
    parts = [_sql(chunk) for form, chunk in zip(chunks[::2], chunks[1::2], strict=True) if form in forms]
    if not parts:
        return _empty_view(schema)
    return _sql(head).replace("{parts}", "\nUNION ALL\n".join(parts)).replace("{root}", root)


def _sql(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("--")).strip()


def _taxonomy_view(taxonomy: TaxonomyConfig) -> str:
    """Every discipline x grade cell of the taxonomy, in its order, so reports show the empty cells too."""
    rows = [
        f"('{d.name}', '{d.category}', '{g}', {i}, {j})"
        for i, d in enumerate(taxonomy.disciplines)
        for j, g in enumerate(taxonomy.grades)
    ]
    return (
        "CREATE OR REPLACE VIEW taxonomy_cells AS SELECT * FROM (VALUES "
        + ", ".join(rows)
        + ") AS t(discipline, category, grade, discipline_order, grade_order);"
    )


def _load_taxonomy() -> TaxonomyConfig:
    from boostqa_assets.configs import TaxonomyConfig, load_config

    taxonomy = load_config("taxonomy.yaml", get_settings().config_dir)
    assert isinstance(taxonomy, TaxonomyConfig)
    return taxonomy


def view_statements(store: Store, sql_dir: Path = SQL_DIR, taxonomy: TaxonomyConfig | None = None) -> list[str]:
    """CREATE VIEW statements for the assets, the taxonomy's cells (``taxonomy``: default the configured one) and
    the reports.

    A table view reads exactly the committed part files of every partition (``{files}``, from the partitions'
    manifests: never a chunk of a run still writing, never an older generation); an asset with no committed
    file yet gets an empty view with its record's columns. The LLM cache view reads its own layout.
    """
    root = store.root if "://" in store.root else Path(store.root).resolve().as_posix()
    statements = []
    for name, schema in VIEW_SCHEMAS.items():
        if name == "llm_cache":  # its own layout: segments, shards and legacy JSON files
            body = _llm_cache_view(store, (sql_dir / "views" / f"{name}.sql").read_text(), root, schema)
            statements.append(f"CREATE OR REPLACE VIEW {name} AS {body};")
            continue
        body = (sql_dir / "views" / f"{name}.sql").read_text()
        select = "\n".join(line for line in body.splitlines() if not line.startswith("--"))
        if "{files}" in select:
            files = store.list_partition_files(name)
            if store.is_local:
                files = [Path(f).resolve().as_posix() for f in files]
            select = select.replace("{files}", _file_list(files)) if files else _empty_view(schema)
        else:
            select = select.replace("{root}", root)
            glob = select.split("'", 2)[1]  # the first quoted string is the file glob
            has_files = bool(store.fs.glob(glob.split("://", 1)[-1] if store.protocol == "s3" else glob))
            select = select if has_files else _empty_view(schema)
        statements.append(f"CREATE OR REPLACE VIEW {name} AS {select};")
    statements.append(_taxonomy_view(taxonomy or _load_taxonomy()))
    for path in sorted((sql_dir / "reports").glob("*.sql")):
        statements.append(path.read_text())
    return statements


def view_names(statements: list[str]) -> list[str]:
    """The views the statements create, in order (the shell's banner lists them all)."""
    return [m.group(1) for stmt in statements for m in re.finditer(r"CREATE OR REPLACE VIEW (\w+)", stmt)]


def connect(store: Store, sql_dir: Path = SQL_DIR) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    if store.protocol == "s3":
        con.register_filesystem(store.fs)
    for stmt in view_statements(store, sql_dir):
        con.execute(stmt)
    return con


def refresh_catalog(store: Store, path: Path | None = None, sql_dir: Path = SQL_DIR) -> list[str]:
    """Write the views into the catalog file ``path`` (default ``$BOOSTQA_HOME/boostqa.duckdb``); returns the view
    names.

    The file is built beside the catalog and swapped in with ``os.replace``: a shell that has the old catalog open
    keeps reading its snapshot and never blocks a refresh (DuckDB allows one writer per file), and two refreshes
    never mix. For an ``s3://`` root the views name ``s3://`` files: the DuckDB shell reads them only with its
    httpfs extension loaded and an S3 secret; ``boostqa duckdb`` / ``boostqa sql`` register s3fs instead."""
    path = path or get_settings().catalog_path
    path.parent.mkdir(parents=True, exist_ok=True)
    statements = view_statements(store, sql_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    started = time.perf_counter()
    con = duckdb.connect()
    try:
        if store.protocol == "s3":  # CREATE VIEW binds its query, which reads the files' footers
            con.register_filesystem(store.fs)
        escaped = str(tmp).replace("'", "''")
        con.execute(f"ATTACH '{escaped}' AS boostqa_catalog (STORAGE_VERSION '{CATALOG_STORAGE_VERSION}')")
        con.execute("USE boostqa_catalog")
        for stmt in statements:
            con.execute(stmt)
        con.execute("USE memory")
        con.execute("DETACH boostqa_catalog")  # checkpoints: the file is complete, no write-ahead log is left
        con.close()
        os.replace(tmp, path)
    finally:
        con.close()
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    logger.debug("catalog %s refreshed in %.2fs", path, time.perf_counter() - started)
    return view_names(statements)


def lineage_lines(con: duckdb.DuckDBPyConnection, key: str) -> list[str] | None:
    """Everything that made one row: its seed, then each LLM step with model, prompt version, request hash and
    the raw reply (from the request cache). ``key`` is a ``qa_id``, a mixture ``doc_id`` or a ``seed_id``; None
    when no kept QA row, mixture document or seed has it."""
    qa_ids = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT qa_id FROM refined_qa WHERE qa_id = $1 OR seed_id = $1 "
            "UNION SELECT qa_id FROM qa_mixture WHERE doc_id = $1 ORDER BY 1",
            [key],
        ).fetchall()
    ]
    if not qa_ids:
        return None
    lines = []
    for qa_id in qa_ids:
        row = con.execute("SELECT * FROM lineage_qa WHERE qa_id = $1", [qa_id]).fetchall()
        cols = [d[0] for d in con.description]
        info = dict(zip(cols, row[0], strict=True))
        lines.append(f"== {qa_id}  ({info['discipline']}, grade {info['grade']}, track {info['track']})")
        docs = con.execute("SELECT doc_id, recipe FROM qa_mixture WHERE qa_id = $1", [qa_id]).fetchall()
        lines.append("mixture: " + (", ".join(f"{d} in {r}" for d, r in docs) or "not sampled into any recipe"))
        lines.append(
            f"seed {info['seed_id']} from {info['source']} ({info['seed_kind']}, native id {info['native_id']}):"
        )
        lines.append("  " + (info["seed_content"] or "")[:500].replace("\n", "\n  "))
        steps = con.execute(
            "SELECT step, model, prompt_id, prompt_version, request_hash, raw_output, raw_reasoning "
            "FROM lineage_steps WHERE qa_id = $1 ORDER BY step_no",
            [qa_id],
        ).fetchall()
        for step, model, pid, version, rhash, raw, reasoning in steps:
            lines.append(f"{step}: model {model}, prompt {pid}/{version}, request {rhash}")
            if reasoning:
                lines.append("  reasoning: " + reasoning[:300].replace("\n", " "))
            lines.append("  raw output: " + ((raw or "<not in the cache>")[:500]).replace("\n", "\n  "))
        lines.append(f"question: {info['question']}")
        lines.append(f"refined answer: {info['refined_answer']}")
    return lines
