"""Glue shared by the asset modules: progress logs, metadata tables, per-partition check reporting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import dagster as dg
import polars as pl

from boostqa_assets.checks import CheckOutcome
from boostqa_assets.llm.client import ProgressFn
from boostqa_assets.llm.types import LLMStats


def progress_logger(log: Any, label: str, every_s: float = 10.0) -> ProgressFn:
    """Report an LLM batch's progress: a live bar in the ``boostqa demo`` terminal (``progress.active()``), and
    log lines with counts and rates (every ``every_s`` seconds and at the end of each call when there is no
    bar; at the end of each call only when there is one, so the event log keeps the record).

    The callback may serve several ``LLMClient.run`` calls (a stage that streams chunks): the bar counts
    requests over all of them; a call starts when the previous one reported ``done == total``."""
    from boostqa_assets import progress

    display = progress.active()
    started = time.monotonic()
    last = [started]
    calls = [0, 0]  # requests of the calls already finished; (done, total) of the current call below
    current = [0, 0]

    def report(done: int, total: int, stats: LLMStats) -> None:
        if current[0] and current[0] == current[1]:  # the previous call had finished: this is a new one
            calls[0] += current[1]
        current[:] = [done, total]
        if display is not None:
            display.update(label, id(report), calls[0] + done, calls[0] + total, stats)
        now = time.monotonic()
        if done != total and (display is not None or now - last[0] < every_s):
            return
        last[0] = now
        rate = (calls[0] + done) / max(now - started, 1e-9)
        log.info(
            f"{label}: {done}/{total} requests ({100 * done / total:.0f}%), {rate:.2f}/s, "
            f"{stats.cache_hits} cache hits, {stats.failed} failed, {stats.retries} retries, "
            f"{stats.tokens_in} in / {stats.tokens_out} out tokens, ${stats.cost_usd:.4f}"
        )

    return report


def md_table(rows: Iterable[dict[str, Any]], columns: list[str] | None = None) -> dg.MetadataValue:
    rows = list(rows)
    if not rows:
        return dg.MetadataValue.md("_no rows_")
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


def counts_by(df: pl.DataFrame, column: str) -> dict[str, int]:
    if df.is_empty():
        return {}
    return {str(k): int(v) for k, v in df.group_by(column).len().sort(column).iter_rows()}


def llm_metadata(stats: LLMStats) -> dict[str, Any]:
    meta = stats.to_metadata()
    return {
        "llm_requests": meta["requests"],
        "llm_http_requests": meta["http_requests"],
        "llm_cache_hits": meta["cache_hits"],
        "llm_failed": meta["failed"],
        "llm_retries": meta["retries"],
        "llm_429s": meta["http_429"],
        "tokens_in": meta["tokens_in"],
        "tokens_out": meta["tokens_out"],
        "latency_p50_s": meta["latency_p50_s"],
        "latency_p95_s": meta["latency_p95_s"],
        "est_cost_usd": meta["est_cost_usd"],
        "llm": dg.MetadataValue.json(meta),
    }


def report_partition_checks(
    context: dg.AssetCheckExecutionContext,
    asset: str,
    check_name: str,
    evaluate: Callable[[str], CheckOutcome],
) -> dg.AssetCheckResult:
    """Evaluate a check for every partition of the run.

    A run of one partition returns that partition's result. A run of many (single-run backfill) records
    one evaluation per partition in the event log, then returns a summary (passed only if all passed),
    which is what blocks downstream steps when the check is blocking. In a run of many, the Great Expectations
    suite runs once over the partitions' rows (``expectations.deferred``), and per partition only if that fails.
    """
    from boostqa_assets import expectations
    from boostqa_assets.resources import project_config

    keys = context.partition_keys
    if len(keys) == 1:
        outcome = evaluate(keys[0])
        return dg.AssetCheckResult(passed=outcome.passed, metadata=outcome.metadata)
    # The pure rules run per partition; the expectation suite once over the run's partitions (a suite run has a
    # fixed cost of ~0.35 s). Only if that fails is it run per partition, to say which ones fail.
    with expectations.deferred(asset, project_config().taxonomy, len(keys)) as state:
        outcomes = {key: evaluate(key) for key in keys}
    suite = expectations.run_deferred(state)
    if not suite.passed:
        outcomes = {key: evaluate(key) for key in keys}
    failed = []
    for key, outcome in outcomes.items():
        if not outcome.passed:
            failed.append(key)
        context.op_execution_context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey(asset),
                check_name=check_name,
                passed=outcome.passed,
                partition=key,
                metadata={k: v for k, v in outcome.metadata.items() if isinstance(v, (str, int, float, bool))},
            )
        )
    return dg.AssetCheckResult(
        passed=not failed,
        metadata={
            "partitions_checked": len(keys),
            "partitions_failed": len(failed),
            "failed_partitions": ", ".join(failed[:50]) or "-",
            **{k: v for k, v in suite.metadata.items() if k.startswith("gx_")},
        },
    )


def endpoint_pool(role: str) -> str:
    """The Dagster concurrency pool of a role: one pool per endpoint (host and port, or `embedded`), so roles
    that share an endpoint share its slots across every run of the instance (limits in `dagster.yaml`)."""
    from urllib.parse import urlsplit

    from boostqa_assets.resources import project_config

    cfg = project_config().llm.roles[role]  # type: ignore[index]
    if cfg.is_embedded:
        return "llm_embedded"
    parts = urlsplit(cfg.base_url)
    host = f"{parts.hostname or 'unknown'}_{parts.port}" if parts.port else (parts.hostname or "unknown")
    return "llm_" + "".join(c if c.isalnum() else "_" for c in host.lower())


def backfill_policy() -> dg.BackfillPolicy:
    """Every partitioned asset's backfill policy (`pipeline.yaml` `orchestration.max_partitions_per_run`).

    Default: a backfill is one run over all selected partitions (one process, one warm LLM endpoint, one batch
    at the concurrency cap). With N set, runs of at most N partitions: a failure redoes only its run's N, and
    the run queue spreads the runs over `max_concurrent_runs`.
    """
    from boostqa_assets.resources import project_config

    n = project_config().pipeline.orchestration.max_partitions_per_run
    return dg.BackfillPolicy.single_run() if n is None else dg.BackfillPolicy.multi_run(max_partitions_per_run=n)


def eager_when_upstream_passed() -> dg.AutomationCondition:
    """Eager automation that waits for its upstream partitions' blocking checks: a source partition that failed in a
    multi-partition run still gets a materialization event (Dagster cannot fail one partition of a run), and its
    failed check is what keeps the LLM stage from spending calls on it."""
    return dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
