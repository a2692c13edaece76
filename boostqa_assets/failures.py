"""Per-partition failure records under the data root: ``_failures/stage=<asset>/partition=<key slug>.json``.

Dagster cannot mark one partition of a multi-partition (single-run backfill) run as failed (dagster#17836): every
partition of the run gets the run's materialization. So a partition that could not be made (an unreadable or empty
source) or that failed its blocking check records why here. Its blocking check fails from the record, readers of
the asset leave the partition out (its old or missing data is not read as if it were current), and the next
successful write of the partition clears the record. The records live with the data (local or S3), like the
request cache, because the data is what they describe.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Collection
from dataclasses import dataclass

import polars as pl

from boostqa_assets.storage import Store, partition_slug

logger = logging.getLogger(__name__)

FAILURES_DIR = "_failures"
# Stages whose failed partitions must not feed later stages, for each source-partitioned asset that readers use.
SOURCE_STAGES = ("seeds", "annotated_seeds")


@dataclass(frozen=True)
class PartitionFailure:
    asset: str
    key: str
    message: str
    run_id: str | None = None
    at: float = 0.0


def _dir(store: Store, asset: str) -> str:
    return store.path(FAILURES_DIR, f"stage={asset}")


def failure_path(store: Store, asset: str, key: str) -> str:
    return posixpath.join(_dir(store, asset), f"partition={partition_slug(key)}.json")


def record_failure(store: Store, asset: str, key: str, message: str, run_id: str | None = None) -> str:
    """Record why partition ``key`` of ``asset`` failed (replacing an older record); returns the record's path."""
    path = failure_path(store, asset, key)
    body = {"asset": asset, "key": key, "message": message, "run_id": run_id, "at": time.time()}
    if store.is_local:
        store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    # A record is a few hundred bytes written in one call; a torn one still reads as a failure (see read_failures).
    store.fs.pipe_file(path, json.dumps(body, ensure_ascii=False).encode("utf-8"))
    return path


def clear_failure(store: Store, asset: str, key: str) -> bool:
    """Remove the record of partition ``key`` (after a successful write or a passed check); True if there was one."""
    path = failure_path(store, asset, key)
    if not store.fs.exists(path):
        return False
    store.fs.rm(path)
    return True


def read_failure(store: Store, asset: str, key: str) -> PartitionFailure | None:
    path = failure_path(store, asset, key)
    if not store.fs.exists(path):
        return None
    return _parse(store, asset, path, key)


def _parse(store: Store, asset: str, path: str, key: str | None) -> PartitionFailure:
    try:
        body = json.loads(store.fs.cat_file(path))
        return PartitionFailure(asset, body["key"], body["message"], body.get("run_id"), float(body.get("at") or 0))
    except (ValueError, KeyError, TypeError):  # torn or hand-edited: still a failure, with what we know
        name = key or posixpath.basename(path).removeprefix("partition=").removesuffix(".json")
        return PartitionFailure(asset, name, f"unreadable failure record {path}; delete it after fixing the partition")


def read_failures(store: Store, asset: str) -> dict[str, PartitionFailure]:
    """Every recorded failure of ``asset``, by partition key."""
    folder = _dir(store, asset)
    try:
        paths = sorted(store.fs.glob(posixpath.join(folder, "partition=*.json")))
    except FileNotFoundError:
        return {}
    if store.protocol != "file":
        paths = [p if "://" in p else f"{store.protocol}://{p}" for p in paths]
    found = [_parse(store, asset, p, None) for p in paths]
    return {f.key: f for f in found}


def failed_sources(store: Store) -> dict[str, PartitionFailure]:
    """Source partitions that failed in ``seeds`` or ``annotated_seeds`` (the earlier stage's record wins)."""
    failed: dict[str, PartitionFailure] = {}
    for asset in reversed(SOURCE_STAGES):
        failed.update(read_failures(store, asset))
    return failed


def source_key_of(path: str) -> str | None:
    """``.../annotated_seeds/source=<key>/part-0000.parquet`` -> ``<key>``."""
    for part in path.split("/"):
        if part.startswith("source="):
            return part.removeprefix("source=")
    return None


def read_good_sources(
    store: Store,
    asset: str,
    schema: pl.Schema,
    discipline: str | None = None,
    seed_ids: Collection[str] | None = None,
) -> pl.DataFrame:
    """Every partition of a source-partitioned ``asset`` except those of sources with a failure record: what the
    discipline x grade stages may read. A failed source's file may be missing or hold data from before the failure;
    either way it is not the source as it is now, so it is left out (and named in the log). With ``discipline``,
    only that discipline's rows, and with ``seed_ids`` only those seeds (read one part file at a time, so memory
    holds only the rows asked for)."""
    wanted = pl.Series(sorted(seed_ids), dtype=pl.String) if seed_ids is not None else None
    frames = []
    for path in good_source_files(store, asset):
        df = store.read_parquet(path, schema)
        if discipline is not None:
            df = df.filter(pl.col("discipline") == discipline)
        frames.append(df if wanted is None else df.filter(pl.col("seed_id").is_in(wanted)))
    return pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=schema)


def good_source_files(store: Store, asset: str) -> list[str]:
    """The part files of ``asset``'s source partitions that ``read_good_sources`` reads (failed sources' left
    out and named in the log): for a reader that streams them (``manifests.stream_parquet``)."""
    failed = failed_sources(store)
    files, skipped = [], set()
    for path in store.list_partition_files(asset):
        key = source_key_of(path)
        if key is not None and key in failed:
            skipped.add(key)
        else:
            files.append(path)
    if skipped:
        logger.warning("%s: leaving out failed source partitions %s", asset, ", ".join(sorted(skipped)))
    return files
