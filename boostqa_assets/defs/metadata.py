"""Materialization metadata that tells the truth in the Dagster UI.

Dagster applies a ``MaterializeResult``'s metadata to every partition of a multi-partition run, so an empty
partition would show the run's rows. The stages therefore return only what is true of every partition (the
column schema) and give each partition its own figures with ``context.add_asset_metadata(..., partition_key=key)``
(one event per partition, each with that partition's rows, rejects, tokens and a few of its rows). Run-wide LLM
figures that belong to no partition (429s, limiter waits) go to the run's log instead (``log_run_llm``).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import polars as pl
from pydantic import BaseModel

from boostqa_assets.llm.types import Latencies, LLMResult, LLMStats
from boostqa_assets.records import polars_schema

PREVIEW_ROWS = 3
PREVIEW_CHARS = 80
# Eight heights of a block: a discipline x grade grid reads as a heatmap in a plain table (the UI shows tables
# inline; a markdown image needs a click).
_BARS = "▁▂▃▄▅▆▇█"


def column_schema(model: type[BaseModel]) -> dg.TableSchema:
    """A record's columns (``records.py``: the polars type of each field, nullable where the model allows None)
    as Dagster's ``dagster/column_schema``."""
    schema = polars_schema(model)
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name,
                str(schema[name]),
                constraints=dg.TableColumnConstraints(nullable=_allows_none(f.annotation)),
            )
            for name, f in model.model_fields.items()
        ]
    )


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (types.UnionType, typing.Union) and type(None) in typing.get_args(
        annotation
    )


def _cell(value: Any, max_chars: int) -> str | int | float | bool | None:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def table_preview(
    df: pl.DataFrame | None, columns: list[str], n: int = PREVIEW_ROWS, max_chars: int = PREVIEW_CHARS
) -> dg.MetadataValue:
    """The first ``n`` rows of ``columns`` as a table (long texts cut to ``max_chars``); an empty frame gives an
    empty table with the same columns, so an empty partition shows that it is empty."""
    shown = [c for c in columns if df is not None and c in df.columns] if df is not None else columns
    rows = df.select(shown).head(n).to_dicts() if df is not None else []
    schema = dg.TableSchema(
        columns=[dg.TableColumn(c, str(df.schema[c]) if df is not None else "string") for c in shown]
    )
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: _cell(r[c], max_chars) for c in shown}) for r in rows], schema=schema
    )


def reasons_text(reasons: Mapping[str, int]) -> str:
    """Reject reasons as ``reason: n, reason: n`` (most first), ``-`` for none."""
    ordered = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k}: {v}" for k, v in ordered) or "-"


def row_figures(rows: int, rejected: int, reasons: Mapping[str, int]) -> dict[str, Any]:
    """What every partition's materialization says first: its rows (``dagster/row_count``) and rejects."""
    return {
        "rows": rows,
        "dagster/row_count": rows,
        "rows_rejected": rejected,
        "reject_reasons": reasons_text(reasons),
    }


