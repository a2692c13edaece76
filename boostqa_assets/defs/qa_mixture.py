"""``qa_mixture[recipe]``: the token-budgeted training mixture of one recipe."""

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import dagster as dg
import polars as pl

from boostqa_assets import checks, expectations
from boostqa_assets.configs import TaxonomyConfig
from boostqa_assets.defs.metadata import column_schema, table_preview
from boostqa_assets.defs.refined_gate import refined_failures
from boostqa_assets.defs.support import asset_ui, md_table, report_partition_checks
from boostqa_assets.logic import gates, gates_ooc
from boostqa_assets.logic.card import dataset_card
from boostqa_assets.logic.mixture_ooc import build_mixture_streaming
from boostqa_assets.logic.spill import SpillConfig, publish_directory, read_columns, staging_folder
from boostqa_assets.partitions import Partitions
from boostqa_assets.records import MIXTURE_SCHEMA, MixtureDoc
from boostqa_assets.resources import StoreResource, project_config


def _coverage_table(docs: pl.DataFrame, grades: list[str]) -> dg.MetadataValue:
    """Discipline x grade token counts: where the mixture's tokens are (``docs``: discipline, grade, n_tokens)."""
    if docs.is_empty():
        return dg.MetadataValue.md("_empty mixture_")
    pivot = docs.group_by("discipline", "grade").agg(pl.col("n_tokens").sum())
    rows = []
    for discipline in sorted(pivot["discipline"].unique().to_list()):
        sub = {g: t for _, g, t in pivot.filter(pl.col("discipline") == discipline).iter_rows()}
        rows.append({"discipline": discipline, **{g: sub.get(g, 0) for g in grades}})
    return md_table(rows, ["discipline", *grades])


