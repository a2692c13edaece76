"""``annotated_seeds[source]``: each seed labelled with discipline, category, grade and difficulty."""

from collections.abc import Iterator

import dagster as dg

from boostqa_assets import checks, expectations
from boostqa_assets.defs.metadata import LLMTally, column_schema, log_run_llm, row_figures, table_preview
from boostqa_assets.defs.seeds import source_name
from boostqa_assets.defs.support import (
    asset_ui,
    backfill_policy,
    counts_by,
    eager_when_upstream_passed,
    endpoint_pool,
    fail_if_unsent,
    progress_logger,
    report_partition_checks,
    unsent_rows,
)
from boostqa_assets.logic import annotate
from boostqa_assets.manifests import stream_parquet
from boostqa_assets.partitions import Partitions
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import ANNOTATED_SCHEMA, SEED_SCHEMA, AnnotatedSeed
from boostqa_assets.resources import LLMResource, StoreResource, project_config
from boostqa_assets.streaming import input_generation, open_output, resume_key, skip_done

PREVIEW_COLUMNS = ["seed_id", "discipline", "grade", "difficulty", "language", "question", "text"]


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.source_partitions,
        deps=["seeds"],
        # A refreshed or new seeds partition is annotated automatically (the same source partition only).
        automation_condition=eager_when_upstream_passed(),
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet", "llm"},
        code_version="annotated-" + prompt_fingerprint(annotate.PROMPT_ID),
        pool=endpoint_pool("annotator"),
        **asset_ui("annotated_seeds"),
    )
    def annotated_seeds(
        context: dg.AssetExecutionContext, store: StoreResource, llm: LLMResource
    ) -> dg.MaterializeResult:
        """One row per seed of the source, with `discipline`, `category`, `grade` and `difficulty` from the
        annotator role. The reply is JSON constrained by a schema built from the taxonomy and validated
        again; a bad reply is re-asked up to `max_parse_retries` times, then the seed goes to
        `rejects/stage=annotated_seeds` with the raw output. Seeds stream through in chunks of
        `streaming.chunk_rows`, each written as a part file; the partition is committed at the end, and a run
        killed half way resumes after its last chunk.
        """
        project = project_config()
        st = store.get()
        client = llm.client("annotator")
        chunk_rows = project.pipeline.streaming.chunk_rows
        validator = annotate.make_validator(project.taxonomy)
        unsent: dict[str, int] = {}
        for key in context.partition_keys:
            files = st.partition_files("seeds", {"source": key})
            fingerprint = resume_key(
                input_generation(st, "seeds", {"source": key}),
                context.assets_def.code_versions_by_key[context.asset_key],
                client.cfg.model_dump(exclude={"api_key_env"}),
            )
            out = open_output(st, "annotated_seeds", {"source": key}, key, ANNOTATED_SCHEMA, fingerprint)
            if out.done:
                context.log.info(f"annotated_seeds[{key}]: resuming after {out.done} seeds already written")
            tally = LLMTally(client.stats)
            for chunk in skip_done(stream_parquet(st, files, chunk_rows, SEED_SCHEMA), out.done):
                requests = annotate.build_requests(
                    chunk, project.taxonomy, project.pipeline.annotation.max_chars_in_prompt
                )
                results = client.run(requests, validator, progress_logger(context.log, f"annotated_seeds[{key}]"))
                tally.add(results)
                kept, rejects = annotate.assemble(chunk, results, project.taxonomy, key)
                out.write(kept, rejects, chunk.height)
            out.commit()
            context.add_asset_metadata(
                {
                    **row_figures(out.kept, out.rejected, out.reasons),
                    "seeds": out.done,
                    "parts": out.rows.chunks_done,
                    "preview": table_preview(out.head, PREVIEW_COLUMNS),
                    **tally.metadata(),
                },
                partition_key=key,
            )
            context.log.info(f"annotated_seeds[{key}]: {out.kept} annotated, {out.rejected} rejected")
            unsent[key] = unsent_rows(out.reasons)
        log_run_llm(context.log, "annotated_seeds", client.stats)
        fail_if_unsent("annotated_seeds", unsent)
        return dg.MaterializeResult(metadata={"dagster/column_schema": column_schema(AnnotatedSeed)})

    @dg.asset_check(asset=annotated_seeds, partitions_def=parts.source_partitions, blocking=True)
    def annotated_seeds_valid(
        context: dg.AssetCheckExecutionContext, store: StoreResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        """Per source partition: the annotated schema, unique `seed_id`, no null labels, every label inside
        the taxonomy, and every request hash recorded (lineage); no seed left unanswered because the run stopped
        sending (endpoint down, 429s past `rate_limit_max_wait_s`); plus the Great Expectations suite of
        `expectations.py` (numbers as `gx_*` metadata)."""
        st = store.get()
        tax = project_config().taxonomy

        def evaluate(key: str) -> checks.CheckOutcome:
            df = st.read_partition("annotated_seeds", {"source": key})
            outcome = checks.table_checks(
                df,
                ANNOTATED_SCHEMA,
                unique_on="seed_id",
                equals={"source": source_name(key)},
                not_null=[
                    "seed_id",
                    "discipline",
                    "category",
                    "grade",
                    "difficulty",
                    "annotate_request_hash",
                ],
                allowed={
                    "discipline": tax.discipline_names,
                    "category": tax.categories,
                    "grade": tax.grades,
                    "difficulty": tax.difficulties,
                },
            )
            if outcome.passed and df.height:
                outcome.metadata["rows_by_grade"] = str(counts_by(df, "grade"))
            sent = checks.all_sent(checks.read_stage_rejects(st, "annotated_seeds", key))
            return checks.CheckOutcome.all_of(outcome, sent, expectations.validate("annotated_seeds", df, tax))

        yield from report_partition_checks(context, "annotated_seeds", "annotated_seeds_valid", evaluate)

    return [annotated_seeds, annotated_seeds_valid]
