"""The training mixture of one recipe: seeded, weighted sampling of kept QA up to a token budget.

Rule: each row's weight is ``category_weights[category] * grade_weights[grade] * track_weights[track] *
language_weights[language]`` (a missing key weighs 1.0; weight 0 excludes). Each row draws a key ``-ln(u) /
weight`` with ``u`` from a hash of (recipe seed, qa_id): an exponential race, i.e. weighted sampling without
replacement (Efraimidis-Spirakis). Rows are taken in key order while the running token total stays within the budget.
The hash makes the draw independent of input order and stable when rows are added elsewhere.

Two implementations of the same rule: ``build_mixture`` over a frame (small runs, tests), and ``mixture_ooc``
over a pool spilled chunk by chunk (``pool_rows``: the same text, token count and key per row) and sorted by
DuckDB out of core, which the ``qa_mixture`` asset uses at every size.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any

import polars as pl
import pyarrow as pa

from boostqa_assets.configs import Recipe
from boostqa_assets.logic import tokens
from boostqa_assets.records import MIXTURE_SCHEMA, stable_hash, to_json

# One row of a recipe's pool spill: the MIXTURE_SCHEMA columns known before sampling, plus the sampling key.
POOL_COLUMNS = ["qa_id", "seed_id", "source", "discipline", "category", "grade", "track", "language"]
# Token totals the manifest reports, one ``tokens_by_<label>`` each; languages also get ``rows_by_language``.
LABELS = ("discipline", "grade", "track", "source", "category", "language")
POOL_SCHEMA = pa.schema(
    [
        *(pa.field(c, pa.string()) for c in POOL_COLUMNS),
        pa.field("text", pa.string()),
        pa.field("n_tokens", pa.int64()),
        pa.field("key", pa.float64()),
    ]
)


def recipe_hash(recipe: Recipe) -> str:
    """A short hash of the recipe. A ``tokenizer`` counts by its file's content, not its path (the same file
    elsewhere counts the same); a recipe without one hashes as it did before the field existed."""
    dump = recipe.model_dump(exclude={"tokenizer"})
    if recipe.tokenizer is not None:
        dump["tokenizer_sha256"] = tokens.describe(recipe.encoding, recipe.tokenizer)["sha256"]
    return hashlib.sha256(to_json(dump).encode()).hexdigest()[:16]


def _uniform(seed: int, qa_id: str) -> float:
    h = int(hashlib.sha256(f"{seed}|{qa_id}".encode()).hexdigest()[:13], 16)
    return (h + 0.5) / 16**13


def row_weights(df: pl.DataFrame, recipe: Recipe) -> pl.Series:
    def mapped(col: str, weights: dict[str, float]) -> pl.Expr:
        if not weights:
            return pl.lit(1.0)
        return pl.col(col).replace_strict(weights, default=1.0, return_dtype=pl.Float64)

    # with_columns (not select) broadcasts a literal to every row when the recipe has no weights at all
    return df.with_columns(
        (
            mapped("category", recipe.category_weights)
            * mapped("grade", recipe.grade_weights)
            * mapped("track", recipe.track_weights)
            * mapped("language", recipe.language_weights)
        ).alias("_w")
    )["_w"].alias("w")


def doc_texts(kept: pl.DataFrame, recipe: Recipe) -> list[str]:
    """The training document of each row: the recipe's template over the question and the refined answer."""
    return [
        recipe.template.format(question=q, answer=a)
        for q, a in zip(kept["question"], kept["refined_answer"], strict=True)
    ]


def token_counts(texts: list[str], recipe: Recipe) -> list[int]:
    """Token count per text in the recipe's tokenizer (``tokenizer``, else tiktoken's ``encoding``)."""
    return tokens.count_with(texts, recipe.encoding, recipe.tokenizer)


def sample_keys(kept: pl.DataFrame, recipe: Recipe) -> list[float]:
    """Each row's key of the exponential race (inf for weight 0: never drawn)."""
    weights = row_weights(kept, recipe) if kept.height else pl.Series("w", [], dtype=pl.Float64)
    return [
        (-math.log(_uniform(recipe.seed, q)) / w) if w > 0 else math.inf
        for q, w in zip(kept["qa_id"], weights, strict=True)
    ]


def pool_rows(kept: pl.DataFrame, recipe: Recipe) -> pa.Table:
    """The pool spill rows (``POOL_SCHEMA``) of ``kept`` (rows with status ``kept``) for ``recipe``."""
    texts = doc_texts(kept, recipe)
    columns = [kept[c].cast(pl.Utf8).to_arrow() for c in POOL_COLUMNS]
    columns += [
        pa.array(texts, pa.string()),
        pa.array(token_counts(texts, recipe), pa.int64()),
        pa.array(sample_keys(kept, recipe), pa.float64()),
    ]
    return pa.Table.from_arrays(columns, schema=POOL_SCHEMA)