@dataclass
class LLMTally:
    """One LLM client's figures for one partition, summed from the results of that partition's requests (each
    ``LLMResult`` says what its request cost): the partitions of a run add up to the client's ``LLMStats``."""

    stats: LLMStats  # the client's: role, model, prices (read at the end: a batch halves the price)
    requests: int = 0
    ok: int = 0
    failed: int = 0
    http_requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latencies: Latencies = field(default_factory=Latencies)
    failures_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, results: Iterable[LLMResult]) -> None:
        for r in results:
            self.requests += 1
            self.ok += int(r.ok)
            self.failed += int(not r.ok)
            self.http_requests += r.http_requests
            self.cache_hits += r.cache_hits
            self.retries += r.retries
            self.tokens_in += r.paid_tokens_in
            self.tokens_out += r.paid_tokens_out
            if r.http_requests and not r.cached:
                self.latencies.append(r.latency_s)
            if not r.ok:
                reason = r.error or "unknown"
                self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1

    @property
    def cost_usd(self) -> float:
        s = self.stats
        return (self.tokens_in * s.price_per_mtok_in + self.tokens_out * s.price_per_mtok_out) / 1e6 * s.price_factor

    def entry(self) -> dict[str, Any]:
        """The JSON entry the CLI summary reads (``runner.llm_stats_by_role``): role, model and the counts."""
        return {
            "role": self.stats.role,
            "model": self.stats.model,
            "requests": self.requests,
            "http_requests": self.http_requests,
            "cache_hits": self.cache_hits,
            "ok": self.ok,
            "failed": self.failed,
            "retries": self.retries,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "latency_p50_s": round(self.latencies.quantile(0.5), 3),
            "latency_p95_s": round(self.latencies.quantile(0.95), 3),
            "est_cost_usd": round(self.cost_usd, 6),
            "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
        }

    def metadata(self) -> dict[str, Any]:
        """Flat figures plus the JSON entry, under the names ``support.llm_metadata`` uses for a whole run."""
        e = self.entry()
        return {
            "llm_requests": e["requests"],
            "llm_http_requests": e["http_requests"],
            "llm_cache_hits": e["cache_hits"],
            "llm_failed": e["failed"],
            "llm_retries": e["retries"],
            "tokens_in": e["tokens_in"],
            "tokens_out": e["tokens_out"],
            "latency_p50_s": e["latency_p50_s"],
            "latency_p95_s": e["latency_p95_s"],
            "est_cost_usd": e["est_cost_usd"],
            "llm": dg.MetadataValue.json(e),
        }


def log_run_llm(log: Any, label: str, stats: LLMStats) -> None:
    """The run-wide LLM figures no partition owns (429s, 5xx, timeouts, waits), in the run's event log."""
    m = stats.to_metadata()
    log.info(
        f"{label} ({m['role']}, {m['model']}): {m['requests']} requests, {m['http_requests']} HTTP, "
        f"{m['cache_hits']} cache hits, {m['failed']} failed, {m['retries']} retries, {m['http_429']} 429s, "
        f"{m['http_5xx']} 5xx, {m['timeouts']} timeouts, {m['tokens_in']} in / {m['tokens_out']} out tokens, "
        f"${m['est_cost_usd']:.4f}, latency p50 {m['latency_p50_s']}s p95 {m['latency_p95_s']}s, limiter wait "
        f"{m['limiter_wait_s']}s, 429 wait {m['rate_limit_wait_s']}s"
        + (f"; stopped: {m['stopped']}" if m["stopped"] != "-" else "")
    )


def grid_table(
    values: Mapping[tuple[str, str], float | None],
    disciplines: list[str],
    grades: list[str],
    fmt: str = "{:.2f}",
    vmin: float | None = None,
    vmax: float | None = None,
) -> dg.MetadataValue:
    """A discipline x grade grid as a table the UI shows inline: one row per discipline, one column per grade,
    each cell its value and a bar of its height on the grid's scale (``n/a`` where there is no value)."""
    finite = [v for v in values.values() if v is not None and not math.isnan(v)]
    lo = vmin if vmin is not None else min(finite, default=0.0)
    hi = vmax if vmax is not None else max(finite, default=1.0)
    span = hi - lo if hi > lo else 1.0

    def cell(v: float | None) -> str:
        if v is None or math.isnan(v):
            return "n/a"
        step = min(len(_BARS) - 1, max(0, int((v - lo) / span * len(_BARS))))
        return f"{fmt.format(v)} {_BARS[step]}"

    schema = dg.TableSchema(
        columns=[dg.TableColumn("discipline", "string"), *(dg.TableColumn(g, "string") for g in grades)]
    )
    records = [dg.TableRecord({"discipline": d, **{g: cell(values.get((d, g))) for g in grades}}) for d in disciplines]
    return dg.MetadataValue.table(records=records, schema=schema)
