"""``synthesized_qa[discipline x grade]``: new QA pairs at the partition's grade, from annotated seeds."""

import json
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
from boostqa_assets.failures import read_good_sources
from boostqa_assets.logic import annotate, fidelity, language, synthesize
from boostqa_assets.logic import plan as plan_logic
from boostqa_assets.partitions import Partitions, qa_key_parts
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import ANNOTATED_SCHEMA, PLAN_SCHEMA, SYNTHESIZED_SCHEMA, SynthesizedQA
from boostqa_assets.resources import LLMResource, StoreResource, project_config
from boostqa_assets.streaming import PartitionOutput, open_output, pooled_lists, resume_key

PREVIEW_COLUMNS = ["qa_id", "track", "difficulty", "language", "question", "answer"]


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.qa_partitions,
        # The plan names each cell's budget and seeds (it reads annotated_seeds), so a cell is stale exactly when
        # its plan changed; eager automation re-synthesizes those cells only.
        deps=[dg.AssetDep("synthesis_plan")],
        automation_condition=eager_when_upstream_passed(),
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet", "llm"},
        code_version="synth-" + prompt_fingerprint(*synthesize.TRACK_PROMPTS.values()),
        pool=endpoint_pool("synthesizer"),
        **asset_ui("synthesized_qa"),
    )
    def synthesized_qa(
        context: dg.AssetExecutionContext, store: StoreResource, llm: LLMResource
    ) -> dg.MaterializeResult:
        """One row per new QA pair at the partition's grade, made from one annotated seed of the
        partition's discipline by the synthesizer role: as many as the partition's `synthesis_plan` budget,
        from the seeds the plan names (variants dealt round-robin over them).

        Multi-grade track: seeds of a multi-grade category (STEM) of any grade yield QA at this grade;
        other disciplines only from seeds of this grade. High-difficulty track (top grades): seeds at or
        above the configured difficulty yield harder variants. `qa_per_seed` variants each; the model's
        thinking goes to `reasoning`, never into `answer`. Failed requests go to rejects with raw output.

        Fidelity: every high-difficulty row and a sample of multi-grade rows (`sample_per_partition` per
        partition per chunk) are re-annotated; the grade match rate per discipline goes to the metadata, and
        high-difficulty rows that came back easier than their seed are rejected as `difficulty_degraded`.

        Language: each QA is written in its target language (the seed's; `languages.cross_lingual` picks, by a
        hash of qa_id, tasks that write another; `mixed`/`und` seeds use `languages.fallback`), recorded as
        `language` and `target_language` beside `seed_language`. A row whose question or answer is detected in
        another language is rejected as `language_mismatch` (`synthesis.check_language`); checked rows and the
        mismatch rate per language are in `language_fidelity`, kept rows per language in `rows_by_language`.

        Streams one discipline at a time (only the seeds its cells' plans name in memory), tasks in pooled chunks of
        `streaming.chunk_rows`, each partition's rows written as part files and committed at the end; a run
        killed half way resumes after its last chunk.
        """
        project = project_config()
        st = store.get()
        client = llm.client("synthesizer")
        checker = llm.client("annotator")
        chunk_rows = project.pipeline.streaming.chunk_rows
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        fidelity_cfg = project.pipeline.quality.fidelity
        top = project.taxonomy.difficulties[-1]
        by_discipline: dict[str, list[str]] = {}
        for key in context.partition_keys:
            by_discipline.setdefault(qa_key_parts(key)[0], []).append(key)
        outs: dict[str, PartitionOutput] = {}
        n_tasks = 0
        languages = project.pipeline.languages
        # Each partition's own figures (its materialization event shows them, not the run's).
        budgets: dict[str, int] = {}
        checked: dict[str, list[dict[str, Any]]] = {k: [] for k in context.partition_keys}
        lang_stats: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in context.partition_keys}
        by_language: dict[str, dict[str, int]] = {k: {} for k in context.partition_keys}
        tallies = {k: LLMTally(client.stats) for k in context.partition_keys}
        check_tallies = {k: LLMTally(checker.stats) for k in context.partition_keys}
        progress = progress_logger(context.log, "synthesized_qa")

        def cell_tasks(
            annotated: pl.DataFrame, cells: dict[str, dict[str, Any]]
        ) -> Iterator[tuple[str, list[synthesize.SynthTask]]]:
            """Each cell's tasks when the chunks reach it: one cell's tasks (and its seeds' dicts) at a time."""
            nonlocal n_tasks
            for key, cell in cells.items():
                part = {"discipline": cell["discipline"], "grade": cell["grade"]}
                tasks, missing = plan_logic.cell_tasks(annotated, cell, project)
                if missing:
                    context.log.warning(
                        f"synthesized_qa[{key}]: {missing} seeds of the plan are no longer annotated; the plan is "
                        "stale (materialize synthesis_plan)"
                    )
                budgets[key] = cell["budget"]
                fingerprint = resume_key(
                    cell["fingerprint"],
                    [t.qa_id for t in tasks],
                    code_version,
                    client.cfg.model_dump(),
                    checker.cfg.model_dump(),
                    fidelity_cfg.model_dump(),
                    languages.model_dump(),
                    project.pipeline.synthesis.check_language,
                )
                outs[key] = out = open_output(st, "synthesized_qa", part, key, SYNTHESIZED_SCHEMA, fingerprint)
                if out.done:
                    context.log.info(f"synthesized_qa[{key}]: resuming after {out.done} tasks already written")
                n_tasks += len(tasks)
                yield key, tasks[out.done :]

        # One discipline at a time: only the seeds its cells' plans name are in memory (the plan holds each cell's
        # budget to the seeds it uses); its cells' tasks are built as the chunks reach them and stream through in
        # pooled chunks, so small cells share an LLM batch and the endpoint stays busy.
        for discipline, keys in by_discipline.items():
            cells = {
                key: st.read_partition(
                    "synthesis_plan", {"discipline": discipline, "grade": qa_key_parts(key)[1]}, PLAN_SCHEMA
                ).row(0, named=True)
                for key in keys
            }
            named = {s for cell in cells.values() for s in json.loads(cell["seed_ids"])}
            annotated = read_good_sources(
                st, "annotated_seeds", ANNOTATED_SCHEMA, discipline=discipline, seed_ids=named
            )
            pending = cell_tasks(annotated, cells)
            for batch in pooled_lists(pending, chunk_rows):
                tasks = [t for _, ts in batch for t in ts]
                requests = synthesize.build_requests(
                    tasks, project.pipeline.synthesis.max_chars_in_prompt, languages=languages
                )
                results = client.run(requests, synthesize.validate_qa, progress)
                by_key = {r.key: r for r in results}
                for key, ts in batch:
                    tallies[key].add(by_key[t.qa_id] for t in ts)
                pieces = [
                    (
                        key,
                        *synthesize.assemble(
                            ts,
                            [by_key[t.qa_id] for t in ts],
                            project.taxonomy,
                            key,
                            top,
                            languages,
                            project.pipeline.synthesis.check_language,
                            lang_stats[key],
                        ),
                    )
                    for key, ts in batch
                ]
                # Grade fidelity / difficulty degradation: re-annotate each piece's sample (all its high-difficulty
                # rows) in one batch, then reject the degraded rows.
                to_check = [fidelity.sample(kept, fidelity_cfg.sample_per_partition, seed=0) for _, kept, _ in pieces]
                check_rows = pl.concat(to_check) if to_check else pl.DataFrame(schema=SYNTHESIZED_SCHEMA)
                check_results = checker.run(
                    fidelity.build_requests(
                        check_rows, project.taxonomy, project.pipeline.annotation.max_chars_in_prompt
                    ),
                    annotate.make_validator(project.taxonomy),
                    progress_logger(context.log, "synthesized_qa fidelity check"),
                )
                check_by_key = {r.key: r for r in check_results}
                for (key, kept, rejects), (_, ts), sampled in zip(pieces, batch, to_check, strict=True):
                    check_tallies[key].add(check_by_key[q] for q in sampled["qa_id"] if q in check_by_key)
                    kept, degraded, part_checked = fidelity.apply(
                        kept, check_results, project.taxonomy, key, fidelity_cfg.drop_degraded
                    )
                    checked[key] += part_checked
                    for lang, n in kept.group_by("language").len().iter_rows():
                        by_language[key][lang] = by_language[key].get(lang, 0) + n
                    outs[key].write(kept, pl.concat([rejects, degraded]), len(ts))
            for key in keys:
                outs[key].commit()
        context.log.info(f"synthesized_qa: {n_tasks} tasks over {len(outs)} partitions")
        for key, out in outs.items():
            table = fidelity.fidelity_table(checked[key])
            sampled = sum(t["sampled"] for t in table)
            matches = sum(t["grade_matches"] for t in table)
            context.add_asset_metadata(
                {
                    **row_figures(out.kept, out.rejected, out.reasons),
                    "tasks": out.done,
                    "plan_budget": budgets.get(key, 0),
                    "parts": out.rows.chunks_done,
                    "grade_fidelity_sampled": sampled,
                    "grade_fidelity_matches": matches,
                    "grade_fidelity_rate": round(matches / sampled, 3) if sampled else "no rows sampled",
                    "difficulty_degraded": sum(t["degraded"] for t in table),
                    "rows_by_language": one_line(dict(sorted(by_language[key].items()))),
                    "language_fidelity": md_table(language.merge_tables(lang_stats[key])),
                    "preview": table_preview(out.head, PREVIEW_COLUMNS),
                    **tallies[key].metadata(),
                    "fidelity_check_tokens_in": check_tallies[key].tokens_in,
                    # The annotator's re-annotation, apart from the synthesizer's figures (the demo summary's
                    # `annotator (fidelity)` line).
                    "fidelity_llm": dg.MetadataValue.json(check_tallies[key].entry()),
                },
                partition_key=key,
            )
        log_run_llm(context.log, "synthesized_qa", client.stats)
        log_run_llm(context.log, "synthesized_qa fidelity check", checker.stats)
        fail_if_unsent("synthesized_qa", {key: unsent_rows(out.reasons) for key, out in outs.items()})
        return dg.MaterializeResult(metadata={"dagster/column_schema": column_schema(SynthesizedQA)})

    @dg.asset_check(asset=synthesized_qa, partitions_def=parts.qa_partitions, blocking=True)
    def synthesized_qa_valid(
        context: dg.AssetCheckExecutionContext, store: StoreResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        """Per discipline x grade partition: the synthesized schema, unique `qa_id`, no null or empty
        question/answer, discipline and grade equal to the partition's, tracks and labels inside the
        taxonomy; plus the Great Expectations suite of `expectations.py` (lengths, label sets; `gx_*` metadata).
        An empty partition passes (no seed of that discipline reached it). Rows the run never sent (the endpoint
        went down, or kept answering 429) fail it until the partition is materialized again."""
        st = store.get()
        tax = project_config().taxonomy

        def evaluate(key: str) -> checks.CheckOutcome:
            discipline, grade = qa_key_parts(key)
            rules = checks.PartTableChecks(
                SYNTHESIZED_SCHEMA,
                unique_on="qa_id",
                equals={"discipline": discipline, "grade": grade},
                not_null=["qa_id", "seed_id", "question", "answer", "synth_request_hash"],
                allowed={
                    "track": ["multi_grade", "high_difficulty"],
                    "difficulty": tax.difficulties,
                    "seed_grade": tax.grades,
                },
            )
            # A part file at a time: a cell of a 10^8-row run is ~10^6 rows with their reasoning traces.
            part = partition_checks.scan(st, "synthesized_qa", {"discipline": discipline, "grade": grade}, rules, tax)
            sent = checks.all_sent(checks.read_stage_rejects(st, "synthesized_qa", key))
            return checks.CheckOutcome.all_of(part.rules, sent, part.suite)

        yield from report_partition_checks(context, "synthesized_qa", "synthesized_qa_valid", evaluate)

    return [synthesized_qa, synthesized_qa_valid]
