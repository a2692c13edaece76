"""``boostqa``: run the pipeline end to end, inspect the data with DuckDB, validate configuration.

- ``boostqa demo``: materialize every asset, every partition, on the configured endpoints (the embedded
  local model by default), then print where the data is, rows per asset, rejects and tokens per role.
- ``boostqa duckdb``: a DuckDB shell with one view per asset and the reports (coverage, rejects, lineage).
- ``boostqa sql "SELECT ..."``: run one query over the same views and print the result.
- ``boostqa check-config``: validate the configuration files and print a summary.
- ``boostqa lineage ID``: a row's seed and each LLM step (model, prompt version, request hash, raw output).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boostqa_assets.configs import ConfigError
from boostqa_assets.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from boostqa_assets.runner import StageResult
    from boostqa_assets.storage import Store


def _print(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _store() -> Store:
    from boostqa_assets.storage import Store

    settings = get_settings()
    return Store(settings.data_root, settings.storage_options)


def cmd_check_config(_: argparse.Namespace) -> int:
    from boostqa_assets.resources import project_config

    project = project_config()
    _print(f"configuration in {project.config_dir} is valid:")
    _print(f"  taxonomy: {len(project.taxonomy.disciplines)} disciplines x {len(project.taxonomy.grades)} grades")
    _print(
        "  sources: "
        + ", ".join(s.name + (f" ({s.shards} shards)" if s.shards > 1 else "") for s in project.sources.sources)
    )
    for role, cfg in project.llm.roles.items():
        where = "embedded llama.cpp" if cfg.is_embedded else cfg.base_url
        _print(f"  {role}: {cfg.model} at {where} ({cfg.api}, {cfg.structured_output})")
    _print(f"  recipes: {', '.join(r.name for r in project.recipes.recipes)}")
    return 0


def _duckdb_cli() -> str | None:
    found = shutil.which("duckdb")
    if found:
        return found
    local = Path(sys.executable).parent / "duckdb"
    return str(local) if local.exists() else None


def cmd_duckdb(_: argparse.Namespace) -> int:
    from boostqa_assets.inspect import connect, init_script

    store = _store()
    cli = _duckdb_cli()
    if store.is_local and cli:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(init_script(store))
        _print(
            f"DuckDB over {store.root}: views seeds, annotated_seeds, synthesized_qa, refined_qa, qa_mixture, "
            "rejects, coverage, rejects_summary, lineage"
        )
        return subprocess.call([cli, "-init", f.name])
    # S3 roots (and machines without the CLI): a small shell on the Python API with s3fs registered.
    con = connect(store)
    _print(f"DuckDB over {store.root} (Python shell; end statements with ';', quit with .quit)")
    buffer = ""
    while True:
        try:
            line = input("D " if not buffer else ". ")
        except EOFError:
            break
        if line.strip() in (".quit", ".exit"):
            break
        buffer += line + "\n"
        if buffer.strip().endswith(";"):
            try:
                _print(str(con.sql(buffer)))
            except Exception as exc:  # a shell reports the error and goes on
                _print(f"Error: {exc}")
            buffer = ""
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from boostqa_assets.inspect import connect

    con = connect(_store())
    rel = con.sql(args.query)
    if rel is not None:
        _print(str(rel.pl()) if args.polars else str(rel))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    """Everything that made one row: its seed, then each LLM step with model, prompt version, request hash and
    the raw reply (from the request cache). Accepts a `qa_id`, a mixture `doc_id` or a `seed_id`."""
    from boostqa_assets.inspect import connect

    con = connect(_store())
    key = args.id
    qa_ids = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT qa_id FROM refined_qa WHERE qa_id = $1 OR seed_id = $1 "
            "UNION SELECT qa_id FROM qa_mixture WHERE doc_id = $1 ORDER BY 1",
            [key],
        ).fetchall()
    ]
    if not qa_ids:
        sys.stderr.write(
            f"no kept QA row, mixture document or seed with id {key!r} (rejects: "
            f"boostqa sql \"SELECT * FROM rejects WHERE qa_id = '{key}' OR seed_id = '{key}'\")\n"
        )
        return 1
    for qa_id in qa_ids:
        row = con.execute("SELECT * FROM lineage_qa WHERE qa_id = $1", [qa_id]).fetchall()
        cols = [d[0] for d in con.description]
        info = dict(zip(cols, row[0], strict=True))
        _print(f"== {qa_id}  ({info['discipline']}, grade {info['grade']}, track {info['track']})")
        docs = con.execute("SELECT doc_id, recipe FROM qa_mixture WHERE qa_id = $1", [qa_id]).fetchall()
        _print("mixture: " + (", ".join(f"{d} in {r}" for d, r in docs) or "not sampled into any recipe"))
        _print(f"seed {info['seed_id']} from {info['source']} ({info['seed_kind']}, native id {info['native_id']}):")
        _print("  " + (info["seed_content"] or "")[:500].replace("\n", "\n  "))
        steps = con.execute(
            "SELECT step, model, prompt_id, prompt_version, request_hash, raw_output, raw_reasoning "
            "FROM lineage_steps WHERE qa_id = $1 ORDER BY step_no",
            [qa_id],
        ).fetchall()
        for step, model, pid, version, rhash, raw, reasoning in steps:
            _print(f"{step}: model {model}, prompt {pid}/{version}, request {rhash}")
            if reasoning:
                _print("  reasoning: " + reasoning[:300].replace("\n", " "))
            _print("  raw output: " + ((raw or "<not in the cache>")[:500]).replace("\n", "\n  "))
        _print(f"question: {info['question']}")
        _print(f"refined answer: {info['refined_answer']}")
    return 0


# The LLM roles each stage calls (synthesized_qa re-annotates a sample with the annotator for grade fidelity).
STAGE_ROLES = {
    "annotated_seeds": ("annotator",),
    "deficiency_probe": ("probe", "judge"),
    "synthesized_qa": ("synthesizer", "annotator"),
    "refined_qa": ("refiner",),
}


class UsageError(Exception):
    """A mistake in the command line; the message says what was meant and what is possible."""


def _check_stages(requested: list[str] | None, known: tuple[str, ...]) -> list[str]:
    """The stages to run, in the order given; an unknown name is a usage error with the closest match."""
    import difflib

    if not requested:
        return list(known)
    for name in requested:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"boostqa demo --stages: unknown stage {name!r}{hint}; stages: {', '.join(known)}")
    return list(requested)


def cmd_demo(args: argparse.Namespace) -> int:
    settings = get_settings()
    store = _store()  # a data root that cannot be used fails here, in one line, before anything starts
    store.require_writable()
    from boostqa_assets.definitions import STAGES  # loads (and validates) the configuration

    stages = _check_stages(args.stages, STAGES)
    # A SIGTERM (a CI timeout, `kill`) stops the demo like Ctrl-C: turn it into SystemExit, handled below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: list[Any] = []  # the embedded model server, once started: stopped however the demo ends
    try:
        return _demo(stages, settings, store, servers)
    except (KeyboardInterrupt, SystemExit) as exc:
        code = 130 if isinstance(exc, KeyboardInterrupt) else int(exc.code or 143)
        for server in servers:
            server.stop()
        _print(
            f"stopped ({'Ctrl-C' if code == 130 else 'SIGTERM'}): a run in progress is marked failed and its pool "
            "slots freed; run `boostqa demo` again to go on (every LLM reply already received comes from the cache)"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # A stage's run may still execute in its worker thread (runner.py): do not wait for it.
        os._exit(code)
    finally:
        for server in servers:
            server.stop()


def _demo(stages: list[str], settings: Settings, store: Store, servers: list[Any]) -> int:
    import dagster as dg

    from boostqa_assets.definitions import build_definitions
    from boostqa_assets.llm.embedded import EmbeddedServer
    from boostqa_assets.resources import project_config
    from boostqa_assets.runner import ensure_dagster_home, run_pipeline

    home = ensure_dagster_home(str(settings.home / "dagster_home"))
    project = project_config()
    _print(f"BoostQA: data root {settings.data_root}, Dagster instance {home}")
    needs_embedded = any(
        project.llm.roles[role].is_embedded  # type: ignore[index]
        for s in stages
        for role in STAGE_ROLES.get(s, ())
        if role in project.llm.roles
    )
    started = time.perf_counter()
    if needs_embedded and not settings.embedded_base_url:
        server = EmbeddedServer(settings.models_dir, project.llm.embedded, settings.home / "logs")
        servers.append(server)
        server.start()
        os.environ["BOOSTQA_EMBEDDED_BASE_URL"] = server.base_url
        _print(f"embedded model (llama.cpp, Gemma 3 270M) serving at {server.base_url}")

    def on_stage(res: StageResult) -> None:
        _print(stage_line(res))
        for key, why in res.failed_partitions.items():
            _print(f"      {res.asset}[{key}] FAILED: {why}")
        if res.error:
            _print(f"      {res.asset} FAILED: {res.error}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instance = dg.DagsterInstance.get()
        _print("materializing " + " -> ".join(stages))
        results = run_pipeline(build_definitions(), instance, stages, on_stage)
    pipeline_s = time.perf_counter() - started
    ok = len(results) == len(stages) and all(r.status == "ok" and not r.skipped_partitions for r in results)
    _print(f"pipeline {'finished' if ok else 'FAILED'} in {pipeline_s:.1f}s")
    _summary(results, store)
    return 0 if ok else 1


def stage_line(res: StageResult) -> str:
    """One line per stage: status, time, partitions, rows and rejects over all of its runs, LLM tokens, checks."""
    status = {"ok": "ok", "partial": "PARTIAL", "failed": "FAILED"}[res.status]
    stats = res.stats
    extra = ""
    if stats.llm:
        t_in = sum(int(v["tokens_in"]) for v in stats.llm.values())
        t_out = sum(int(v["tokens_out"]) for v in stats.llm.values())
        hits = sum(int(v["cache_hits"]) for v in stats.llm.values())
        extra = f", tokens in/out {t_in}/{t_out}, cache hits {hits}"
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
    """Every LLM role's figures over the whole run (a role used by several stages is added up)."""
    totals: dict[str, dict[str, float]] = {}
    for res in results:
        for role, stats in res.stats.llm.items():
            total = totals.setdefault(role, {k: 0 for k in stats})
            for k, v in stats.items():
                total[k] = total.get(k, 0) + v
    return totals


