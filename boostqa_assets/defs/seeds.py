"""``seeds[source]``: one row per normalized seed of a configured source (no LLM)."""

import dagster as dg

from boostqa_assets import checks, expectations
from boostqa_assets.defs.support import backfill_policy, counts_by, md_table, report_partition_checks
from boostqa_assets.logic.sources import read_source
from boostqa_assets.partitions import Partitions
from boostqa_assets.records import SEED_SCHEMA
from boostqa_assets.resources import StoreResource, project_config


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.source_partitions,
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet"},
        code_version="seeds-v1",
    )
    def seeds(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        """One row per seed of the source: a QA item, problem or passage, normalized to the seed record.

        Rows are read with the source's field mapping; `seed_id` is a stable hash of source + native id (or
        normalized text). Exact duplicates within the source, invalid UTF-8, empty text, oversize rows,
        missing required fields and unparseable lines go to `rejects/stage=seeds` with a reason. `limit`
        keeps a seeded sample (reported as `rows_not_sampled`). A corrupt file fails the run, naming it.
        """
        project = project_config()
        st = store.get()
        summary = []
        for key in context.partition_keys:
            cfg = project.sources.get(key)
            result = read_source(cfg, project.config_dir, st.storage_options)
            path = st.write_partition("seeds", {"source": key}, result.seeds)
            st.write_rejects("seeds", key, result.rejects)
            reasons = counts_by(result.rejects, "reason")
            context.log.info(
                f"seeds[{key}]: read {result.rows_read} rows from {result.path}, kept "
                f"{result.seeds.height}, rejected {result.rejects.height} {reasons}, "
                f"not sampled {result.rows_not_sampled}"
            )
            summary.append(
                {
                    "source": key,
                    "rows_read": result.rows_read,
                    "kept": result.seeds.height,
                    "rejected": result.rejects.height,
                    "not_sampled": result.rows_not_sampled,
                    "reject_reasons": reasons or "-",
                    "path": path,
                }
            )
        return dg.MaterializeResult(
            metadata={
                "rows": sum(s["kept"] for s in summary),
                "rows_rejected": sum(s["rejected"] for s in summary),
                "partitions": md_table(summary),
                "dagster/row_count": sum(s["kept"] for s in summary),
            }
        )

    @dg.asset_check(asset=seeds, partitions_def=parts.source_partitions, blocking=True)
    def seeds_valid(context: dg.AssetCheckExecutionContext, store: StoreResource) -> dg.AssetCheckResult:
        """Per source partition: the seed schema, unique `seed_id`, no null ids or kinds, and at least one
        seed (an empty source is a configuration or data problem, so this blocks annotation); plus the
        Great Expectations suite of `expectations.py` (numbers as `gx_*` metadata)."""
        st = store.get()
        tax = project_config().taxonomy

        def evaluate(key: str) -> checks.CheckOutcome:
            df = st.read_partition("seeds", {"source": key})
            rules = checks.table_checks(
                df,
                SEED_SCHEMA,
                not_null=["seed_id", "source", "kind", "language"],
                unique_on="seed_id",
                equals={"source": key},
                require_rows=True,
            )
            return checks.CheckOutcome.all_of(rules, expectations.validate("seeds", df, tax))

        return report_partition_checks(context, "seeds", "seeds_valid", evaluate)

    return [seeds, seeds_valid]
