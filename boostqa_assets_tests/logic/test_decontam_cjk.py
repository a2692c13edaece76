"""CJK decontamination: character windows, CMMLU and C-Eval layouts, boilerplate stems, measured recall and
false positives on a generated CMMLU-style fixture (``boostqa_assets_tests/cjk_fixture.py``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from boostqa_assets.configs import BenchmarkRef, DecontamSettings
from boostqa_assets.logic.decontam import BenchmarkIndex, DecontamConfig, decontaminate, ngram_words
from boostqa_assets_tests.cjk_fixture import benchmark_items, planted_qa, unrelated_qa, write_ceval, write_cmmlu

ISSUE_ITEM = "下列关于光合作用的说法中，正确的是哪一项？植物在光照下把二氧化碳和水转化为葡萄糖和氧气。"


def _qa(rows: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame({"question": [q for q, _ in rows], "answer": [a for _, a in rows]})


def test_cjk_characters_are_tokens_and_words_stay_words() -> None:
    words = ngram_words(pl.Series(["DNA的结构 is 双螺旋, x2"]))[0].to_list()
    assert words == ["dna", "的", "结", "构", "is", "双", "螺", "旋", "x2"]


def test_the_issue_item_is_caught_where_whitespace_words_never_could(tmp_path: Path) -> None:
    path = tmp_path / "bench.csv"
    row = {
        "": [0],
        "Question": [ISSUE_ITEM],
        "A": ["对"],
        "B": ["错"],
        "C": ["不确定"],
        "D": ["都不对"],
        "Answer": ["A"],
    }
    pl.DataFrame(row).write_csv(path)  # CMMLU's layout: an unnamed index column, Question, A-D, Answer
    index = BenchmarkIndex.build([BenchmarkRef(name="cmmlu", path=str(path), layout="cmmlu")], DecontamConfig())
    match = index.find("请看这道题：" + ISSUE_ITEM + "答案是什么？")
    assert match is not None and (match.benchmark, match.item_id, match.n_words) == ("cmmlu", "1", 20)
    assert match.ngram in ISSUE_ITEM.replace("，", "").replace("？", "")  # CJK characters joined without spaces
    assert index.find("植物的光合作用需要阳光、水和二氧化碳，这是初中生物的基础知识。") is None


@pytest.fixture(scope="module")
def items() -> dict[str, list[dict[str, str]]]:
    return benchmark_items(60)


def test_cmmlu_layout_glob_recall_and_false_positives(tmp_path: Path, items: dict[str, list[dict[str, str]]]) -> None:
    write_cmmlu(tmp_path / "cmmlu" / "test", items)
    ref = BenchmarkRef(name="cmmlu", path="cmmlu/test/*.csv", layout="cmmlu")
    cfg = DecontamConfig()
    index = BenchmarkIndex.build([ref], cfg, config_dir=tmp_path)
    assert index.stats.benchmarks == {"cmmlu": 300}
    planted = planted_qa(items, 60)
    unrelated = unrelated_qa(1000)
    _, matches = decontaminate(_qa([(q, a) for q, a, _ in planted] + unrelated), index, cfg)
    caught = [m for m in matches[: len(planted)] if m is not None]
    assert len(caught) == len(planted)  # recall 100% on copied items
    assert [m.item_id for m in caught] == [item for _, _, item in planted]  # ids `<subject>:<record>`
    false_positives = [m for m in matches[len(planted) :] if m is not None]
    assert false_positives == []  # the same stems and topics, another content: nothing flagged


def test_a_boilerplate_stem_alone_is_not_contamination(tmp_path: Path) -> None:
    rows = {
        "": [0, 1],
        "Question": ["下列关于秦朝统一的叙述，错误的是", "秦始皇统一六国后推行郡县制，下列说法正确的是"],
        "A": ["统一了文字和度量衡制度", "郡县长官由皇帝直接任免"],
        "B": ["修筑了长城以抵御匈奴", "郡县制最早在汉朝出现"],
        "C": ["推行了分封制度到全国", "地方官员可以世袭职位"],
        "D": ["焚书坑儒加强思想控制", "郡县制削弱了中央集权"],
        "Answer": ["C", "A"],
    }
    pl.DataFrame(rows).write_csv(tmp_path / "history.csv")
    index = BenchmarkIndex.build(
        [BenchmarkRef(name="cmmlu", path=str(tmp_path / "history.csv"), layout="cmmlu")], DecontamConfig()
    )
    # A generated question with the same short stem but its own choices: the stem alone does not count.
    assert index.find("下列关于秦朝统一的叙述，错误的是？A. 秦朝只存在了十五年 B. 秦朝定都咸阳") is None
    # The stem with one of the item's own choices is the item.
    copy = index.find("下列关于秦朝统一的叙述，错误的是？A. 推行了分封制度到全国 B. 其他")
    assert copy is not None and copy.item_id == "1"


def test_ceval_layout_uses_its_id_column(tmp_path: Path, items: dict[str, list[dict[str, str]]]) -> None:
    write_ceval(tmp_path / "ceval" / "val", {k: v[:10] for k, v in items.items()})
    ref = BenchmarkRef(name="ceval", path=str(tmp_path / "ceval" / "val" / "*.csv"), layout="ceval")
    assert ref.text_fields == ["question", "A", "B", "C", "D"] and ref.id_field == "id"
    index = BenchmarkIndex.build([ref], DecontamConfig())
    r = items["physics"][3]
    m = index.find(f"{r['Question']}？A. {r['A']} B. {r['B']} C. {r['C']} D. {r['D']}")
    assert m is not None and (m.benchmark, m.item_id) == ("ceval", "physics_val:3")


def test_pipeline_settings_carry_the_cjk_window() -> None:
    settings = DecontamSettings(cjk_n=24, cjk_min_chars=10)
    assert (settings.cjk_n, settings.cjk_min_chars) == (24, 10)
    assert (DecontamConfig().cjk_n, DecontamConfig().cjk_min_chars) == (DecontamSettings().cjk_n, 8)
