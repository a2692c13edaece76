"""The ``README.md`` of a training export (``boostqa export``): a Hugging Face dataset card.

The YAML header is what the Hub and ``datasets`` read: ``license`` (Hub licence ids of the sources in the export),
``language``, ``size_categories``, ``task_categories``, ``pretty_name``, ``configs`` (the data files of each
config and split, so ``load_dataset(DIR, "messages")`` needs nothing else) and ``dataset_info`` (each config's
features, derived from the pinned Arrow schema, with row and byte counts). The body says what a row is, which
models and prompt versions wrote the rows, every source and licence, and what every filter removed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import yaml

from boostqa_assets.logic.card import markdown_table

# Licence ids the Hub knows (its licence list), for sources configured with an SPDX-like name.
HUB_LICENSES = {
    "apache-2.0",
    "mit",
    "bsd-2-clause",
    "bsd-3-clause",
    "cc0-1.0",
    "cc-by-2.0",
    "cc-by-3.0",
    "cc-by-4.0",
    "cc-by-sa-3.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0",
    "gpl-3.0",
    "lgpl-3.0",
    "agpl-3.0",
    "odc-by",
    "odbl",
    "pddl",
    "unlicense",
    "openrail",
    "gemma",
    "llama3",
    "unknown",
}
STEPS = ("annotate", "synth", "refine")  # the LLM steps whose lineage every row carries
# Hub size buckets: (upper bound exclusive, label).
_SIZES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
]


def hub_license(name: str | None) -> str:
    """A source's configured licence as a Hub licence id (``other`` when the Hub has no id for it)."""
    key = (name or "unknown").strip().lower().replace(" ", "-").replace("_", "-")
    return key if key in HUB_LICENSES else "other"


def size_category(rows: int) -> str:
    return next((label for bound, label in _SIZES if rows < bound), "n>10B")


def features_yaml(schema: pa.Schema) -> list[dict[str, Any]]:
    """``dataset_info.features`` of an Arrow schema, as ``datasets`` writes them (``Features._to_yaml_list``)."""

    def one(name: str, typ: pa.DataType) -> dict[str, Any]:
        if pa.types.is_list(typ) or pa.types.is_large_list(typ):
            inner = typ.value_type
            if pa.types.is_struct(inner):
                return {"name": name, "list": [one(f.name, f.type) for f in inner]}
            return {"name": name, "list": one("", inner)["dtype"]}
        if pa.types.is_struct(typ):
            return {"name": name, "struct": [one(f.name, f.type) for f in typ]}
        dtype = {pa.string(): "string", pa.large_string(): "large_string"}.get(typ, str(typ))
        return {"name": name, "dtype": dtype}

    return [one(f.name, f.type) for f in schema]


@dataclass
class ConfigFiles:
    """One config of the export: its name, what a row is, its schema, its files and figures."""

    name: str
    description: str
    schema: pa.Schema
    pattern: str  # data_files glob, relative to the export folder
    files: list[str] = field(default_factory=list)
    rows: int = 0
    num_bytes: int = 0  # Arrow (in-memory) bytes, as datasets reports dataset_size
    download_size: int = 0  # Parquet bytes on disk


@dataclass
class ExportStats:
    """What the export counted while streaming the rows."""

    rows: int = 0
    tokens: int = 0
    # (step, model, prompt_id, prompt_version) -> documents
    models: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    # (source, licence) -> documents, tokens
    sources: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    languages: dict[str, list[int]] = field(default_factory=dict)  # language -> documents, tokens
    annotation_changed: int = 0  # rows whose seed was re-annotated since they were synthesized


def _header(
    recipe: str, stats: ExportStats, configs: list[ConfigFiles], languages: list[str], licenses: list[str]
) -> dict[str, Any]:
    return {
        "pretty_name": f"BoostQA mixture: {recipe}",
        "license": licenses if len(licenses) != 1 else licenses[0],
        "language": languages,
        "size_categories": [size_category(stats.rows)],
        "task_categories": ["question-answering", "text-generation"],
        "tags": ["synthetic", "boostqa", "mid-training"],
        "configs": [
            {
                "config_name": c.name,
                "data_files": [{"split": "train", "path": c.pattern}],
                **({"default": True} if i == 0 else {}),
            }
            for i, c in enumerate(configs)
        ],
        "dataset_info": [
            {
                "config_name": c.name,
                "features": features_yaml(c.schema),
                "splits": [{"name": "train", "num_bytes": c.num_bytes, "num_examples": c.rows}],
                "download_size": c.download_size,
                "dataset_size": c.num_bytes,
            }
            for c in configs
        ],
    }


def _models_table(stats: ExportStats) -> str:
    rows = [
        {"step": step, "model": model, "prompt id": pid, "prompt version": version, "documents": n}
        for (step, model, pid, version), n in sorted(stats.models.items(), key=lambda kv: (STEPS.index(kv[0][0]), kv))
    ]
    return markdown_table(rows, ["step", "model", "prompt id", "prompt version", "documents"])


def _removed_table(rejects: list[tuple[str, str, int]], gates: dict[str, int]) -> str:
    rows = [{"stage": st, "filter / reason": reason, "rows removed": n} for st, reason, n in rejects]
    table = markdown_table(rows, ["stage", "filter / reason", "rows removed"])
    gate_line = ", ".join(f"{k}: {v}" for k, v in sorted(gates.items()) if k != "pool")
    pool = gates.get("pool")
    return table + (f"\nGates before the mixture, over {pool} refined rows: {gate_line}.\n" if gates else "")


