"""``synthesized_qa[discipline x grade]``: new QA pairs at the partition's grade, from annotated seeds."""

import dagster as dg
import polars as pl

from boostqa_assets import checks, expectations
from boostqa_assets.defs.support import (
    backfill_policy,
    counts_by,
    endpoint_pool,
    llm_metadata,
    md_table,
    progress_logger,
    report_partition_checks,
)
from boostqa_assets.failures import read_good_sources
from boostqa_assets.logic import annotate, fidelity, synthesize
from boostqa_assets.logic import plan as plan_logic
from boostqa_assets.partitions import Partitions, qa_key_parts
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import ANNOTATED_SCHEMA, PLAN_SCHEMA, SYNTHESIZED_SCHEMA
from boostqa_assets.resources import LLMResource, StoreResource, project_config


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.qa_partitions,
        # The plan names each cell's budget and seeds (it reads annotated_seeds), so a cell is stale exactly when
        # its plan changed; eager automation re-synthesizes those cells only.
        deps=[dg.AssetDep("synthesis_plan")],
        automation_condition=dg.AutomationCondition.eager(),
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet", "llm"},
        code_version="synth-" + prompt_fingerprint(*synthesize.TRACK_PROMPTS.values()),
        pool=endpoint_pool("synthesizer"),
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

        Fidelity: every high-difficulty row and a sample of multi-grade rows are re-annotated; the grade match
        rate per discipline goes to the metadata, and high-difficulty rows that came back easier than their
        seed are rejected as `difficulty_degraded`.
        """
        project = project_config()
        st = store.get()
        annotated = read_good_sources(st, "annotated_seeds", ANNOTATED_SCHEMA)
        client = llm.client("synthesizer")
        plans = {}
        budgets = []
        for key in context.partition_keys:
            discipline, grade = qa_key_parts(key)
            cell = st.read_partition("synthesis_plan", {"discipline": discipline, "grade": grade}, PLAN_SCHEMA).row(
                0, named=True
            )
            plans[key], missing = plan_logic.cell_tasks(annotated, cell, project)
            if missing:
                context.log.warning(
                    f"synthesized_qa[{key}]: {missing} seeds of the plan are no longer annotated; the plan is stale "
                    "(materialize synthesis_plan)"
                )
            budgets.append(cell["budget"])
        # One batch across the run's partitions keeps the endpoint busy at the concurrency cap.
        tasks = [t for ts in plans.values() for t in ts]
        context.log.info(
            f"synthesized_qa: {len(tasks)} tasks over {len(plans)} partitions from {annotated.height} annotated seeds"
        )
        requests = synthesize.build_requests(tasks, project.pipeline.synthesis.max_chars_in_prompt)
        results = client.run(requests, synthesize.validate_qa, progress_logger(context.log, "synthesized_qa"))
        by_key = {r.key: r for r in results}
        top = project.taxonomy.difficulties[-1]
        assembled = {}
        for key, ts in plans.items():
            assembled[key] = synthesize.assemble(ts, [by_key[t.qa_id] for t in ts], project.taxonomy, key, top)
        # Grade fidelity / difficulty degradation: re-annotate a sample (all high-difficulty rows) in one batch.
        fidelity_cfg = project.pipeline.quality.fidelity
        to_check = [fidelity.sample(kept, fidelity_cfg.sample_per_partition, seed=0) for kept, _ in assembled.values()]
        check_rows = pl.concat(to_check) if to_check else pl.DataFrame(schema=SYNTHESIZED_SCHEMA)
        checker = llm.client("annotator")
        check_results = checker.run(
            fidelity.build_requests(check_rows, project.taxonomy, project.pipeline.annotation.max_chars_in_prompt),
            annotate.make_validator(project.taxonomy),
            progress_logger(context.log, "synthesized_qa fidelity check"),
        )
        summary, checked = [], []
        for key, (kept, rejects) in assembled.items():
            discipline, grade = qa_key_parts(key)
            kept, degraded, part_checked = fidelity.apply(
                kept, check_results, project.taxonomy, key, fidelity_cfg.drop_degraded
            )
            rejects = pl.concat([rejects, degraded])
            checked += part_checked
            st.write_partition("synthesized_qa", {"discipline": discipline, "grade": grade}, kept)
            st.write_rejects("synthesized_qa", key, rejects)
            if plans[key]:
                summary.append(
                    {
                        "partition": key,
                        "tasks": len(plans[key]),
                        "kept": kept.height,
                        "rejected": rejects.height,
                        "tracks": counts_by(kept, "track") or "-",
                        "reject_reasons": counts_by(rejects, "reason") or "-",
                    }
                )
        table = fidelity.fidelity_table(checked)
        matches = sum(t["grade_matches"] for t in table)
        sampled = sum(t["sampled"] for t in table)
        rows = sum(s["kept"] for s in summary)
        return dg.MaterializeResult(
            metadata={
                "rows": rows,
                "rows_rejected": sum(s["rejected"] for s in summary),
                "dagster/row_count": rows,
                "partitions_with_rows": len(summary),
                "partitions_in_run": len(plans),
                "plan_budget": sum(budgets),
                "partitions": md_table(summary),
                "grade_fidelity": md_table(table),
                "grade_fidelity_rate": round(matches / sampled, 3) if sampled else "no rows sampled",
                "grade_fidelity_sampled": sampled,
                "difficulty_degraded": sum(t["degraded"] for t in table),
                "fidelity_check_tokens_in": checker.stats.tokens_in,
                "fidelity_llm": llm_metadata(checker.stats)["llm"],  # the annotator's figures for the demo summary
                **llm_metadata(client.stats),
            }
        )

    @dg.asset_check(asset=synthesized_qa, partitions_def=parts.qa_partitions, blocking=True)
    def synthesized_qa_valid(context: dg.AssetCheckExecutionContext, store: StoreResource) -> dg.AssetCheckResult:
        """Per discipline x grade partition: the synthesized schema, unique `qa_id`, no null or empty
        question/answer, discipline and grade equal to the partition's, tracks and labels inside the
        taxonomy; plus the Great Expectations suite of `expectations.py` (lengths, label sets; `gx_*` metadata).
        An empty partition passes (no seed of that discipline reached it). Rows the run never sent (the endpoint
        went down, or kept answering 429) fail it until the partition is materialized again."""
        st = store.get()
        tax = project_config().taxonomy

        def evaluate(key: str) -> checks.CheckOutcome:
            discipline, grade = qa_key_parts(key)
            df = st.read_partition("synthesized_qa", {"discipline": discipline, "grade": grade})
            rules = checks.table_checks(
                df,
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
            sent = checks.all_sent(checks.read_stage_rejects(st, "synthesized_qa", key))
            return checks.CheckOutcome.all_of(rules, sent, expectations.validate("synthesized_qa", df, tax))

        return report_partition_checks(context, "synthesized_qa", "synthesized_qa_valid", evaluate)

    return [synthesized_qa, synthesized_qa_valid]
