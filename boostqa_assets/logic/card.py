"""The dataset card written beside each mixture: what went in, what every filter removed, where it came from."""

from __future__ import annotations

import json
from typing import Any

import polars as pl


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``columns`` (``_none_`` without rows); also the export card's (logic/hf_card.py)."""
    if not rows:
        return "_none_\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _languages(manifest: dict[str, Any], seeds: pl.DataFrame) -> list[dict[str, Any]]:
    """Seeds, mixture documents, tokens and token share per language (seed languages with no QA included)."""
    tokens = manifest.get("tokens_by_language", {})
    rows = manifest.get("rows_by_language", {})
    share = manifest.get("language_share", {})
    by_seed = (
        {str(k): int(v) for k, v in seeds.group_by("language").len().iter_rows()}
        if "language" in seeds.columns and seeds.height
        else {}
    )
    return [
        {
            "language": lang,
            "seeds": by_seed.get(lang, 0),
            "documents": rows.get(lang, 0),
            "tokens": tokens.get(lang, 0),
            "token share": f"{share.get(lang, 0.0):.1%}",
        }
        for lang in sorted({*tokens, *rows, *by_seed})
    ]


def dataset_card(manifest: dict[str, Any], seeds: pl.DataFrame, rejects: pl.DataFrame, refined_rows: int) -> str:
    """Markdown: sources and licences, token counts, every filter with what it removed, the mixture recipe."""
    recipe = manifest["recipe"]
    used = set(manifest.get("tokens_by_source", {}))
    sources = []
    if seeds.height:
        grouped = seeds.group_by("source", "license").len().sort("source")
        for source, license_, n in grouped.iter_rows():
            sources.append(
                {
                    "source": source,
                    "licence": license_,
                    "seeds": n,
                    "tokens in mixture": manifest.get("tokens_by_source", {}).get(source, 0),
                    "in mixture": "yes" if source in used else "no",
                }
            )
    removed = []
    if rejects.height:
        grouped = rejects.group_by("stage", "reason").len().sort(["stage", "len"], descending=[False, True])
        removed = [{"stage": st, "filter / reason": reason, "rows removed": n} for st, reason, n in grouped.iter_rows()]
    tokens = [
        {"dimension": dim, **{"values": ", ".join(f"{k}: {v}" for k, v in manifest[f"tokens_by_{dim}"].items())}}
        for dim in ("language", "track", "grade", "category", "discipline")
        if f"tokens_by_{dim}" in manifest
    ]
    return "\n".join(
        [
            f"# Dataset card: `{recipe['name']}`",
            "",
            "Question-answer documents for LLM mid-training, synthesized from seed corpora (BoostQA method: "
            "annotate, multi-grade and high-difficulty synthesis, refinement, token-budgeted mixture).",
            "",
            "## Summary",
            markdown_table(
                [
                    {
                        "documents": manifest["rows"],
                        "tokens": manifest["tokens_total"],
                        "budget": manifest["token_budget"],
                        "budget filled": f"{manifest['budget_filled']:.1%}",
                        "kept QA available": refined_rows,
                        "tokenizer": manifest["encoding"],
                        "sampling seed": manifest["sampling_seed"],
                        "recipe hash": manifest["recipe_hash"],
                    }
                ],
                [
                    "documents",
                    "tokens",
                    "budget",
                    "budget filled",
                    "kept QA available",
                    "tokenizer",
                    "sampling seed",
                    "recipe hash",
                ],
            ),
            "## Sources and licences",
            markdown_table(sources, ["source", "licence", "seeds", "tokens in mixture", "in mixture"]),
            "Generated text inherits the terms of its seeds and of the models that wrote it.",
            "",
            "## Languages",
            markdown_table(_languages(manifest, seeds), ["language", "seeds", "documents", "tokens", "token share"]),
            "`mixed`: CJK and alphabetic text both substantial; `und`: too little text to tell (README, Languages).",
            "",
            "## Filters: what each removed",
            markdown_table(removed, ["stage", "filter / reason", "rows removed"]),
            "## Tokens by dimension",
            markdown_table(tokens, ["dimension", "values"]),
            "## Recipe",
            "```json",
            json.dumps(recipe, indent=2, sort_keys=True),
            "```",
            "",
        ]
    )
