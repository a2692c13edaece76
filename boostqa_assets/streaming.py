"""Chunked processing for the LLM stages: inputs are read and outputs written a chunk at a time, so memory stays
at one chunk whatever a partition's size, and a killed run resumes after its last committed chunk.

``Outputs`` holds, for each partition a run writes, the writer of its rows and the writer of its rejects (both
``manifests.PartitionWriter``), with the same resume key: the fingerprint of everything the partition is made of
(its inputs' manifests, the prompt versions, the model). Each chunk records how many input items it consumed
(``progress``), so a resumed run skips exactly those.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import polars as pl

from boostqa_assets.manifests import PartitionWriter
from boostqa_assets.storage import Store

T = TypeVar("T")
HEAD_ROWS = 5


def resume_key(*parts: Any) -> str:
    """A stable fingerprint of a partition's inputs (anything JSON-serialisable)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of at most ``size`` (the last one shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def input_generation(store: Store, asset: str, partition: Mapping[str, str]) -> list[str]:
    """What identifies a committed input partition's content: its part files (new data, new names)."""
    return [f.rsplit("/", 1)[-1] for f in store.partition_files(asset, partition)]


def owned(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` in buffers of its own. A slice, head or sample of a frame is a view that keeps every buffer of the
    frame alive: a preview (5 rows) kept per partition through a run held a whole chunk each, ~350 MB over a
    100k-seed refinement's 110 partitions, and the checks' expectation samples held every partition whole. An Arrow
    IPC round trip copies only the rows, with their exact types."""
    buf = io.BytesIO()
    df.write_ipc(buf)
    buf.seek(0)
    return pl.read_ipc(buf)


@dataclass
class PartitionOutput:
    """The row writer and the rejects writer of one output partition, and what this run added to them."""

    key: str
    rows: PartitionWriter
    rejects: PartitionWriter
    done: int = 0  # input items already consumed by committed chunks (a resumed run skips them)
    kept: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    head: pl.DataFrame | None = None  # the first rows this run wrote (the partition's preview in the Dagster UI)

    def write(self, kept: pl.DataFrame, rejects: pl.DataFrame, consumed: int) -> None:
        """One chunk of this partition: its rows, its rejects, and how many input items it covered."""
        self.done += consumed
        self.rejects.write(rejects, progress=self.done)
        self.rows.write(kept, progress=self.done)
        if self.head is None and kept.height:
            self.head = owned(kept.head(HEAD_ROWS))
        self.kept += kept.height
        self.rejected += rejects.height
        if rejects.height:
            for reason, n in rejects.group_by("reason").len().iter_rows():
                self.reasons[str(reason)] = self.reasons.get(str(reason), 0) + int(n)

    def commit(self) -> None:
        self.rejects.commit()
        self.rows.commit()

    def count(self, rejects: pl.DataFrame) -> None:
        """Add rejects written outside ``write`` (a second pass) to the figures."""
        self.rejected += rejects.height
        if rejects.height:
            for reason, n in rejects.group_by("reason").len().iter_rows():
                self.reasons[str(reason)] = self.reasons.get(str(reason), 0) + int(n)


def open_output(
    store: Store,
    asset: str,
    partition: Mapping[str, str],
    key: str,
    schema: pl.Schema,
    fingerprint: str,
    rejects_stage: str | None = None,
    resume_committed: bool = False,
) -> PartitionOutput:
    """The writers of one output partition; with a matching unfinished run on disk, resumed after its last chunk
    that both writers recorded (a kill between the two writes drops that chunk from the longer one).
    ``rejects_stage``: whose rejects these are, when the rows go somewhere else first (a staging asset)."""
    rows = store.partition_writer(asset, partition, schema, resume_key=fingerprint, resume_committed=resume_committed)
    rejects = store.rejects_writer(rejects_stage or asset, key, resume_key=fingerprint)
    done = min(rows.progress, rejects.progress)
    rows.truncate_to_progress(done)
    rejects.truncate_to_progress(done)
    out = PartitionOutput(key, rows, rejects, done=done)
    out.kept, out.rejected = rows.rows, rejects.rows
    return out


def pooled(pieces: Iterable[tuple[str, pl.DataFrame]], rows: int) -> Iterator[list[tuple[str, pl.DataFrame]]]:
    """Pieces of several partitions' inputs, pooled into batches of about ``rows`` rows: small partitions share
    one LLM batch (the endpoint stays busy at the concurrency cap), big ones are cut into several."""
    pool: list[tuple[str, pl.DataFrame]] = []
    size = 0
    for key, df in pieces:
        for start in range(0, df.height, rows):
            piece = df.slice(start, rows)
            pool.append((key, piece))
            size += piece.height
            if size >= rows:
                yield pool
                pool, size = [], 0
    if pool:
        yield pool


def skip_done(frames: Iterable[pl.DataFrame], done: int) -> Iterator[pl.DataFrame]:
    """``frames`` without their first ``done`` rows (what a resumed run already wrote)."""
    seen = 0
    for df in frames:
        skip = min(df.height, max(0, done - seen))
        seen += df.height
        if skip < df.height:
            yield df.slice(skip)


def pooled_lists(pending: Iterable[tuple[str, list[T]]], size: int) -> Iterator[list[tuple[str, list[T]]]]:
    """Like ``pooled`` for lists of work items (synthesis tasks) of several partitions."""
    pool: list[tuple[str, list[T]]] = []
    total = 0
    for key, items in pending:
        for start in range(0, len(items), size):
            piece = items[start : start + size]
            pool.append((key, piece))
            total += len(piece)
            if total >= size:
                yield pool
                pool, total = [], 0
    if pool:
        yield pool
