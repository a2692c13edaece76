"""Glue shared by the asset modules: progress logs, metadata tables, per-partition check reporting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import dagster as dg
import polars as pl
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData

from boostqa_assets.checks import NOT_SENT_REASONS, CheckOutcome
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


def one_line(value: Any) -> str:
    """A value as readable text on one line: a dict as ``a: 1, b: 2`` (not its repr), a list as ``a, b``, None and
    empty as ``-``."""
    if isinstance(value, dict):
        text = ", ".join(f"{k}: {v}" for k, v in value.items())
    elif isinstance(value, list | tuple):
        text = ", ".join(map(str, value))
    else:
        text = "" if value is None else str(value)
    return " ".join(text.split()) or "-"


def md_cell(value: Any) -> str:
    """One markdown table cell (``one_line``) with ``|`` escaped: partition keys such as ``arts|primary`` would
    otherwise split the cell and shift every column after it."""
    return one_line(value).replace("\\", "\\\\").replace("|", "\\|")


def md_table(rows: Iterable[dict[str, Any]], columns: list[str] | None = None) -> dg.MetadataValue:
    rows = list(rows)
    if not rows:
        return dg.MetadataValue.md("_no rows_")
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


def asset_ui(asset: str) -> dict[str, Any]:
    """``owners`` and ``tags`` for an asset decorator, from `pipeline.yaml` ``ui:``."""
    from boostqa_assets.resources import project_config

    ui = project_config().pipeline.ui
    return {"owners": ui.owners_for(asset), "tags": ui.tags_for(asset)}


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
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """Evaluate a check for every partition of the run, and record one evaluation per partition.

    Each evaluation carries its partition, whatever the run's size: a run launched over a range of one key (the
    demo's runs, a one-partition backfill) has no ``dagster/partition`` tag, and an ``AssetCheckResult`` would be
    recorded without a partition (the UI shows that partition's check as skipped). Then the check's output, which
    is what later steps wait for; a failed blocking evaluation fails the step after it, so they do not run. In a
    run of many, the Great Expectations suite runs once over the partitions' rows (``expectations.deferred``), and
    per partition only if that fails. Use as ``yield from report_partition_checks(...)``.
    """
    from boostqa_assets import expectations
    from boostqa_assets.resources import project_config

    keys = context.partition_keys
    if len(keys) == 1:
        outcomes = {keys[0]: evaluate(keys[0])}
    else:
        # The pure rules run per partition; the expectation suite once over the run's partitions (a suite run has
        # a fixed cost of ~0.35 s). Only if that fails is it run per partition, to say which ones fail.
        with expectations.deferred(asset, project_config().taxonomy, len(keys)) as state:
            outcomes = {key: evaluate(key) for key in keys}
        suite = expectations.run_deferred(state)
        if suite.passed:
            shared = {k: v for k, v in suite.metadata.items() if k.startswith("gx_")}
            shared["gx"] = f"passed: one suite run over this run's {len(keys)} partitions"
            for outcome in outcomes.values():
                outcome.metadata.update(shared)
        else:
            outcomes = {key: evaluate(key) for key in keys}
    asset_key = dg.AssetKey(asset)
    blocking = any(spec.blocking for spec in context.check_specs)
    targets = _latest_materializations(context.instance, asset_key, keys)
    for key, outcome in outcomes.items():
        yield dg.AssetCheckEvaluation(
            asset_key=asset_key,
            check_name=check_name,
            passed=outcome.passed,
            partition=key,
            blocking=blocking,
            target_materialization_data=targets.get(key),
            metadata={k: _scalar(v) for k, v in outcome.metadata.items()},
        )
    yield dg.Output(None, output_name=context.op_execution_context.op_def.output_defs[0].name)


def _scalar(value: Any) -> Any:
    """Check metadata the UI shows as text: numbers and strings as they are, dicts and lists as one line."""
    return value if isinstance(value, str | int | float | bool) or value is None else one_line(value)


def _latest_materializations(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, keys: list[str]
) -> dict[str, AssetCheckEvaluationTargetMaterializationData]:
    """Each partition's latest materialization (what its evaluation checked), in one query: the run that checks
    them has just materialized them all, so they are the newest ``len(keys)`` records."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=keys), limit=len(keys)
    ).records
    found: dict[str, AssetCheckEvaluationTargetMaterializationData] = {}
    for record in records:
        if record.partition_key is not None and record.partition_key not in found:
            found[record.partition_key] = AssetCheckEvaluationTargetMaterializationData(
                storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
            )
    return found


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


def unsent_rows(reasons: Mapping[str, int]) -> int:
    """Rows of a partition that were never answered (the endpoint went down, kept answering 429, or a request
    failed all its retries on the wire), from its reject reasons."""
    return sum(int(reasons.get(reason, 0)) for reason in NOT_SENT_REASONS)


def fail_if_unsent(asset: str, unsent: Mapping[str, int]) -> None:
    """Fail the step when a partition has rows that were never answered, after what was answered is written
    and cached. A step that stopped sending is a failed step, not a materialization with a failed check: a
    backfill's re-execution from failure (and the runner) then runs this asset again, which pays only for the
    rows that never came back, instead of running only what is downstream of it."""
    bad = {key: n for key, n in unsent.items() if n}
    if not bad:
        return
    shown = ", ".join(f"{key or asset} ({n})" for key, n in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise dg.Failure(
        description=(
            f"{asset}: {sum(bad.values())} rows never answered in {shown}{more}: the endpoint went down, kept "
            f"answering 429, or failed every retry (reasons {', '.join(NOT_SENT_REASONS)} in rejects). Fix the "
            "endpoint and materialize again: what was answered is written and cached, only the rest is paid for"
        ),
        metadata={"rows_not_sent": sum(bad.values()), "partitions_not_complete": len(bad)},
    )
