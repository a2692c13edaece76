"""Tests for a recipe's own tokenizer (``tokenizer:``, a Hugging Face tokenizer.json read with ``tokenizers``):
counts, the mixture's budget and manifest in those tokens, and the configuration that names the file. The
tokenizer is built here with the ``tokenizers`` library: nothing is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from boostqa_assets.configs import ConfigError, Recipe, load_project_config
from boostqa_assets.logic import tokens
from boostqa_assets.logic.mixture import build_mixture, pool_rows, recipe_hash
from boostqa_assets.settings import DEFAULT_CONFIG_DIR
from boostqa_assets_tests.logic.test_mixture import refined_frame


def word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json: one token per word or punctuation mark, easy to count by hand. Saved with
    truncation at 4 tokens, padding and a [CLS] post-processor, which a budget count must all ignore."""
    vocab = {"[UNK]": 0, "[CLS]": 1, "[PAD]": 2, "question": 3, "answer": 4, ":": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 1)])
    tok.enable_truncation(max_length=4)
    tok.enable_padding(pad_id=2, pad_token="[PAD]", length=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    return word_tokenizer(tmp_path / "model" / "tokenizer.json")


def test_counts_in_the_tokenizer_json_without_special_tokens_truncation_or_padding(tokenizer_file: Path) -> None:
    texts = ["Question: why is the sky blue?\nAnswer: Rayleigh scattering.", "", "one"]
    # Whitespace pre-tokenizer: \w+ runs and punctuation runs; 'blue?' is two tokens, '.' one.
    assert tokens.count_with(texts, tokenizer=str(tokenizer_file)) == [13, 0, 1]
    assert tokens.count_with(texts) == tokens.count_with(texts, "o200k_base")  # no tokenizer: tiktoken as before
    assert tokens.count_with(texts[:1]) != [13]


def test_the_mixture_budget_and_manifest_use_the_recipe_tokenizer(tokenizer_file: Path) -> None:
    refined = refined_frame(120)
    recipe = Recipe(name="words", token_budget=600, seed=3, tokenizer=str(tokenizer_file))
    docs, manifest = build_mixture(refined, recipe)
    assert docs.height > 0
    expected = tokens.count_with(docs["text"].to_list(), tokenizer=str(tokenizer_file))
    assert docs["n_tokens"].to_list() == expected
    assert manifest["tokens_total"] == sum(expected) <= 600
    assert manifest["tokenizer"]["library"] == "tokenizers" and len(manifest["tokenizer"]["sha256"]) == 64
    assert manifest["encoding"].startswith(f"tokenizer.json {tokenizer_file} (sha256 ")
    # The same budget in o200k tokens picks a different number of documents: the tokenizer really steers it.
    o200k_docs, o200k = build_mixture(refined, Recipe(name="words", token_budget=600, seed=3))
    assert o200k["tokenizer"] == {"library": "tiktoken", "name": "o200k_base"} and o200k["encoding"] == "o200k_base"
    assert o200k_docs.height != docs.height
    # The out-of-core path (the pool spill the qa_mixture asset samples from) counts the same way.
    pool = pl.from_arrow(pool_rows(refined, recipe))
    assert isinstance(pool, pl.DataFrame)
    by_id = dict(zip(pool["qa_id"], pool["n_tokens"], strict=True))
    assert [by_id[q] for q in docs["qa_id"]] == expected


def test_recipe_hash_follows_the_tokenizer_file_not_its_path(tokenizer_file: Path, tmp_path: Path) -> None:
    base = Recipe(name="r", token_budget=100)
    with_tok = base.model_copy(update={"tokenizer": str(tokenizer_file)})
    moved = shutil.copy(tokenizer_file, tmp_path / "elsewhere.json")
    assert recipe_hash(with_tok) != recipe_hash(base)
    assert recipe_hash(with_tok) == recipe_hash(base.model_copy(update={"tokenizer": str(moved)}))
    tokens.file_sha256.cache_clear()
    word_tokenizer(Path(moved)).write_text(Path(moved).read_text().replace('"question"', '"questions"'))
    assert recipe_hash(base.model_copy(update={"tokenizer": str(moved)})) != recipe_hash(with_tok)


def _config(tmp_path: Path, tokenizer: str) -> Path:
    config = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, config)
    recipes = yaml.safe_load((config / "recipes.yaml").read_text())
    recipes["recipes"][0]["tokenizer"] = tokenizer
    (config / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    return config


def test_config_resolves_a_relative_tokenizer_and_names_a_missing_one(tmp_path: Path) -> None:
    config = _config(tmp_path, "model/tokenizer.json")
    word_tokenizer(config / "model" / "tokenizer.json")
    [recipe] = load_project_config(config).recipes.recipes
    assert recipe.tokenizer == str((config / "model" / "tokenizer.json").resolve())
    (config / "model" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"recipe 'stem_heavy' tokenizer: file .*model/tokenizer.json not found; fix"):
        load_project_config(config)
    with pytest.raises(ConfigError, match="nothing is downloaded at run time"):
        load_project_config(_config(tmp_path / "b", "https://example.invalid/tokenizer.json"))
    with pytest.raises(ConfigError, match="no installed package 'no_such_pkg'"):
        load_project_config(_config(tmp_path / "c", "pkg://no_such_pkg/tokenizer.json"))


def test_pkg_paths_resolve_inside_the_installed_package() -> None:
    path = tokens.resolve_tokenizer("pkg://boostqa_assets/config/recipes.yaml")
    assert path.is_file() and path == DEFAULT_CONFIG_DIR / "recipes.yaml"


def test_an_unreadable_tokenizer_file_says_which_and_how_to_fix(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(tokens.TokenizerError, match=r"cannot be read as a Hugging Face tokenizer.json.*fix"):
        tokens.count_with(["x"], tokenizer=str(bad))
