"""``refined_qa[discipline x grade]``: synthesized QA with the refiner's answer and rule-filter flags."""

from collections.abc import Iterator
from typing import Any

import dagster as dg
import polars as pl

from boostqa_assets import checks, partition_checks
from boostqa_assets.defs.metadata import LLMTally, column_schema, log_run_llm, row_figures, table_preview
from boostqa_assets.defs.support import (
    asset_ui,
    backfill_policy,
    eager_when_upstream_passed,
    endpoint_pool,
    fail_if_unsent,
    md_table,
    one_line,
    progress_logger,
    report_partition_checks,
    unsent_rows,
)
from boostqa_assets.logic import language, refine
from boostqa_assets.manifests import stream_parquet
from boostqa_assets.partitions import Partitions, qa_key, qa_key_parts
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import REFINED_SCHEMA, SYNTHESIZED_SCHEMA, RefinedQA
from boostqa_assets.resources import LLMResource, StoreResource, project_config
from boostqa_assets.storage import Store
from boostqa_assets.streaming import PartitionOutput, input_generation, open_output, pooled, resume_key, skip_done

PREVIEW_COLUMNS = ["qa_id", "track", "language", "question", "refined_answer", "flags"]


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.qa_partitions,
        deps=["synthesized_qa"],
        # Re-synthesized cells are refined automatically (the same discipline x grade partition only).
        automation_condition=eager_when_upstream_passed(),
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet", "llm"},
        code_version="refined-" + prompt_fingerprint(refine.PROMPT_ID),
        pool=endpoint_pool("refiner"),
        **asset_ui("refined_qa"),
    )
    def refined_qa(context: dg.AssetExecutionContext, store: StoreResource, llm: LLMResource) -> dg.MaterializeResult:
        """One row per kept QA pair of the partition: `refined_answer` from the refiner role, `flags` from
        the rule filters, `status = kept`.

        Rejected (to `rejects/stage=refined_qa`, reason = the first blocking flag): refusals, empty or
        truncated answers, answers shorter/longer than the configured bounds, length outliers beyond
        Q3 + k*IQR of the partition, and `language_mismatch`: the answer's script differs from the question's, or
        the refined answer is detected in another language than the row's `language` (its target;
        `refinement.check_language`; the question too when synthesis did not check it, `synthesis.check_language`).
        Checked rows and the mismatch rate per language are in `language_fidelity`, kept rows per language in
        `rows_by_language`.

        Streams in two passes, a chunk (`streaming.chunk_rows`) at a time: the refiner's answers are staged
        under `_work/`, then the partition's length fence is computed and the rules applied; the partition is
        committed at the end. A run killed in pass 1 resumes after its last chunk; one killed in pass 2 redoes
        only pass 2.
        """
        project = project_config()
        st = store.get()
        client = llm.client("refiner")
        cfg = project.pipeline.refinement
        chunk_rows = project.pipeline.streaming.chunk_rows
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        detection = project.pipeline.languages.detection
        # Synthesis's language gate detected every question it kept; refinement keeps the question as it is.
        question_checked = project.pipeline.synthesis.check_language
        # Each partition's own figures (its materialization event shows them, not the run's).
        lang_stats: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in context.partition_keys}
        by_language: dict[str, dict[str, int]] = {k: {} for k in context.partition_keys}
        tallies = {k: LLMTally(client.stats) for k in context.partition_keys}
        # Pass 1, the LLM: the run's partitions stream through in pooled chunks; answered rows are staged (the
        # length rule needs the whole partition), the rows the refiner did not answer are rejects already.
        staged: dict[str, PartitionOutput] = {}
        pending: list[tuple[str, Iterator[pl.DataFrame]]] = []
        for key in context.partition_keys:
            part = _part(key)
            fingerprint = resume_key(
                input_generation(st, "synthesized_qa", part),
                code_version,
                client.cfg.model_dump(),
                cfg.model_dump(),
                detection.model_dump(),
                question_checked,
            )
            out = open_output(
                st, WORK_ASSET, part, key, refine.STAGED_SCHEMA, fingerprint, "refined_qa", resume_committed=True
            )
            staged[key] = out
            if not out.rows.committed:
                if out.done:
                    context.log.info(f"refined_qa[{key}]: resuming after {out.done} rows already refined")
                files = st.partition_files("synthesized_qa", part)
                pending.append((key, skip_done(stream_parquet(st, files, chunk_rows, SYNTHESIZED_SCHEMA), out.done)))
        progress = progress_logger(context.log, "refined_qa")
        sent = 0
        for batch in pooled(_interleave(pending), chunk_rows):
            qa = pl.concat([df for _, df in batch])
            results = client.run(refine.build_requests(qa), refine.validate_answer, progress)
            by_key = {r.key: r for r in results}
            for key, df in batch:
                mine = [by_key[q] for q in df["qa_id"]]
                tallies[key].add(mine)
                rows, rejects = refine.stage(df, mine, cfg, key, detection, lang_stats[key], question_checked)
                staged[key].write(rows, rejects, df.height)
            sent += qa.height
        for out in staged.values():
            out.rows.commit()  # pass 1 is complete: a kill from here on redoes pass 2 only
        # Pass 2, the rules: the partition's length fence, then every blocking flag rejects its row.
        for key, out in staged.items():
            part = _part(key)
            work_files = st.partition_files(WORK_ASSET, part)
            lengths = pl.concat(
                [st.read_parquet(f, columns=["refined_answer"])["refined_answer"].str.len_chars() for f in work_files]
                or [pl.Series([], dtype=pl.UInt32)]
            )
            fence = refine.length_fence(lengths, cfg.length_outlier_iqr, cfg.min_rows_for_outliers)
            final = st.partition_writer("refined_qa", part, REFINED_SCHEMA)
            kept, head = 0, None
            for i, chunk in enumerate(stream_parquet(st, work_files, chunk_rows, refine.STAGED_SCHEMA)):
                rows, rejects = refine.finish(chunk, fence, cfg, key)
                final.write(rows)
                for lang, n in rows.group_by("language").len().iter_rows():
                    by_language[key][lang] = by_language[key].get(lang, 0) + n
                out.rejects.write(rejects, progress=out.done + i + 1)  # beyond pass 1: a resume drops these
                out.count(rejects)
                kept += rows.height
                if head is None and rows.height:
                    head = rows.head(5)
            final.commit()
            out.rejects.commit()
            st.delete_folder(st.partition_folder(WORK_ASSET, part))
            context.add_asset_metadata(
                {
                    **row_figures(kept, out.rejected, out.reasons),
                    "input": out.done,
                    "rows_by_language": one_line(dict(sorted(by_language[key].items()))),
                    "language_fidelity": md_table(language.merge_tables(lang_stats[key])),
                    "preview": table_preview(head, PREVIEW_COLUMNS),
                    **tallies[key].metadata(),
                },
                partition_key=key,
            )
        context.log.info(f"refined_qa: {sent} QA refined over {len(staged)} partitions")
        log_run_llm(context.log, "refined_qa", client.stats)
        fail_if_unsent("refined_qa", {key: unsent_rows(out.reasons) for key, out in staged.items()})
        return dg.MaterializeResult(metadata={"dagster/column_schema": column_schema(RefinedQA)})

    @dg.asset_check(asset=refined_qa, partitions_def=parts.qa_partitions, blocking=True)
    def refined_qa_valid(
        context: dg.AssetCheckExecutionContext, store: StoreResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        """Per partition (blocking: bad rows must not reach the mixture): the refined schema, unique `qa_id`,
        no null or empty question or refined answer, `status = kept`, and no kept row carrying a flag that
        the configuration says must reject; plus the Great Expectations suite of `expectations.py` (nulls,
        label sets, unique `qa_id`, question/answer lengths; `gx_*` metadata). Rows the run never sent (the
        endpoint went down, or kept answering 429) fail it until the partition is materialized again."""
        st = store.get()
        reject_flags = project_config().pipeline.refinement.reject_flags
        yield from report_partition_checks(
            context, "refined_qa", "refined_qa_valid", lambda key: evaluate_partition(st, key, reject_flags)
        )

    return [refined_qa, refined_qa_valid]


WORK_ASSET = "_work/refined_qa"  # pass 1's staged rows, deleted once the partition is committed


def _part(key: str) -> dict[str, str]:
    discipline, grade = qa_key_parts(key)
    return {"discipline": discipline, "grade": grade}


def _interleave(pending: list[tuple[str, Iterator[pl.DataFrame]]]) -> Iterator[tuple[str, pl.DataFrame]]:
    for key, frames in pending:
        for df in frames:
            yield key, df


def evaluate_partition(st: Store, key: str, reject_flags: list[str]) -> checks.CheckOutcome:
    """The `refined_qa_valid` rules and expectation suite for one partition (a store and a key in, numbers out)."""
    discipline, grade = qa_key_parts(key)
    rules = checks.PartTableChecks(
        REFINED_SCHEMA,
        unique_on="qa_id",
        equals={"discipline": discipline, "grade": grade},
        not_null=["qa_id", "seed_id", "question", "refined_answer", "refine_request_hash"],
        allowed={"status": ["kept"]},
    )
    flagged = 0

    def count_flagged(df: pl.DataFrame) -> None:
        nonlocal flagged
        flagged += df.filter(pl.col("flags").list.eval(pl.element().is_in(reject_flags)).list.any()).height

    # A part file at a time: a cell of a 10^8-row run is ~10^6 rows.
    part = partition_checks.scan(
        st, "refined_qa", {"discipline": discipline, "grade": grade}, rules, project_config().taxonomy, count_flagged
    )
    outcome = part.rules
    if outcome.passed and rules.rows:
        outcome.metadata["kept_rows_with_reject_flags"] = flagged
        outcome.passed = flagged == 0
    sent = checks.all_sent(checks.read_stage_rejects(st, "refined_qa", key))
    return checks.CheckOutcome.all_of(outcome, sent, part.suite)


def failing_partitions(st: Store, reject_flags: list[str]) -> list[str]:
    """Keys of the materialized refined_qa partitions whose `refined_qa_valid` rules fail (empty ones pass)."""
    failing = []
    for path in st.list_partition_files("refined_qa"):
        discipline = path.split("discipline=", 1)[1].split("/", 1)[0]
        grade = path.split("grade=", 1)[1].split("/", 1)[0]
        key = qa_key(discipline, grade)
        if not evaluate_partition(st, key, reject_flags).passed:
            failing.append(key)
    return failing