def doc_id(recipe: Recipe, qa_id: str) -> str:
    return "d_" + stable_hash(recipe.name, qa_id)


def build_mixture(refined: pl.DataFrame, recipe: Recipe) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Documents of the mixture (MIXTURE_SCHEMA, in sampled order) and the manifest."""
    kept = refined.filter(pl.col("status") == "kept")
    texts = doc_texts(kept, recipe)
    n_tokens = token_counts(texts, recipe)
    keys = sample_keys(kept, recipe)
    pool = kept.with_columns(
        pl.Series("text", texts, dtype=pl.Utf8),
        pl.Series("n_tokens", n_tokens, dtype=pl.Int64),
        pl.Series("_key", keys, dtype=pl.Float64),
    )
    pool = pool.filter(pl.col("_key").is_finite()).sort(["_key", "qa_id"])
    pool = pool.with_columns(pl.col("n_tokens").cum_sum().alias("_cum"))
    chosen = pool.filter(pl.col("_cum") <= recipe.token_budget)
    docs = (
        chosen.with_row_index("_i")
        .select(
            pl.col("qa_id").map_elements(lambda q: doc_id(recipe, q), return_dtype=pl.Utf8).alias("doc_id"),
            pl.lit(recipe.name).alias("recipe"),
            "qa_id",
            "seed_id",
            "source",
            "discipline",
            "category",
            "grade",
            "track",
            "language",
            "text",
            "n_tokens",
            (pl.col("_i") // recipe.shard_rows).cast(pl.Int64).alias("shard"),
        )
        .select(list(MIXTURE_SCHEMA))
    )
    manifest = _manifest(docs, recipe, available_rows=kept.height, available_tokens=int(sum(n_tokens)))
    return docs, manifest


def _totals(docs: pl.DataFrame, col: str) -> dict[str, int]:
    if docs.is_empty():
        return {}
    grouped = docs.group_by(col).agg(pl.col("n_tokens").sum()).sort(col)
    return {k: int(v) for k, v in grouped.iter_rows()}


def _manifest(docs: pl.DataFrame, recipe: Recipe, available_rows: int, available_tokens: int) -> dict[str, Any]:
    totals = {f"tokens_by_{c}": _totals(docs, c) for c in LABELS}
    rows_by_language = (
        {k: int(v) for k, v in docs.group_by("language").len().sort("language").iter_rows()} if docs.height else {}
    )
    shards = int(docs["shard"].max()) + 1 if docs.height else 0
    return manifest_of(
        recipe,
        docs.height,
        int(docs["n_tokens"].sum()) if docs.height else 0,
        shards,
        totals,
        (available_rows, available_tokens),
        rows_by_language,
    )


def manifest_of(
    recipe: Recipe,
    rows: int,
    total: int,
    shards: int,
    totals: dict[str, dict[str, int]],
    available: tuple[int, int],
    rows_by_language: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The manifest of a mixture from its figures (both implementations build it here). ``language_share`` is each
    language's share of the mixture's tokens (what ``language_weights`` steer)."""
    available_rows, available_tokens = available
    by_language = totals.get("tokens_by_language", {})
    return {
        "recipe": recipe.model_dump(),
        "recipe_hash": recipe_hash(recipe),
        "sampling_seed": recipe.seed,
        "encoding": tokens.label(recipe.encoding, recipe.tokenizer),  # what counted the tokens, in one line
        "tokenizer": tokens.describe(recipe.encoding, recipe.tokenizer),
        "token_budget": recipe.token_budget,
        "tokens_total": total,
        "budget_filled": round(total / recipe.token_budget, 4),
        "rows": rows,
        "available_rows": available_rows,
        "available_tokens": available_tokens,
        "shards": shards,
        **{f"tokens_by_{c}": totals.get(f"tokens_by_{c}", {}) for c in LABELS},
        "rows_by_language": dict(sorted((rows_by_language or {}).items())),
        "language_share": {k: round(v / total, 4) for k, v in sorted(by_language.items())} if total else {},
    }


def shard_files(docs: pl.DataFrame, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Parquet and JSONL shards plus ``manifest.json`` (which lists them), as name -> bytes."""
    files: dict[str, bytes] = {}
    n_shards = manifest["shards"] or 1
    for shard in range(n_shards):
        part = docs.filter(pl.col("shard") == shard)
        buf = io.BytesIO()
        part.write_parquet(buf, compression="zstd")
        files[f"part-{shard:05d}.parquet"] = buf.getvalue()
        files[f"part-{shard:05d}.jsonl"] = part.write_ndjson().encode("utf-8")
    manifest = {**manifest, "files": sorted(files)}
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    return files
