"""The DuckDB catalog follows what the UI materializes: after every run of this code location that ended (a failed
run may have committed partitions too, e.g. a stage that stopped sending), ``$BOOSTQA_HOME/boostqa.duckdb`` is
rebuilt from the committed files (``inspect.refresh_catalog``), so a plain ``duckdb`` shell opened later sees
backfills and automation runs as well as ``boostqa demo``'s."""

import dagster as dg

from boostqa_assets.inspect import refresh_catalog
from boostqa_assets.partitions import Partitions
from boostqa_assets.resources import StoreResource


def _refresh(context: dg.RunStatusSensorContext) -> dg.SkipReason:
    store = StoreResource().get()
    views = refresh_catalog(store)
    return dg.SkipReason(
        f"catalog refreshed after run {context.dagster_run.run_id[:8]} ({context.dagster_run.job_name}): "
        f"{len(views)} views"
    )


def build(parts: Partitions) -> list[dg.SensorDefinition]:
    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        name="duckdb_catalog_after_success",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Rebuilds the DuckDB catalog ($BOOSTQA_HOME/boostqa.duckdb) after a run succeeds.",
    )
    def duckdb_catalog_after_success(context: dg.RunStatusSensorContext) -> dg.SkipReason:
        return _refresh(context)

    @dg.run_failure_sensor(
        name="duckdb_catalog_after_failure",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Rebuilds the DuckDB catalog after a run fails (what it committed is readable).",
    )
    def duckdb_catalog_after_failure(context: dg.RunFailureSensorContext) -> dg.SkipReason:
        return _refresh(context)

    return [duckdb_catalog_after_success, duckdb_catalog_after_failure]
