"""Tests for boostqa_assets.logic.mixture and logic.tokens: budgeted weighted sampling, manifest, shards."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from boostqa_assets.configs import Recipe
from boostqa_assets.logic import tokens
from boostqa_assets.logic.mixture import build_mixture, recipe_hash, row_weights, shard_files
from boostqa_assets.logic.tokens import count_tokens
from boostqa_assets.records import MIXTURE_SCHEMA, REFINED_SCHEMA, frame

DISCIPLINES = {
    "physics": "stem",
    "history": "humanities",
    "economics": "social_science",
    "general_knowledge": "other",
}
GRADES = ["primary", "middle", "high", "undergraduate", "graduate"]
TRACKS = ["multi_grade", "high_difficulty"]
WORDS = ["force", "energy", "empire", "market", "river", "theorem", "cell", "law", "price", "wave"]


def refined_row(i: int, discipline: str, grade: str, track: str, source: str = "src_a") -> dict[str, Any]:
    rng = random.Random(i)
    question = f"Question {i}: what about " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "?"
    answer = "Answer: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "."
    return {
        "qa_id": f"q_{i:04d}",
        "seed_id": f"s_{i // 2:04d}",
        "source": source,
        "discipline": discipline,
        "category": DISCIPLINES[discipline],
        "grade": grade,
        "difficulty": "medium",
        "seed_grade": grade,
        "seed_difficulty": "medium",
        "track": track,
        "language": "en",
        "question": question,
        "answer": "draft " + answer,
        "reasoning": "",
        "annotate_request_hash": "ah",
        "synth_model": "sm",
        "synth_prompt_id": "synthesize_multi_grade",
        "synth_prompt_version": "v1",
        "synth_request_hash": f"sh{i}",
        "refined_answer": answer,
        "flags": [],
        "status": "kept",
        "refine_model": "rm",
        "refine_prompt_id": "refine",
        "refine_prompt_version": "v1",
        "refine_request_hash": f"rh{i}",
    }


def refined_frame(n: int = 300) -> pl.DataFrame:
    names = list(DISCIPLINES)
    rows = [
        refined_row(i, names[i % 4], GRADES[(i // 4) % 5], TRACKS[(i // 20) % 2], source="src_a" if i % 3 else "src_b")
        for i in range(n)
    ]
    return frame(rows, REFINED_SCHEMA)


@pytest.fixture(scope="module")
def refined() -> pl.DataFrame:
    return refined_frame()


def recipe(**kw: Any) -> Recipe:
    base: dict[str, Any] = {"name": "test_mix", "token_budget": 3000, "seed": 17}
    return Recipe.model_validate({**base, **kw})


def total_tokens(df: pl.DataFrame) -> int:
    return int(df["n_tokens"].sum())


# --- budget and order ----------------------------------------------------------------------------------


def test_budget_is_respected_and_filled_greedily_in_key_order(refined: pl.DataFrame) -> None:
    r = recipe(token_budget=3000)
    docs, manifest = build_mixture(refined, r)
    assert docs.schema == MIXTURE_SCHEMA
    assert 0 < total_tokens(docs) <= 3000
    # the chosen docs are a prefix of the full sampled order; the next doc would overflow the budget
    full, _ = build_mixture(refined, recipe(token_budget=10**9))
    assert full.height == refined.height
    k = docs.height
    assert full["qa_id"].head(k).to_list() == docs["qa_id"].to_list()
    assert total_tokens(docs) + full["n_tokens"][k] > 3000
    assert manifest["tokens_total"] == total_tokens(docs)
    assert manifest["rows"] == k
    assert manifest["budget_filled"] == round(total_tokens(docs) / 3000, 4)


def test_everything_fits_under_a_large_budget(refined: pl.DataFrame) -> None:
    docs, manifest = build_mixture(refined, recipe(token_budget=10**9))
    assert docs.height == refined.height
    assert manifest["tokens_total"] == manifest["available_tokens"]
    assert sorted(docs["qa_id"].to_list()) == sorted(refined["qa_id"].to_list())


def test_n_tokens_and_text_follow_the_template(refined: pl.DataFrame) -> None:
    docs, _ = build_mixture(refined, recipe(template="Q: {question}\nA: {answer}"))
    row = docs.row(0, named=True)
    src = refined.filter(pl.col("qa_id") == row["qa_id"]).row(0, named=True)
    assert row["text"] == f"Q: {src['question']}\nA: {src['refined_answer']}"
    assert row["n_tokens"] == count_tokens([row["text"]])[0]
    assert row["doc_id"].startswith("d_") and row["recipe"] == "test_mix"


def test_only_kept_rows_are_sampled(refined: pl.DataFrame) -> None:
    marked = refined.with_columns(
        pl.when(pl.col("qa_id") < "q_0100").then(pl.lit("dropped")).otherwise(pl.col("status")).alias("status")
    )
    docs, manifest = build_mixture(marked, recipe(token_budget=10**9))
    assert docs.height == manifest["available_rows"] == refined.height - 100
    assert min(docs["qa_id"]) >= "q_0100"


def test_deterministic_and_independent_of_input_order(refined: pl.DataFrame) -> None:
    r = recipe()
    a, ma = build_mixture(refined, r)
    b, mb = build_mixture(refined, r)
    assert a.equals(b) and ma == mb
    shuffled = refined.sample(fraction=1.0, shuffle=True, seed=123)
    assert shuffled["qa_id"].to_list() != refined["qa_id"].to_list()
    c, mc = build_mixture(shuffled, r)
    assert a.equals(c) and ma == mc


def test_adding_rows_elsewhere_keeps_the_relative_order(refined: pl.DataFrame) -> None:
    r = recipe(token_budget=10**9)
    full, _ = build_mixture(refined, r)
    part, _ = build_mixture(refined.head(150), r)
    order = [q for q in full["qa_id"].to_list() if q in set(part["qa_id"].to_list())]
    assert order == part["qa_id"].to_list()


def test_the_seed_changes_the_sample(refined: pl.DataFrame) -> None:
    a, _ = build_mixture(refined, recipe(seed=1))
    b, _ = build_mixture(refined, recipe(seed=2))
    assert a["qa_id"].to_list() != b["qa_id"].to_list()
    assert set(a["qa_id"]) != set(b["qa_id"])


def test_higher_weight_gets_a_larger_share(refined: pl.DataFrame) -> None:
    # stem and humanities have the same supply (75 rows each); everything else is excluded
    r = recipe(
        token_budget=2500,
        category_weights={"stem": 10.0, "humanities": 1.0, "social_science": 0.0, "other": 0.0},
    )
    docs, manifest = build_mixture(refined, r)
    by_cat = manifest["tokens_by_category"]
    assert set(docs["category"]) == set(by_cat) <= {"stem", "humanities"}
    supply = refined.group_by("category").len()
    assert dict(supply.iter_rows())["stem"] == dict(supply.iter_rows())["humanities"]
    assert by_cat["stem"] > 4 * by_cat.get("humanities", 0)
    assert by_cat["stem"] / manifest["tokens_total"] > 0.75


def test_weight_zero_excludes(refined: pl.DataFrame) -> None:
    r = recipe(token_budget=10**9, grade_weights={"primary": 0.0}, track_weights={"high_difficulty": 0.0})
    docs, manifest = build_mixture(refined, r)
    assert docs.height > 0
    assert "primary" not in set(docs["grade"]) and "high_difficulty" not in set(docs["track"])
    expected = refined.filter((pl.col("grade") != "primary") & (pl.col("track") != "high_difficulty")).height
    assert docs.height == expected
    assert manifest["available_rows"] == refined.height  # excluded rows are still available supply


def test_row_weights_multiply_and_default_to_one(refined: pl.DataFrame) -> None:
    r = recipe(category_weights={"stem": 3.0}, grade_weights={"graduate": 2.0}, track_weights={"multi_grade": 0.5})
    w = row_weights(refined, r).to_list()
    for row, weight in zip(refined.iter_rows(named=True), w, strict=True):
        expected = (
            (3.0 if row["category"] == "stem" else 1.0)
            * (2.0 if row["grade"] == "graduate" else 1.0)
            * (0.5 if row["track"] == "multi_grade" else 1.0)
        )
        assert weight == pytest.approx(expected)


def test_recipe_without_any_weights_samples_uniformly(refined: pl.DataFrame) -> None:
    r = recipe(token_budget=10**9)
    assert not (r.category_weights or r.grade_weights or r.track_weights)
    assert row_weights(refined, r).to_list() == [1.0] * refined.height
    docs, _ = build_mixture(refined, r)
    assert docs.height == refined.height


def test_empty_input() -> None:
    docs, manifest = build_mixture(frame([], REFINED_SCHEMA), recipe())
    assert docs.height == 0 and docs.schema == MIXTURE_SCHEMA
    assert (manifest["tokens_total"], manifest["rows"], manifest["shards"]) == (0, 0, 0)
    assert manifest["tokens_by_discipline"] == {}
    files = shard_files(docs, manifest)
    assert sorted(files) == ["manifest.json", "part-00000.jsonl", "part-00000.parquet"]


def test_budget_smaller_than_any_doc(refined: pl.DataFrame) -> None:
    docs, manifest = build_mixture(refined, recipe(token_budget=1))
    assert docs.height == 0 and manifest["tokens_total"] == 0


# --- manifest ------------------------------------------------------------------------------------------


def test_manifest_totals_sum_to_tokens_total(refined: pl.DataFrame) -> None:
    docs, manifest = build_mixture(refined, recipe(token_budget=4000))
    total = manifest["tokens_total"]
    assert total == total_tokens(docs) > 0
    for key in (
        "tokens_by_discipline",
        "tokens_by_grade",
        "tokens_by_track",
        "tokens_by_source",
        "tokens_by_category",
    ):
        assert sum(manifest[key].values()) == total, key
    assert set(manifest["tokens_by_source"]) <= {"src_a", "src_b"}
    assert manifest["tokens_by_discipline"] == {
        k: int(v) for k, v in docs.group_by("discipline").agg(pl.col("n_tokens").sum()).sort("discipline").iter_rows()
    }
    assert manifest["available_rows"] == refined.height
    assert manifest["sampling_seed"] == 17 and manifest["encoding"] == "o200k_base"
    json.dumps(manifest)  # JSON-ready


def test_recipe_hash_changes_with_the_recipe() -> None:
    base = recipe()
    assert recipe_hash(base) == recipe_hash(recipe())
    variants = [
        recipe(seed=18),
        recipe(token_budget=3001),
        recipe(category_weights={"stem": 2.0}),
        recipe(template="{question} {answer}"),
        recipe(name="other_mix"),
        recipe(encoding="cl100k_base"),
    ]
    hashes = {recipe_hash(v) for v in variants}
    assert recipe_hash(base) not in hashes and len(hashes) == len(variants)


# --- shards --------------------------------------------------------------------------------------------


def test_shard_files(refined: pl.DataFrame) -> None:
    docs, manifest = build_mixture(refined, recipe(token_budget=2000, shard_rows=7))
    n = docs.height
    n_shards = -(-n // 7)
    assert n_shards >= 3
    assert manifest["shards"] == n_shards
    assert docs["shard"].to_list() == [i // 7 for i in range(n)]
    files = shard_files(docs, manifest)
    names = [f"part-{s:05d}.{ext}" for s in range(n_shards) for ext in ("jsonl", "parquet")]
    assert sorted(files) == sorted([*names, "manifest.json"])
    listed = json.loads(files["manifest.json"])
    assert listed["files"] == sorted(names)
    assert listed["tokens_total"] == manifest["tokens_total"]
    back = pl.concat([pl.read_parquet(io.BytesIO(files[f"part-{s:05d}.parquet"])) for s in range(n_shards)])
    assert back.equals(docs)
    lines = [json.loads(line) for s in range(n_shards) for line in files[f"part-{s:05d}.jsonl"].decode().splitlines()]
    assert [d["doc_id"] for d in lines] == docs["doc_id"].to_list()
    assert all(len(files[f"part-{s:05d}.jsonl"].decode().splitlines()) <= 7 for s in range(n_shards))


# --- tokens --------------------------------------------------------------------------------------------


def test_count_tokens_matches_tiktoken() -> None:
    assert count_tokens(["hello world"]) == [2]
    texts = ["hello world", "Question: What is 2+2?\nAnswer: 4", "", "水在海平面上的沸点", "x" * 1000]
    o200k, cl100k = count_tokens(texts), count_tokens(texts, "cl100k_base")  # seeds both rank files
    enc = tiktoken.get_encoding("o200k_base")
    assert o200k == [len(enc.encode_ordinary(t)) for t in texts]
    cl = tiktoken.get_encoding("cl100k_base")
    assert cl100k == [len(cl.encode_ordinary(t)) for t in texts]
    assert o200k != cl100k
    assert count_tokens([]) == []


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="unknown encoding 'gpt2'"):
        count_tokens(["x"], "gpt2")


@pytest.fixture
def offline_tiktoken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty tiktoken cache, no encodings loaded yet, and any download an error."""
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    tokens.get_encoding.cache_clear()
    yield cache
    tokens.get_encoding.cache_clear()


