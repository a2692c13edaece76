"""Tests for boostqa_assets.storage on a local root: layout, partitions written in chunks and committed by a
manifest, resume, reads, directory swaps."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import polars as pl
import pytest

from boostqa_assets import manifests
from boostqa_assets.manifests import MANIFEST
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


def committed(store: Store, asset: str, partition: dict[str, str]) -> list[str]:
    return [os.path.basename(p) for p in store.partition_files(asset, partition)]


def test_hive_layout(store: Store) -> None:
    assert partition_dirs(PHYSICS_HIGH) == "discipline=physics/grade=high"
    folder = store.write_partition("synthesized_qa", PHYSICS_HIGH, rows(2))
    assert folder == f"{store.root}/synthesized_qa/discipline=physics/grade=high"
    files = all_files(Path(store.root))
    assert files[0] == f"synthesized_qa/discipline=physics/grade=high/{MANIFEST}"
    assert len(files) == 2 and files[1].startswith("synthesized_qa/discipline=physics/grade=high/part-")
    assert [os.path.basename(files[1])] == committed(store, "synthesized_qa", PHYSICS_HIGH)


def test_partition_order_is_the_mapping_order(store: Store) -> None:
    assert store.partition_folder("a", {"grade": "high", "discipline": "physics"}).endswith(
        "a/grade=high/discipline=physics"
    )


def test_a_partition_written_in_chunks_is_invisible_until_committed(store: Store) -> None:
    store.write_partition("t", PHYSICS_HIGH, rows(1, value=1))
    writer = store.partition_writer("t", PHYSICS_HIGH, SCHEMA)
    writer.write(rows(2, value=2))
    writer.write(rows(3, value=2, prefix="r"))
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [1]  # readers see the old partition
    assert store.read_asset("t", SCHEMA).height == 1 and len(store.list_partition_files("t")) == 1
    writer.commit()
    back = store.read_partition("t", PHYSICS_HIGH)
    assert back.height == 5 and set(back["value"]) == {2} and len(store.list_partition_files("t")) == 2
    assert not (Path(writer.folder) / "_staging").exists() or not any((Path(writer.folder) / "_staging").iterdir())


def test_a_rerun_resumes_after_the_last_committed_chunk(store: Store) -> None:
    first = store.partition_writer("t", PHYSICS_HIGH, SCHEMA, resume_key="inputs-v1")
    first.write(rows(2, value=1))
    first.write(rows(2, value=2, prefix="r"))
    del first  # the run was killed: no commit
    again = store.partition_writer("t", PHYSICS_HIGH, SCHEMA, resume_key="inputs-v1")
    assert again.chunks_done == 2 and again.rows == 4  # the caller skips two input chunks
    again.write(rows(1, value=3, prefix="s"))
    again.commit()
    assert sorted(store.read_partition("t", PHYSICS_HIGH)["value"].to_list()) == [1, 1, 2, 2, 3]
    other = store.partition_writer("t", PHYSICS_HIGH, SCHEMA, resume_key="inputs-v2")
    assert other.chunks_done == 0  # other inputs: nothing to resume


def test_a_committed_partition_with_the_same_inputs_is_made_again_not_skipped(store: Store) -> None:
    with store.partition_writer("t", PHYSICS_HIGH, SCHEMA, resume_key="inputs-v1") as first:
        first.write(rows(2, value=1))
    again = store.partition_writer("t", PHYSICS_HIGH, SCHEMA, resume_key="inputs-v1")
    assert again.chunks_done == 0 and not again.committed and again.generation != first.generation
    again.write(rows(1, value=2))
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [1, 1]  # the committed one, untouched
    again.commit()
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [2]
    staging = store.partition_writer("s", PHYSICS_HIGH, SCHEMA, resume_key="k", resume_committed=True)
    staging.write(rows(1))
    staging.commit()
    resumed = store.partition_writer("s", PHYSICS_HIGH, SCHEMA, resume_key="k", resume_committed=True)
    assert resumed.committed and resumed.chunks_done == 1  # a staging step already done is not redone


def test_an_empty_commit_is_an_empty_partition(store: Store) -> None:
    store.partition_writer("t", PHYSICS_HIGH, SCHEMA).commit()
    back = store.read_partition("t", PHYSICS_HIGH)
    assert back.height == 0 and back.schema == SCHEMA


def test_old_generations_go_but_the_previous_one_stays_for_readers(store: Store) -> None:
    for value in (1, 2, 3):
        with store.partition_writer("t", PHYSICS_HIGH, SCHEMA) as writer:
            writer.write(rows(1, value=value))
            writer.write(rows(1, value=value, prefix="r"))
    parts = [f for f in all_files(Path(store.root)) if "/part-" in f]
    assert len(parts) == 4  # generation 3 (committed) and 2 (previous); 1 is gone
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [3, 3]


def test_two_runs_of_one_partition_at_once_do_not_delete_each_others_parts(store: Store) -> None:
    store.write_partition("t", PHYSICS_HIGH, rows(1, value=0))
    slow = store.partition_writer("t", PHYSICS_HIGH, SCHEMA)
    slow.write(rows(2, value=1))
    for value in (2, 3):  # two runs commit while the slow one is still at work: its part is not theirs to delete
        with store.partition_writer("t", PHYSICS_HIGH, SCHEMA) as fast:
            fast.write(rows(1, value=value))
    slow.write(rows(1, value=1, prefix="r"))
    slow.commit()  # the last commit wins, whole
    assert sorted(store.read_partition("t", PHYSICS_HIGH)["value"].to_list()) == [1, 1, 1]
    with store.partition_writer("t", PHYSICS_HIGH, SCHEMA) as last:
        last.write(rows(1, value=4))
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [4]
    parts = [f for f in all_files(Path(store.root)) if "/part-" in f]
    assert len(parts) == 3  # the last commit's part and the slow run's two (the previous); the rest are gone


def test_a_dead_runs_staged_parts_go_once_abandoned(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    now = manifests._now
    dead = store.partition_writer("t", PHYSICS_HIGH, SCHEMA, resume_key="killed-run")
    dead.write(rows(2, value=1))
    with store.partition_writer("t", PHYSICS_HIGH, SCHEMA) as other:
        other.write(rows(1, value=2))
    assert store.exists(f"{dead.folder}/{dead.parts[0]}")  # a day to come back and resume
    monkeypatch.setattr(manifests, "ABANDONED_AFTER_S", 3600.0)
    monkeypatch.setattr(manifests, "_now", lambda: now() + 7200)  # two hours later, it resumes
    resumed = store.partition_writer("t", PHYSICS_HIGH, SCHEMA, resume_key="killed-run")
    assert resumed.chunks_done == 1
    with store.partition_writer("t", PHYSICS_HIGH, SCHEMA) as meanwhile:  # the resumed run is at work again
        meanwhile.write(rows(1, value=5))
    assert store.exists(f"{dead.folder}/{dead.parts[0]}")
    del resumed  # killed once more
    monkeypatch.setattr(manifests, "ABANDONED_AFTER_S", -1.0)  # as if a day had passed
    with store.partition_writer("t", PHYSICS_HIGH, SCHEMA) as later:
        later.write(rows(1, value=3))
    assert not store.exists(f"{dead.folder}/{dead.parts[0]}") and not store.exists(dead._staging)
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [3]


def test_a_partition_written_before_manifests_still_reads(store: Store) -> None:
    folder = Path(store.partition_folder("t", PHYSICS_HIGH))
    folder.mkdir(parents=True)
    rows(2, value=9).write_parquet(folder / PART_FILE)
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [9, 9]
    store.write_partition("t", PHYSICS_HIGH, rows(1, value=1))  # the first manifest replaces it
    assert store.read_partition("t", PHYSICS_HIGH)["value"].to_list() == [1]


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
    assert not [f for f in all_files(Path(store.root)) if f.endswith(".tmp") or "/." in f]


def test_concurrent_readers_never_see_a_partial_partition(store: Store) -> None:
    store.write_partition("t", PHYSICS_HIGH, rows(1, value=1))
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                df = store.read_partition("t", PHYSICS_HIGH)
                # a generation k holds k rows, each with value k, in up to 3 chunks: anything else is torn
                k = df["value"][0]
                assert df.height == k and df["value"].to_list() == [k] * k, (df.height, k)
                seen.append(int(k))
            except FileNotFoundError:
                continue  # a part of a generation two commits old went while this reader held its list
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for k in range(2, 60):
            with store.partition_writer("t", PHYSICS_HIGH, SCHEMA) as writer:
                for chunk in (rows(k, value=k).slice(0, k // 3), rows(k, value=k).slice(k // 3)):
                    writer.write(chunk)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]
    assert seen, "the readers never read"


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


def test_rejects_folder_slugs_multi_partition_keys(store: Store) -> None:
    assert partition_slug("physics|high") == "physics+high"
    assert partition_slug("a/b") == "a_b"
    folder = store.rejects_folder("synthesized_qa", "physics|high")
    assert folder == f"{store.root}/rejects/stage=synthesized_qa/partition=physics+high"
    rejects = pl.DataFrame(schema=REJECT_SCHEMA)
    written = store.write_rejects("synthesized_qa", "physics|high", rejects)
    assert written == folder and "|" not in written
    assert store.read_rejects("synthesized_qa", "physics|high").schema == REJECT_SCHEMA
    assert store.read_rejects("synthesized_qa", "never|written").height == 0


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
    path = store.partition_folder("t", {"source": "s"}) + "/" + MANIFEST
    assert not store.exists(path)
    store.write_partition("t", {"source": "s"}, rows(1))
    assert store.exists(path)


def test_file_url_root_is_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store(f"file://{tmp_path}/data")
    assert store.is_local and store.root == f"{tmp_path}/data"
    store.write_partition("t", {"source": "s"}, rows(2))
    assert all(f.startswith("data/t/source=s/") for f in all_files(tmp_path))  # no stray ./file: folder
    assert store.read_asset("t", SCHEMA).height == 2
