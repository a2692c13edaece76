"""Tests for boostqa_assets.logic.sources: formats, field mapping, rejects, errors, sampling, remote paths."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from boostqa_assets.configs import SourceConfig, SourcesConfig, load_config
from boostqa_assets.logic.sources import SourceError, SourceReadResult, read_source, resolve_path
from boostqa_assets.records import REJECT_SCHEMA, SEED_SCHEMA, make_seed_id

CONFIG_DIR = Path(__file__).resolve().parents[2] / "boostqa_assets" / "config"
QA_FIELDS = {"id": "id", "question": "q", "answer": "a"}


def qa_source(path: str, **kw: Any) -> SourceConfig:
    return SourceConfig.model_validate({"name": "src", "path": path, "kind": "qa", "fields": QA_FIELDS, **kw})


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def check_shape(res: SourceReadResult) -> None:
    assert res.seeds.schema == SEED_SCHEMA
    assert res.rejects.schema == REJECT_SCHEMA
    assert res.seeds["seed_id"].to_list() == sorted(res.seeds["seed_id"].to_list())
    assert res.rows_read == res.seeds.height + res.rejects.height + res.rows_not_sampled


def reasons(res: SourceReadResult) -> list[str]:
    return res.rejects["reason"].to_list()


ROWS = [
    {"id": 1, "q": "What is 2+2?", "a": "4", "topic": "math"},
    {"id": 2, "q": "  Capital of France?  ", "a": ["Paris", "France"], "topic": "geo"},
]


def check_rows(res: SourceReadResult, native_ids: tuple[str, ...] = ("1", "2")) -> None:
    check_shape(res)
    assert res.rejects.height == 0
    by_id = {r["native_id"]: r for r in res.seeds.to_dicts()}
    assert set(by_id) == set(native_ids)
    one = by_id[native_ids[0]]
    assert (one["question"], one["answer"], one["source"], one["kind"]) == ("What is 2+2?", "4", "src", "qa")
    assert one["seed_id"] == make_seed_id("src", native_ids[0], "What is 2+2?\n4")


# --- formats -------------------------------------------------------------------------------------------


def test_jsonl_field_mapping_nested_and_normalization(tmp_path: Path) -> None:
    rows = [
        {
            "id": 7,
            "item": {"q": "  Name two primes.\n", "a": [2, 3]},
            "lang": "de",
            "topic": "math",
            "n": 1.5,
        },
        {"id": "x", "item": {"q": "Which structure?", "a": {"k": [1, {"z": 2}]}}, "tags": ["a", "b"]},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = SourceConfig.model_validate(
        {
            "name": "src",
            "path": "data.jsonl",
            "kind": "qa",
            "license": "MIT",
            "fields": {"id": "id", "question": "item.q", "answer": "item.a", "language": "lang"},
            "meta_fields": ["topic", "n", "tags", "absent"],
        }
    )
    res = read_source(cfg, tmp_path)
    check_shape(res)
    assert res.path == str(path) and res.rows_read == 2
    seeds = {r["native_id"]: r for r in res.seeds.to_dicts()}
    assert seeds["7"]["question"] == "Name two primes." and seeds["7"]["answer"] == "2, 3"
    assert seeds["7"]["language"] == "de" and seeds["7"]["license"] == "MIT"
    assert (seeds["7"]["language_origin"], seeds["7"]["language_confidence"]) == ("record", None)
    assert json.loads(seeds["7"]["meta"]) == {"topic": "math", "n": 1.5}
    # No language field and no `language:`: detected; two words and a JSON object tell too little to say.
    assert seeds["x"]["answer"] == '{"k":[1,{"z":2}]}' and seeds["x"]["language"] == "und"
    assert seeds["x"]["language_origin"] == "detected"
    assert json.loads(seeds["x"]["meta"]) == {"tags": ["a", "b"]}


def test_jsonl_gz_and_code_indentation(tmp_path: Path) -> None:
    rows = [*ROWS, {"id": 3, "q": "def f():\n", "a": "    return 1\n    # done\n"}]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n\n" for r in rows)  # blank lines are skipped
    res = read_source(qa_source("d.jsonl.gz"), tmp_path)
    check_rows(res, ("1", "2", "3"))
    assert res.rows_read == 3
    assert res.seeds.filter(pl.col("native_id") == "3")["answer"].item() == "    return 1\n    # done"
    # explicit gzip on a name without .gz
    (tmp_path / "plain.jsonl").write_bytes((tmp_path / "d.jsonl.gz").read_bytes())
    assert read_source(qa_source("plain.jsonl", compression="gzip"), tmp_path).seeds.height == 3


def test_json_list(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    check_rows(read_source(qa_source("d.json"), tmp_path))


def test_json_dict_values(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps({"first": ROWS[0], "second": ROWS[1], "bad": 3}))
    res = read_source(qa_source("d.json", json_records="dict_values"), tmp_path)
    assert res.seeds.height == 2 and reasons(res) == ["not_an_object"]
    assert "key 'bad'" in res.rejects["detail"].item()


def test_json_key_and_jsonl_layout(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps({"meta": {}, "data": {"items": ROWS}}))
    check_rows(read_source(qa_source("d.json", json_records="data.items"), tmp_path))
    with pytest.raises(SourceError, match="nope"):
        read_source(qa_source("d.json", json_records="nope"), tmp_path)
    with pytest.raises(SourceError, match=r"d\.json"):
        read_source(qa_source("d.json", json_records="list"), tmp_path)
    write_jsonl(tmp_path / "lines.json", ROWS)
    check_rows(read_source(qa_source("lines.json", json_records="jsonl"), tmp_path))


def test_parquet_with_struct_column(tmp_path: Path) -> None:
    df = pl.DataFrame(
        {
            "id": [1, 2],
            "qa": [{"q": "What is 2+2?", "a": "4"}, {"q": "Why?", "a": "Because"}],
            "topic": ["math", None],
        }
    )
    df.write_parquet(tmp_path / "d.parquet")
    cfg = SourceConfig.model_validate(
        {
            "name": "src",
            "path": "d.parquet",
            "kind": "qa",
            "fields": {"id": "id", "question": "qa.q", "answer": "qa.a"},
            "meta_fields": ["topic"],
        }
    )
    check_rows(read_source(cfg, tmp_path))


def test_csv(tmp_path: Path) -> None:
    text = 'id,q,a,topic\n1,What is 2+2?,4,math\n\n2,"Capital of\nFrance?",Paris,geo\n'
    (tmp_path / "d.csv").write_text(text)
    res = read_source(qa_source("d.csv", meta_fields=["topic"]), tmp_path)
    check_rows(res)
    assert res.seeds.filter(pl.col("native_id") == "2")["question"].item() == "Capital of\nFrance?"


# --- rejects -------------------------------------------------------------------------------------------


def test_jsonl_every_reject_reason(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": 1, "q": "Good one?", "a": "yes"}).encode(),
        b'{"id": 2, "q": "bad \xff byte", "a": "x"}',
        b'{"id": 3, "q": "broken"',
        b"[1, 2]",
        json.dumps({"id": 5, "a": "no question"}).encode(),
        json.dumps({"id": 6, "q": None, "a": "null question"}).encode(),
        json.dumps({"id": 7, "q": "   ", "a": "blank question"}).encode(),
        json.dumps({"id": 8, "q": "Long?", "a": "x" * 20_000}).encode(),
        json.dumps({"id": 9, "q": "GOOD   one?", "a": "Yes"}).encode(),  # same normalized content as id 1
        json.dumps({"id": 1, "q": "Other?", "a": "other"}).encode(),  # id 1 again, other content
        json.dumps({"id": 11, "q": "Lone \ud800 surrogate", "a": "x"}).encode(),  # \ud800 escape in JSON
        b"",
        json.dumps({"id": 12, "q": "Second good?", "a": "also"}).encode(),
    ]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    res = read_source(qa_source("d.jsonl", max_chars=10_000), tmp_path)
    check_shape(res)
    assert sorted(res.seeds["native_id"].to_list()) == ["1", "12"]
    assert reasons(res) == [
        "invalid_utf8",
        "unparseable_line",
        "not_an_object",
        "missing_field",
        "missing_field",
        "empty_text",
        "oversize",
        "duplicate",
        "duplicate_id",
        "invalid_utf8",
    ]
    assert res.rows_read == 12
    rej = res.rejects.to_dicts()
    assert all(r["stage"] == "seeds" and r["partition"] == "src" and r["source"] == "src" for r in rej)
    assert all(r["qa_id"] is None and r["raw_output"] is None and r["request_hash"] is None for r in rej)
    assert rej[0]["detail"].startswith("line 2:") and "\ufffd" in rej[0]["record"]
    assert rej[0]["seed_id"] is None
    assert rej[1]["detail"].startswith("line 3:") and rej[1]["record"] == '{"id": 3, "q": "broken"'
    assert "'question'" in rej[3]["detail"] and "'q'" in rej[3]["detail"] and "missing" in rej[3]["detail"]
    assert "null" in rej[4]["detail"]
    assert len(rej[6]["record"]) == 10_000 and rej[6]["seed_id"] == make_seed_id("src", "8", "")
    kept_1 = make_seed_id("src", "1", "")
    assert rej[7]["detail"] == f"line 9: same content as {kept_1}"
    assert rej[8]["seed_id"] == kept_1


def test_csv_rejects(tmp_path: Path) -> None:
    data = b'id,q,a\n1,Good?,yes\n2,Bad \xff\xfe byte,no\n3,too,many,fields\n4,"",empty\n5,Fine too?,sure\n'
    (tmp_path / "d.csv").write_bytes(data)
    res = read_source(qa_source("d.csv"), tmp_path)
    check_shape(res)
    assert sorted(res.seeds["native_id"].to_list()) == ["1", "5"]
    assert reasons(res) == ["invalid_utf8", "unparseable_line", "empty_text"]
    bad = res.rejects.row(0, named=True)
    assert bad["detail"].startswith("row 2 (line 3)") and "\ufffd" in bad["record"]
    assert "4 fields where the header has 3" in res.rejects["detail"][1]


def test_csv_without_header_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(SourceError, match=r"empty\.csv"):
        read_source(qa_source("empty.csv"), tmp_path)
    (tmp_path / "nohead.csv").write_text("1,What?,That\n")
    with pytest.raises(SourceError, match=r"nohead\.csv.*header"):
        read_source(qa_source("nohead.csv"), tmp_path)


# --- unreadable files ----------------------------------------------------------------------------------


def test_corrupt_json_and_invalid_utf8_json(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('[{"id": 1, "q": "x", ')
    with pytest.raises(SourceError, match=r"broken\.json.*not valid JSON"):
        read_source(qa_source("broken.json"), tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'[{"id": 1, "q": "caf\xe9", "a": "x"}]')
    with pytest.raises(SourceError, match=r"latin1\.json.*UTF-8"):
        read_source(qa_source("latin1.json"), tmp_path)


def test_corrupt_parquet_and_gzip(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    with pytest.raises(SourceError, match=r"broken\.parquet"):
        read_source(qa_source("broken.parquet"), tmp_path)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip data")
    with pytest.raises(SourceError, match=r"broken\.jsonl\.gz"):
        read_source(qa_source("broken.jsonl.gz"), tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"source 'src': file .*nowhere\.jsonl not found"):
        read_source(qa_source("nowhere.jsonl"), tmp_path)
    with pytest.raises(SourceError, match="not installed"):
        resolve_path(qa_source("pkg://no_such_package_xyz/data.jsonl"), tmp_path)


def test_resolve_path(tmp_path: Path) -> None:
    assert resolve_path(qa_source("sub/d.jsonl"), tmp_path) == str(tmp_path / "sub" / "d.jsonl")
    assert resolve_path(qa_source("/abs/d.jsonl"), tmp_path) == "/abs/d.jsonl"
    for url in ("s3://bucket/d.jsonl", "https://example.org/d.jsonl"):
        assert resolve_path(qa_source(url), tmp_path) == url
    assert resolve_path(qa_source("pkg://pytest/x.jsonl"), tmp_path).endswith("/pytest/x.jsonl")


# --- ids and sampling ----------------------------------------------------------------------------------


def test_seed_ids_stable_and_source_specific(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [*ROWS, {"q": "No id here?", "a": "none"}])
    first, again = (read_source(qa_source("d.jsonl"), tmp_path) for _ in range(2))
    assert first.seeds.equals(again.seeds)
    other = read_source(qa_source("d.jsonl", name="other"), tmp_path)
    assert set(first.seeds["seed_id"]).isdisjoint(other.seeds["seed_id"])
    no_id = first.seeds.filter(pl.col("native_id") == "")
    assert no_id["seed_id"].item() == make_seed_id("src", None, "No id here?\nnone")


def test_limit_sampling_is_deterministic(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"id": i, "q": f"Question {i}?", "a": str(i)} for i in range(40)])

    def sample(seed: int) -> list[str]:
        res = read_source(qa_source("d.jsonl", limit=5, sample_seed=seed), tmp_path)
        check_shape(res)
        assert res.seeds.height == 5 and res.rows_not_sampled == 35 and res.rejects.height == 0
        return res.seeds["seed_id"].to_list()

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    full = read_source(qa_source("d.jsonl", limit=100), tmp_path)
    assert full.seeds.height == 40 and full.rows_not_sampled == 0


def test_demo_sources() -> None:
    sources = load_config("sources.yaml", CONFIG_DIR)
    assert isinstance(sources, SourcesConfig)
    for cfg in sources.sources:
        res = read_source(cfg, CONFIG_DIR)
        check_shape(res)
        assert res.seeds.height == cfg.limit, cfg.name
        content = res.seeds["text"] if cfg.kind == "passage" else res.seeds["question"]
        assert all(c and c.strip() for c in content.to_list()), cfg.name
        assert all(res.seeds["native_id"].to_list()), cfg.name


# --- remote --------------------------------------------------------------------------------------------


def test_http_source(http_dir: tuple[Path, str]) -> None:
    folder, base = http_dir
    with gzip.open(folder / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    res = read_source(qa_source(f"{base}/d.jsonl.gz"), folder)
    check_rows(res)
    assert res.path == f"{base}/d.jsonl.gz"
    with pytest.raises(SourceError, match=r"missing\.jsonl"):
        read_source(qa_source(f"{base}/missing.jsonl"), folder)


@pytest.mark.s3
def test_s3_source(tmp_path: Path) -> None:
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}"}
        endpoint = {"endpoint_url": opts["endpoint_url"]}
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs=endpoint)
        fs.mkdir("seeds")
        fs.pipe_file("seeds/d.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode())
        check_rows(read_source(qa_source("s3://seeds/d.jsonl"), tmp_path, storage_options=opts))
        with pytest.raises(SourceError, match=r"absent\.jsonl"):
            read_source(qa_source("s3://seeds/absent.jsonl"), tmp_path, storage_options=opts)
    finally:
        server.stop()


# --- shards ----------------------------------------------------------------------------------------------


def test_a_sharded_source_is_cut_into_hash_buckets_of_seed_id(tmp_path: Path) -> None:
    rows = [{"id": i, "q": f"Question number {i}?", "a": str(i)} for i in range(200)]
    rows += [{"id": 500, "q": "", "a": "empty"}, {"id": 7, "q": "Other content, same id?", "a": "x"}]
    write_jsonl(tmp_path / "big.jsonl", rows)
    (tmp_path / "big.jsonl").write_text((tmp_path / "big.jsonl").read_text() + "{not json\n")
    whole = read_source(qa_source("big.jsonl"), tmp_path)
    cfg = qa_source("big.jsonl", shards=4)
    assert cfg.partition_keys() == ["src--s0000", "src--s0001", "src--s0002", "src--s0003"]
    assert SourcesConfig(sources=[cfg]).for_key("src--s0002") == (cfg, (2, 4))
    assert SourcesConfig(sources=[cfg]).for_key("src") is None  # a sharded source has no unsharded key
    parts = [read_source(cfg, tmp_path, shard=(i, 4)) for i in range(4)]
    ids = [s for p in parts for s in p.seeds["seed_id"].to_list()]
    assert sorted(ids) == sorted(whole.seeds["seed_id"].to_list())  # every seed in exactly one shard
    assert all(0 < p.seeds.height < whole.seeds.height for p in parts)
    reasons_all = sorted(r for p in parts for r in p.rejects["reason"].to_list())
    assert reasons_all == sorted(whole.rejects["reason"].to_list())  # every reject reported once
    assert {r for p in parts for r in p.rejects["partition"].to_list()} <= set(cfg.partition_keys())
    assert {s for p in parts for s in p.seeds["source"].to_list()} == {"src"}
    limited = [read_source(qa_source("big.jsonl", shards=4, limit=40), tmp_path, shard=(i, 4)) for i in range(4)]
    assert all(p.seeds.height <= 10 for p in limited)  # the limit is spread over the shards
