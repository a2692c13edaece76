"""Bilingual end to end, in process against the fake LLM server: a Chinese source without `language:` is
detected, makes Chinese QA that reaches the mixture, a copied CMMLU item is caught; a model that answers in English
has its rows rejected as language_mismatch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from boostqa_assets.definitions import build_definitions
from boostqa_assets.inspect import connect
from boostqa_assets.runner import run_pipeline, run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer, FaultConfig
from boostqa_assets_tests.conftest import english_only_responder, pipeline_responder, write_project

CMMLU_ITEM = "下列关于光合作用的说法中，正确的是哪一项？植物在光照下把二氧化碳和水转化为葡萄糖和氧气。"
ZH_ROWS = [
    {
        "id": "z1",
        "question": "一个长方形的长是8厘米，宽是5厘米，它的三角形对角线把它分成什么？",
        "answer": "两个全等的三角形。",
    },
    {"id": "z2", "question": "植物细胞和动物细胞相比，特有的结构有哪些？", "answer": "细胞壁、叶绿体和液泡。"},
    # A seed that carries a benchmark item: the QA made from it copies the item, and decontamination must catch it.
    {"id": "z3", "question": CMMLU_ITEM, "answer": "光合作用需要光照，产物是葡萄糖和氧气。"},
]


def _chinese_project(root: Path, base_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    env = write_project(root, base_url, all_disciplines=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    os.makedirs(root / "dagster_home", exist_ok=True)
    config = Path(env["BOOSTQA_CONFIG_DIR"])
    src = root / "sources" / "zh.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ZH_ROWS), encoding="utf-8")
    fields = {"id": "id", "question": "question", "answer": "answer"}
    sources = {"sources": [{"name": "zh_src", "path": str(src), "kind": "qa", "fields": fields}]}  # no language:
    (config / "sources.yaml").write_text(yaml.safe_dump(sources, allow_unicode=True), encoding="utf-8")
    bench = root / "cmmlu" / "test"
    bench.mkdir(parents=True)
    pl.DataFrame(
        {
            "": [0],
            "Question": [CMMLU_ITEM],
            "A": ["需要光照"],
            "B": ["不需要水"],
            "C": ["只在夜间"],
            "D": ["以上都不对"],
        }
        | {"Answer": ["A"]}
    ).write_csv(bench / "biology.csv")
    pipeline = yaml.safe_load((config / "pipeline.yaml").read_text())
    pipeline["probe"] = {"enabled": False}
    pipeline["quality"] = {
        "decontamination": {"benchmarks": [{"name": "cmmlu", "path": str(bench / "*.csv"), "layout": "cmmlu"}]}
    }
    (config / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, allow_unicode=True), encoding="utf-8")
    return config


def _store() -> Store:
    s = get_settings()
    return Store(s.data_root, s.storage_options)


@pytest.mark.slow
def test_chinese_source_makes_chinese_qa_and_a_copied_cmmlu_item_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAIServer(FaultConfig(), responder=pipeline_responder) as fake:
        _chinese_project(tmp_path, fake.base_url, monkeypatch)
        results = run_pipeline(build_definitions(), dg.DagsterInstance.ephemeral())
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]
    con = connect(_store())
    seeds = con.sql("SELECT DISTINCT language, language_origin FROM seeds").fetchall()
    assert seeds == [("zh", "detected")]
    synth = con.sql("SELECT DISTINCT language, seed_language, target_language FROM synthesized_qa").fetchall()
    assert synth == [("zh", "zh", "zh")]
    assert con.sql("SELECT count(*) FROM rejects WHERE reason = 'language_mismatch'").fetchall()[0][0] == 0
    # The QA made from the seed carrying the CMMLU item copies it: rejected at the mixture, naming item and span.
    contaminated = con.sql(
        "SELECT seed_id, detail FROM rejects WHERE stage = 'qa_mixture' AND reason = 'contaminated'"
    ).fetchall()
    assert contaminated and all("with cmmlu item 1 (Question)" in d for _, d in contaminated)
    assert len({seed for seed, _ in contaminated}) == 1  # every QA of the seed that carried the item, no other
    docs = con.sql("SELECT DISTINCT language FROM qa_mixture").fetchall()
    assert docs == [("zh",)]
    mixture = next(r for r in results if r.asset == "qa_mixture").metadata
    assert set(mixture["tokens_by_language"]) == {"zh"} and mixture["language_share"] == {"zh": 1.0}
    cov = con.sql("SELECT DISTINCT language FROM coverage_by_language").fetchall()
    assert cov == [("zh",)]
    by_cell = con.sql("SELECT mixture_tokens_by_language FROM coverage WHERE mixture_docs > 0").fetchall()
    assert by_cell and all(v.startswith("zh: ") for (v,) in by_cell)
    refined = next(r for r in results if r.asset == "refined_qa").partition_metadata.values()
    assert any("| zh |" in m["language_fidelity"] for m in refined)  # each partition's own table


@pytest.mark.slow
def test_english_answers_to_chinese_seeds_are_language_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAIServer(FaultConfig(), responder=english_only_responder) as fake:
        _chinese_project(tmp_path, fake.base_url, monkeypatch)
        defs, instance = build_definitions(), dg.DagsterInstance.ephemeral()
        for stage in ("seeds", "annotated_seeds", "deficiency_probe", "synthesis_plan", "synthesized_qa"):
            result = run_stage(defs, stage, instance)
            assert result.success, stage
    con = connect(_store())
    assert con.sql("SELECT count(*) FROM synthesized_qa").fetchall()[0][0] == 0
    rejected = con.sql(
        "SELECT count(*), min(detail) FROM rejects WHERE stage = 'synthesized_qa' AND reason = 'language_mismatch'"
    ).fetchall()[0]
    assert rejected[0] > 0 and "is en" in rejected[1] and "target zh" in rejected[1]
    tables = [m["language_fidelity"] for m in result.partition_metadata.values()]
    assert any("| zh |" in t and "1.0 |" in t for t in tables)  # each partition's own table
