"""``synthesis_plan[discipline x grade]``: how many QA each cell gets (and from which seeds), from the recipe's
QA budget and the deficiency probe's accuracies. The rule is in ``logic/plan.py`` and in the asset docstring.

The plan is cheap (no LLM), so it is computed whole; a run writes only the cells it was asked for. The
sensor ``synthesis_plan_sensor`` (and ``boostqa demo``) materialize only the cells whose plan changed, so only
those ``synthesized_qa`` partitions become stale and only those are re-synthesized by automation.
"""

import json
from collections.abc import Iterator
from typing import Any

import dagster as dg
import polars as pl

from boostqa_assets import checks, expectations
from boostqa_assets.configs import ProjectConfig
from boostqa_assets.defs.metadata import column_schema, grid_table, table_preview
from boostqa_assets.defs.support import asset_ui, backfill_policy, md_table, report_partition_checks
from boostqa_assets.failures import good_source_files
from boostqa_assets.logic import plan as plan_logic
from boostqa_assets.logic.heatmap import HeatmapPanel, png_markdown, render_heatmaps
from boostqa_assets.logic.probe import read_probe_cells
from boostqa_assets.manifests import stream_parquet
from boostqa_assets.partitions import Partitions, contiguous_ranges, qa_key, qa_key_parts
from boostqa_assets.records import ANNOTATED_SCHEMA, PLAN_SCHEMA, PlanCell, frame, stable_hash
from boostqa_assets.resources import StoreResource, project_config
from boostqa_assets.storage import Store


def plan_rows(st: Store, project: ProjectConfig) -> tuple[Iterator[dict[str, Any]], bool]:
    """The plan's cells from what is in the store now, one at a time (``plan_logic.plan_cells``); the flag says
    whether a probe table was found."""
    files = good_source_files(st, "annotated_seeds")
    columns = pl.Schema({c: ANNOTATED_SCHEMA[c] for c in plan_logic.SEED_COLUMNS})
    chunk_rows = project.pipeline.streaming.chunk_rows
    probe_cells = read_probe_cells(st)
    rows = plan_logic.plan_cells(lambda: stream_parquet(st, files, chunk_rows, columns), probe_cells, project)
    return rows, probe_cells is not None


def compute_plan(st: Store, project: ProjectConfig) -> pl.DataFrame:
    """The whole plan without its cells' ``seed_ids`` (null): budgets, weights and fingerprints of every cell."""
    rows, _ = plan_rows(st, project)
    return frame([{k: v for k, v in r.items() if k != "seed_ids"} for r in rows], PLAN_SCHEMA)


def stored_fingerprints(st: Store) -> dict[str, str]:
    """Each stored cell's fingerprint (its seed ids are not read)."""
    out = {}
    for path in st.list_partition_files("synthesis_plan"):
        for discipline, grade, fingerprint in st.read_parquet(
            path, columns=["discipline", "grade", "fingerprint"]
        ).rows():
            out[qa_key(discipline, grade)] = fingerprint
    return out


