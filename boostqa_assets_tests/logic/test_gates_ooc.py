"""The out-of-core gates against the in-memory ones on planted data: same kept set, same rejects (reason and
detail), same mixture; chunks and signature blocks really bounded; keys reused only while they are fresh."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from boostqa_assets.configs import QualityConfig, Recipe
from boostqa_assets.logic import gate_keys, gates, gates_ooc, mixture_ooc
from boostqa_assets.logic.decontam import DEFAULT_BENCHMARKS, BenchmarkIndex
from boostqa_assets.logic.dedup import DedupConfig, dedup
from boostqa_assets.logic.dedup_ooc import dedup_out_of_core
from boostqa_assets.logic.mixture import build_mixture
from boostqa_assets.logic.spill import SpillConfig
from boostqa_assets.records import REFINED_SCHEMA, frame
from boostqa_assets.storage import Store
from boostqa_assets_tests.logic.test_mixture import refined_row

MMLU_920 = (
    'Who said "Globalization is not something we can hold off or turn off. It is the economic equivalent of a '
    'force of nature-like wind or water"?'
)
DISCIPLINES = ["physics", "history", "economics", "general_knowledge"]


def planted_questions(n: int, seed: int = 5) -> tuple[list[str], list[str]]:
    """``n`` template questions (shared templates make LSH hub buckets) with ~8% exact and ~8% near
    duplicates planted, in shuffled order; and ids that are not in text order."""
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice("aeioukltrsnmpd") for _ in range(rng.randint(4, 9))) for _ in range(600)})
    templates = [
        "Explain how {} affects {} and give one everyday example of this effect.",
        "What is the difference between {} and {} when studying {}?",
        "Why does {} increase when {} is heated, and what does that tell us about {}?",
        "Describe the relationship between {}, {} and {} in a short paragraph.",
    ]
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if out and r < 0.08:
            out.append("  " + rng.choice(out).upper() + " ")  # exact after normalization
        elif out and r < 0.16:
            words = rng.choice(out).split(" ")
            k = rng.randrange(len(words))
            out.append(" ".join([*words[:k], rng.choice(vocab), *words[k + 1 :]]))  # one word changed
        else:
            words = [rng.choice(vocab) for _ in range(3)]
            tail = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 6)))
            out.append(rng.choice(templates).format(*words) + (f" Consider {tail}." if tail else ""))
    ids = [f"q_{rng.getrandbits(40):010x}" for _ in range(n)]
    return out, ids


def write_partitions(store: Store, df: pl.DataFrame, parts: int, row_group: int = 97) -> list[str]:
    """``df`` cut into ``parts`` refined partitions (small row groups: the readers must cross them)."""
    files = []
    size = -(-df.height // parts)
    for k in range(parts):
        path = store.partition_path("refined_qa", {"discipline": f"d{k:02d}", "grade": "high"})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        df.slice(k * size, size).write_parquet(path, row_group_size=row_group)
        files.append(path)
    return files


def spill_cfg(tmp_path: Path, **kw: Any) -> SpillConfig:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    defaults = {"chunk_rows": 150, "block_rows": 170, "workers": 1}
    return SpillConfig(work_dir=work, memory_limit="256MB", threads=1, **{**defaults, **kw})


def ooc_removals(store: Store, files: list[str], cfg: DedupConfig, spill: SpillConfig) -> dict[str, tuple]:
    keys, _ = gates_ooc.prepare_keys(store, files, cfg, spill)
    res = dedup_out_of_core(keys, cfg, spill)
    by_file = {f: pl.read_parquet(f)["qa_id"].to_list() for f in files}
    out = {}
    for fid, f in enumerate(res.files):
        rows, reasons, dup_of, sims = res.removed_in(fid)
        ids = by_file[store.path(f)]
        for r, reason, d, s in zip(rows.tolist(), reasons, dup_of, sims.tolist(), strict=True):
            out[ids[r]] = (reason, d, round(s, 12))
    res.con.close()
    return out


def in_memory_removals(df: pl.DataFrame, cfg: DedupConfig) -> dict[str, tuple]:
    res = dedup(df, cfg)
    return {
        q: (r, d, round(s, 12))
        for q, k, r, d, s in zip(df["qa_id"], res.keep, res.reason, res.duplicate_of, res.similarity, strict=True)
        if not k
    }


@pytest.mark.parametrize(
    "cfg",
    [
        DedupConfig(),
        DedupConfig(verify_jaccard=False, max_candidates=3),
        DedupConfig(shingle="word", ngram=2, threshold=0.7),
        DedupConfig(exact=False),
        DedupConfig(near=False),
    ],
    ids=["default", "estimate-cap3", "word-bigrams", "near-only", "exact-only"],
)
def test_dedup_out_of_core_equals_in_memory(tmp_path: Path, cfg: DedupConfig) -> None:
    questions, ids = planted_questions(1200)
    df = pl.DataFrame({"qa_id": ids, "question": questions})
    store = Store(str(tmp_path / "data"))
    files = write_partitions(store, df, parts=5)
    expected = in_memory_removals(df, cfg)
    assert len(expected) > (60 if cfg.exact and cfg.near else 30)  # the plants are found at all
    assert ooc_removals(store, files, cfg, spill_cfg(tmp_path)) == expected


def test_chunks_and_signature_blocks_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    questions, ids = planted_questions(900)
    store = Store(str(tmp_path / "data"))
    files = write_partitions(store, pl.DataFrame({"qa_id": ids, "question": questions}), parts=2)
    seen: list[int] = []
    real = gate_keys.iter_parquet

    def spy(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        for chunk in real(*args, **kwargs):
            seen.append(chunk.height)
            yield chunk

    monkeypatch.setattr(gate_keys, "iter_parquet", spy)
    spill = spill_cfg(tmp_path, chunk_rows=64, block_rows=100)
    keys, _ = gates_ooc.prepare_keys(store, files, DedupConfig(), spill)
    res = dedup_out_of_core(keys, DedupConfig(), spill)
    assert sum(seen) == 900 and max(seen) <= 64 and len(seen) >= 900 // 64
    assert (spill.work_dir / "sigs.bin").stat().st_size == 900 * 4 * 64  # signatures on disk, not in memory
    assert res.stats["signature_block_reads"] >= 9  # 9 blocks of 100 rows, each read when a tile needs it
    assert res.stats["near_removed"] > 0
    res.con.close()


def test_keys_from_qa_signatures_are_used_only_while_fresh(tmp_path: Path) -> None:
    questions, ids = planted_questions(300)
    store = Store(str(tmp_path / "data"))
    files = write_partitions(store, pl.DataFrame({"qa_id": ids, "question": questions}), parts=3)
    cfg = DedupConfig()
    for f in files:  # what the qa_signatures asset writes
        gate_keys.write_keys_file(store, [f], cfg, gate_keys.keys_path(store, os.path.dirname(f)), 100)
    _, counts = gates_ooc.prepare_keys(store, files, cfg, spill_cfg(tmp_path))
    assert counts == {"keys_reused": 3, "keys_computed": 0}
    # a refined partition rewritten after its keys: computed again; other settings: all computed again
    pl.read_parquet(files[1]).head(50).write_parquet(files[1])
    _, counts = gates_ooc.prepare_keys(store, files, cfg, spill_cfg(tmp_path))
    assert counts == {"keys_reused": 2, "keys_computed": 1}
    _, counts = gates_ooc.prepare_keys(store, files, DedupConfig(num_perm=32), spill_cfg(tmp_path))
    assert counts == {"keys_reused": 0, "keys_computed": 3}


def refined_pool(n: int) -> pl.DataFrame:
    """Refined rows with planted duplicates and two MMLU plants, over four disciplines."""
    questions, ids = planted_questions(n, seed=11)
    rows = []
    for i, (q, qa_id) in enumerate(zip(questions, ids, strict=True)):
        row = refined_row(
            i, DISCIPLINES[i % 4], ["primary", "high", "graduate"][i % 3], ["multi_grade", "high_difficulty"][i % 2]
        )
        row.update(qa_id=qa_id, question=MMLU_920 if i in (17, 401) else q)
        if i == 230:
            row["refined_answer"] = "As the quote says: " + MMLU_920.lower()
        rows.append(row)
    return frame(rows, REFINED_SCHEMA)


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["one-process", "two-processes"])
def test_gates_and_mixture_out_of_core_equal_the_in_memory_path(tmp_path: Path, workers: int) -> None:
    pool = refined_pool(700)
    store = Store(str(tmp_path / "data"))
    files = write_partitions(store, pool, parts=4, row_group=61)
    quality = QualityConfig()
    index = BenchmarkIndex.build(DEFAULT_BENCHMARKS, gates.decontam_config(quality))
    recipes = [
        Recipe(name="a", token_budget=9_000, seed=3, category_weights={"stem": 3.0}, shard_rows=40),
        Recipe(name="b", token_budget=10**9, seed=4, grade_weights={"primary": 0.0}),
    ]
    spill = spill_cfg(tmp_path, chunk_rows=50, workers=workers, parallel_min_rows=0)
    run = gates_ooc.run_gates(store, files, quality, index, recipes, spill)
    assert (spill.work_dir / "parts").exists() == (workers > 1)  # the per-file work really ran in processes

    kept, rejects, counts = gates.apply_gates(pool, quality, index, "a")
    assert run.counts == counts and counts["contaminated"] >= 1 and counts["near_duplicate"] > 10
    got = pl.read_parquet(store.rejects_path("qa_mixture", "a")) if not hasattr(store, "read_rejects") else None
    got = store.read_rejects("qa_mixture", "a") if got is None else got
    cols = ["qa_id", "reason", "detail", "record", "partition", "seed_id", "request_hash"]
    assert got.select(cols).sort("qa_id").equals(rejects.select(cols).sort("qa_id"))

    for recipe in recipes:
        out = tmp_path / f"out-{recipe.name}"
        mix = mixture_ooc.build_mixture_streaming(run.pools[recipe.name], recipe, spill, out)
        docs, manifest = build_mixture(kept, recipe)
        assert mix.manifest == manifest
        shards = [pl.read_parquet(out / f) for f in sorted(mix.files) if f.endswith(".parquet")]
        assert pl.concat(shards).equals(docs)
        assert len(shards) == max(1, manifest["shards"])
        lines = [
            json.loads(x) for f in sorted(mix.files) if f.endswith(".jsonl") for x in (out / f).read_text().splitlines()
        ]
        assert [x["doc_id"] for x in lines] == docs["doc_id"].to_list()
    assert 0 < manifest["rows"] < kept.height or recipe.name == "b"


def test_empty_pool_gives_one_empty_shard(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "data"))
    spill = spill_cfg(tmp_path)
    recipe = Recipe(name="a", token_budget=100)
    run = gates_ooc.run_gates(store, [], QualityConfig(), None, [recipe], spill)
    mix = mixture_ooc.build_mixture_streaming(run.pools["a"], recipe, spill, tmp_path / "out")
    _, manifest = build_mixture(pl.DataFrame(schema=REFINED_SCHEMA), recipe)
    assert mix.manifest == manifest and mix.files == ["part-00000.parquet", "part-00000.jsonl"]
    assert run.counts == {"pool": 0, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0}


def test_a_mixture_that_fails_midway_leaves_no_shard_file_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard is written batch by batch, so its files stay open between batches: a failure closes them."""
    pool = refined_pool(300)
    store = Store(str(tmp_path / "data"))
    files = write_partitions(store, pool, parts=2, row_group=61)
    recipe = Recipe(name="a", token_budget=10**9, seed=3, shard_rows=1000)
    spill = spill_cfg(tmp_path, chunk_rows=50)
    run = gates_ooc.run_gates(store, files, QualityConfig(), None, [recipe], spill)
    calls = {"n": 0}
    real_doc_id = mixture_ooc.doc_id

    def failing_doc_id(r: Recipe, qa_id: str) -> str:
        calls["n"] += 1
        if calls["n"] > 120:  # in the third batch of 50, with the shard's files open
            raise RuntimeError("disk full")
        return real_doc_id(r, qa_id)

    monkeypatch.setattr(mixture_ooc, "doc_id", failing_doc_id)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="disk full") as failure:
        mixture_ooc.build_mixture_streaming(run.pools["a"], recipe, spill, out)
    assert (out / "part-00000.parquet").exists()  # it failed with the shard open
    # The traceback (kept, as a caller logging it would) holds the writer: its files must be closed already.
    assert failure.traceback
    fd_dir = Path("/proc/self/fd")
    open_files = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir) if (fd_dir / fd).is_symlink()]
    assert not [f for f in open_files if f.startswith(str(out))]
