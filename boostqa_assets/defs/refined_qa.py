"""``refined_qa[discipline x grade]``: synthesized QA with the refiner's answer and rule-filter flags."""

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
from boostqa_assets.logic import refine
from boostqa_assets.partitions import Partitions, qa_key, qa_key_parts
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import REFINED_SCHEMA, SYNTHESIZED_SCHEMA
from boostqa_assets.resources import LLMResource, StoreResource, project_config
from boostqa_assets.storage import Store


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.qa_partitions,
        deps=["synthesized_qa"],
        # Re-synthesized cells are refined automatically (the same discipline x grade partition only).
        automation_condition=dg.AutomationCondition.eager(),
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet", "llm"},
        code_version="refined-" + prompt_fingerprint(refine.PROMPT_ID),
        pool=endpoint_pool("refiner"),
    )
    def refined_qa(context: dg.AssetExecutionContext, store: StoreResource, llm: LLMResource) -> dg.MaterializeResult:
        """One row per kept QA pair of the partition: `refined_answer` from the refiner role, `flags` from
        the rule filters, `status = kept`.

        Rejected (to `rejects/stage=refined_qa`, reason = the first blocking flag): refusals, empty or
        truncated answers, answers shorter/longer than the configured bounds, length outliers beyond
        Q3 + k*IQR of the partition, and answers whose script differs from the question's.
        """
        project = project_config()
        st = store.get()
        client = llm.client("refiner")
        inputs = {}
        for key in context.partition_keys:
            discipline, grade = qa_key_parts(key)
            inputs[key] = st.read_partition(
                "synthesized_qa", {"discipline": discipline, "grade": grade}, SYNTHESIZED_SCHEMA
            )
        everything = pl.concat(list(inputs.values())) if inputs else pl.DataFrame(schema=SYNTHESIZED_SCHEMA)
        context.log.info(f"refined_qa: {everything.height} QA to refine over {len(inputs)} partitions")
        results = client.run(
            refine.build_requests(everything),
            refine.validate_answer,
            progress_logger(context.log, "refined_qa"),
        )
        by_key = {r.key: r for r in results}
        summary = []
        for key, qa in inputs.items():
            discipline, grade = qa_key_parts(key)
            kept, rejects = refine.assemble(qa, [by_key[q] for q in qa["qa_id"]], project.pipeline.refinement, key)
            st.write_partition("refined_qa", {"discipline": discipline, "grade": grade}, kept)
            st.write_rejects("refined_qa", key, rejects)
            if qa.height:
                summary.append(
                    {
                        "partition": key,
                        "input": qa.height,
                        "kept": kept.height,
                        "rejected": rejects.height,
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
                "partitions": md_table(summary),
                **llm_metadata(client.stats),
            }
        )

    @dg.asset_check(asset=refined_qa, partitions_def=parts.qa_partitions, blocking=True)
    def refined_qa_valid(context: dg.AssetCheckExecutionContext, store: StoreResource) -> dg.AssetCheckResult:
        """Per partition (blocking: bad rows must not reach the mixture): the refined schema, unique `qa_id`,
        no null or empty question or refined answer, `status = kept`, and no kept row carrying a flag that
        the configuration says must reject; plus the Great Expectations suite of `expectations.py` (nulls,
        label sets, unique `qa_id`, question/answer lengths; `gx_*` metadata). Rows the run never sent (the
        endpoint went down, or kept answering 429) fail it until the partition is materialized again."""
        st = store.get()
        reject_flags = project_config().pipeline.refinement.reject_flags
        return report_partition_checks(
            context, "refined_qa", "refined_qa_valid", lambda key: evaluate_partition(st, key, reject_flags)
        )

    return [refined_qa, refined_qa_valid]


def evaluate_partition(st: Store, key: str, reject_flags: list[str]) -> checks.CheckOutcome:
    """The `refined_qa_valid` rules and expectation suite for one partition (a store and a key in, numbers out)."""
    discipline, grade = qa_key_parts(key)
    df = st.read_partition("refined_qa", {"discipline": discipline, "grade": grade})
    outcome = checks.table_checks(
        df,
        REFINED_SCHEMA,
        unique_on="qa_id",
        equals={"discipline": discipline, "grade": grade},
        not_null=["qa_id", "seed_id", "question", "refined_answer", "refine_request_hash"],
        allowed={"status": ["kept"]},
    )
    if outcome.passed and df.height:
        flagged = df.filter(pl.col("flags").list.eval(pl.element().is_in(reject_flags)).list.any()).height
        outcome.metadata["kept_rows_with_reject_flags"] = flagged
        outcome.passed = flagged == 0
    sent = checks.all_sent(checks.read_stage_rejects(st, "refined_qa", key))
    suite = expectations.validate("refined_qa", df, project_config().taxonomy)
    return checks.CheckOutcome.all_of(outcome, sent, suite)


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
