"""``qa_mixture[recipe]``: the token-budgeted training mixture of one recipe."""

import json

import dagster as dg
import polars as pl

from boostqa_assets import checks, expectations
from boostqa_assets.defs import refined_qa as refined_qa_defs
from boostqa_assets.defs.support import md_table, report_partition_checks
from boostqa_assets.logic import gates
from boostqa_assets.logic.card import dataset_card
from boostqa_assets.logic.mixture import build_mixture, shard_files
from boostqa_assets.partitions import Partitions
from boostqa_assets.records import MIXTURE_SCHEMA, REFINED_SCHEMA, REJECT_SCHEMA, SEED_SCHEMA
from boostqa_assets.resources import StoreResource, project_config


def _coverage_table(docs: pl.DataFrame, grades: list[str]) -> dg.MetadataValue:
    """Discipline x grade token counts: where the mixture's tokens are."""
    if docs.is_empty():
        return dg.MetadataValue.md("_empty mixture_")
    pivot = docs.group_by("discipline", "grade").agg(pl.col("n_tokens").sum())
    rows = []
    for discipline in sorted(pivot["discipline"].unique().to_list()):
        sub = {g: t for _, g, t in pivot.filter(pl.col("discipline") == discipline).iter_rows()}
        rows.append({"discipline": discipline, **{g: sub.get(g, 0) for g in grades}})
    return md_table(rows, ["discipline", *grades])


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.recipe_partitions,
        deps=[dg.AssetDep("refined_qa", partition_mapping=dg.AllPartitionMapping())],
        # Rebuilt once refined partitions changed and none is still running (every recipe: they all sample it).
        automation_condition=dg.AutomationCondition.eager(),
        group_name="boostqa",
        kinds={"parquet", "jsonl"},
        code_version="mixture-v1",
    )
    def qa_mixture(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        """One row per training document of the recipe: `template` applied to a kept QA pair.

        Gates first, over every refined_qa partition: exact and near duplicates (MinHash LSH, Jaccard >=
        `quality.dedup.threshold`; the smallest qa_id of a cluster stays) and rows sharing a 13-word n-gram
        with a benchmark (MMLU by default) go to `rejects/stage=qa_mixture` with the reason.

        Seeded weighted sampling without replacement (weights per category, grade and track) fills the
        recipe's token budget, counted with tiktoken. Written as Parquet and JSONL shards plus
        `manifest.json` (token totals by discipline, grade, track and source; the recipe and its hash; the
        sampling seed) and `DATASET_CARD.md` (sources and licences, tokens, what every filter removed),
        replacing the recipe's folder as a whole.
        """
        project = project_config()
        st = store.get()
        # The gate holds across runs too: a refined partition that fails its blocking check never feeds a mixture,
        # even when it was materialized in another run than this one.
        failing = refined_qa_defs.failing_partitions(st, project.pipeline.refinement.reject_flags)
        if failing:
            raise dg.Failure(
                description=f"refined_qa partitions fail refined_qa_valid: {', '.join(failing[:20])}"
                f"{' ...' if len(failing) > 20 else ''}; re-materialize them (or fix the data) before the mixture",
                metadata={"failing_partitions": len(failing)},
            )
        refined = st.read_asset("refined_qa", REFINED_SCHEMA)
        seeds = st.read_asset("seeds", SEED_SCHEMA)
        quality = project.pipeline.quality
        index = gates.build_index(quality, project.config_dir, st.storage_options)
        results = {}
        for key in context.partition_keys:
            recipe = project.recipes.get(key)
            pool, gate_rejects, gate_counts = gates.apply_gates(refined, quality, index, key)
            st.write_rejects("qa_mixture", key, gate_rejects)
            docs, manifest = build_mixture(pool, recipe)
            manifest["gates"] = gate_counts
            files = shard_files(docs, manifest)
            rejects = st.read_asset("rejects", REJECT_SCHEMA)  # every stage's, this recipe's gates included
            card = dataset_card(manifest, seeds, rejects, refined.height)
            files["DATASET_CARD.md"] = card.encode("utf-8")
            target = st.write_directory("qa_mixture", {"recipe": key}, files)
            results[key] = (docs, manifest, target, card)
            context.log.info(
                f"qa_mixture[{key}]: {docs.height} docs, {manifest['tokens_total']} tokens "
                f"({manifest['budget_filled']:.0%} of the budget) from {refined.height} kept QA; gates removed "
                f"{gate_counts['exact_duplicate']} exact and {gate_counts['near_duplicate']} near duplicates, "
                f"{gate_counts['contaminated']} contaminated"
            )
        docs, manifest, target, card = results[context.partition_keys[-1]]
        return dg.MaterializeResult(
            metadata={
                "rows": docs.height,
                "dagster/row_count": docs.height,
                "tokens_total": manifest["tokens_total"],
                "token_budget": manifest["token_budget"],
                "budget_filled": manifest["budget_filled"],
                "recipe_hash": manifest["recipe_hash"],
                "sampling_seed": manifest["sampling_seed"],
                "path": target,
                "rows_rejected": sum(v for k, v in manifest["gates"].items() if k != "pool"),
                "removed_exact_duplicates": manifest["gates"]["exact_duplicate"],
                "removed_near_duplicates": manifest["gates"]["near_duplicate"],
                "removed_contaminated": manifest["gates"]["contaminated"],
                "dataset_card": dg.MetadataValue.md(card),
                "coverage_tokens": _coverage_table(docs, project.taxonomy.grades),
                "tokens_by_track": dg.MetadataValue.json(manifest["tokens_by_track"]),
                "tokens_by_source": dg.MetadataValue.json(manifest["tokens_by_source"]),
            }
        )

    @dg.asset_check(asset=qa_mixture, partitions_def=parts.recipe_partitions, blocking=True)
    def qa_mixture_valid(context: dg.AssetCheckExecutionContext, store: StoreResource) -> dg.AssetCheckResult:
        """Per recipe (blocking): the mixture schema, unique `qa_id` and `doc_id`, no empty text, at least one
        document, tokens within the budget, the manifest's totals equal to the shards', and every row's
        `seed_id` joining back to `seeds` (lineage); plus the Great Expectations suite of `expectations.py`
        (`n_tokens >= 1`, labels in the taxonomy, unique `doc_id`; `gx_*` metadata)."""
        st = store.get()
        project = project_config()
        seed_ids = st.read_asset("seeds", SEED_SCHEMA)["seed_id"]

        def evaluate(key: str) -> checks.CheckOutcome:
            folder = st.path("qa_mixture", f"recipe={key}")
            manifest = json.loads(st.read_bytes(f"{folder}/manifest.json"))
            shards = [st.read_parquet(f"{folder}/{f}") for f in manifest["files"] if f.endswith(".parquet")]
            df = pl.concat(shards) if shards else pl.DataFrame(schema=MIXTURE_SCHEMA)
            outcome = checks.table_checks(
                df,
                MIXTURE_SCHEMA,
                not_null=["doc_id", "qa_id", "seed_id", "text"],
                unique_on="qa_id",
                require_rows=True,
            )
            suite = expectations.validate("qa_mixture", df, project.taxonomy)
            if not outcome.passed:
                return checks.CheckOutcome.all_of(outcome, suite)
            tokens = int(df["n_tokens"].sum())
            budget = project.recipes.get(key).token_budget
            within = checks.CheckOutcome(
                tokens <= budget and tokens == manifest["tokens_total"],
                {"tokens": tokens, "budget": budget, "manifest_tokens": manifest["tokens_total"]},
            )
            return checks.CheckOutcome.all_of(outcome, within, checks.joins_back(df, "seed_id", seed_ids), suite)

        return report_partition_checks(context, "qa_mixture", "qa_mixture_valid", evaluate)

    return [qa_mixture, qa_mixture_valid]
