"""Tests for boostqa_assets.export (``boostqa export RECIPE DIR``): the folder loads with ``datasets`` offline in both
configs, with the pinned types in every shard, the card stands on its own, and the data root may be on S3 (moto).

The data root is made with the store and the mixture code themselves (refined_qa, annotated_seeds, seeds and
rejects partitions; a mixture written by ``build_mixture`` + ``shard_files``, the files qa_mixture commits)."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from boostqa_assets.configs import Recipe
from boostqa_assets.export import MESSAGES_SCHEMA, TEXT_SCHEMA, ExportError, export_recipe
from boostqa_assets.logic.mixture import build_mixture, shard_files
from boostqa_assets.records import ANNOTATED_SCHEMA, REFINED_SCHEMA, REJECT_SCHEMA, SEED_SCHEMA, frame
from boostqa_assets.storage import Store
from boostqa_assets_tests.logic.test_mixture import refined_frame

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loading a local folder must never reach for the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RECIPE = Recipe(name="mix", token_budget=2_500, seed=5, shard_rows=10)
LICENSES = {"src_a": "CC-BY-SA-4.0", "src_b": "Gemma-ToS"}


def refined_rows() -> pl.DataFrame:
    """Kept QA of test_mixture, with one source per seed (as seed ids make it: they hash the source)."""
    refined = refined_frame(120)
    seed_no = pl.col("seed_id").str.slice(2).cast(pl.Int64)
    return refined.with_columns(
        pl.when(seed_no % 3 == 0).then(pl.lit("src_b")).otherwise(pl.lit("src_a")).alias("source")
    )


def _seed_rows(refined: pl.DataFrame, annotated: bool) -> list[dict[str, Any]]:
    rows = []
    for seed_id, source in refined.select("seed_id", "source").unique().sort("seed_id").iter_rows():
        row: dict[str, Any] = {
            "seed_id": seed_id,
            "source": source,
            "native_id": seed_id,
            "kind": "qa",
            "language": "en",
            "question": "q",
            "answer": "a",
            "text": None,
            "title": None,
            "url": None,
            "license": LICENSES[source],
            "meta": "{}",
        }
        if annotated:
            row |= {
                "discipline": "physics",
                "category": "stem",
                "grade": "high",
                "difficulty": "medium",
                "annotation_status": "ok",
                "annotate_model": "annotator-7b",
                "annotate_prompt_id": "annotate",
                "annotate_prompt_version": "v1",
                "annotate_request_hash": "ah",
            }
        rows.append(row)
    return rows


def make_root(store: Store) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A data root with every table the export reads; returns the mixture's documents and manifest."""
    refined = refined_rows()
    for (discipline, grade), part in refined.group_by("discipline", "grade"):
        store.write_partition("refined_qa", {"discipline": str(discipline), "grade": str(grade)}, part)
    for source in LICENSES:
        seeds = frame([r for r in _seed_rows(refined, False) if r["source"] == source], SEED_SCHEMA)
        store.write_partition("seeds", {"source": source}, seeds)
        ann = frame([r for r in _seed_rows(refined, True) if r["source"] == source], ANNOTATED_SCHEMA)
        store.write_partition("annotated_seeds", {"source": source}, ann)
    rejects = [
        {
            "stage": "refined_qa",
            "partition": "physics|high",
            "source": "src_a",
            "seed_id": "s",
            "qa_id": f"x{i}",
            "reason": reason,
            "detail": "",
            "raw_output": None,
            "request_hash": None,
            "record": "{}",
        }
        for i, reason in enumerate(["fewshot_echo", "fewshot_echo", "refusal"])
    ]
    store.write_rejects("refined_qa", "physics|high", frame(rejects, REJECT_SCHEMA))
    docs, manifest = build_mixture(refined, RECIPE)
    manifest["gates"] = {"pool": 120, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0}
    store.write_directory("qa_mixture", {"recipe": RECIPE.name}, shard_files(docs, manifest))
    return docs, manifest


@pytest.fixture
def local_root(tmp_path: Path) -> tuple[Store, pl.DataFrame, dict[str, Any]]:
    store = Store(str(tmp_path / "data"))
    docs, manifest = make_root(store)
    return store, docs, manifest


