"""``boostqa``: run the pipeline end to end, inspect the data with DuckDB, validate configuration.

- ``boostqa demo``: materialize every asset, every partition, on the configured endpoints (the embedded
  local model by default), with a live progress bar per LLM stage in a terminal; then print where the data is,
  rows per asset, rejects and requests, tokens and cost per LLM role.
- ``boostqa duckdb``: a DuckDB shell with one view per asset and the reports (coverage, rejects, lineage).
- ``boostqa sql "SELECT ..."``: run one query over the same views and print the result.
- ``boostqa catalog``: refresh the DuckDB catalog file that any DuckDB shell can open, and print its path.
- ``boostqa check-config``: validate the configuration files (and that local source files exist).
- ``boostqa lineage ID``: a row's seed and each LLM step (model, prompt version, request hash, raw output).
- ``boostqa export RECIPE DIR``: the recipe's mixture as a Hugging Face ``datasets`` folder (``export.py``).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from boostqa_assets.cli_summary import STAGE_ROLES, base_role, stage_line, summary_lines
from boostqa_assets.configs import ConfigError
from boostqa_assets.settings import Settings, SettingsError, get_settings, unknown_env_vars

if TYPE_CHECKING:
    import duckdb

    from boostqa_assets.configs import ProjectConfig
    from boostqa_assets.runner import StageResult
    from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)


def _print(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class UsageError(Exception):
    """A mistake in the command line; the message says what was meant and what is possible."""


class QueryError(Exception):
    """A query DuckDB refused; the message is DuckDB's, on one line."""


def _store() -> Store:
    from boostqa_assets.storage import Store

    settings = get_settings()
    return Store(settings.data_root, settings.storage_options)