def dataset_card(
    manifest: dict[str, Any],
    stats: ExportStats,
    configs: list[ConfigFiles],
    rejects: list[tuple[str, str, int]],
    seeds: dict[tuple[str, str], int],
) -> str:
    """The README.md of an export. ``manifest``: the mixture's ``manifest.json``; ``rejects``: (stage, reason,
    rows) over every rejects partition; ``seeds``: (source, licence) -> seeds read."""
    recipe = manifest["recipe"]["name"]
    licence_of = {src: lic for (src, lic) in stats.sources}
    licenses = sorted({hub_license(lic) for lic in licence_of.values()}) or ["unknown"]
    languages = sorted(lang for lang in stats.languages if re.fullmatch(r"[a-z]{2,3}", lang))
    header = yaml.safe_dump(_header(recipe, stats, configs, languages, licenses), sort_keys=False, allow_unicode=True)
    sources = [
        {
            "source": src,
            "licence": lic,
            "Hub licence": hub_license(lic),
            "seeds": seeds.get((src, lic), 0),
            "documents": docs,
            "tokens": tokens,
        }
        for (src, lic), (docs, tokens) in sorted(stats.sources.items())
    ]
    langs = [
        {"language": lang, "documents": d, "tokens": t, "token share": f"{t / max(stats.tokens, 1):.1%}"}
        for lang, (d, t) in sorted(stats.languages.items())
    ]
    config_rows = [
        {"config": f"`{c.name}`", "a row is": c.description, "rows": c.rows, "files": len(c.files)} for c in configs
    ]
    dims = [
        {"dimension": dim, "tokens": ", ".join(f"{k}: {v}" for k, v in manifest[f"tokens_by_{dim}"].items())}
        for dim in ("track", "grade", "category", "discipline")
        if manifest.get(f"tokens_by_{dim}")
    ]
    summary = {
        "documents": stats.rows,
        "tokens": stats.tokens,
        "token budget": manifest["token_budget"],
        "budget filled": f"{manifest['budget_filled']:.1%}",
        "kept QA available": manifest.get("available_rows", ""),
        "tokenizer": manifest["encoding"],
        "sampling seed": manifest["sampling_seed"],
        "recipe hash": manifest["recipe_hash"],
    }
    other = sorted({lic for lic in licence_of.values() if hub_license(lic) == "other"})
    notes = []
    if other:
        notes.append(f"Licences without a Hub id (`other` above): {', '.join(other)}.")
    if stats.annotation_changed:
        notes.append(
            f"{stats.annotation_changed} documents' seeds were annotated again after synthesis: their `annotate_*` "
            "model and prompt are the current annotation's; `annotate_request_hash` is the one that shaped the row."
        )
    body = [
        f"# BoostQA mixture: `{recipe}`",
        "",
        "Question-answer documents for LLM mid-training, synthesized from seed corpora after the BoostQA method "
        "(annotate seeds by discipline and grade, multi-grade and high-difficulty synthesis with a reasoning model, "
        "answer refinement with a second model, quality gates, a token-budgeted weighted mixture). Every row keeps its "
        "lineage: the seed, and the model, prompt version and request hash of each LLM step.",
        "",
        "## Configs",
        markdown_table(config_rows, ["config", "a row is", "rows", "files"]),
        "```python",
        "from datasets import load_dataset",
        "",
        'docs = load_dataset("path/to/this/folder", "text", split="train")  # or the Hub id',
        'chat = load_dataset("path/to/this/folder", "messages", split="train")',
        "```",
        "",
        "Both configs carry the same lineage columns beside the text: `doc_id`, `qa_id`, `seed_id`, `source`, "
        "`license` (the seed's), `recipe`, `discipline`, `category`, `grade`, `difficulty`, `track`, `language`, "
        "`n_tokens` (the document's tokens in the recipe's tokenizer) and, per LLM step (`annotate`, `synth`, "
        "`refine`), `<step>_model`, `<step>_prompt_id`, `<step>_prompt_version`, `<step>_request_hash`. Rows are in "
        "the mixture's sampled order, the same in both configs.",
        "",
        "## Summary",
        markdown_table([summary], list(summary)),
        "## Models and prompts",
        _models_table(stats),
        "## Sources and licences",
        markdown_table(sources, ["source", "licence", "Hub licence", "seeds", "documents", "tokens"]),
        "Generated text inherits the terms of its seeds and of the models that wrote it (above).",
        "",
        "## Languages",
        markdown_table(langs, ["language", "documents", "tokens", "token share"]),
        "`mixed`: CJK and alphabetic text both substantial; `und`: too little text to tell.",
        "",
        "## Filters: what each removed",
        _removed_table(rejects, manifest.get("gates", {})),
        "## Tokens by dimension",
        markdown_table(dims, ["dimension", "tokens"]),
        "## Recipe",
        "```json",
        json.dumps(manifest["recipe"], indent=2, sort_keys=True, ensure_ascii=False),
        "```",
        "",
        *[f"{n}\n" for n in notes],
    ]
    return "---\n" + header + "---\n\n" + "\n".join(body)