def test_count_tokens_works_offline_from_the_bundled_files(offline_tiktoken: Path) -> None:
    assert not offline_tiktoken.exists()
    assert count_tokens(["hello world"]) == [2]
    assert count_tokens(["hello world"], "cl100k_base") == [2]
    assert len(list(offline_tiktoken.iterdir())) == 2  # both rank files seeded under tiktoken's cache names


def test_seeding_the_cache_is_safe_across_threads(offline_tiktoken: Path) -> None:
    import threading

    errors: list[BaseException] = []

    def seed() -> None:
        try:
            tokens._seed_cache("o200k_base")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=seed) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [p.name for p in offline_tiktoken.iterdir() if p.name.endswith(".tmp")] == []
    assert count_tokens(["hello world"]) == [2]


def test_offline_with_data_gym_cache_dir(
    offline_tiktoken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gym = tmp_path / "gym"
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(gym))
    assert count_tokens(["hello world"]) == [2]
    assert len(list(gym.iterdir())) == 1  # seeded where tiktoken looks


def test_offline_when_tiktoken_cache_is_disabled(
    offline_tiktoken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an empty TIKTOKEN_CACHE_DIR turns tiktoken's cache off (and so downloads); it must not win over offline
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    assert count_tokens(["hello world"]) == [2]


def test_language_weights_steer_the_token_share_and_the_manifest_reports_it(refined: pl.DataFrame) -> None:
    half_zh = refined.with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("zh")).otherwise(pl.lit("en")).alias("language")
    )
    _, even = build_mixture(half_zh, recipe(token_budget=2000))
    docs, weighted = build_mixture(half_zh, recipe(token_budget=2000, language_weights={"zh": 4.0}))
    assert weighted["language_share"]["zh"] > even["language_share"]["zh"] + 0.15
    assert sum(weighted["tokens_by_language"].values()) == weighted["tokens_total"]
    assert weighted["rows_by_language"] == {
        k: int(v) for k, v in docs.group_by("language").len().sort("language").iter_rows()
    }
    _, none = build_mixture(half_zh, recipe(token_budget=2000, language_weights={"en": 0.0}))
    assert set(none["tokens_by_language"]) == {"zh"}  # weight 0 excludes a language
