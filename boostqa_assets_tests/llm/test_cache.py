"""The response cache: Parquet segments written as replies arrive, bulk lookups, compaction into hash-prefix
shards (also by two processes at once), legacy one-file-per-entry JSON, SIGKILL, S3 (moto) and the DuckDB view."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest

from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.cache.compaction import compact_tail, merge_files, merge_tiers
from boostqa_assets.llm.cache.files import REPLY_FIELDS

if TYPE_CHECKING:
    import duckdb

# The DuckDB views and the LLM client are imported where used: the child processes below import this module.

SMALL = {"prefix_len": 1, "fanout": 2, "shard_row_group_rows": 16, "merge_chunk_rows": 40}  # many files, fast


def h(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def entry(i: int | str, content: str | None = None) -> dict[str, Any]:
    rhash = h(i)
    return {
        "request_hash": rhash,
        "role": "synthesizer",
        "model": "fake-model",
        "request": {"model": "fake-model", "messages": [{"role": "user", "content": f"question {i}"}], "seed": 1},
        "content": content if content is not None else f"answer {i}",
        "reasoning": "",
        "finish_reason": "stop",
        "tokens_in": 12,
        "tokens_out": 7,
        "latency_s": 0.25,
    }


def fill(cache: ResponseCache, ids: range, content: str | None = None) -> None:
    for i in ids:
        cache.put(h(i), entry(i, content))


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def view(data_root: Path | str, **storage_options: Any) -> duckdb.DuckDBPyConnection:
    from boostqa_assets.inspect import connect
    from boostqa_assets.storage import Store

    return connect(Store(str(data_root), storage_options))


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_round_trip_and_layout(tmp_path: Path) -> None:
    cache = ResponseCache(str(tmp_path))
    fill(cache, range(30))
    odd = {**entry("odd"), "request": None, "reasoning": None, "note": {"kept": True}}  # extra fields survive
    cache.put(h("odd"), odd)
    assert cache.get(h(3)) == entry(3)  # from the writer's own buffer, before any flush
    cache.close()
    assert [p.relative_to(tmp_path).parts[0] for p in files(tmp_path, "*")] == ["segments"]
    assert not files(tmp_path, "*.tmp") and not files(tmp_path, ".*")
    again = ResponseCache(str(tmp_path))
    assert all(again.get(h(i)) == entry(i) for i in range(30))
    assert again.get(h("odd")) == odd and again.get(h("missing")) is None
    # closed is not finished: puts start the flusher again
    fill(cache, range(30, 40))
    cache.close()
    assert len(ResponseCache(str(tmp_path)).get_many(h(i) for i in range(40))) == 40


def test_bulk_lookup_hits_misses_duplicates(tmp_path: Path) -> None:
    first = ResponseCache(str(tmp_path))
    fill(first, range(100), content="first")
    first.close()
    second = ResponseCache(str(tmp_path))  # another writer stores some of the same hashes again, later
    fill(second, range(50, 120), content="second")
    second.close()
    reader = ResponseCache(str(tmp_path))
    asked = [h(i) for i in range(0, 150, 3)] * 2 + [h("nope"), "not-a-hex-hash"]
    got = reader.get_many(asked)
    assert set(got) == {h(i) for i in range(0, 120, 3)}  # hits only, each once
    assert {got[h(i)]["content"] for i in range(51, 99, 3)} == {"first"}  # stored twice: the earliest wins
    assert got[h(117)]["content"] == "second"
    assert reader.compact(force=True).segments_in == 2  # the same answers from shards
    assert ResponseCache(str(tmp_path)).get_many(asked) == got


def test_prefetch_answers_get_from_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ResponseCache(str(tmp_path))
    fill(writer, range(20))
    writer.close()
    cache = ResponseCache(str(tmp_path))
    assert cache.prefetch([h(i) for i in range(25)]) == 20
    loads: list[int] = []
    monkeypatch.setattr(cache, "_load", _counting(cache._load, loads))
    reply = {k: entry(3)[k] for k in REPLY_FIELDS}  # a prefetch keeps what a client re-reads
    assert cache.get(h(3)) == reply
    assert all(cache.get(h(i))["content"] == f"answer {i}" for i in (*range(3), *range(4, 20)))  # type: ignore[index]
    assert cache.get(h(21)) is None
    assert loads == []  # hits and known misses from memory
    cache.put(h(21), entry(21))  # a miss that got paid for is no longer a known miss
    assert cache.get(h(21)) == entry(21)
    assert cache.get(h(3)) == entry(3) and loads == [1]  # a prefetched hit is handed out once, then storage


def test_legacy_json_entries_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):  # the old layout: <root>/<hh>/<hash>.json, as the old cache wrote it
        path = tmp_path / h(i)[:2] / f"{h(i)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry(i), sort_keys=True))
    cache = ResponseCache(str(tmp_path))
    fill(cache, range(3, 8), content="new")
    cache.close()
    reader = ResponseCache(str(tmp_path))
    got = reader.get_many([h(i) for i in range(10)])
    assert {k: v["content"] for k, v in got.items()} == {
        **{h(i): f"answer {i}" for i in range(3)},
        **{h(i): "new" for i in range(3, 8)},  # checked only for misses
    }
    assert reader.get(h(1)) == entry(1)
    # With no legacy folder, the root is listed once per instance and no per-entry file is ever asked for.
    fresh = ResponseCache(str(tmp_path / "fresh"))
    calls: list[str] = []
    monkeypatch.setattr(fresh.storage, "has_legacy", lambda: calls.append("ls") or False)
    monkeypatch.setattr(fresh.storage, "legacy_path", lambda rhash: pytest.fail("looked for a legacy file"))
    for i in range(5):
        assert fresh.get(h(i)) is None and fresh.get_many([h(i)]) == {}
    assert calls == ["ls"]


def test_flush_by_size_and_by_time(tmp_path: Path) -> None:
    by_size = ResponseCache(str(tmp_path / "size"), flush_entries=10, flush_interval_s=3600)
    for i in range(25):
        by_size.put(h(i), entry(i))
        if i in (9, 19):  # let the flusher take exactly the full buffer
            assert wait_for(lambda n=(i + 1) // 10: by_size.segments_written == n)
    reader = ResponseCache(str(tmp_path / "size"))
    assert len(reader.get_many(h(i) for i in range(25))) == 20  # the 5 of a partial buffer wait
    by_size.close()
    assert len(reader.get_many(h(i) for i in range(25))) == 25

    by_time = ResponseCache(str(tmp_path / "time"), flush_entries=1000, flush_interval_s=0.3)
    fill(by_time, range(3))
    started = time.monotonic()
    other = ResponseCache(str(tmp_path / "time"))
    assert wait_for(lambda: len(other.get_many(h(i) for i in range(3))) == 3, timeout=10)
    assert time.monotonic() - started >= 0.25  # written by the timer, not at once
    assert by_time.segments_written == 1
    by_time.close()


CHILD = """
import sys, time, hashlib
sys.path.insert(0, {repo!r})
from boostqa_assets_tests.llm.test_cache import entry, h
from boostqa_assets.llm.cache import ResponseCache
cache = ResponseCache(sys.argv[1], flush_entries=100, flush_interval_s=3600)
for i in range(250):
    cache.put(h(i), entry(i))
    if i in (99, 199):
        while cache.segments_written < (i + 1) // 100:
            time.sleep(0.01)
