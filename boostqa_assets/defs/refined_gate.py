"""Which refined_qa partitions fail `refined_qa_valid`, for the mixture's refusal, without re-running the suite.

For each refined partition that holds data, the latest `refined_qa_valid` evaluation of that partition is read
from the Dagster instance (`get_asset_check_partition_info`: one query for every partition). It is trusted when
it is *current*: it passed or failed (not skipped or crashed), it was recorded after the partition's latest
materialization (storage ids), and no file of the partition changed after it (a run killed between writing a
partition and logging its materialization leaves new data behind an old result). Every other partition (never
checked, checked before its data changed, data written outside Dagster) is judged by the pure polars rules of
the check (`logic/refined_rules.py`: milliseconds), never by the Great Expectations suite (~0.37 s a partition).

Not an asset module: `qa_mixture` calls `refined_failures`.
"""

import logging
import posixpath
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from boostqa_assets import checks
from boostqa_assets.logic.refined_rules import refined_rules
from boostqa_assets.partitions import qa_key
from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)

CHECK = dg.AssetCheckKey(dg.AssetKey("refined_qa"), "refined_qa_valid")
_DECIDED = (AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED)


@dataclass
class RefinedVerdicts:
    failing: list[str]  # partition keys that fail refined_qa_valid
    from_instance: int = 0  # partitions judged by their recorded check evaluation
    by_rules: list[str] = field(default_factory=list)  # partitions judged by the pure rules here


def refined_failures(instance: dg.DagsterInstance | None, st: Store, reject_flags: list[str]) -> RefinedVerdicts:
    """The refined partitions holding data that fail `refined_qa_valid` (see the module docstring)."""
    folders: dict[str, list[str]] = {}
    for path in st.list_partition_files("refined_qa"):
        folders.setdefault(posixpath.dirname(path), []).append(path)
    recorded = _recorded(instance)
    verdicts = RefinedVerdicts(failing=[])
    for folder, files in folders.items():
        discipline = folder.split("discipline=", 1)[1].split("/", 1)[0]
        grade = folder.split("grade=", 1)[1].split("/", 1)[0]
        key = qa_key(discipline, grade)
        found = recorded.get(key)
        if found is not None and found[1] >= _newest_change(st, files):
            verdicts.from_instance += 1
            if not found[0]:
                verdicts.failing.append(key)
            continue
        df = st.read_partition("refined_qa", {"discipline": discipline, "grade": grade})
        rejects = checks.read_stage_rejects(st, "refined_qa", key)
        verdicts.by_rules.append(key)
        if not refined_rules(df, rejects, discipline, grade, reject_flags).passed:
            verdicts.failing.append(key)
    logger.info(
        "refined_qa_valid: %d partitions from their recorded evaluation, %d by the rules here (%s), %d failing",
        verdicts.from_instance,
        len(verdicts.by_rules),
        ", ".join(verdicts.by_rules[:10]) + (" ..." if len(verdicts.by_rules) > 10 else ""),
        len(verdicts.failing),
    )
    return verdicts


def _recorded(instance: dg.DagsterInstance | None) -> dict[str, tuple[bool, float]]:
    """Partition key -> (passed, evaluation time) of each current recorded evaluation."""
    if instance is None:
        return {}
    try:
        infos = instance.event_log_storage.get_asset_check_partition_info([CHECK])
    except NotImplementedError:  # a storage without per-partition check records: the rules decide
        return {}
    current = {
        i.partition_key: i
        for i in infos
        if i.partition_key is not None
        and i.latest_execution_status in _DECIDED
        and (
            i.latest_materialization_storage_id is None
            or i.latest_check_event_storage_id > i.latest_materialization_storage_id
        )
    }
    if not current:
        return {}
    # Evaluation times from the runs that recorded them (a handful of runs hold every partition's evaluation;
    # storage ids are per shard in SQLite instances, so the events are matched by run and partition).
    when: dict[tuple[str, str], float] = {}
    for run_id in {i.latest_planned_run_id for i in current.values()}:
        cursor = None
        while True:
            page = instance.get_records_for_run(
                run_id, cursor=cursor, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, limit=1000
            )
            for record in page.records:
                event = record.event_log_entry.dagster_event
                evaluation = event.event_specific_data if event is not None else None
                if isinstance(evaluation, dg.AssetCheckEvaluation) and evaluation.asset_check_key == CHECK:
                    key = (run_id, str(evaluation.partition))
                    when[key] = max(when.get(key, 0.0), record.timestamp)
            if not page.has_more:
                break
            cursor = page.cursor
    passed = AssetCheckExecutionRecordStatus.SUCCEEDED
    return {
        key: (i.latest_execution_status == passed, when[(i.latest_planned_run_id, key)])
        for key, i in current.items()
        if (i.latest_planned_run_id, key) in when
    }


def _newest_change(st: Store, files: list[str]) -> float:
    """The latest modification time (epoch seconds) of ``files``; +inf when it cannot be told (then the rules run)."""
    newest = 0.0
    for path in files:
        info: dict[str, Any] = st.fs.info(path)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if isinstance(stamp, datetime):
            stamp = stamp.timestamp()
        if not isinstance(stamp, int | float):
            return float("inf")
        newest = max(newest, float(stamp))
    return newest