PREVIEW_COLUMNS = ["doc_id", "discipline", "grade", "track", "language", "n_tokens", "text"]


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        partitions_def=parts.recipe_partitions,
        deps=[dg.AssetDep("refined_qa", partition_mapping=dg.AllPartitionMapping())],
        # Rebuilt once refined partitions changed and none is still running (every recipe: they all sample it).
        automation_condition=dg.AutomationCondition.eager(),
        group_name="boostqa",
        kinds={"parquet", "jsonl"},
        code_version="mixture-v2",  # v2: a `language` column, language weights and totals
        **asset_ui("qa_mixture"),
    )
    def qa_mixture(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        """One row per training document of the recipe: `template` applied to a kept QA pair.

        Gates first, over every refined_qa partition: exact and near duplicates (MinHash LSH, Jaccard >=
        `quality.dedup.threshold`; the smallest qa_id of a cluster stays) and rows sharing a 13-word n-gram
        with a benchmark (MMLU by default) go to `rejects/stage=qa_mixture` with the reason.

        Seeded weighted sampling without replacement (weights per category, grade, track and language) fills the
        recipe's token budget, counted with tiktoken. Written as Parquet and JSONL shards plus
        `manifest.json` (token totals by discipline, grade, track, source and language, rows and token share per
        language; the recipe and its hash; the
        sampling seed) and `DATASET_CARD.md` (sources and licences, tokens, what every filter removed),
        replacing the recipe's folder as a whole.
        """
        project = project_config()
        st = store.get()
        # The gate holds across runs too: a refined partition that fails its blocking check never feeds a mixture,
        # even when it was materialized in another run than this one. Read from the instance's check records, not
        # re-validated (see defs/refined_gate.py).
        failing = refined_failures(context.instance, st, project.pipeline.refinement.reject_flags).failing
        if failing:
            raise dg.Failure(
                description=f"refined_qa partitions fail refined_qa_valid: {', '.join(failing[:20])}"
                f"{' ...' if len(failing) > 20 else ''}; re-materialize them (or fix the data) before the mixture",
                metadata={"failing_partitions": len(failing)},
            )
        quality = project.pipeline.quality
        index = gates.build_index(quality, project.config_dir, st.storage_options)
        recipes = [project.recipes.get(key) for key in context.partition_keys]
        spill = SpillConfig(work_dir=gates_ooc.work_folder())
        staged: list[Path] = []
        try:
            # Out of core at every size: keys per partition (qa_signatures' when fresh), a DuckDB merge, one
            # streaming pass for rejects, decontamination and each recipe's pool (logic/gates_ooc.py).
            run = gates_ooc.run_gates(st, st.list_partition_files("refined_qa"), quality, index, recipes, spill)
            gate_counts = run.counts
            # The card needs counts only: two columns of seeds and rejects, never their records.
            seeds = read_columns(st, st.list_partition_files("seeds"), ["source", "license", "language"])
            rejects = read_columns(st, st.list_partition_files("rejects"), ["stage", "reason"])
            results = {}
            for recipe in recipes:
                key = recipe.name
                out = staging_folder(st, "qa_mixture") or spill.work_dir / "out" / key
                staged.append(out)
                mix = build_mixture_streaming(run.pools[key], recipe, spill, out)
                shards = sorted(f for f in mix.files if f.endswith(".parquet"))
                head = pl.read_parquet(out / shards[0], n_rows=5) if shards else None  # before it moves
                manifest = {**mix.manifest, "gates": gate_counts}
                (out / "manifest.json").write_bytes(
                    json.dumps({**manifest, "files": sorted(mix.files)}, indent=2, sort_keys=True).encode("utf-8")
                )
                card = dataset_card(manifest, seeds, rejects, run.refined_rows)
                (out / "DATASET_CARD.md").write_bytes(card.encode("utf-8"))
                target = publish_directory(st, "qa_mixture", f"recipe={key}", out)
                results[key] = (mix.coverage, manifest, target, card, head)
                context.log.info(
                    f"qa_mixture[{key}]: {manifest['rows']} docs, {manifest['tokens_total']} tokens "
                    f"({manifest['budget_filled']:.0%} of the budget) from {run.refined_rows} kept QA; gates removed "
                    f"{gate_counts['exact_duplicate']} exact and {gate_counts['near_duplicate']} near duplicates, "
                    f"{gate_counts['contaminated']} contaminated"
                )
        finally:
            for folder in [spill.work_dir, *staged]:  # published folders are gone already; a failed one is not
                shutil.rmtree(folder, ignore_errors=True)
        # Each recipe's own figures (a run of several recipes gives each its own event).
        for key, (coverage, manifest, target, card, head) in results.items():
            context.add_asset_metadata(
                {
                    "rows": manifest["rows"],
                    "dagster/row_count": manifest["rows"],
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
                    "coverage_tokens": _coverage_table(coverage, project.taxonomy.grades),
                    "gate_seconds": run.stats.get("seconds_gates", 0.0),
                    "dedup_keys_from_qa_signatures": run.stats.get("keys_reused", 0),
                    "tokens_by_track": dg.MetadataValue.json(manifest["tokens_by_track"]),
                    "tokens_by_source": dg.MetadataValue.json(manifest["tokens_by_source"]),
                    "tokens_by_language": dg.MetadataValue.json(manifest["tokens_by_language"]),
                    "rows_by_language": dg.MetadataValue.json(manifest["rows_by_language"]),
                    "language_share": dg.MetadataValue.json(manifest["language_share"]),
                    "preview": table_preview(head, PREVIEW_COLUMNS),
                },
                partition_key=key,
            )
        return dg.MaterializeResult(metadata={"dagster/column_schema": column_schema(MixtureDoc)})

    @dg.asset_check(asset=qa_mixture, partitions_def=parts.recipe_partitions, blocking=True)
    def qa_mixture_valid(
        context: dg.AssetCheckExecutionContext, store: StoreResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        """Per recipe (blocking): the mixture schema, unique `qa_id` and `doc_id`, no empty text, at least one
        document, tokens within the budget, the manifest's totals equal to the shards', and every row's
        `seed_id` joining back to `seeds` (lineage); plus the Great Expectations suite of `expectations.py`
        (`n_tokens >= 1`, labels in the taxonomy, unique `doc_id`; `gx_*` metadata)."""
        st = store.get()
        project = project_config()
        seed_ids = read_columns(st, st.list_partition_files("seeds"), ["seed_id"])["seed_id"]

        def evaluate(key: str) -> checks.CheckOutcome:
            folder = st.path("qa_mixture", f"recipe={key}")
            manifest = json.loads(st.read_bytes(f"{folder}/manifest.json"))
            shards = [f"{folder}/{f}" for f in manifest["files"] if f.endswith(".parquet")]
            return mixture_outcome(
                (st.read_parquet(f) for f in shards),
                len(shards),
                manifest["tokens_total"],
                project.recipes.get(key).token_budget,
                seed_ids,
                project.taxonomy,
            )

        yield from report_partition_checks(context, "qa_mixture", "qa_mixture_valid", evaluate)

    return [qa_mixture, qa_mixture_valid]


ID_COLUMNS = ["doc_id", "qa_id", "seed_id"]


def mixture_outcome(
    shards: Iterable[pl.DataFrame],
    n_shards: int,
    manifest_tokens: int,
    budget: int,
    seed_ids: pl.Series,
    taxonomy: TaxonomyConfig,
) -> checks.CheckOutcome:
    """The `qa_mixture_valid` rules over a recipe's shards, one shard in memory at a time: per shard the schema and
    nulls; over all of them the id columns (unique `qa_id`, lineage to `seeds`), the token total, and the suite on
    an even sample (``expectations.GX_SAMPLE_ROWS``)."""
    ids: list[pl.DataFrame] = []
    samples: list[pl.DataFrame] = []
    rows = tokens = 0
    per_shard = max(1, expectations.GX_SAMPLE_ROWS // max(1, n_shards))
    for i, df in enumerate(shards):
        outcome = checks.table_checks(df, MIXTURE_SCHEMA, not_null=["doc_id", "qa_id", "seed_id", "text"])
        if not outcome.passed:
            outcome.metadata["failing_shard"] = i
            return checks.CheckOutcome.all_of(outcome, expectations.validate("qa_mixture", df, taxonomy))
        rows += df.height
        tokens += int(df["n_tokens"].sum())
        ids.append(df.select(ID_COLUMNS))
        samples.append(expectations.spread_sample(df, per_shard))
    every = pl.concat(ids) if ids else pl.DataFrame(schema={c: MIXTURE_SCHEMA[c] for c in ID_COLUMNS})
    sample = pl.concat(samples) if samples else pl.DataFrame(schema=MIXTURE_SCHEMA)
    suite = expectations.validate("qa_mixture", sample, taxonomy)
    suite.metadata["rows"] = rows
    within = checks.CheckOutcome(
        tokens <= budget and tokens == manifest_tokens,
        {"tokens": tokens, "budget": budget, "manifest_tokens": manifest_tokens},
    )
    return checks.CheckOutcome.all_of(
        checks.non_empty(every),
        checks.unique(every, "qa_id"),
        checks.unique(every, "doc_id"),
        within,
        checks.joins_back(every, "seed_id", seed_ids),
        suite,
    )
