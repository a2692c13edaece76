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
from boostqa_assets.logic import annotate, fidelity, synthesize
from boostqa_assets.partitions import Partitions, qa_key_parts
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import ANNOTATED_SCHEMA, SYNTHESIZED_SCHEMA
from boostqa_assets.resources import LLMResource, StoreResource, project_config


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.qa_partitions,
        deps=[dg.AssetDep("annotated_seeds", partition_mapping=dg.AllPartitionMapping())],
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
        partition's discipline by the synthesizer role.

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
        annotated = st.read_asset("annotated_seeds", ANNOTATED_SCHEMA)
        client = llm.client("synthesizer")
        plans = {}
        for key in context.partition_keys:
            discipline, grade = qa_key_parts(key)
            plans[key] = synthesize.plan_tasks(
                annotated, discipline, grade, project.taxonomy, project.pipeline.synthesis
            )
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
                "partitions": md_table(summary),
                "grade_fidelity": md_table(table),
                "grade_fidelity_rate": round(matches / sampled, 3) if sampled else "no rows sampled",
                "grade_fidelity_sampled": sampled,
                "difficulty_degraded": sum(t["degraded"] for t in table),
                "fidelity_check_tokens_in": checker.stats.tokens_in,
                **llm_metadata(client.stats),
            }
        )

    @dg.asset_check(asset=synthesized_qa, partitions_def=parts.qa_partitions, blocking=True)
    def synthesized_qa_valid(context: dg.AssetCheckExecutionContext, store: StoreResource) -> dg.AssetCheckResult:
        """Per discipline x grade partition: the synthesized schema, unique `qa_id`, no null or empty
        question/answer, discipline and grade equal to the partition's, tracks and labels inside the
        taxonomy; plus the Great Expectations suite of `expectations.py` (lengths, label sets; `gx_*` metadata).
        An empty partition passes (no seed of that discipline reached it)."""
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
            return checks.CheckOutcome.all_of(rules, expectations.validate("synthesized_qa", df, tax))

        return report_partition_checks(context, "synthesized_qa", "synthesized_qa_valid", evaluate)

    return [synthesized_qa, synthesized_qa_valid]
