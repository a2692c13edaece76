"""A QA partition's check reads it a part file at a time and says exactly what a whole-frame read said."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from boostqa_assets import checks, expectations, partition_checks
from boostqa_assets.configs import TaxonomyConfig, load_config
from boostqa_assets.defs.refined_qa import evaluate_partition
from boostqa_assets.partitions import qa_key
from boostqa_assets.records import REFINED_SCHEMA, SYNTHESIZED_SCHEMA, frame
from boostqa_assets.settings import DEFAULT_CONFIG_DIR
from boostqa_assets.storage import Store
from boostqa_assets_tests.test_expectations import _refined, _synth


@pytest.fixture(scope="module")
def tax() -> TaxonomyConfig:
    t = load_config("taxonomy.yaml", DEFAULT_CONFIG_DIR)
    assert isinstance(t, TaxonomyConfig)
    return t


def _write_parts(store: Store, asset: str, part: dict[str, str], df: pl.DataFrame, seed: int) -> int:
    """``df`` as part files of random sizes (1..150 rows); returns the largest."""
    rng = random.Random(seed)
    largest, start = 0, 0
    with store.partition_writer(asset, part) as writer:
        while start < df.height:
            n = rng.randint(1, 150)
            writer.write(df.slice(start, n))
            largest, start = max(largest, min(n, df.height - start)), start + n
        writer.commit()
    return largest


def _bad_rows(rows: list[dict[str, Any]], tax: TaxonomyConfig, rng: random.Random) -> None:
    """Planted problems: a label outside the taxonomy, an empty question, a duplicate id, a long answer."""
    for i in rng.sample(range(len(rows)), 12):
        kind = rng.choice(["label", "empty", "dup", "long", "grade"])
        if kind == "label":
            rows[i]["difficulty"] = "impossible"
        elif kind == "empty":
            rows[i]["question"] = "  "
        elif kind == "dup":
            rows[i]["qa_id"] = rows[rng.randrange(len(rows))]["qa_id"]
        elif kind == "long":
            rows[i]["answer"] = "x" * rng.randint(5_000, 9_000)
        else:
            rows[i]["grade"] = tax.grades[-1]


def _same(streamed: checks.CheckOutcome, whole: checks.CheckOutcome) -> None:
    a = {k: v for k, v in streamed.metadata.items() if k != "gx_seconds"}
    b = {k: v for k, v in whole.metadata.items() if k != "gx_seconds"}
    assert a == b
    assert streamed.passed == whole.passed


@pytest.mark.parametrize("trial", range(4))
def test_synthesized_check_part_by_part_equals_the_whole_frame(
    trial: int, tax: TaxonomyConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(expectations, "GX_SAMPLE_ROWS", 97)  # the suite sees every k-th row across the parts
    rng = random.Random(trial)
    rows = [_synth(i, tax) for i in range(rng.randint(300, 900))]
    if trial:
        _bad_rows(rows, tax, rng)
    df = frame(rows, SYNTHESIZED_SCHEMA)
    store = Store(str(tmp_path))
    part = {"discipline": rows[0]["discipline"], "grade": tax.grades[0]}
    largest = _write_parts(store, "synthesized_qa", part, df, trial)
    kwargs: dict[str, Any] = {
        "unique_on": "qa_id",
        "equals": part,
        "not_null": ["qa_id", "seed_id", "question", "answer", "synth_request_hash"],
        "allowed": {"track": ["multi_grade", "high_difficulty"], "difficulty": tax.difficulties},
    }
    # Every read is one part: nothing reads the partition whole.
    read = store.read_parquet
    sizes: list[int] = []
    monkeypatch.setattr(store, "read_parquet", lambda *a, **k: sizes.append((r := read(*a, **k)).height) or r)
    monkeypatch.setattr(store, "read_partition", None)
    scan = partition_checks.scan(
        store, "synthesized_qa", part, checks.PartTableChecks(SYNTHESIZED_SCHEMA, **kwargs), tax
    )
    assert sum(sizes) == df.height and max(sizes) == largest < df.height
    _same(scan.rules, checks.table_checks(df, SYNTHESIZED_SCHEMA, **kwargs))
    _same(scan.suite, expectations.validate("synthesized_qa", df, tax))
    assert scan.rules.passed == (trial == 0)


def test_refined_check_part_by_part_equals_the_whole_frame(
    tax: TaxonomyConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(expectations, "GX_SAMPLE_ROWS", 50)
    rows = [_refined(i, tax) for i in range(400)]
    rows[123]["flags"] = ["refusal"]
    rows[321]["qa_id"] = rows[7]["qa_id"]
    df = frame(rows, REFINED_SCHEMA)
    store = Store(str(tmp_path))
    part = {"discipline": rows[0]["discipline"], "grade": rows[0]["grade"]}
    _write_parts(store, "refined_qa", part, df, 1)
    key = qa_key(part["discipline"], part["grade"])
    streamed = evaluate_partition(store, key, ["refusal"])
    # What the check said when it read the partition whole.
    whole = checks.table_checks(
        df,
        REFINED_SCHEMA,
        unique_on="qa_id",
        equals=part,
        not_null=["qa_id", "seed_id", "question", "refined_answer", "refine_request_hash"],
        allowed={"status": ["kept"]},
    )
    assert not whole.passed and whole.metadata["duplicate_qa_id"] == 1
    expected = checks.CheckOutcome.all_of(
        whole, checks.CheckOutcome(True, {"rows_not_sent": 0}), expectations.validate("refined_qa", df, tax)
    )
    _same(streamed, expected)
    # Without the duplicate the flagged row is what fails it, counted over every part.
    rows[321]["qa_id"] = "q_fresh"
    _write_parts(store, "refined_qa", part, frame(rows, REFINED_SCHEMA), 2)
    out = evaluate_partition(store, key, ["refusal"])
    assert not out.passed and out.metadata["kept_rows_with_reject_flags"] == 1


def test_an_empty_partition_passes_and_a_wrong_part_fails_it(tax: TaxonomyConfig, tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    part = {"discipline": tax.discipline_names[0], "grade": tax.grades[0]}
    with store.partition_writer("synthesized_qa", part, SYNTHESIZED_SCHEMA) as writer:
        writer.commit()
    rules = checks.PartTableChecks(SYNTHESIZED_SCHEMA, not_null=["qa_id"], unique_on="qa_id")
    scan = partition_checks.scan(store, "synthesized_qa", part, rules, tax)
    assert scan.rules.passed and scan.suite.passed and scan.suite.metadata["rows"] == 0
    good = frame([_synth(i, tax) for i in range(5)], SYNTHESIZED_SCHEMA)
    with store.partition_writer("synthesized_qa", part) as writer:
        writer.write(good)
        writer.write(good.drop("reasoning").with_columns(pl.col("qa_id") + "b"))
        writer.commit()
    rules = checks.PartTableChecks(SYNTHESIZED_SCHEMA, not_null=["qa_id"], unique_on="qa_id")
    scan = partition_checks.scan(store, "synthesized_qa", part, rules, tax)
    assert not scan.rules.passed and scan.rules.metadata["missing_columns"] == "reasoning"
