"""What ``boostqa demo`` reports: a line per stage as it ends, then the run's summary (rows, rejects by reason,
LLM requests, tokens and cost per role). Lines are returned, never printed: ``cli.py`` prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from boostqa_assets.runner import StageResult
    from boostqa_assets.storage import Store

# The LLM clients each stage runs, in pipeline order, as the runner labels them (``runner.llm_stats_by_role``):
# synthesized_qa re-annotates a sample with the annotator for grade fidelity, shown apart.
STAGE_ROLES: dict[str, tuple[str, ...]] = {
    "annotated_seeds": ("annotator",),
    "deficiency_probe": ("probe", "judge"),
    "synthesized_qa": ("synthesizer", "annotator (fidelity)"),
    "refined_qa": ("refiner",),
}


def base_role(label: str) -> str:
    """``annotator (fidelity)`` -> ``annotator``: the configured role behind a client label."""
    return label.split(" ", 1)[0]


def stage_line(res: StageResult) -> str:
    """One line per stage: status, time, partitions, rows and rejects over all of its runs, LLM tokens, checks."""
    status = {"ok": "ok", "partial": "PARTIAL", "failed": "FAILED"}[res.status]
    stats = res.stats
    extra = ""
    if stats.llm:
        t_in = sum(int(v["tokens_in"]) for v in stats.llm.values())
        t_out = sum(int(v["tokens_out"]) for v in stats.llm.values())
        hits = sum(int(v["cache_hits"]) for v in stats.llm.values())
        cost = sum(float(v.get("est_cost_usd") or 0.0) for v in stats.llm.values())
        extra = f", tokens in/out {t_in}/{t_out}, cache hits {hits}, ${cost:.4f}"
    failed = f", {len(res.failed_partitions)} failed" if res.failed_partitions else ""
    skipped = f", {len(res.skipped_partitions)} skipped" if res.skipped_partitions else ""
    runs = [r for r in res.run_id.split(",") if r]
    run_ids = ", ".join(r[:8] for r in runs[:3]) + (" ..." if len(runs) > 3 else "")
    return (
        f"  {res.asset:<16} {status:<7} {res.seconds:7.1f}s  {res.partitions:>3} partitions{failed}{skipped}  "
        f"rows {stats.rows}, rejected {stats.rows_rejected}{extra}  "
        f"checks {res.checks_passed} passed / {res.checks_failed} failed  (runs: {run_ids or '-'})"
    )


def rejects_by_reason(results: list[StageResult], store: Store) -> list[tuple[str, str, int]]:
    """(stage, reason, rows) over the rejects of the partitions this run materialized, and only those: files that
    other (or failed) runs left behind are not counted."""
    import polars as pl

    from boostqa_assets.logic.probe import REJECTS_PARTITION
    from boostqa_assets.storage import partition_slug

    wanted = {
        f"/stage={res.asset}/partition={partition_slug(key or REJECTS_PARTITION)}/"
        for res in results
        for key in res.materialized
    }
    files = [f for f in store.list_partition_files("rejects") if any(w in f for w in wanted)]
    counts: dict[tuple[str, str], int] = {}
    for path in files:
        stage = path.split("/stage=", 1)[1].split("/", 1)[0]
        for reason, n in store.read_parquet(path).group_by("reason").agg(pl.len()).iter_rows():
            counts[(stage, str(reason))] = counts.get((stage, str(reason)), 0) + int(n)
    return sorted(((s, r, n) for (s, r), n in counts.items()), key=lambda t: (t[0], -t[2], t[1]))


def llm_by_role(results: list[StageResult]) -> dict[str, dict[str, float]]:
    """Every LLM client's figures over the whole run, by label (a role used by several stages is added up)."""
    totals: dict[str, dict[str, float]] = {}
    for res in results:
        for role, stats in res.stats.llm.items():
            total = totals.setdefault(role, dict.fromkeys(stats, 0))
            for k, v in stats.items():
                total[k] = total.get(k, 0) + v
    return totals


def llm_lines(results: list[StageResult]) -> list[str]:
    """The per-role table: every client the stages that ran use, in pipeline order, zero when it sent nothing
    (a judge that graded nothing is shown, not left out), then any other client the runs reported, then the total."""
    roles = llm_by_role(results)
    expected = [label for res in results for label in STAGE_ROLES.get(res.asset, ())]
    order = list(dict.fromkeys([*expected, *roles]))
    if not order:
        return []
    fields = ("requests", "http_requests", "cache_hits", "tokens_in", "tokens_out")
    lines = [
        "LLM requests, tokens and estimated cost per role:",
        f"  {'role':<20} {'requests':>8} {'http':>6} {'cached':>7} {'tokens in':>10} {'tokens out':>10} {'cost':>10}",
    ]
    for label in [*order, "total"]:
        t = (
            roles.get(label, {})
            if label != "total"
            else {k: sum(r.get(k, 0) for r in roles.values()) for k in (*fields, "est_cost_usd")}
        )
        req, http, hits, t_in, t_out = (int(t.get(k, 0)) for k in fields)
        lines.append(
            f"  {label:<20} {req:>8} {http:>6} {hits:>7} {t_in:>10} {t_out:>10} "
            f"{'$' + format(float(t.get('est_cost_usd', 0.0)), '.4f'):>10}"
        )
    return lines


def summary_lines(results: list[StageResult], store: Store, catalog: str | None) -> list[str]:
    """The end of ``boostqa demo``: what this run materialized (from the runs' metadata), rejects by reason, the
    LLM table, every failed partition with why, and how to open DuckDB on the data."""
    lines = ["", f"data: {store.root}", "materialized by this run (from the runs' metadata):"]
    for res in results:
        lines.append(
            f"  {res.asset:<16} {len(set(res.materialized)):>4} partitions  {res.stats.rows:>7} rows  "
            f"{res.stats.rows_rejected:>6} rejected"
        )
    rejects = rejects_by_reason(results, store)
    if rejects:
        lines.append("rejected rows by reason:")
        lines += [f"  {stage:<16} {reason:<24} {n}" for stage, reason, n in rejects]
    lines += llm_lines(results)
    failed_here = {k for r in results for k in r.failed_partitions}
    problems = [
        *(f"{r.asset}[{k}]: {why}" for r in results for k, why in r.failed_partitions.items()),
        # A partition left out because it failed upstream in an earlier demo (this run's failures are listed above).
        *(
            f"{r.asset}[{k}] not run: {why}"
            for r in results
            for k, why in r.skipped_partitions.items()
            if k not in failed_here
        ),
        *(f"{r.asset}: {r.error}" for r in results if r.error),
    ]
    if problems:
        lines += ["", f"FAILED ({len(problems)}):", *(f"  {p}" for p in problems)]
    lines += ["", "inspect: .venv/bin/boostqa duckdb    (or: make duckdb)"]
    if catalog:
        lines.append(f"         duckdb -readonly {catalog}    (any DuckDB 1.0+ shell; views refreshed by this run)")
    lines.append('e.g.:    .venv/bin/boostqa sql "SELECT * FROM coverage"')
    return lines
