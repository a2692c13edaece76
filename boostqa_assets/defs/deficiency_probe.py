"""``deficiency_probe``: the target model's accuracy per discipline x grade, measured on annotated seeds."""

import json
from typing import Any

import dagster as dg
import polars as pl

from boostqa_assets import checks, expectations
from boostqa_assets.defs.metadata import column_schema, grid_table, reasons_text, table_preview
from boostqa_assets.defs.support import (
    asset_ui,
    counts_by,
    endpoint_pool,
    fail_if_unsent,
    llm_metadata,
    md_table,
    progress_logger,
    unsent_rows,
)
from boostqa_assets.failures import good_source_files
from boostqa_assets.llm.types import LLMResult
from boostqa_assets.logic import probe
from boostqa_assets.logic.heatmap import HeatmapPanel, png_markdown, render_heatmaps
from boostqa_assets.manifests import stream_parquet
from boostqa_assets.partitions import Partitions
from boostqa_assets.prompting import prompt_fingerprint
from boostqa_assets.records import ANNOTATED_SCHEMA, PROBE_CELL_SCHEMA, PROBE_ITEM_SCHEMA, REJECT_SCHEMA, ProbeCell
from boostqa_assets.resources import LLMResource, StoreResource, project_config


def _cell_rows(cells: pl.DataFrame) -> list[dict[str, Any]]:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    return [
        {
            "discipline": r["discipline"],
            "grade": r["grade"],
            "status": r["status"],
            "accuracy": num(r["accuracy"]),
            "ci": "-" if r["ci_low"] is None else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
            "graded / sampled / candidates": f"{r['n_graded']} / {r['n_sampled']} / {r['n_candidates']}",
            "correct": r["n_correct"],
            "grading": ", ".join(f"{k} {v}" for k, v in json.loads(r["grading"]).items()) or "-",
        }
        for r in cells.sort("accuracy", "discipline", "grade", nulls_last=True).iter_rows(named=True)
    ]


def _heatmap(cells: pl.DataFrame, disciplines: list[str], grades: list[str]) -> str:
    accuracy = {(r["discipline"], r["grade"]): r["accuracy"] for r in cells.iter_rows(named=True)}
    graded = {(r["discipline"], r["grade"]): float(r["n_graded"]) for r in cells.iter_rows(named=True)}
    png = render_heatmaps(
        [
            HeatmapPanel("probe accuracy (n/a: too few or no samples)", accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0),
            HeatmapPanel("graded replies (n/a: no candidates)", graded, fmt="{:.0f}", cmap="Blues", vmin=0.0),
        ],
        disciplines,
        grades,
    )
    return png_markdown(png, "deficiency probe: accuracy and sample size per discipline x grade")


def _heatmap_tables(cells: pl.DataFrame, disciplines: list[str], grades: list[str]) -> dict[str, dg.MetadataValue]:
    """The heatmap's two grids as tables, which the UI shows inline (the PNG is behind "Show Markdown")."""
    rows = cells.to_dicts()
    accuracy = {(r["discipline"], r["grade"]): r["accuracy"] for r in rows}
    graded = {(r["discipline"], r["grade"]): float(r["n_graded"]) for r in rows}
    return {
        "heatmap_accuracy": grid_table(accuracy, disciplines, grades, vmin=0.0, vmax=1.0),
        "heatmap_graded": grid_table(graded, disciplines, grades, fmt="{:.0f}", vmin=0.0),
    }


PREVIEW_COLUMNS = ["discipline", "grade", "status", "n_graded", "n_correct", "accuracy", "ci_low", "ci_high"]


