"""Tests for boostqa_assets.streaming: what a partition's output keeps between its chunks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from boostqa_assets.records import REJECT_SCHEMA
from boostqa_assets.storage import Store
from boostqa_assets.streaming import HEAD_ROWS, open_output, owned

# 60 partitions, one 2,000-row chunk of ~2 KB texts each (~4 MB), written through PartitionOutput as an LLM stage
# writes them (or sampled for the expectation suite, as a run's deferred check and the mixture's check keep each
# partition's or shard's sample); each chunk is then dropped. RSS after, minus RSS before: what the outputs (their
# previews) or the samples keep.
PROBE = textwrap.dedent(
    """
    import gc, sys, time
    import polars as pl
    from boostqa_assets.records import REJECT_SCHEMA
    from boostqa_assets.storage import Store
    from boostqa_assets.expectations import spread_sample
    from boostqa_assets.streaming import open_output

    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) // 1024

    store = Store(sys.argv[1])
    outs, before = [], rss()
    for p in range(60):
        ids = [f"{p}-{i}" for i in range(2000)]
        chunk = pl.DataFrame({"qa_id": ids, "text": [f"{q} " + "x" * 2000 for q in ids]})
        if sys.argv[2] == "sample":
            outs.append(spread_sample(chunk, 20))
        else:
            out = open_output(store, "probe", {"p": str(p)}, str(p), chunk.schema, "fp")
            out.write(chunk, pl.DataFrame(schema=REJECT_SCHEMA), chunk.height)
            outs.append(out)
        del chunk
    gc.collect()
    held = rss() - before
    for _ in range(50):  # polars' allocator hands freed pages back after ~0.5-1 s
        if held < 60:
            break
        time.sleep(0.2)
        held = rss() - before
    print(held)
    """
)


def _held_mb(tmp_path: Path, kept: str) -> int:
    return int(
        subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp_path), kept], capture_output=True, text=True, check=True, timeout=120
        ).stdout.strip()
    )


def test_a_partitions_preview_does_not_keep_its_whole_chunk(tmp_path: Path) -> None:
    held = _held_mb(tmp_path, "preview")
    # Views of the chunks (df.head) kept ~250 MB here; rows of their own, a few MB.
    assert held < 60, f"60 partition outputs keep {held} MB after their chunks were dropped"


def test_an_expectation_sample_does_not_keep_its_whole_chunk(tmp_path: Path) -> None:
    held = _held_mb(tmp_path, "sample")
    # A gather_every view of each chunk kept every chunk whole; the sample's own 20 rows are a few KB each.
    assert held < 60, f"60 expectation samples keep {held} MB after their chunks were dropped"


def test_owned_keeps_rows_and_exact_types() -> None:
    df = pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            "n": pl.Series([1, 2, 3], dtype=pl.UInt32),
            "flags": [["x"], [], ["y", "z"]],
            "at": [datetime(2026, 1, 1, tzinfo=UTC)] * 3,
        }
    )
    head = owned(df.head(2))
    assert head.schema == df.schema
    assert head.to_dicts() == df.head(2).to_dicts()
    assert owned(df.clear()).schema == df.schema


def test_the_output_preview_is_the_first_written_rows(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "data"))
    out = open_output(store, "a", {"p": "1"}, "1", pl.Schema({"v": pl.Int64}), "fp")
    out.write(pl.DataFrame({"v": list(range(10))}), pl.DataFrame(schema=REJECT_SCHEMA), 10)
    out.write(pl.DataFrame({"v": [99]}), pl.DataFrame(schema=REJECT_SCHEMA), 1)
    assert out.head is not None and out.head["v"].to_list() == list(range(HEAD_ROWS))