def _duckdb_message(exc: Exception) -> str:
    """DuckDB's message on one line: the error and its hint ("Did you mean ..."), without the caret drawing."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith("LINE ") and set(line) != {"^"}]
    return " ".join(kept)


def _connect() -> duckdb.DuckDBPyConnection:
    import duckdb

    from boostqa_assets.inspect import connect

    try:
        return connect(_store())
    except duckdb.Error as exc:  # a view over a file DuckDB cannot read
        raise QueryError(f"the views could not be created: {_duckdb_message(exc)}") from None


# --- check-config --------------------------------------------------------------------------------------


def missing_sources(project: ProjectConfig) -> list[str]:
    """One line per configured source whose local (or ``pkg://``) file does not exist: the source and the path."""
    from boostqa_assets.logic.sources import SourceError, resolve_path

    problems = []
    for source in project.sources.sources:
        if "://" in source.path and not source.path.startswith("pkg://"):
            continue  # s3:// and https:// are checked when read: no network here
        try:
            path = resolve_path(source, project.config_dir)
        except SourceError as exc:
            problems.append(str(exc))
            continue
        if not Path(path).exists():
            problems.append(
                f"source {source.name!r}: file {path} does not exist (sources.yaml path {source.path!r}); fix: "
                "correct the path (relative paths are under the config folder) or remove the source"
            )
    return problems


def cmd_check_config(_: argparse.Namespace) -> int:
    from boostqa_assets.resources import project_config

    project = project_config()
    problems = missing_sources(project)
    if problems:
        for line in problems:
            sys.stderr.write(f"configuration error: {line}\n")
        return 2
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


# --- DuckDB --------------------------------------------------------------------------------------------


def _duckdb_cli() -> str | None:
    local = Path(sys.executable).parent / "duckdb"  # the venv's (duckdb-cli), which the catalog is tested with
    return str(local) if local.exists() else shutil.which("duckdb")


def _refresh_catalog() -> tuple[Path, list[str]]:
    import duckdb

    from boostqa_assets.inspect import refresh_catalog

    path = get_settings().catalog_path
    try:
        return path, refresh_catalog(_store(), path)
    except duckdb.Error as exc:
        raise QueryError(f"the catalog {path} could not be written: {_duckdb_message(exc)}") from None
    except OSError as exc:
        raise SettingsError(
            f"the DuckDB catalog {path} cannot be written: {exc.strerror or exc}; fix: point BOOSTQA_HOME at a "
            "folder you can write"
        ) from None


def cmd_catalog(_: argparse.Namespace) -> int:
    path, views = _refresh_catalog()
    _print(f"DuckDB catalog {path}: {len(views)} views over {get_settings().data_root}")
    _print(f"  views: {', '.join(views)}")
    _print(f"open it with any DuckDB 1.0+ shell:  duckdb -readonly {path}")
    if get_settings().is_s3:
        _print("  (s3:// data: the shell needs its httpfs extension and an S3 secret; or use boostqa duckdb)")
    return 0


def cmd_duckdb(_: argparse.Namespace) -> int:
    store = _store()
    cli = _duckdb_cli()
    if store.is_local and cli:
        path, views = _refresh_catalog()
        _print(f"DuckDB over {store.root}, catalog {path} (read-only); {len(views)} views: {', '.join(views)}")
        return subprocess.call([cli, "-readonly", str(path)])
    # S3 roots (DuckDB's httpfs cannot be installed offline) and machines without the shell: a small shell on the
    # Python API, with s3fs registered.
    import duckdb

    from boostqa_assets.inspect import view_names, view_statements

    con = _connect()
    views = view_names(view_statements(store))
    _print(f"DuckDB over {store.root} (Python shell; end statements with ';', quit with .quit)")
    _print(f"{len(views)} views: {', '.join(views)}")
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
            except duckdb.Error as exc:  # a shell reports the error and goes on
                _print(f"Error: {_duckdb_message(exc)}")
            buffer = ""
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    con = _connect()
    try:
        rel = con.sql(args.query)
        text = (str(rel.pl()) if args.polars else str(rel)) if rel is not None else None
    except duckdb.Error as exc:
        raise QueryError(_duckdb_message(exc)) from None
    if text is not None:
        _print(text)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    """Everything that made one row (``inspect.lineage_lines``)."""
    import duckdb

    from boostqa_assets.inspect import lineage_lines

    key = args.id
    try:
        lines = lineage_lines(_connect(), key)
    except duckdb.Error as exc:
        raise QueryError(_duckdb_message(exc)) from None
    if lines is None:
        sys.stderr.write(
            f"no kept QA row, mixture document or seed with id {key!r} (rejects: "
            f"boostqa sql \"SELECT * FROM rejects WHERE qa_id = '{key}' OR seed_id = '{key}'\")\n"
        )
        return 1
    for line in lines:
        _print(line)
    return 0


# --- export --------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """A recipe's mixture as a Hugging Face datasets folder (``export.export_recipe``)."""
    from boostqa_assets.export import ExportError, export_recipe

    try:
        result = export_recipe(_store(), args.recipe, args.dir, shard_rows=args.shard_rows)
    except ExportError as exc:  # one line on stderr, exit 1: the data is not ready, the command line was fine
        sys.stderr.write(f"boostqa export: {exc}\n")
        return 1
    _print(f"{result.out_dir}: {result.rows} documents, {result.tokens} tokens ({result.seconds:.1f} s)")
    for config in result.configs:
        _print(f"  {config.name}: {len(config.files)} Parquet files, {config.download_size:,} bytes")
    _print(f'load: datasets.load_dataset("{result.out_dir}", "text") or (..., "messages")')
    return 0


# --- demo ----------------------------------------------------------------------------------------------


def _check_stages(requested: list[str] | None, known: tuple[str, ...]) -> list[str]:
    """The stages to run, in the order given; an unknown name is a usage error with the closest match."""
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


def _catalog_after(res: StageResult, store: Store) -> str | None:
    """Refresh the DuckDB catalog once a stage has written: a failure is a warning, never the demo's end."""
    from boostqa_assets.inspect import refresh_catalog

    if not res.materialized:
        return None
    try:
        refresh_catalog(store, get_settings().catalog_path)
    except Exception as exc:  # the data is written; only the shell's snapshot is behind
        logger.warning("DuckDB catalog not refreshed after %s: %s (run `boostqa catalog`)", res.asset, exc)
        return None
    return str(get_settings().catalog_path)


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
    catalog: list[str] = []

    def on_stage(res: StageResult) -> None:
        if display is not None:
            display.finish_stage(res.asset)
        _print(stage_line(res))
        for key, why in res.failed_partitions.items():
            _print(f"      {res.asset}[{key}] FAILED: {why}")
        if res.error:
            _print(f"      {res.asset} FAILED: {res.error}")
        catalog.extend(p for p in [_catalog_after(res, store)] if p)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instance = dg.DagsterInstance.get()
        _print("materializing " + " -> ".join(stages))
        results = run_pipeline(build_definitions(), instance, stages, on_stage)
    pipeline_s = time.perf_counter() - started
    ok = len(results) == len(stages) and all(r.status == "ok" and not r.skipped_partitions for r in results)
    _print(f"pipeline {'finished' if ok else 'FAILED'} in {pipeline_s:.1f}s")
    for line in summary_lines(results, store, catalog[-1] if catalog else None):
        _print(line)
    return 0 if ok else 1


# --- the command line ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with one line for a mistake: the closest command for a misspelt one (Python 3.11's argparse
    has no suggestions), and no usage block before it."""

    def error(self, message: str) -> NoReturn:
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = re.findall(r"'([^']*)'", found.group(2))
            close = difflib.get_close_matches(found.group(1), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            message = f"unknown command {found.group(1)!r}{hint}; commands: {', '.join(choices)}"
        self.exit(2, f"{self.prog}: {message} (see {self.prog.split()[0]} --help)\n")


def _version() -> str:
    try:
        return metadata.version("boostqa-assets")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="boostqa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"boostqa {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="materialize the whole pipeline, every partition")
    demo.add_argument("--stages", nargs="*", help="only these assets, in order")
    demo.add_argument("--no-progress", action="store_true", help="no live progress bars, even in a terminal")
    demo.set_defaults(fn=cmd_demo)
    sub.add_parser("duckdb", help="open a DuckDB shell with the views loaded").set_defaults(fn=cmd_duckdb)
    sql = sub.add_parser("sql", help="run one SQL query over the views")
    sql.add_argument("query")
    sql.add_argument("--polars", action="store_true", help="print as a polars frame (all rows)")
    sql.set_defaults(fn=cmd_sql)
    sub.add_parser("catalog", help="refresh the DuckDB catalog file and print its path").set_defaults(fn=cmd_catalog)
    sub.add_parser("check-config", help="validate the configuration files").set_defaults(fn=cmd_check_config)
    lineage = sub.add_parser("lineage", help="print a row's seed and every LLM call that shaped it")
    lineage.add_argument("id", help="a qa_id, a mixture doc_id or a seed_id")
    lineage.set_defaults(fn=cmd_lineage)
    export = sub.add_parser(
        "export", help="write a recipe's mixture as a Hugging Face datasets folder (text, messages)"
    )
    export.add_argument("recipe", help="the recipe whose committed qa_mixture to export")
    export.add_argument("dir", help="a local folder: new, empty, or an earlier export (replaced whole)")
    export.add_argument("--shard-rows", type=int, default=None, help="rows per Parquet file (default: the recipe's)")
    export.set_defaults(fn=cmd_export)
    return parser


def _configured_key_vars() -> set[str]:
    """The variables the roles name for their API keys (``api_key_env``): set on purpose, whatever their names."""
    try:
        from boostqa_assets.configs import LLMConfig, load_config

        llm = load_config("llm.yaml", get_settings().config_dir)
    except Exception:  # a broken llm.yaml is reported by the command itself, not here
        return set()
    return {cfg.api_key_env for cfg in llm.roles.values() if cfg.api_key_env} if isinstance(llm, LLMConfig) else set()


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
    args = build_parser().parse_args(argv)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        for warning in unknown_env_vars(also_known=_configured_key_vars()):
            sys.stderr.write(f"boostqa: warning: {warning}\n")
        return int(args.fn(args))
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    except (SettingsError, UsageError) as exc:  # a path or a command line that cannot work: one line, no traceback
        sys.stderr.write(f"boostqa: {exc}\n")
        return 2
    except QueryError as exc:
        sys.stderr.write(f"boostqa {args.command}: {exc}\n")
        return 1
    except BrokenPipeError:
        # The reader went away (`boostqa lineage X | head`): stop quietly, like any Unix tool, and keep Python from
        # complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
