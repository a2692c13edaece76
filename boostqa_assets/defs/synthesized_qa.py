"""``synthesized_qa[discipline x grade]``: new QA pairs at the partition's grade, from annotated seeds."""

import dagster as dg

from boostqa_assets import checks
from boostqa_assets.defs.support import (
    counts_by,
    endpoint_pool,
    llm_metadata,
    md_table,
    progress_logger,
    report_partition_checks,
)
from boostqa_assets.logic import synthesize
from boostqa_assets.partitions import Partitions, qa_key_parts
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import ANNOTATED_SCHEMA, SYNTHESIZED_SCHEMA
from boostqa_assets.resources import LLMResource, StoreResource, project_config


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.qa_partitions,
        deps=[dg.AssetDep("annotated_seeds", partition_mapping=dg.AllPartitionMapping())],
        backfill_policy=dg.BackfillPolicy.single_run(),
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
        summary = []
        top = project.taxonomy.difficulties[-1]
        for key, ts in plans.items():
            discipline, grade = qa_key_parts(key)
            kept, rejects = synthesize.assemble(ts, [by_key[t.qa_id] for t in ts], project.taxonomy, key, top)
            st.write_partition("synthesized_qa", {"discipline": discipline, "grade": grade}, kept)
            st.write_rejects("synthesized_qa", key, rejects)
            if ts:
                summary.append(
                    {
                        "partition": key,
                        "tasks": len(ts),
                        "kept": kept.height,
                        "rejected": rejects.height,
                        "tracks": counts_by(kept, "track") or "-",
                        "reject_reasons": counts_by(rejects, "reason") or "-",
                    }
                )
        rows = sum(s["kept"] for s in summary)
        return dg.MaterializeResult(
            metadata={
                "rows": rows,
                "rows_rejected": sum(s["rejected"] for s in summary),
                "dagster/row_count": rows,
                "partitions_with_rows": len(summary),
                "partitions_in_run": len(plans),
                "partitions": md_table(summary),
                **llm_metadata(client.stats),
            }
        )

    @dg.asset_check(asset=synthesized_qa, partitions_def=parts.qa_partitions, blocking=True)
    def synthesized_qa_valid(context: dg.AssetCheckExecutionContext, store: StoreResource) -> dg.AssetCheckResult:
        """Per discipline x grade partition: the synthesized schema, unique `qa_id`, no null or empty
        question/answer, discipline and grade equal to the partition's, tracks and labels inside the
        taxonomy. An empty partition passes (no seed of that discipline reached it)."""
        st = store.get()
        tax = project_config().taxonomy

        def evaluate(key: str) -> checks.CheckOutcome:
            discipline, grade = qa_key_parts(key)
            df = st.read_partition("synthesized_qa", {"discipline": discipline, "grade": grade})
            return checks.table_checks(
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

        return report_partition_checks(context, "synthesized_qa", "synthesized_qa_valid", evaluate)

    return [synthesized_qa, synthesized_qa_valid]
