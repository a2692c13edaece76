"""The mixture's refusal of failing refined partitions reads `refined_qa_valid` evaluations from the instance;
it re-judges a partition with the pure rules (never the expectation suite) only when the record is missing or
older than the partition's data."""

import os
import time
from pathlib import Path

import dagster as dg
import polars as pl

from boostqa_assets.defs import refined_gate
from boostqa_assets.records import REFINED_SCHEMA, frame
from boostqa_assets.storage import Store
from boostqa_assets_tests.logic.test_mixture import refined_row

PARTS = dg.MultiPartitionsDefinition(
    {
        "discipline": dg.StaticPartitionsDefinition(["physics"]),
        "grade": dg.StaticPartitionsDefinition(["high", "primary"]),
    }
)
VERDICT: dict[str, bool] = {}


@dg.asset(name="refined_qa", partitions_def=PARTS)
def fake_refined_qa() -> None:
    """Stands in for refined_qa: the test writes the data, this only records materializations."""


@dg.asset_check(asset=fake_refined_qa, name="refined_qa_valid", partitions_def=PARTS)
def fake_refined_qa_valid(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=VERDICT[context.partition_key])


def write(store: Store, grade: str, bad: bool = False) -> None:
    row = refined_row(1 if grade == "high" else 2, "physics", grade, "multi_grade")
    if bad:
        row["flags"] = ["refusal"]
    store.write_partition("refined_qa", {"discipline": "physics", "grade": grade}, frame([row], REFINED_SCHEMA))


def materialize(instance: dg.DagsterInstance, key: str, check: bool = True) -> None:
    selection = dg.AssetSelection.assets("refined_qa")
    if not check:
        selection = selection - dg.AssetSelection.checks_for_assets("refined_qa")
    result = dg.materialize(
        [fake_refined_qa, fake_refined_qa_valid], partition_key=key, instance=instance, selection=selection
    )
    assert result.success


def test_recorded_evaluations_decide_and_stale_ones_fall_back_to_the_rules(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "data"))
    instance = dg.DagsterInstance.ephemeral()
    for grade in ("high", "primary"):
        write(store, grade)
    VERDICT.update({"physics|high": True, "physics|primary": False})  # primary's record says failed
    time.sleep(0.05)
    materialize(instance, "physics|high")
    materialize(instance, "physics|primary")

    verdicts = refined_gate.refined_failures(instance, store, ["refusal"])
    assert verdicts.failing == ["physics|primary"]  # the record decides, although the data passes the rules
    assert (verdicts.from_instance, verdicts.by_rules) == (2, [])

    # primary materialized again without its check: its record is older than the data, so the rules judge it
    materialize(instance, "physics|primary", check=False)
    verdicts = refined_gate.refined_failures(instance, store, ["refusal"])
    assert (verdicts.failing, verdicts.by_rules) == ([], ["physics|primary"])

    # high's file rewritten behind Dagster's back (no materialization): newer than its passed record
    write(store, "high", bad=True)
    for path in store.list_partition_files("refined_qa"):
        if "grade=high" in path:
            os.utime(path, (time.time() + 5, time.time() + 5))
    verdicts = refined_gate.refined_failures(instance, store, ["refusal"])
    assert verdicts.failing == ["physics|high"] and "physics|high" in verdicts.by_rules

    # no instance at all: every partition by the rules
    assert refined_gate.refined_failures(None, store, ["refusal"]).by_rules == ["physics|high", "physics|primary"]
    assert pl.read_parquet(store.list_partition_files("refined_qa")[0]).height == 1