def _summary(results: list[StageResult], store: Store) -> None:
    _print("")
    _print(f"data: {store.root}")
    _print("materialized by this run (from the runs' metadata):")
    for res in results:
        _print(
            f"  {res.asset:<16} {len(set(res.materialized)):>4} partitions  {res.stats.rows:>7} rows  "
            f"{res.stats.rows_rejected:>6} rejected"
        )
    rejects = rejects_by_reason(results, store)
    if rejects:
        _print("rejected rows by reason:")
        for stage, reason, n in rejects:
            _print(f"  {stage:<16} {reason:<24} {n}")
    roles = llm_by_role(results)
    if roles:
        _print("LLM requests, tokens and estimated cost per role:")
        for role, t in roles.items():
            _print(
                f"  {role:<12} requests {int(t['requests']):>5}  http {int(t['http_requests']):>5}  "
                f"cache hits {int(t['cache_hits']):>5}  in {int(t['tokens_in']):>8}  out {int(t['tokens_out']):>7}  "
                f"cost ${t['est_cost_usd']:.4f}"
            )
        total = sum(t["est_cost_usd"] for t in roles.values())
        _print(f"  {'total':<12} requests {sum(int(t['requests']) for t in roles.values()):>5}  cost ${total:.4f}")
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
        _print("")
        _print(f"FAILED ({len(problems)}):")
        for line in problems:
            _print(f"  {line}")
    _print("")
    _print("inspect: .venv/bin/boostqa duckdb    (or: make duckdb)")
    _print('e.g.:    .venv/bin/boostqa sql "SELECT * FROM coverage"')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="boostqa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize the whole pipeline, every partition")
    demo.add_argument("--stages", nargs="*", help="only these assets, in order")
    demo.set_defaults(fn=cmd_demo)
    sub.add_parser("duckdb", help="open a DuckDB shell with the views loaded").set_defaults(fn=cmd_duckdb)
    sql = sub.add_parser("sql", help="run one SQL query over the views")
    sql.add_argument("query")
    sql.add_argument("--polars", action="store_true", help="print as a polars frame (all rows)")
    sql.set_defaults(fn=cmd_sql)
    sub.add_parser("check-config", help="validate the configuration files").set_defaults(fn=cmd_check_config)
    lineage = sub.add_parser("lineage", help="print a row's seed and every LLM call that shaped it")
    lineage.add_argument("id", help="a qa_id, a mixture doc_id or a seed_id")
    lineage.set_defaults(fn=cmd_lineage)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    except (SettingsError, UsageError) as exc:  # a path or a command line that cannot work: one line, no traceback
        sys.stderr.write(f"boostqa: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