def pending_ranges(st: Store, project: ProjectConfig, all_keys: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The cells whose plan changed since the stored plan, and the fewest key ranges that cover exactly them."""
    new_plan = compute_plan(st, project)
    changed = plan_logic.changed_cells(new_plan, stored_fingerprints(st))
    return changed, contiguous_ranges(all_keys, changed)


def heatmap_markdown(plan: pl.DataFrame, project: ProjectConfig) -> str:
    """Accuracy and budget heatmaps, discipline x grade, side by side (a PNG inside markdown)."""
    accuracy = {(r["discipline"], r["grade"]): r["accuracy"] for r in plan.to_dicts()}
    budget = {(r["discipline"], r["grade"]): float(r["budget"]) for r in plan.to_dicts()}
    png = render_heatmaps(
        [
            HeatmapPanel("probe accuracy (target model)", accuracy, "{:.2f}", "RdYlGn", 0.0, 1.0),
            HeatmapPanel("synthesis budget (QA)", budget, "{:.0f}", "Blues", 0.0, None),
        ],
        project.taxonomy.discipline_names,
        project.taxonomy.grades,
    )
    return png_markdown(png, "probe accuracy and synthesis budget, discipline x grade")


def heatmap_tables(plan: pl.DataFrame, project: ProjectConfig) -> dict[str, dg.MetadataValue]:
    """The same two grids as tables, which the UI shows inline (the PNG is behind "Show Markdown")."""
    rows = plan.to_dicts()
    tax = project.taxonomy
    accuracy = {(r["discipline"], r["grade"]): r["accuracy"] for r in rows}
    budget = {(r["discipline"], r["grade"]): float(r["budget"]) for r in rows}
    return {
        "heatmap_probe_accuracy": grid_table(accuracy, tax.discipline_names, tax.grades, vmin=0.0, vmax=1.0),
        "heatmap_budget": grid_table(budget, tax.discipline_names, tax.grades, fmt="{:.0f}", vmin=0.0),
    }


PREVIEW_COLUMNS = ["discipline", "grade", "budget", "capacity", "accuracy", "need", "weight", "basis", "seed_ids"]


def build(parts: Partitions) -> list[Any]:
    @dg.asset(
        partitions_def=parts.qa_partitions,
        deps=[
            dg.AssetDep("annotated_seeds", partition_mapping=dg.AllPartitionMapping()),
            dg.AssetDep("deficiency_probe"),
        ],
        backfill_policy=backfill_policy(),
        group_name="boostqa",
        kinds={"parquet"},
        code_version=plan_logic.PLAN_RULE_VERSION,
        **asset_ui("synthesis_plan"),
    )
    def synthesis_plan(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        """One row per discipline x grade cell: the number of QA `synthesized_qa` makes there (`budget`), the
        seeds it uses, and why (`basis`, `accuracy`, `need`, `static_weight`, `weight`).

        Rule: cells with no candidate seeds get 0. Static weight = recipe category weight x grade weight x
        `stem_weight` (STEM) x `high_difficulty_weight` (high-difficulty grades). Need = max(`min_need`,
        1 - probe accuracy) for cells the probe measured; unmeasured cells take the mean need of the measured
        ones. The recipe's `qa_budget` goes first as `floor` to every cell with candidates, the rest in
        proportion to static weight x need, no cell above min(`cap`, candidates x `max_qa_per_seed`); integers by
        largest remainder, ties by key (deterministic). Without a probe run the plan uses the static weights
        alone and says so (`basis: static`); without a `qa_budget`, every candidate seed gets `qa_per_seed`
        variants (`basis: unbudgeted`). Each cell's `fingerprint` changes only when what synthesis will do
        there changes, and the cell's data version is derived from it.
        """
        project = project_config()
        st = store.get()
        rows, probed = plan_rows(st, project)
        before = stored_fingerprints(st)
        keys = set(context.partition_keys)
        written, light = [], []
        # Each cell is written as it comes and only its figures kept: the cells' seed ids are never all held.
        for row in rows:
            key = qa_key(row["discipline"], row["grade"])
            light.append({k: v for k, v in row.items() if k != "seed_ids"})
            if key not in keys:
                continue
            cell = frame([row], PLAN_SCHEMA)
            st.write_partition("synthesis_plan", {"discipline": row["discipline"], "grade": row["grade"]}, cell)
            written.append(light[-1])
            context.add_asset_metadata(
                {
                    "rows": 1,
                    "dagster/row_count": 1,
                    "budget": row["budget"],
                    "capacity": row["capacity"],
                    "candidates": row["candidates"],
                    "accuracy": row["accuracy"] if row["accuracy"] is not None else "not measured",
                    "need": row["need"],
                    "weight": row["weight"],
                    "cell_basis": row["basis"],
                    "seeds": len(json.loads(row["seed_ids"])),
                    "changed": before.get(key) != row["fingerprint"],
                    "preview": table_preview(cell, PREVIEW_COLUMNS),
                },
                partition_key=key,
            )
        plan = frame(light, PLAN_SCHEMA)
        changed = [r for r in written if before.get(qa_key(r["discipline"], r["grade"])) != r["fingerprint"]]
        basis = plan_logic.plan_basis(plan)
        recipe = project.recipes.plan_recipe(project.pipeline.plan.recipe)
        context.log.info(
            f"synthesis_plan: wrote {len(written)} cells ({len(changed)} changed: "
            f"{', '.join(qa_key(r['discipline'], r['grade']) for r in changed[:40]) or '-'}); total budget "
            f"{int(plan['budget'].sum())} of qa_budget {recipe.qa_budget}; basis: {basis}"
        )
        top = plan.filter(pl.col("budget") > 0).sort(["budget", "discipline", "grade"], descending=[True, False, False])
        table_cols = ["discipline", "grade", "budget", "accuracy", "probe_n", "need", "static_weight", "basis"]
        # Every cell of a run shows the whole plan it belongs to (the same whichever cells the run wrote): what its
        # budget was weighed against. The cell's own figures are above; nothing here counts the run's cells.
        return dg.MaterializeResult(
            metadata={
                "basis": basis,
                "probe_found": probed,
                "recipe": recipe.name,
                "qa_budget": recipe.qa_budget if recipe.qa_budget is not None else "none (unbudgeted)",
                "plan_total_budget": int(plan["budget"].sum()),
                "plan_cells_with_budget": int((plan["budget"] > 0).sum()),
                "plan_cells_without_candidates": int((plan["candidates"] == 0).sum()),
                **heatmap_tables(plan, project),
                "heatmaps": dg.MetadataValue.md(heatmap_markdown(plan, project)),
                "plan_budgets": md_table(top.select(table_cols).to_dicts()),
                "dagster/column_schema": column_schema(PlanCell),
            },
            # Cells in one run share a data version: the hash of their fingerprints. A cell whose plan did not
            # change is not re-materialized by the sensor, so its synthesized_qa partition stays fresh.
            data_version=dg.DataVersion(stable_hash(*sorted(r["fingerprint"] for r in written))),
        )

    @dg.asset_check(asset=synthesis_plan, partitions_def=parts.qa_partitions, blocking=True)
    def synthesis_plan_valid(
        context: dg.AssetCheckExecutionContext, store: StoreResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        """Per cell: the plan schema, exactly one row for the cell's discipline and grade, 0 <= budget <=
        capacity, budget <= `cap`, no budget without candidate seeds, and enough named seeds for the budget
        (each serves at most 2 tracks x `max_qa_per_seed` variants). Plus the Great Expectations suite of
        `expectations.py` (labels in the taxonomy, known `basis`, counts >= 0, `need` in (0, 1], weights >= 0,
        accuracy in [0, 1] or null; `gx_*` metadata)."""
        st = store.get()
        project = project_config()
        cfg = project.pipeline.plan

        def evaluate(key: str) -> checks.CheckOutcome:
            discipline, grade = qa_key_parts(key)
            df = st.read_partition("synthesis_plan", {"discipline": discipline, "grade": grade})
            rules = checks.table_checks(
                df,
                PLAN_SCHEMA,
                not_null=["discipline", "grade", "budget", "capacity", "basis", "fingerprint", "seed_ids"],
                equals={"discipline": discipline, "grade": grade},
                allowed={"basis": ["probe", "probe_mean", "static", "unbudgeted"]},
                require_rows=True,
            )
            problems = []
            if df.height != 1:
                problems.append(f"{df.height} rows, expected 1")
            for r in df.to_dicts():
                if not 0 <= r["budget"] <= r["capacity"]:
                    problems.append(f"budget {r['budget']} outside 0..capacity {r['capacity']}")
                if cfg.cap is not None and r["basis"] != "unbudgeted" and r["budget"] > cfg.cap:
                    problems.append(f"budget {r['budget']} above cap {cfg.cap}")
                if r["candidates"] == 0 and r["budget"] > 0:
                    problems.append("budget without candidate seeds")
                per_seed = project.pipeline.synthesis.qa_per_seed if r["basis"] == "unbudgeted" else cfg.max_qa_per_seed
                # Each named seed serves one pair per track (at most 2 tracks) x per_seed variants.
                if len(json.loads(r["seed_ids"])) * per_seed * 2 < r["budget"]:
                    problems.append(f"budget {r['budget']} needs more seeds than the {r['seed_ids']} named")
            own = checks.CheckOutcome(not problems, {"plan_problems": "; ".join(problems) or "-"})
            suite = expectations.validate("synthesis_plan", df, project.taxonomy)
            return checks.CheckOutcome.all_of(rules, own, suite)

        yield from report_partition_checks(context, "synthesis_plan", "synthesis_plan_valid", evaluate)

    @dg.sensor(
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        asset_selection=[synthesis_plan],
    )
    def synthesis_plan_sensor(context: dg.SensorEvaluationContext, store: StoreResource) -> dg.SensorResult:
        """When `annotated_seeds` or `deficiency_probe` has a new materialization, recompute the plan and
        materialize only the cells whose plan changed (runs over the fewest contiguous key ranges)."""
        instance = context.instance
        marks = []
        for upstream in ("annotated_seeds", "deficiency_probe"):
            records = instance.fetch_materializations(dg.AssetKey(upstream), limit=1).records
            marks.append(str(records[0].storage_id) if records else "-")
        cursor = ",".join(marks)
        if cursor == context.cursor:
            return dg.SensorResult(skip_reason="no new annotated_seeds or deficiency_probe materialization")
        if marks[0] == "-":
            return dg.SensorResult(skip_reason="annotated_seeds has never been materialized", cursor=cursor)
        project = project_config()
        changed, ranges = pending_ranges(store.get(), project, parts.qa_partitions.get_partition_keys())
        if not ranges:
            return dg.SensorResult(skip_reason="the plan did not change in any cell", cursor=cursor)
        context.log.info(f"synthesis plan changed in {len(changed)} cells: {changed[:20]}")
        requests = [
            dg.RunRequest(
                run_key=f"plan-{cursor}-{start}-{end}",
                asset_selection=[dg.AssetKey("synthesis_plan")],
                asset_check_keys=[dg.AssetCheckKey(dg.AssetKey("synthesis_plan"), "synthesis_plan_valid")],
                tags={
                    "dagster/asset_partition_range_start": start,
                    "dagster/asset_partition_range_end": end,
                },
            )
            for start, end in ranges
        ]
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return [synthesis_plan, synthesis_plan_valid, synthesis_plan_sensor]
