"""``seeds[source]``: one row per normalized seed of a source (no LLM); a source is a configured source or a file
discovered under a watched prefix. Also: the ``new_source_files`` sensor (registers configured sources, adds a
partition and requests a run per new watched file) and the ``seeds_refresh`` schedule (re-reads the sources
whose file changed since their last materialization)."""

import json
import time
from collections.abc import Iterator

import dagster as dg

from boostqa_assets import checks, expectations
from boostqa_assets.defs.metadata import column_schema, reasons_text, row_figures, table_preview
from boostqa_assets.defs.support import asset_ui, backfill_policy, counts_by, one_line, report_partition_checks
from boostqa_assets.failures import clear_failure, read_failure, record_failure
from boostqa_assets.logic.source_watch import SourceFile, SourceResolver, refresh_reason, split_new_files
from boostqa_assets.logic.sources import SourceError, empty_source_message, read_source
from boostqa_assets.partitions import SOURCE_PARTITIONS, Partitions, register_sources
from boostqa_assets.records import SEED_SCHEMA, Seed
from boostqa_assets.resources import StoreResource, project_config
from boostqa_assets.settings import get_settings

FINGERPRINT_KEY = "source_fingerprint"
CURSOR_VERSION = 1
PREVIEW_COLUMNS = ["seed_id", "kind", "language", "question", "answer", "text"]


def _resolver() -> SourceResolver:
    project = project_config()
    return SourceResolver(project.sources, project.config_dir, get_settings().storage_options)


def source_name(key: str) -> str:
    """The `source` column of a partition's rows: the source's name (a shard key ``<name>--s0003`` -> ``<name>``;
    a watched file's key is its own name)."""
    found = project_config().sources.for_key(key)
    return found[0].name if found is not None else key


def load_cursor(cursor: str | None) -> set[str]:
    """The sensor's cursor: the keys of every watched file it has already handled."""
    if not cursor:
        return set()
    data = json.loads(cursor)
    return set(data.get("seen", []))


def dump_cursor(seen: set[str]) -> str:
    return json.dumps({"v": CURSOR_VERSION, "seen": sorted(seen)}, separators=(",", ":"))