def test_export_loads_with_datasets_in_both_configs(local_root: Any, tmp_path: Path) -> None:
    import datasets

    store, docs, manifest = local_root
    assert docs.height > 20 and manifest["shards"] > 2  # several mixture shards, several export shards
    out = tmp_path / "export"
    result = export_recipe(store, RECIPE.name, out, batch_rows=7)  # batches that straddle shard boundaries
    assert result.rows == docs.height and result.tokens == manifest["tokens_total"]

    text = datasets.load_dataset(str(out), "text", split="train")
    chat = datasets.load_dataset(str(out), "messages", split="train")
    assert text.num_rows == chat.num_rows == docs.height
    assert text.features == datasets.Features.from_arrow_schema(TEXT_SCHEMA)
    assert chat.features == datasets.Features.from_arrow_schema(MESSAGES_SCHEMA)
    assert text["doc_id"] == chat["doc_id"] == docs["doc_id"].to_list()  # the mixture's sampled order, both configs
    assert text["text"] == docs["text"].to_list() and text["n_tokens"] == docs["n_tokens"].to_list()

    refined = refined_rows()
    by_qa = {r["qa_id"]: r for r in refined.to_dicts()}
    for row in chat.select(range(0, chat.num_rows, 5)):
        src = by_qa[row["qa_id"]]
        assert row["messages"] == [
            {"role": "user", "content": src["question"]},
            {"role": "assistant", "content": src["refined_answer"]},
        ]
        assert (row["synth_model"], row["refine_model"], row["annotate_model"]) == ("sm", "rm", "annotator-7b")
        assert (row["refine_prompt_id"], row["refine_prompt_version"]) == ("refine", "v1")
        assert row["refine_request_hash"] == src["refine_request_hash"] and row["license"] == LICENSES[src["source"]]

    # One pinned schema in every shard of a config (string, never large_string), the one the card declares.
    for config, schema in (("text", TEXT_SCHEMA), ("messages", MESSAGES_SCHEMA)):
        files = sorted((out / config).glob("train-*.parquet"))
        n = math.ceil(docs.height / RECIPE.shard_rows)  # the recipe's shard size by default
        assert n > 2 and len(files) == n and files[0].name == f"train-00000-of-{n:05d}.parquet"
        assert all(pq.read_schema(f).remove_metadata().equals(schema) for f in files)
    assert not list(tmp_path.glob(".export.*")), "no staging folder left beside the export"


def test_the_card_stands_on_its_own(local_root: Any, tmp_path: Path) -> None:
    import datasets
    from huggingface_hub import DatasetCard

    store, docs, manifest = local_root
    out = tmp_path / "export"
    export_recipe(store, RECIPE.name, out)
    readme = (out / "README.md").read_text(encoding="utf-8")
    _, header, body = readme.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["license"] == ["cc-by-sa-4.0", "other"] and meta["language"] == ["en"]
    assert meta["size_categories"] == ["n<1K"] and "question-answering" in meta["task_categories"]
    assert meta["pretty_name"] == "BoostQA mixture: mix"
    assert [c["config_name"] for c in meta["configs"]] == ["text", "messages"] and meta["configs"][0]["default"]
    info = {i["config_name"]: i for i in meta["dataset_info"]}
    assert info["messages"]["splits"][0]["num_examples"] == docs.height
    assert datasets.Features._from_yaml_list(info["messages"]["features"]) == datasets.Features.from_arrow_schema(
        MESSAGES_SCHEMA
    )
    card = DatasetCard.load(out / "README.md")  # the Hub's own parser
    assert card.data.to_dict()["license"] == ["cc-by-sa-4.0", "other"]
    assert datasets.get_dataset_config_names(str(out)) == ["text", "messages"]  # configs read from the card alone
    builder = datasets.load_dataset_builder(str(out), "messages")
    assert builder.info.features == datasets.Features.from_arrow_schema(MESSAGES_SCHEMA)

    # The body: every model and prompt version, sources with licences, filters with counts, budget, tokenizer.
    for needle in (
        "| annotate | annotator-7b | annotate | v1 |",
        "| synth | sm | synthesize_multi_grade | v1 |",
        "| refine | rm | refine | v1 |",
        "| src_b | Gemma-ToS | other |",
        "| refined_qa | fewshot_echo | 2 |",
        "| refined_qa | refusal | 1 |",
        f"{manifest['budget_filled']:.1%}",
        "o200k_base",
        "Licences without a Hub id (`other` above): Gemma-ToS.",
        "contaminated: 0",
    ):
        assert needle in body, needle
    marker = json.loads((out / ".boostqa-export.json").read_text())
    assert marker["rows"] == docs.height and marker["recipe_hash"] == manifest["recipe_hash"]


