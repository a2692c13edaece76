"""DuckDB over the Parquet assets: a read-only connection with one view per asset plus the reports.

Views come from ``sql/views/<name>.sql`` (``{files}`` is the list of the asset's committed part files, read from
the partitions' manifests); reports from ``sql/reports``.
An asset with no files yet gets an empty view with its record's columns, so every query binds. For
``s3://`` roots the s3fs filesystem is registered with DuckDB (its httpfs extension is not installable
offline).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

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
from boostqa_assets.settings import SQL_DIR
from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)

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


def view_statements(store: Store, sql_dir: Path = SQL_DIR) -> list[str]:
    """CREATE VIEW statements for the assets and the reports.

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
    for path in sorted((sql_dir / "reports").glob("*.sql")):
        statements.append(path.read_text())
    return statements


def connect(store: Store, sql_dir: Path = SQL_DIR) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    if store.protocol == "s3":
        con.register_filesystem(store.fs)
    for stmt in view_statements(store, sql_dir):
        con.execute(stmt)
    return con


def init_script(store: Store, sql_dir: Path = SQL_DIR) -> str:
    """The same views as one SQL script (for ``duckdb -init``)."""
    return "\n".join(view_statements(store, sql_dir)) + "\n"