print("ready", flush=True)
time.sleep(600)
"""


def test_sigkill_loses_only_the_unflushed_tail(tmp_path: Path) -> None:
    script = CHILD.format(repo=str(Path(__file__).parents[2]))
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    got = ResponseCache(str(tmp_path)).get_many(h(i) for i in range(250))
    assert set(got) == {h(i) for i in range(200)}  # two flushed segments kept, the 50 buffered lost
    assert not files(tmp_path, "*.tmp")


WRITER = """
import sys
sys.path.insert(0, {repo!r})
from boostqa_assets_tests.llm.test_cache import SMALL, entry, h
from boostqa_assets.llm.cache import ResponseCache
start, name = int(sys.argv[2]), sys.argv[3]
with ResponseCache(sys.argv[1], flush_entries=25, compact_rows=1, **SMALL) as cache:
    for i in range(start, start + 300):
        cache.put(h(i), entry(i, content=name))
        if i % 50 == 0:
            cache.flush()
            cache.compact(force=True)  # races the other writer's and the parent's compactions
"""


def test_two_writer_processes_and_concurrent_compaction(tmp_path: Path) -> None:
    script = WRITER.format(repo=str(Path(__file__).parents[2]))
    root = tmp_path / "data" / "_llm_cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root), str(start), name], stderr=subprocess.PIPE)
        for start, name in ((0, "a"), (200, "b"))  # hashes 200..299 are written by both
    ]
    compactor = ResponseCache(str(root), **SMALL)
    while any(p.poll() is None for p in procs):
        compactor.compact(force=True)
        time.sleep(0.1)
    for p in procs:
        assert p.wait() == 0, p.stderr.read() if p.stderr else ""
    want = [h(i) for i in range(500)]
    before = ResponseCache(str(root), **SMALL).get_many(want)
    assert len(before) == 500
    compactor.compact(force=True)
    assert not files(root / "segments", "*.parquet")
    assert len(files(root / "shards", "*.parquet")) < 16 * 8  # merged by tier, not one file per flush
    after = ResponseCache(str(root), **SMALL).get_many(want)
    assert after == before  # the same winner for every hash stored twice, wherever it lives
    con = view(tmp_path / "data")
    rows = dict(con.sql("SELECT request_hash, content FROM llm_cache").fetchall())
    assert len(rows) == 500 and rows == {k: v["content"] for k, v in after.items()}


def test_two_compactors_over_the_same_inputs_leave_one_copy(tmp_path: Path) -> None:
    """Compactor B read the segments before compactor A deleted them: B publishes the same entries again.
    Readers and the view see one row per hash; the next tier merge keeps one copy; a merge whose input was
    merged away by someone else publishes nothing."""
    cache = ResponseCache(str(tmp_path), flush_entries=20, **SMALL)
    fill(cache, range(60))
    cache.close()
    segments = cache.storage.list_parquet(cache.storage.segments)
    saved = {p: Path(p).read_bytes() for p in segments}
    compact_tail(cache.storage, segments, 1, 16, cache._name)  # A
    for path, data in saved.items():  # B's reads happened before A's deletes
        Path(path).write_bytes(data)
    compact_tail(cache.storage, segments, 1, 16, cache._name)  # B: the same t0 shards again
    shards = files(tmp_path / "shards", "*.parquet")
    assert sum(pq.read_metadata(p).num_rows for p in shards) == 120
    assert ResponseCache(str(tmp_path)).get_many(h(i) for i in range(60)) == {h(i): entry(i) for i in range(60)}
    prefix = shards[0].parent.name.removeprefix("p=")
    inputs = [str(p) for p in shards if p.parent.name == f"p={prefix}"]
    gone = str(tmp_path / "gone.parquet")
    assert merge_files(cache.storage, [*inputs, gone], str(tmp_path / "out"), 16, 40, 1000) == []
    assert not files(tmp_path, "out*") and not files(tmp_path, "*.tmp")
    assert merge_tiers(cache.storage, None, 2, 16, 40, 1000, cache._name) > 0
    assert sum(pq.read_metadata(p).num_rows for p in files(tmp_path / "shards", "*.parquet")) == 60


def test_tier_merges_cut_big_runs_into_files_of_disjoint_key_ranges(tmp_path: Path) -> None:
    small = {**SMALL, "shard_row_group_rows": 4, "merge_chunk_rows": 8, "max_file_rows": 10}
    cache = ResponseCache(str(tmp_path), flush_entries=50, **small)
    for part in range(8):  # 8 tail compactions, then merges of 2 runs by 2 runs
        fill(cache, range(50 * part, 50 * part + 50))
        cache.close()
        cache.compact(force=True)
    runs: dict[str, list[tuple[int, int]]] = {}
    for path in files(tmp_path / "shards", "*.parquet"):
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        assert keys == sorted(keys) and pq.read_metadata(path).row_group(0).num_rows <= 4
        runs.setdefault(f"{path.parent.name}/{path.stem.rpartition('-')[0]}", []).append((keys[0], keys[-1]))
    assert max(len(parts) for parts in runs.values()) > 1  # some run was cut into several files
    for parts in runs.values():
        assert all(a[1] < b[0] for a, b in zip(sorted(parts), sorted(parts)[1:], strict=False))  # disjoint
    assert sum(pq.read_metadata(p).num_rows for p in files(tmp_path / "shards", "*.parquet")) == 400
    assert ResponseCache(str(tmp_path)).get_many(h(i) for i in range(400)) == {h(i): entry(i) for i in range(400)}


def test_reader_lists_again_when_files_are_compacted_under_it(tmp_path: Path) -> None:
    writer = ResponseCache(str(tmp_path), flush_entries=20, **SMALL)
    fill(writer, range(100))
    writer.close()
    reader = ResponseCache(str(tmp_path), refresh_s=3600, **SMALL)
    assert reader.get(h(1)) == entry(1)  # the reader has listed the segments
    ResponseCache(str(tmp_path), **SMALL).compact(force=True)  # ...which are now gone
    assert not files(tmp_path / "segments", "*.parquet")
    assert all(reader.get(h(i)) == entry(i) for i in range(100))
    reader.put(h(100), entry(100))
    reader.close()
    assert ResponseCache(str(tmp_path), **SMALL).compact(force=True).merges  # deletes shards the reader knew
    assert all(reader.get(h(i)) == entry(i) for i in range(101))


def test_duckdb_view_over_segments_shards_and_legacy_without_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "_llm_cache"
    con = view(tmp_path)  # nothing cached yet: an empty view that binds
    assert con.sql("SELECT count(*), max(created_at) FROM llm_cache").fetchall() == [(0, None)]
    cache = ResponseCache(str(root), **SMALL)
    fill(cache, range(40))
    cache.close()
    cache.compact(force=True)  # 0..39 in shards
    fill(cache, range(30, 60), content="again")
    cache.close()  # 30..59 in a segment; 30..39 stored twice
    for i in range(55, 70):  # legacy files, 55..59 also in the segment
        path = root / h(i)[:2] / f"{h(i)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry(i, content="legacy")))
    assert files(root / "shards", "*.parquet") and files(root / "segments", "*.parquet")
    con = view(tmp_path)
    total, distinct = con.sql("SELECT count(*), count(DISTINCT request_hash) FROM llm_cache").fetchall()[0]
    assert total == distinct == 70
    contents = dict(con.sql("SELECT request_hash, content FROM llm_cache").fetchall())
    assert contents[h(35)] == "answer 35" and contents[h(57)] == "again" and contents[h(65)] == "legacy"
    request = con.sql(f"SELECT request->>'$.messages[0].content' FROM llm_cache WHERE request_hash = '{h(7)}'")
    assert request.fetchall() == [("question 7",)]


def test_no_api_key_in_any_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from boostqa_assets_tests.llm.test_client import (
        KEY_ENV,
        SECRET,
        HeaderServer,
        client_for,
        make_requests,
        qa_validator,
    )

    monkeypatch.setenv(KEY_ENV, SECRET)
    with HeaderServer() as srv:
        cache = ResponseCache(str(tmp_path), **SMALL)
        results = client_for(srv, api_key_env=KEY_ENV, cache=cache).run(make_requests(30), qa_validator)
        assert all(r.ok for r in results) and srv.auth == [f"Bearer {SECRET}"] * 30
    cache.compact(force=True)
    fill(cache, range(5))
    cache.close()
    found = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.relative_to(tmp_path).parts[0] for p in found} == {"segments", "shards"}
    for path in found:
        raw, text = path.read_bytes(), json.dumps(pq.read_table(path).to_pylist(), default=str)
        assert (
            SECRET.encode() not in raw and SECRET not in text and "Bearer" not in text and "authorization" not in text
        )


def _counting(load: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    def counted(hashes: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(hashes))
        return load(hashes, *args, **kwargs)

    return counted


def test_client_run_looks_up_once_and_writes_before_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from boostqa_assets.testing.fake_server import FakeOpenAIServer
    from boostqa_assets_tests.llm.test_client import client_for, make_requests, qa_validator

    reqs = make_requests(40)
    with FakeOpenAIServer() as srv:
        for run in ("first", "second"):
            cache = ResponseCache(str(tmp_path))
            loads: list[int] = []
            monkeypatch.setattr(cache, "_load", _counting(cache._load, loads))
            results = client_for(srv, cache=cache).run(reqs, qa_validator)
            assert all(r.ok and r.cached == (run == "second") for r in results)
            assert loads == [40]  # one bulk lookup; every request's get came from memory (hit or known miss)
            assert cache._buffer == {} and cache._thread is None  # run() wrote every reply and stopped its flusher
        assert srv.stats()["requests"] == 40


@pytest.mark.s3
def test_on_s3_segments_shards_legacy_and_view(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from boostqa_assets.llm.cache import files as cache_files

    bucket = f"cache-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})
    fs.mkdir(bucket)
    root = f"s3://{bucket}/data/_llm_cache"
    fs.pipe_file(f"{bucket}/data/_llm_cache/{h(999)[:2]}/{h(999)}.json", json.dumps(entry(999)).encode())
    cache = ResponseCache(root, fs, flush_entries=50, **SMALL)
    fill(cache, range(120))
    cache.close()
    segments = fs.find(f"{bucket}/data/_llm_cache/segments")
    assert 1 <= len(segments) <= 3 and all(p.endswith(".parquet") for p in segments)  # about one object per flush
    want = [h(i) for i in (*range(130), 999)]
    assert len(ResponseCache(root, fs).get_many(want)) == 121
    reader = ResponseCache(root, fs, **SMALL)
    assert reader.get(h(5)) == entry(5)
    report = ResponseCache(root, fs, **SMALL).compact(force=True)
    assert report.segments_in == len(segments) and not fs.find(f"{bucket}/data/_llm_cache/segments")
    assert reader.get_many(want) == {h(i): entry(i) for i in (*range(120), 999)}
    # Big objects are read by the byte ranges of the column chunks wanted, not whole.
    monkeypatch.setattr(cache_files, "WHOLE_FILE_BYTES", 0)
    ranged = ResponseCache(root, fs, **SMALL)
    assert ranged.get_many(want) == {h(i): entry(i) for i in (*range(120), 999)}
    assert ranged.get_many(want, reply_only=True)[h(7)] == {k: entry(7)[k] for k in REPLY_FIELDS}
    con = view(f"s3://{bucket}/data", endpoint_url=moto_endpoint)
    assert con.sql("SELECT count(*), count(DISTINCT request_hash) FROM llm_cache").fetchall() == [(121, 121)]