def recorded_fingerprint(instance: dg.DagsterInstance, key: str) -> tuple[bool, str | None]:
    """(materialized at all, the `source_fingerprint` its latest materialization recorded or None)."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("seeds"), asset_partitions=[key]), limit=1
    )
    if not result.records:
        return False, None
    mat = result.records[0].asset_materialization
    value = mat.metadata.get(FINGERPRINT_KEY) if mat is not None else None
    return True, (str(getattr(value, "value", value)) if value is not None else None)


def build(
    parts: Partitions,
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition | dg.SensorDefinition | dg.ScheduleDefinition]:
    @dg.asset(
        partitions_def=parts.source_partitions,
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet"},
        code_version="seeds-v2",  # v2: language detected per seed (language_confidence, language_origin)
        **asset_ui("seeds"),
    )
    def seeds(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        """One row per seed of the source: a QA item, problem or passage, normalized to the seed record.

        A partition is a source of sources.yaml, or a file discovered under a watched prefix (key
        `<watch>__<file slug>_<hash>`, read with the watch's `source` template). Rows are read with the
        source's field mapping; `seed_id` is a stable hash of source + native id (or normalized text). Exact
        duplicates within the source, invalid UTF-8, empty text, oversize rows, missing required fields and
        unparseable lines go to `rejects/stage=seeds` with a reason. `limit` keeps a seeded sample (reported
        as `rows_not_sampled`). A source without `language:` gets each seed's language detected (fastText, batched;
        `mixed` and `und` where it cannot say; `pipeline.yaml` `languages.detection`); seeds per language are in the
        metadata. Each partition's materialization records `source_fingerprint` (size + mtime, or ETag + size on
        S3) for the `seeds_refresh` schedule.

        A source that cannot be read (missing, truncated, not the configured layout) or that gives no seed fails
        its own partition only, with a message naming the source, the file and the fix: its previous data is
        left as it was, a failure record (`_failures/stage=seeds/`) makes `seeds_valid` fail for it and keeps later
        stages off it, and the other sources are read as usual. A run of that one partition fails.
        """
        project = project_config()
        st = store.get()
        resolver = SourceResolver(project.sources, project.config_dir, st.storage_options)
        keys = context.partition_keys
        failed: dict[str, str] = {}
        records: dict[str, str] = {}
        for key in keys:
            fingerprint, result, message = None, None, None
            try:
                cfg = resolver.resolve(key)
                # Taken before reading: a file that changes during the read is read again by the next refresh. A
                # file that cannot be reached fails the read below, with the read's own message.
                try:
                    fingerprint = resolver.fingerprint(key)
                except SourceError as exc:
                    context.log.warning(f"seeds[{key}]: no source fingerprint recorded: {exc}")
                result = read_source(
                    cfg,
                    project.config_dir,
                    st.storage_options,
                    shard=resolver.shard(key),
                    detection=project.pipeline.languages.detection,
                )
                message = empty_source_message(key, result)
            except SourceError as exc:
                message = " ".join(str(exc).split())  # one line: it goes to tables, checks and the CLI
            if result is None or message is not None:
                message = message or f"source {key!r}: not read"
                records[key] = record = record_failure(st, "seeds", key, message, context.run_id)
                if result is not None:  # why every row was rejected is the diagnosis: keep it
                    st.write_rejects("seeds", key, result.rejects)
                context.log.error(f"seeds[{key}] FAILED: {message}")
                failed[key] = message
                # Its previous data stays: this run wrote no row (no dagster/row_count: that is the stored data's).
                rejected = result.rejects.height if result is not None else 0
                context.add_asset_metadata(
                    {"rows": 0, "rows_rejected": rejected, "error": message, "failure_record": record},
                    partition_key=key,
                )
                continue
            path = st.write_partition("seeds", {"source": key}, result.seeds)
            st.write_rejects("seeds", key, result.rejects)
            clear_failure(st, "seeds", key)
            reasons = counts_by(result.rejects, "reason")
            context.log.info(
                f"seeds[{key}]: read {result.rows_read} rows from {result.path}, kept "
                f"{result.seeds.height}, rejected {result.rejects.height} {reasons_text(reasons)}, "
                f"not sampled {result.rows_not_sampled}"
            )
            per_partition: dict[str, object] = {
                **row_figures(result.seeds.height, result.rejects.height, reasons),
                "rows_read": result.rows_read,
                "rows_not_sampled": result.rows_not_sampled,
                "rows_by_language": one_line(counts_by(result.seeds, "language")),
                "source_path": result.path,
                "path": path,
                "preview": table_preview(result.seeds, PREVIEW_COLUMNS),
            }
            if fingerprint is not None:
                per_partition[FINGERPRINT_KEY] = fingerprint
            context.add_asset_metadata(per_partition, partition_key=key)
        if len(keys) == 1 and failed:
            # A run of one partition can say it failed: the run fails and the partition shows as failed.
            raise dg.Failure(
                description=failed[keys[0]],
                metadata={"source": keys[0], "failure_record": records[keys[0]]},
                allow_retries=False,  # the file has to change first; a retry would read the same bytes
            )
        if failed:
            context.log.error(f"seeds: {len(failed)} of {len(keys)} sources failed: {', '.join(failed)}")
        # Only what is true of every partition: each partition's figures are its own (add_asset_metadata above).
        return dg.MaterializeResult(metadata={"dagster/column_schema": column_schema(Seed)})

    @dg.asset_check(asset=seeds, partitions_def=parts.source_partitions, blocking=True)
    def seeds_valid(
        context: dg.AssetCheckExecutionContext, store: StoreResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        """Per source partition: the seed schema, unique `seed_id`, no null ids or kinds, and at least one
        seed; plus the Great Expectations suite of `expectations.py` (numbers as `gx_*` metadata). A partition
        whose source could not be read, or gave no seed, fails with the message that names the source, the file
        and the fix (its failure record); that blocks its annotation, not the other sources'."""
        st = store.get()
        tax = project_config().taxonomy

        def evaluate(key: str) -> checks.CheckOutcome:
            failure = read_failure(st, "seeds", key)
            if failure is not None:
                return checks.CheckOutcome(False, {"source": key, "error": failure.message})
            df = st.read_partition("seeds", {"source": key})
            rules = checks.table_checks(
                df,
                SEED_SCHEMA,
                not_null=["seed_id", "source", "kind", "language"],
                unique_on="seed_id",
                equals={"source": source_name(key)},
                require_rows=True,
            )
            outcome = checks.CheckOutcome.all_of(rules, expectations.validate("seeds", df, tax))
            if not outcome.passed:
                outcome.metadata["error"] = f"source {key!r}: the seeds partition fails seeds_valid (see the numbers)"
            return outcome

        yield from report_partition_checks(context, "seeds", "seeds_valid", evaluate)

    @dg.sensor(
        name="new_source_files",
        asset_selection=dg.AssetSelection.assets(seeds),  # the run includes the blocking check
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def new_source_files(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        """Registers the configured sources as `sources` partitions, then lists every watched prefix
        (`watch:` in sources.yaml): each file not seen before becomes a `seeds` partition and a run of it.
        Files modified less than the watch's `min_age_s` ago may still be being written: they wait for a
        later tick. The cursor holds the keys of the files already handled; a file rewritten under the same
        name is the `seeds_refresh` schedule's business."""
        project = project_config()
        registered = register_sources(context.instance, project)
        if registered:
            context.log.info(f"registered configured sources as partitions: {registered}")
        seen = load_cursor(context.cursor)
        resolver = _resolver()
        now = time.time()
        new: list[SourceFile] = []
        waiting: list[SourceFile] = []
        problems = []
        for watch in project.sources.watch:
            try:
                files = resolver.files(watch).values()
            except SourceError as exc:
                context.log.error(str(exc))
                problems.append(str(exc))
                continue
            settled, young = split_new_files(files, seen, now, watch.min_age_s)
            new.extend(settled)
            waiting.extend(young)
        if waiting:
            context.log.info(f"{len(waiting)} file(s) too recent to read yet: {[f.path for f in waiting][:10]}")
        if not new:
            parts_msg = [f"no new files under {len(project.sources.watch)} watched prefix(es)"]
            if waiting:
                parts_msg.append(f"{len(waiting)} still being written")
            if registered:
                parts_msg.append(f"registered configured sources {registered}")
            parts_msg.extend(problems)
            return dg.SkipReason("; ".join(parts_msg))
        new_keys = [f.key for f in new]
        existing = context.instance.get_existing_dynamic_partitions(SOURCE_PARTITIONS, new_keys)
        to_add = [k for k in new_keys if k not in existing]
        context.log.info(f"{len(new)} new file(s): {[(f.key, f.path) for f in new][:20]}")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{f.key}@{f.fingerprint}",
                    asset_selection=[seeds.key],
                    partition_key=f.key,
                    tags={"boostqa/source_file": f.path[-200:]},
                )
                for f in new
            ],
            dynamic_partitions_requests=[parts.source_partitions.build_add_request(to_add)] if to_add else [],
            cursor=dump_cursor(seen | set(new_keys)),
        )

    orchestration = project_config().pipeline.orchestration

    @dg.schedule(
        name="seeds_refresh",
        cron_schedule=orchestration.seeds_refresh_cron,
        execution_timezone=orchestration.timezone,
        target=seeds,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    def seeds_refresh(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        """On `pipeline.yaml` `orchestration.seeds_refresh_cron`: one `seeds` run per source partition whose
        file changed since its last materialization (its fingerprint differs from the `source_fingerprint`
        recorded then), or that was never materialized. Partitions that no longer resolve to a file, and
        watched files modified less than `min_age_s` ago, are left out (logged)."""
        project = project_config()
        register_sources(context.instance, project)
        resolver = _resolver()
        now = time.time()
        requests, unchanged, problems = [], 0, []
        for key in context.instance.get_dynamic_partitions(SOURCE_PARTITIONS):
            try:
                resolver.resolve(key)
                current = resolver.fingerprint(key)
            except SourceError as exc:
                problems.append(str(exc))
                continue
            found = resolver.file(key)
            watch = project.sources.watch_for_key(key) if found is not None else None
            if found is not None and watch is not None and now - found.modified < watch.min_age_s:
                problems.append(f"{key}: modified {now - found.modified:.0f}s ago, may still be written")
                continue
            materialized, recorded = recorded_fingerprint(context.instance, key)
            reason = refresh_reason(current, materialized, recorded)
            if reason is None:
                unchanged += 1
                continue
            requests.append(
                dg.RunRequest(run_key=key, partition_key=key, tags={"boostqa/refresh_reason": reason.replace(" ", "_")})
            )
        for problem in problems:
            context.log.warning(problem)
        if not requests:
            detail = f"; left out: {'; '.join(problems)}" if problems else ""
            return dg.SkipReason(
                f"nothing changed: {unchanged} source partition(s) unchanged since their last materialization{detail}"
            )
        context.log.info(f"refreshing {[r.partition_key for r in requests]}; {unchanged} unchanged")
        return requests

    return [seeds, seeds_valid, new_source_files, seeds_refresh]
