"""Tests for boostqa_assets.storage on a local root: layout, atomic writes, reads, directory swaps."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import polars as pl
import pytest

from boostqa_assets.records import REJECT_SCHEMA, SYNTHESIZED_SCHEMA
from boostqa_assets.storage import PART_FILE, Store, partition_dirs, partition_slug

SCHEMA = pl.Schema({"qa_id": pl.Utf8(), "value": pl.Int64(), "tags": pl.List(pl.Utf8())})
PHYSICS_HIGH = {"discipline": "physics", "grade": "high"}


def rows(n: int, value: int = 0, prefix: str = "q") -> pl.DataFrame:
    return pl.DataFrame(
        {"qa_id": [f"{prefix}{i}" for i in range(n)], "value": [value] * n, "tags": [["a", "b"]] * n},
        schema=SCHEMA,
    )


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def all_dirs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "data"))


def test_root_is_created(tmp_path: Path) -> None:
    Store(str(tmp_path / "a" / "b") + "/")
    assert (tmp_path / "a" / "b").is_dir()


def test_hive_layout(store: Store) -> None:
    assert partition_dirs(PHYSICS_HIGH) == "discipline=physics/grade=high"
    path = store.write_partition("synthesized_qa", PHYSICS_HIGH, rows(2))
    assert path == f"{store.root}/synthesized_qa/discipline=physics/grade=high/part-0000.parquet"
    assert path == store.partition_path("synthesized_qa", PHYSICS_HIGH)
    assert os.path.isfile(path)
    assert all_files(Path(store.root)) == ["synthesized_qa/discipline=physics/grade=high/part-0000.parquet"]


def test_partition_order_is_the_mapping_order(store: Store) -> None:
    assert store.partition_path("a", {"grade": "high", "discipline": "physics"}).endswith(
        "a/grade=high/discipline=physics/" + PART_FILE
    )


def test_round_trip_keeps_the_schema(store: Store) -> None:
    df = rows(3, value=7)
    store.write_partition("t", {"source": "s"}, df)
    back = store.read_partition("t", {"source": "s"})
    assert back.schema == SCHEMA
    assert back.equals(df)


def test_write_replaces_the_partition_and_leaves_no_temp_files(store: Store) -> None:
    store.write_partition("t", PHYSICS_HIGH, rows(5, value=1))
    store.write_partition("t", PHYSICS_HIGH, rows(2, value=2))
    back = store.read_partition("t", PHYSICS_HIGH)
    assert back["value"].to_list() == [2, 2]
    assert all_files(Path(store.root)) == ["t/discipline=physics/grade=high/part-0000.parquet"]


def test_concurrent_readers_never_see_a_partial_file(store: Store) -> None:
    store.write_partition("t", PHYSICS_HIGH, rows(1, value=1))
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                df = store.read_partition("t", PHYSICS_HIGH)
                # a generation k holds k rows, each with value k: anything else is a torn read
                k = df["value"][0]
                assert df.height == k and df["value"].to_list() == [k] * k, (df.height, k)
                seen.append(int(k))
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for k in range(2, 120):
            store.write_partition("t", PHYSICS_HIGH, rows(k * 20, value=k * 20) if k % 2 else rows(k, value=k))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]
    assert seen, "the readers never read"
    assert all_files(Path(store.root)) == ["t/discipline=physics/grade=high/part-0000.parquet"]


def test_read_partition_missing(store: Store) -> None:
    with pytest.raises(FileNotFoundError) as info:
        store.read_partition("synthesized_qa", PHYSICS_HIGH)
    message = str(info.value)
    assert "synthesized_qa partition discipline=physics/grade=high has not been materialized" in message
    assert "materialize it first" in message


def test_read_asset_concatenates_partitions(store: Store) -> None:
    store.write_partition("t", {"discipline": "physics", "grade": "high"}, rows(2, 1, "p"))
    store.write_partition("t", {"discipline": "physics", "grade": "primary"}, rows(3, 2, "pp"))
    store.write_partition("t", {"discipline": "history", "grade": "high"}, rows(1, 3, "h"))
    df = store.read_asset("t", SCHEMA)
    assert df.schema == SCHEMA
    assert df.height == 6
    assert sorted(df["qa_id"].to_list()) == ["h0", "p0", "p1", "pp0", "pp1", "pp2"]
    assert len(store.list_partition_files("t")) == 3


def test_read_asset_selects_and_casts_to_the_schema(store: Store) -> None:
    df = pl.DataFrame(
        {"qa_id": ["a"], "value": [1], "extra": ["dropped"]},
        schema={"qa_id": pl.Utf8, "value": pl.Int32, "extra": pl.Utf8},
    )
    store.write_partition("t", {"source": "s"}, df)
    schema = pl.Schema({"value": pl.Int64(), "qa_id": pl.Utf8()})
    back = store.read_asset("t", schema)
    assert back.schema == schema
    assert back.to_dicts() == [{"value": 1, "qa_id": "a"}]


def test_read_asset_ignores_hidden_temp_files(store: Store) -> None:
    store.write_partition("t", {"source": "s"}, rows(1))
    stray = Path(store.root) / "t" / "source=s" / f".{PART_FILE}.deadbeef.tmp"
    stray.write_bytes(b"half a file")
    assert store.read_asset("t", SCHEMA).height == 1


def test_read_asset_of_nothing_is_an_empty_frame_with_the_schema(store: Store) -> None:
    df = store.read_asset("synthesized_qa", SYNTHESIZED_SCHEMA)
    assert df.height == 0
    assert df.schema == SYNTHESIZED_SCHEMA
    assert store.list_partition_files("synthesized_qa") == []


def test_rejects_path_slugs_multi_partition_keys(store: Store) -> None:
    assert partition_slug("physics|high") == "physics+high"
    assert partition_slug("a/b") == "a_b"
    path = store.rejects_path("synthesized_qa", "physics|high")
    assert path == f"{store.root}/rejects/stage=synthesized_qa/partition=physics+high/{PART_FILE}"
    rejects = pl.DataFrame(schema=REJECT_SCHEMA)
    written = store.write_rejects("synthesized_qa", "physics|high", rejects)
    assert written == path
    assert all_files(Path(store.root)) == [f"rejects/stage=synthesized_qa/partition=physics+high/{PART_FILE}"]
    assert store.read_parquet(path, REJECT_SCHEMA).schema == REJECT_SCHEMA
    assert "|" not in written


def test_write_directory_swaps_the_whole_folder(store: Store) -> None:
    partition = {"recipe": "stem_heavy"}
    target = store.write_directory(
        "qa_mixture",
        partition,
        {"part-00000.parquet": b"old", "part-00001.jsonl": b"old", "manifest.json": b"{}"},
    )
    assert target == f"{store.root}/qa_mixture/recipe=stem_heavy"
    store.write_directory("qa_mixture", partition, {"part-00000.jsonl": b"new", "manifest.json": b'{"v": 2}'})
    root = Path(store.root)
    assert all_files(root) == [
        "qa_mixture/recipe=stem_heavy/manifest.json",
        "qa_mixture/recipe=stem_heavy/part-00000.jsonl",
    ]
    assert all_dirs(root) == ["qa_mixture", "qa_mixture/recipe=stem_heavy"]  # no staging or trash left
    assert store.read_bytes(f"{target}/manifest.json") == b'{"v": 2}'
    assert store.read_bytes(f"{target}/part-00000.jsonl") == b"new"


def test_write_directory_nested_partition_and_neighbours_untouched(store: Store) -> None:
    store.write_directory("m", {"recipe": "a"}, {"x": b"1"})
    store.write_directory("m", {"recipe": "b", "split": "train"}, {"y": b"2"})
    store.write_directory("m", {"recipe": "b", "split": "train"}, {"z": b"3"})
    assert all_files(Path(store.root)) == ["m/recipe=a/x", "m/recipe=b/split=train/z"]


def test_exists(store: Store) -> None:
    path = store.partition_path("t", {"source": "s"})
    assert not store.exists(path)
    store.write_partition("t", {"source": "s"}, rows(1))
    assert store.exists(path)


def test_file_url_root_is_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store(f"file://{tmp_path}/data")
    assert store.is_local and store.root == f"{tmp_path}/data"
    store.write_partition("t", {"source": "s"}, rows(2))
    assert all_files(tmp_path) == ["data/t/source=s/part-0000.parquet"]  # no stray ./file: folder
    assert store.read_asset("t", SCHEMA).height == 2
