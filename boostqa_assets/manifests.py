"""Partitions written in chunks and committed by a manifest.

A partition of a table asset is a folder of immutable part files plus ``_manifest.json``, the list of the
parts that make the committed partition::

    <root>/<asset>/<key>=<value>/.../_manifest.json
    <root>/<asset>/<key>=<value>/.../part-<generation>-<n>.parquet

A stage writes a chunk at a time (``PartitionWriter.write``): each part is one object, written whole (a
temporary name and ``os.replace`` locally, one PUT on S3), and the list of parts written so far is saved in a
staging file (``_staging/<generation>.json``), so a run killed half way leaves every finished chunk and a re-run
with the same ``resume_key`` (the fingerprint of its inputs) goes on after the last one. ``commit`` writes the
manifest in one object: readers that go by the manifest (``Store.partition_files``, the DuckDB views) see the
old partition or the new one, never half of one. Then the parts of older generations go, except the previous
generation's, which a reader that read the old manifest a moment ago may still be reading, and those of writers
still at work on the same partition (two runs of one partition at once: each has a staging file, saved before
its first part and touched with every part; one untouched for ``ABANDONED_AFTER_S`` is a dead run's).

A folder without a manifest is read as its ``part-*.parquet`` files (partitions written before manifests, one
``part-0000.parquet``; and the mixture's shard folders, which are swapped whole).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
STAGING = "_staging"
MANIFEST_VERSION = 1
# A staging file untouched this long belongs to a dead run: its parts may go. A live writer touches its file with
# every chunk; a resume after this long re-asks its LLM calls of the cache, it does not pay for them again.
ABANDONED_AFTER_S = 24 * 3600


def read_manifest(store: Store, folder: str) -> dict[str, Any] | None:
    path = posixpath.join(folder, MANIFEST)
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        manifest: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-materialize this partition") from None
    return manifest


def committed_files(store: Store, folder: str) -> list[str]:
    """The files that make the committed partition in ``folder`` (empty if it was never written)."""
    manifest = read_manifest(store, folder)
    if manifest is not None:
        return [posixpath.join(folder, name) for name in manifest["parts"]]
    if not store.exists(folder):
        return []
    names = sorted(posixpath.basename(p) for p in store.fs.ls(folder, detail=False))
    return [posixpath.join(folder, n) for n in names if n.startswith("part-") and n.endswith(".parquet")]


class PartitionWriter:
    """Writes one partition chunk by chunk; ``commit`` publishes it. Use as a context manager (a writer left
    without ``commit`` keeps its staged chunks for a resume and publishes nothing).

    ``resume_key``: a fingerprint of everything the partition is made from. A writer given the key of an
    unfinished earlier run of the same partition starts where it stopped: its staged parts are kept, and
    ``progress`` is what the caller recorded with the last of them (how many input items they cover). A
    partition already committed from the same inputs is made again (a new materialization is asked for), unless
    ``resume_committed`` (a staging step of a run that was cut after it): then the writer is ``committed``.
    """

    def __init__(
        self,
        store: Store,
        folder: str,
        schema: pl.Schema | None = None,
        resume_key: str | None = None,
        resume_committed: bool = False,
    ) -> None:
        self.store, self.folder, self.schema = store, folder, schema
        self.entries: list[dict[str, Any]] = []  # per part: name, rows, bytes, progress
        self.committed = False
        self.generation = uuid.uuid4().hex[:16]
        if resume_key is not None:
            previous = read_manifest(store, folder)
            self.generation = resume_key[:16]
            if previous is not None and previous.get("generation") == self.generation:
                if resume_committed and "entries" in previous:
                    self.entries, self.committed = list(previous["entries"]), True
                else:  # a new generation, still the same on every resume of this run, never the committed one
                    self.generation = hashlib.sha256(f"{resume_key}/{self.generation}".encode()).hexdigest()[:16]
        self._staging = posixpath.join(folder, STAGING, f"{self.generation}.json")
        if resume_key is not None and not self.committed:
            self._resume()

    @property
    def parts(self) -> list[str]:
        return [e["name"] for e in self.entries]

    @property
    def rows(self) -> int:
        return sum(int(e["rows"]) for e in self.entries)

    @property
    def bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.entries)

    @property
    def chunks_done(self) -> int:
        return len(self.entries)

    @property
    def progress(self) -> int:
        return int(self.entries[-1]["progress"]) if self.entries else 0

    def _resume(self) -> None:
        try:
            staged = json.loads(self.store.read_bytes(self._staging))
            entries = list(staged["entries"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return
        if not all(self.store.exists(posixpath.join(self.folder, e["name"])) for e in entries):
            logger.warning("%s: staged parts are missing; writing the partition again", self.folder)
            return
        self.entries = entries
        self._save_staging()  # at work again: other writers' commits must spare these parts, however old
        logger.info("%s: resuming after %d staged chunks (%d rows)", self.folder, len(entries), self.rows)

    def _save_staging(self) -> None:
        staged = {"generation": self.generation, "entries": self.entries, "updated_at": _now()}
        self.store.put_bytes(self._staging, json.dumps(staged).encode())

    def truncate_to_progress(self, progress: int) -> None:
        """Forget the staged parts recorded beyond ``progress`` (a chunk the other writer of a pair missed)."""
        keep = [e for e in self.entries if int(e["progress"]) <= progress]
        if len(keep) != len(self.entries):
            self.entries = keep
            self._save_staging()

    def write(self, df: pl.DataFrame, progress: int | None = None) -> str:
        """Write one chunk as its own part file and record it in the staging file; returns the part path.

        ``progress``: what this chunk brings the partition to in the caller's terms (input items consumed); by
        default the number of chunks written."""
        if self.schema is not None:
            df = df.select([pl.col(c).cast(t) for c, t in self.schema.items()])
        if not self.entries:  # a concurrent writer's commit must see this run at work before its first part
            self._save_staging()
        name = f"part-{self.generation}-{len(self.entries):05d}.parquet"
        path = posixpath.join(self.folder, name)
        size = self.store.write_parquet(path, df)
        done = len(self.entries) + 1 if progress is None else progress
        self.entries.append({"name": name, "rows": df.height, "bytes": size, "progress": done})
        self._save_staging()
        return path

    def commit(self) -> str:
        """Publish the chunks written (an empty partition if none): one manifest object, then clean up."""
        if self.committed:  # resumed from a run that had committed already
            return posixpath.join(self.folder, MANIFEST)
        if not self.entries and self.schema is not None:
            self.write(pl.DataFrame(schema=self.schema))  # an empty partition is a real, readable one
        previous = read_manifest(self.store, self.folder)
        manifest = {
            "version": MANIFEST_VERSION,
            "generation": self.generation,
            "parts": self.parts,
            "entries": self.entries,
            "rows": self.rows,
            "bytes": self.bytes,
            "committed_at": time.time(),
            "previous_generation": previous.get("generation") if previous else None,
        }
        path = posixpath.join(self.folder, MANIFEST)
        self.store.put_bytes(path, json.dumps(manifest, indent=1).encode())
        self.committed = True
        keep = set(self.parts) | set(previous["parts"] if previous else [])
        self._collect(keep)
        return path

    def _collect(self, keep: set[str]) -> None:
        """Delete the staging file and the part files of generations older than the previous one, sparing those
        of writers still at work here and of a manifest another writer committed meanwhile.

        The order makes it safe: a writer saves its staging file before its first part and removes it only after
        its commit, so a part listed here either has a live staging file when staging is listed next, or was
        committed before that, and then the manifest read last names its generation or a later one."""
        fs = self.store.fs
        for folder in (self.folder, posixpath.join(self.folder, STAGING)):
            fs.invalidate_cache(folder)  # s3fs keeps listings: other writers' new files would stay unseen
        try:
            names = [posixpath.basename(p) for p in fs.ls(self.folder, detail=False)]
        except FileNotFoundError:
            return
        parts = [n for n in names if n.startswith("part-") and n.endswith(".parquet") and n not in keep]
        if not parts:
            self.store.delete([self._staging])
            return
        live, abandoned = self._other_writers()
        latest = read_manifest(self.store, self.folder) or {}
        keep = keep | set(latest.get("parts", []))
        generations = {self.generation, latest.get("generation"), latest.get("previous_generation"), *live}
        stale = [
            posixpath.join(self.folder, n) for n in parts if n not in keep and _generation_of(n) not in generations
        ]
        self.store.delete([*stale, *abandoned, self._staging])

    def _other_writers(self) -> tuple[set[str], list[str]]:
        """(generations of other writers at work on this partition, staging files of dead ones)."""
        folder = posixpath.join(self.folder, STAGING)
        try:
            files = [p for p in self.store.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return set(), []
        live: set[str] = set()
        abandoned: list[str] = []
        for found in files:
            path = posixpath.join(folder, posixpath.basename(found))
            if path == self._staging:
                continue
            try:
                updated = float(json.loads(self.store.read_bytes(path)).get("updated_at", 0))
            except FileNotFoundError:  # it committed meanwhile: the manifest read next names it
                continue
            except (ValueError, TypeError, AttributeError):
                updated = 0.0
            if _now() - updated < ABANDONED_AFTER_S:
                live.add(posixpath.basename(path).removesuffix(".json"))
            else:
                abandoned.append(path)
        return live, abandoned

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and not self.committed:
            self.commit()


def _now() -> float:
    return time.time()


def _generation_of(part: str) -> str | None:
    """``part-<generation>-<n>.parquet`` -> generation; None for names before manifests (``part-0000.parquet``)."""
    generation, _, _ = part.removesuffix(".parquet").removeprefix("part-").rpartition("-")
    return generation or None


def chunked(df: pl.DataFrame, rows: int) -> list[pl.DataFrame]:
    """``df`` cut into frames of at most ``rows`` rows (one empty frame for an empty input)."""
    if df.height <= rows:
        return [df]
    return [df.slice(i, rows) for i in range(0, df.height, rows)]


def stream_parquet(
    store: Store, files: list[str], batch_rows: int, schema: pl.Schema | None = None
) -> Iterator[pl.DataFrame]:
    """Yield frames of at most ``batch_rows`` rows from ``files`` in order, one file open at a time; with
    ``schema``, only its columns are read (cast to its types)."""
    import pyarrow.parquet as pq

    columns = list(schema) if schema is not None else None
    for path in files:
        with store.fs.open(path, "rb") as f:
            reader = pq.ParquetFile(f)
            for batch in reader.iter_batches(batch_size=batch_rows, columns=columns):
                df = pl.from_arrow(batch)
                assert isinstance(df, pl.DataFrame)
                yield df if schema is None else df.select([pl.col(c).cast(t) for c, t in schema.items()])


def parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    return buf.getvalue()