def test_export_refuses_what_it_cannot_make(local_root: Any, tmp_path: Path) -> None:
    store, docs, _ = local_root
    with pytest.raises(ExportError, match=r"no mixture of recipe 'nope' .*mixtures here: mix.*materialize"):
        export_recipe(store, "nope", tmp_path / "x")
    with pytest.raises(ExportError, match="is inside the data root"):
        export_recipe(store, RECIPE.name, Path(store.root) / "export")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not a boostqa export"):
        export_recipe(store, RECIPE.name, busy)
    assert (busy / "notes.txt").exists()
    # An earlier export is replaced whole.
    out = tmp_path / "export"
    export_recipe(store, RECIPE.name, out, shard_rows=1000)
    assert [p.name for p in (out / "text").iterdir()] == ["train-00000-of-00001.parquet"]
    export_recipe(store, RECIPE.name, out, shard_rows=20)
    assert sorted(p.name for p in (out / "text").iterdir()) == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    # A QA refined again after the mixture was built: the chat form would not match the text any more.
    qa_id = docs["qa_id"][3]
    refined = refined_rows()
    row = refined.filter(pl.col("qa_id") == qa_id)
    part = {"discipline": row["discipline"][0], "grade": row["grade"][0]}
    changed = store.read_partition("refined_qa", part, REFINED_SCHEMA).with_columns(
        pl.when(pl.col("qa_id") == qa_id)
        .then(pl.lit("A new answer."))
        .otherwise("refined_answer")
        .alias("refined_answer")
    )
    store.write_partition("refined_qa", part, changed)
    with pytest.raises(ExportError, match=rf"document 4 of the mixture \(qa_id {qa_id}\) is not the recipe's template"):
        export_recipe(store, RECIPE.name, tmp_path / "stale")
    assert not (tmp_path / "stale").exists() and not list(tmp_path.glob(".stale.*"))


@pytest.mark.s3
def test_export_from_an_s3_data_root(moto_endpoint: str, local_root: Any, tmp_path: Path) -> None:
    import datasets

    bucket = f"boostqa-export-{uuid.uuid4().hex[:8]}"
    store = Store(f"s3://{bucket}/data", {"endpoint_url": moto_endpoint})
    store.fs.mkdir(bucket)
    docs, _ = make_root(store)
    result = export_recipe(store, RECIPE.name, tmp_path / "from_s3")
    local_store, _, _ = local_root
    export_recipe(local_store, RECIPE.name, tmp_path / "from_local")
    assert result.rows == docs.height
    for config in ("text", "messages"):
        s3 = datasets.load_dataset(str(tmp_path / "from_s3"), config, split="train")
        local = datasets.load_dataset(str(tmp_path / "from_local"), config, split="train")
        assert s3.to_list() == local.to_list()
    assert (tmp_path / "from_s3" / "README.md").read_text() == (tmp_path / "from_local" / "README.md").read_text()


def test_boostqa_export_command(
    local_root: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from boostqa_assets.cli import main

    store, docs, _ = local_root
    monkeypatch.setenv("BOOSTQA_DATA_ROOT", store.root)
    monkeypatch.setenv("BOOSTQA_HOME", str(tmp_path / "home"))
    assert main(["export", RECIPE.name, str(tmp_path / "cli"), "--shard-rows", "1000"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'cli'}: {docs.height} documents" in out and "messages: 1 Parquet files" in out
    assert main(["export", "nope", str(tmp_path / "cli2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("boostqa export: no mixture of recipe 'nope'")


def test_an_empty_mixture_is_not_exported(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "data"))
    docs, manifest = build_mixture(refined_rows().head(0), RECIPE)
    store.write_directory("qa_mixture", {"recipe": RECIPE.name}, shard_files(docs, manifest))
    with pytest.raises(ExportError, match="has no documents"):  # datasets cannot load a split without rows
        export_recipe(store, RECIPE.name, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