def build(parts: Partitions) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        deps=[dg.AssetDep("annotated_seeds", partition_mapping=dg.AllPartitionMapping())],
        group_name="boostqa",
        kinds={"parquet", "llm"},
        code_version="probe-" + prompt_fingerprint(probe.PROBE_PROMPT_ID, probe.JUDGE_PROMPT_ID),
        pool=endpoint_pool("probe"),
        **asset_ui("deficiency_probe"),
    )
    def deficiency_probe(
        context: dg.AssetExecutionContext, store: StoreResource, llm: LLMResource
    ) -> dg.MaterializeResult:
        """One row per discipline x grade cell that has probe candidates: how well the target model (the
        `probe` role) answers annotated seed questions with reference answers (QA items, problems with a
        solution). At most `probe.samples_per_cell` seeds per cell, a seeded hash sample; replies are graded by
        normalized match (short references) or by the `judge` role (free-form ones), per `probe.grading`.

        Columns: `n_candidates`, `n_sampled`, `n_graded`, `n_correct`, `accuracy` with a Wilson interval
        (`ci_low`, `ci_high`) at `probe.confidence`, `status` and `grading` (graded replies by method). A cell
        with fewer than `probe.min_samples` graded replies is `insufficient_samples` with null numbers. Every
        question, reply and grade is in `deficiency_probe_items`; failed requests are not graded and go to
        `rejects/stage=deficiency_probe` with their reason.
        """
        project = project_config()
        cfg = project.pipeline.probe
        tax = project.taxonomy
        st = store.get()
        if not cfg.enabled:
            st.write_partition(probe.ASSET, {}, pl.DataFrame(schema=PROBE_CELL_SCHEMA))
            st.write_partition(probe.ITEMS_ASSET, {}, pl.DataFrame(schema=PROBE_ITEM_SCHEMA))
            st.write_rejects(probe.ASSET, probe.REJECTS_PARTITION, pl.DataFrame(schema=REJECT_SCHEMA))
            context.log.info("deficiency_probe: disabled (pipeline.yaml probe.enabled: false); wrote an empty table")
            return dg.MaterializeResult(
                metadata={
                    "rows": 0,
                    "dagster/row_count": 0,
                    "dagster/column_schema": column_schema(ProbeCell),
                    "probe": "disabled (pipeline.yaml probe.enabled: false): empty table, the plan uses static weights",
                }
            )

        # Streamed a chunk at a time: a cell keeps only its sample, so memory does not grow with the seeds.
        columns = pl.Schema({c: ANNOTATED_SCHEMA[c] for c in probe.SEED_COLUMNS})
        files = good_source_files(st, "annotated_seeds")
        chunks = stream_parquet(st, files, project.pipeline.streaming.chunk_rows, columns)
        sample, cands = probe.stratified_sample(chunks, cfg)
        requests = probe.build_probe_requests(sample, cfg.max_chars_in_prompt)
        context.log.info(
            f"deficiency_probe: {len(requests)} questions over {len(sample)} cells from {cands.seeds_read} "
            f"annotated seeds ({sum(cands.counts.values())} candidates)"
        )
        target = llm.client("probe")
        results = target.run(requests, probe.validate_reply, progress_logger(context.log, "deficiency_probe"))
        graded = probe.grade_replies(sample, results, cfg)
        judge_results: list[LLMResult] = []
        judge_meta: dict[str, Any] = {"judge_llm_requests": 0}
        if graded.judge_requests:
            judge = llm.client("judge")
            judge_results = judge.run(
                graded.judge_requests, probe.validate_verdict, progress_logger(context.log, "deficiency_probe judge")
            )
            judge_meta = {"judge_" + k: v for k, v in llm_metadata(judge.stats).items()}
        graded = probe.apply_verdicts(graded, judge_results)

        items = probe.items_frame(graded)
        rejects = probe.rejects_frame(graded)
        cells = probe.aggregate(items, cfg, cands.counts, cells=list(sample))
        st.write_partition(probe.ASSET, {}, cells)
        st.write_partition(probe.ITEMS_ASSET, {}, items)
        st.write_rejects(probe.ASSET, probe.REJECTS_PARTITION, rejects)

        overall = probe.overall_accuracy(cells)
        n_graded = int(items["correct"].is_not_null().sum()) if items.height else 0
        n_ok = int((cells["status"] == "ok").sum()) if cells.height else 0
        n_insufficient = int((cells["status"] == "insufficient_samples").sum()) if cells.height else 0
        context.log.info(
            f"deficiency_probe: {cells.height} cells ({n_ok} ok, {n_insufficient} insufficient), "
            f"{n_graded}/{items.height} replies graded, {rejects.height} rejected, overall accuracy "
            + ("n/a" if overall is None else f"{overall:.3f}")
        )
        fail_if_unsent("deficiency_probe", {"": unsent_rows(counts_by(rejects, "reason"))})
        return dg.MaterializeResult(
            metadata={
                "rows": cells.height,
                "dagster/row_count": cells.height,
                "rows_rejected": rejects.height,
                "reject_reasons": reasons_text(counts_by(rejects, "reason")),
                "cells_ok": n_ok,
                "cells_insufficient": n_insufficient,
                "items": items.height,
                "items_graded": n_graded,
                "overall_accuracy": round(overall, 4) if overall is not None else "no graded replies",
                "grading_methods": reasons_text(counts_by(items, "method")),
                "candidates_without_reference": cands.without_reference,
                "candidates_too_long_for_prompt": cands.too_long,
                "samples_per_cell": cfg.samples_per_cell,
                "min_samples": cfg.min_samples,
                "confidence": cfg.confidence,
                "cells": md_table(_cell_rows(cells)),
                **_heatmap_tables(cells, tax.discipline_names, tax.grades),
                "heatmap": dg.MetadataValue.md(_heatmap(cells, tax.discipline_names, tax.grades)),
                "preview": table_preview(cells.sort("discipline", "grade"), PREVIEW_COLUMNS),
                "dagster/column_schema": column_schema(ProbeCell),
                **llm_metadata(target.stats),
                **judge_meta,
            }
        )

    @dg.asset_check(asset=deficiency_probe, blocking=True)
    def deficiency_probe_valid(context: dg.AssetCheckExecutionContext, store: StoreResource) -> dg.AssetCheckResult:
        """The cell table: schema, one row per cell inside the taxonomy, `n_correct <= n_graded <= n_sampled <=
        n_candidates`, `accuracy` in [0, 1] and equal to `n_correct / n_graded`, `ci_low <= accuracy <=
        ci_high`, status `ok` exactly when `n_graded >= probe.min_samples` (null numbers otherwise); and the
        item table adds up to it per cell. Plus the Great Expectations suite of `expectations.py` (labels in the
        taxonomy, unique (discipline, grade), counts >= 0, accuracy and interval in [0, 1] or null, known status;
        `gx_*` metadata). An empty table (probe disabled) passes; questions never sent (the probe or judge
        endpoint went down) fail it until it is materialized again."""
        project = project_config()
        st = store.get()
        cells = st.read_partition(probe.ASSET, {})
        rules = probe.validate_cells(cells, project.pipeline.probe.min_samples, project.taxonomy)
        suite = expectations.validate("deficiency_probe", cells, project.taxonomy)
        sent = checks.all_sent(checks.read_stage_rejects(st, probe.ASSET, probe.REJECTS_PARTITION))
        outcome = checks.CheckOutcome.all_of(rules, suite, sent)
        if outcome.passed:
            items = st.read_partition(probe.ITEMS_ASSET, {})
            items_schema = checks.schema_matches(items, PROBE_ITEM_SCHEMA)
            items_schema.metadata = {"items_" + k: v for k, v in items_schema.metadata.items()}
            found = [outcome, items_schema]
            if items_schema.passed:
                found.append(probe.items_match_cells(items, cells))
            outcome = checks.CheckOutcome.all_of(*found)
        return dg.AssetCheckResult(passed=outcome.passed, metadata=outcome.metadata)

    return [deficiency_probe, deficiency_probe_valid]
