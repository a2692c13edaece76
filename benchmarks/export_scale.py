"""Benchmark: ``boostqa export`` (``export.export_recipe``) over a generated data root of N mixture documents.

The data root holds N kept QA rows in ``refined_qa`` (20 partitions), their seeds in ``seeds`` and
``annotated_seeds``, some rejects, and a mixture of all N rows written as ``qa_mixture`` writes it (Parquet and
JSONL shards of 100k rows, ``manifest.json``). The export runs in a fresh child process, so its peak RSS is its
own; the figures are the time, documents per second, peak RSS and the size of each config. No asserts.

    .venv/bin/python benchmarks/export_scale.py                 # 10^6 documents
    .venv/bin/python benchmarks/export_scale.py --rows 100000   # a quick look
    .venv/bin/python benchmarks/export_scale.py --memory-limit 256MB   # DuckDB's limit bounds the peak
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from boostqa_assets.configs import Recipe
from boostqa_assets.records import ANNOTATED_SCHEMA, MIXTURE_SCHEMA, REFINED_SCHEMA, SEED_SCHEMA
from boostqa_assets.storage import Store

WORDS = ["force", "energy", "empire", "market", "river", "theorem", "cell", "law", "price", "wave", "atom", "gene"]


def _word(expr: pl.Expr) -> pl.Expr:
    return pl.lit(pl.Series(WORDS)).gather(expr % len(WORDS))


def generate(root: Path, n: int, shard_rows: int = 100_000) -> None:
    store = Store(str(root))
    i = pl.col("i")
    s = pl.col("i").cast(pl.Utf8)
    names = {*REFINED_SCHEMA} - {"check_grade", "check_difficulty", "check_request_hash"}
    refined = (
        pl.DataFrame({"i": pl.int_range(0, n, eager=True)})
        .select(
            ("q_" + s).alias("qa_id"),
            ("s_" + (i // 2).cast(pl.Utf8)).alias("seed_id"),
            pl.when(i // 2 % 3 == 0).then(pl.lit("wiki")).otherwise(pl.lit("fanout")).alias("source"),
            pl.lit(pl.Series(["physics", "history", "economics", "biology"])).gather(i % 4).alias("discipline"),
            pl.lit("stem").alias("category"),
            pl.lit(pl.Series(["primary", "middle", "high", "undergraduate", "graduate"]))
            .gather(i // 4 % 5)
            .alias("grade"),
            pl.lit("medium").alias("difficulty"),
            pl.lit("high").alias("seed_grade"),
            pl.lit("medium").alias("seed_difficulty"),
            pl.lit("multi_grade").alias("track"),
            pl.lit("en").alias("language"),
            pl.concat_str(
                pl.lit("Question "),
                s,
                pl.lit(": how does the "),
                _word(i),
                pl.lit(" relate to the "),
                _word(i * 7),
                pl.lit("?"),
            ).alias("question"),
            pl.lit("draft").alias("answer"),
            pl.lit("").alias("reasoning"),
            ("ah_" + (i // 2).cast(pl.Utf8)).alias("annotate_request_hash"),
            pl.lit("deepseek-reasoner").alias("synth_model"),
            pl.lit("synthesize_multi_grade").alias("synth_prompt_id"),
            pl.lit("v2").alias("synth_prompt_version"),
            ("sh_" + s).alias("synth_request_hash"),
            pl.concat_str(
                pl.lit("It follows from the "),
                _word(i * 3),
                pl.lit(" law, as step "),
                (i % 97).cast(pl.Utf8),
                pl.lit(" shows."),
            ).alias("refined_answer"),
            pl.lit([], dtype=pl.List(pl.Utf8)).alias("flags"),
            pl.lit("kept").alias("status"),
            pl.lit("deepseek-chat").alias("refine_model"),
            pl.lit("refine").alias("refine_prompt_id"),
            pl.lit("v2").alias("refine_prompt_version"),
            ("rh_" + s).alias("refine_request_hash"),
        )
        .with_columns(pl.col("language").alias("seed_language"), pl.col("language").alias("target_language"))
        .select([(pl.col(c) if c in names else pl.lit(None)).cast(t).alias(c) for c, t in REFINED_SCHEMA.items()])
    )
    for (d, g), part in refined.group_by("discipline", "grade"):
        store.write_partition("refined_qa", {"discipline": str(d), "grade": str(g)}, part)
    seeds = refined.group_by("seed_id").agg(pl.col("source").first(), pl.col("annotate_request_hash").first())
    seeds = seeds.with_columns(
        native_id=pl.col("seed_id"),
        kind=pl.lit("qa"),
        language=pl.lit("en"),
        language_confidence=None,
        language_origin=None,
        question=pl.lit("q"),
        answer=pl.lit("a"),
        text=None,
        title=None,
        url=None,
        license=pl.when(pl.col("source") == "wiki").then(pl.lit("CC-BY-SA-4.0")).otherwise(pl.lit("MIT")),
        meta=pl.lit("{}"),
        discipline=pl.lit("physics"),
        category=pl.lit("stem"),
        grade=pl.lit("high"),
        difficulty=pl.lit("medium"),
        annotation_status=pl.lit("ok"),
        annotate_model=pl.lit("deepseek-chat"),
        annotate_prompt_id=pl.lit("annotate"),
        annotate_prompt_version=pl.lit("v1"),
    )
    for (source,), part in seeds.group_by("source"):
        store.write_partition(
            "seeds", {"source": str(source)}, part.select([pl.col(c).cast(t) for c, t in SEED_SCHEMA.items()])
        )
        store.write_partition(
            "annotated_seeds",
            {"source": str(source)},
            part.select([pl.col(c).cast(t) for c, t in ANNOTATED_SCHEMA.items()]),
        )
    recipe = Recipe(name="big", token_budget=10**12, shard_rows=shard_rows)
    docs = refined.select(
        ("d_" + pl.col("qa_id")).alias("doc_id"),
        pl.lit("big").alias("recipe"),
        "qa_id",
        "seed_id",
        "source",
        "discipline",
        "category",
        "grade",
        "track",
        "language",
        ("Question: " + pl.col("question") + "\nAnswer: " + pl.col("refined_answer")).alias("text"),
    ).with_columns(n_tokens=(pl.col("text").str.len_chars() // 4).cast(pl.Int64))
    docs = docs.with_columns(shard=(pl.int_range(0, pl.len()) // shard_rows).cast(pl.Int64)).select(
        list(MIXTURE_SCHEMA)
    )
    folder = root / "qa_mixture" / "recipe=big"
    folder.mkdir(parents=True)
    files = []
    for s in range(docs["shard"].max() + 1):  # type: ignore[operator]
        part = docs.filter(pl.col("shard") == s)
        part.write_parquet(folder / f"part-{s:05d}.parquet", compression="zstd")
        part.write_ndjson(folder / f"part-{s:05d}.jsonl")
        files += [f"part-{s:05d}.parquet", f"part-{s:05d}.jsonl"]
    total = int(docs["n_tokens"].sum())
    manifest = {
        "recipe": recipe.model_dump(),
        "recipe_hash": "bench",
        "sampling_seed": 0,
        "encoding": "o200k_base",
        "token_budget": recipe.token_budget,
        "tokens_total": total,
        "budget_filled": 0.0,
        "rows": n,
        "available_rows": n,
        "shards": len(files) // 2,
        "files": sorted(files),
        "gates": {"pool": n, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


CHILD = """
import json, resource, sys
from boostqa_assets.export import export_recipe
from boostqa_assets.storage import Store
r = export_recipe(Store(sys.argv[1]), "big", sys.argv[2], memory_limit=sys.argv[3])
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sizes = {c.name: [len(c.files), c.download_size, c.num_bytes] for c in r.configs}
print(json.dumps({"rows": r.rows, "seconds": r.seconds, "rss_mb": rss_mb, "sizes": sizes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB's memory limit for the join and sort")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="boostqa-export-bench-") as tmp:
        t0 = time.perf_counter()
        generate(Path(tmp) / "data", args.rows)
        print(f"generated {args.rows:,} documents in {time.perf_counter() - t0:.1f} s")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(Path(tmp) / "data"), str(Path(tmp) / "export"), args.memory_limit],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            print(f"export failed:\n{out.stderr[-3000:]}")
            return
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"export: {res['rows']:,} documents in {res['seconds']:.1f} s "
            f"({res['rows'] / res['seconds']:,.0f} docs/s), peak RSS {res['rss_mb']:.0f} MB"
        )
        for name, (files, disk, arrow) in res["sizes"].items():
            print(f"  {name}: {files} Parquet files, {disk / 1e6:.1f} MB on disk, {arrow / 1e6:.1f} MB in Arrow")
        print(f"  children peak RSS: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
