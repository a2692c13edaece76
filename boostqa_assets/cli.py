"""``boostqa``: run the pipeline end to end, inspect the data with DuckDB, validate configuration.

- ``boostqa demo``: materialize every asset, every partition, on the configured endpoints (the embedded
  local model by default), with a live progress bar per LLM stage in a terminal; then print where the data is,
  rows per asset, rejects and requests, tokens and cost per LLM role.
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

from boostqa_assets.cli_summary import STAGE_ROLES, base_role, stage_line, summary_lines
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
    from boostqa_assets.progress import live_progress

    settings = get_settings()
    store = _store()  # a data root that cannot be used fails here, in one line, before anything starts
    store.require_writable()
    from boostqa_assets.definitions import STAGES  # loads (and validates) the configuration

    stages = _check_stages(args.stages, STAGES)
    # A SIGTERM (a CI timeout, `kill`) stops the demo like Ctrl-C: turn it into SystemExit, handled below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: list[Any] = []  # the embedded model server, once started: stopped however the demo ends
    with live_progress(enabled=not args.no_progress) as display:
        try:
            return _demo(stages, settings, store, servers, display)
        except (KeyboardInterrupt, SystemExit) as exc:
            code = 130 if isinstance(exc, KeyboardInterrupt) else int(exc.code or 143)
            if display is not None:
                display.stop()  # the terminal gets its cursor back before the process ends below
            for server in servers:
                server.stop()
            _print(
                f"stopped ({'Ctrl-C' if code == 130 else 'SIGTERM'}): a run in progress is marked failed and its "
                "pool slots freed; run `boostqa demo` again to go on (every LLM reply already received comes from "
                "the cache)"
            )
            sys.stdout.flush()
            sys.stderr.flush()
            # A stage's run may still execute in its worker thread (runner.py): do not wait for it.
            os._exit(code)
        finally:
            for server in servers:
                server.stop()


def _demo(stages: list[str], settings: Settings, store: Store, servers: list[Any], display: Any) -> int:
    import dagster as dg

    from boostqa_assets.definitions import build_definitions
    from boostqa_assets.llm.embedded import EmbeddedServer
    from boostqa_assets.resources import project_config
    from boostqa_assets.runner import ensure_dagster_home, run_pipeline

    home = ensure_dagster_home(str(settings.home / "dagster_home"))
    project = project_config()
    _print(f"BoostQA: data root {settings.data_root}, Dagster instance {home}")
    needs_embedded = any(
        project.llm.roles[base_role(label)].is_embedded  # type: ignore[index]
        for s in stages
        for label in STAGE_ROLES.get(s, ())
        if base_role(label) in project.llm.roles
    )
    started = time.perf_counter()
    if needs_embedded and not settings.embedded_base_url:
        server = EmbeddedServer(settings.models_dir, project.llm.embedded, settings.home / "logs")
        servers.append(server)
        server.start()
        os.environ["BOOSTQA_EMBEDDED_BASE_URL"] = server.base_url
        _print(f"embedded model (llama.cpp, Gemma 3 270M) serving at {server.base_url}")

    def on_stage(res: StageResult) -> None:
        if display is not None:
            display.finish_stage(res.asset)
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
    for line in summary_lines(results, store, None):
        _print(line)
    return 0 if ok else 1


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (the progress display prints it above the bars; a handler
    holding the original stream would write into Dagster's capture of descriptor 2 instead)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="boostqa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize the whole pipeline, every partition")
    demo.add_argument("--stages", nargs="*", help="only these assets, in order")
    demo.add_argument("--no-progress", action="store_true", help="no live progress bars, even in a terminal")
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
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
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
