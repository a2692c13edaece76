"""Tests for boostqa_assets.logic.dedup: exact and near-duplicate removal, traceability, determinism."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import polars as pl
import pytest

from boostqa_assets.logic.dedup import (
    EXACT,
    NEAR,
    DedupConfig,
    candidate_probability,
    dedup,
    lsh_params,
    shingle_hashes,
    signatures,
)
from boostqa_assets.records import REFINED_SCHEMA, frame

LONG = [
    "Explain why the mitochondria is often called the powerhouse of the cell, and describe the main chemical "
    "process that happens there.",
    "A ball is thrown straight up with an initial speed of 12 metres per second; ignoring air resistance, how "
    "long does it take to return to the thrower's hand?",
    "Describe the causes of the French Revolution and explain how the financial crisis of the monarchy "
    "contributed to the events of 1789.",
    "In a market with perfect competition, what happens to the price and quantity of a good when consumer "
    "income rises and the good is a normal good?",
]

# same topic, clearly different questions: char 5-gram Jaccard 0.55-0.7, below the default threshold 0.8
DIFFERENT_SAME_TOPIC = [
    ("What is the boiling point of water at sea level?", "What is the freezing point of water at sea level?"),
    ("What is the capital city of France?", "What is the capital city of Spain?"),
    ("How many protons does a carbon atom have?", "How many neutrons does a carbon atom have?"),
    ("Who wrote the novel Pride and Prejudice?", "Who wrote the novel Sense and Sensibility?"),
]


def qa_frame(questions: list[str | None], ids: list[str] | None = None, **extra: list[Any]) -> pl.DataFrame:
    ids = ids or [f"q_{i:04d}" for i in range(len(questions))]
    return pl.DataFrame({"qa_id": ids, "question": questions, **extra}, schema_overrides={"question": pl.Utf8})


def outcome(df: pl.DataFrame, cfg: DedupConfig = DedupConfig()) -> dict[str, tuple[bool, str | None, str | None]]:  # noqa: B008
    res = dedup(df, cfg)
    return {q: (k, d, r) for q, k, d, r in zip(df["qa_id"], res.keep, res.duplicate_of, res.reason, strict=True)}


def synthetic(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice("aeioukltrsnmpd") for _ in range(rng.randint(4, 9))) for _ in range(4000)})
    templates = [
        "Explain how {} affects {} and give one everyday example of this effect.",
        "What is the difference between {} and {} when studying {}?",
        "Why does {} increase when {} is heated, and what does that tell us about {}?",
        "Describe the relationship between {}, {} and {} in a short paragraph.",
    ]
    out = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(3)]
        tail = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
        out.append(rng.choice(templates).format(*words) + (f" Consider {tail}." if tail else ""))
    return out


# ------------------------------------------------------------------------------------------------ exact


def test_exact_duplicates_after_normalization_point_at_the_kept_row() -> None:
    base = "What is the speed of light in a vacuum?"
    variants = [
        "WHAT IS THE SPEED OF LIGHT IN A VACUUM?",  # case
        "  What is the   speed of light\nin a vacuum?\t",  # whitespace
        "What is the speed of light in a vacuum\uff1f",  # fullwidth question mark (NFKC)
        "What is the speed of light in a vacuum?",  # verbatim
    ]
    # the kept row is the smallest qa_id, wherever it stands in the input
    ids = ["q_5", "q_2", "q_9", "q_3", "q_1"]
    df = qa_frame([*variants, base], ids=ids)
    res = dedup(df)
    assert res.keep.to_list() == [False, False, False, False, True]
    assert res.duplicate_of.to_list() == ["q_1", "q_1", "q_1", "q_1", None]
    assert res.reason.to_list() == [EXACT] * 4 + [None]
    assert res.similarity.to_list() == [1.0] * 4 + [None]
    assert res.stats["exact_removed"] == 4
    assert res.stats["near_removed"] == 0


def test_exact_only_config_leaves_near_duplicates() -> None:
    df = qa_frame([LONG[0], LONG[0].upper(), LONG[0].replace("describe", "outline")])
    res = dedup(df, DedupConfig(near=False))
    assert res.keep.to_list() == [True, False, True]
    res = dedup(df, DedupConfig(exact=False))
    # without the exact pass the case variant is still a near duplicate (Jaccard 1.0 after normalization)
    assert res.reason.to_list() == [None, NEAR, NEAR]
    assert res.similarity[1] == 1.0


# ------------------------------------------------------------------------------------------------- near


def near_variants(q: str) -> list[str]:
    words = q.split(" ")
    one_word = " ".join([*words[:5], "certainly", *words[6:]])
    punctuation = q.replace(",", "").replace(";", "").replace("'", "")[:-1] + "!"
    appended = q + " Give one example."
    return [one_word, punctuation, appended]


def test_planted_near_duplicates_are_removed_counted_and_traceable() -> None:
    questions, ids, planted = [], [], {}
    for k, q in enumerate(LONG):
        ids.append(f"q_{k}0")
        questions.append(q)
        for v, text in enumerate(near_variants(q), start=1):
            ids.append(f"q_{k}{v}")
            questions.append(text)
            planted[f"q_{k}{v}"] = f"q_{k}0"
    df = qa_frame(questions, ids=ids)
    res = dedup(df)
    out = res.annotate(df)
    removed = out.filter(~pl.col("dedup_keep"))
    assert dict(zip(removed["qa_id"], removed["dedup_duplicate_of"], strict=True)) == planted
    assert set(removed["dedup_reason"]) == {NEAR}
    assert removed["dedup_similarity"].min() >= 0.8
    assert out.filter(pl.col("dedup_keep"))["qa_id"].to_list() == [f"q_{k}0" for k in range(len(LONG))]
    assert res.stats["near_removed"] == len(planted)
    assert res.stats["candidates_checked"] >= len(planted)


@pytest.mark.parametrize("pair", DIFFERENT_SAME_TOPIC)
def test_different_questions_on_the_same_topic_are_kept(pair: tuple[str, str]) -> None:
    res = dedup(qa_frame(list(pair)))
    assert res.keep.to_list() == [True, True]
    assert res.stats["near_removed"] == 0


def test_lower_threshold_removes_more() -> None:
    questions = [q for pair in DIFFERENT_SAME_TOPIC for q in pair]
    strict = dedup(qa_frame(questions))
    loose = dedup(qa_frame(questions), DedupConfig(threshold=0.5))
    assert strict.stats["near_removed"] == 0
    assert loose.stats["near_removed"] >= 3
    assert loose.duplicate_of[1] == "q_0000"  # freezing -> boiling
    assert 0.5 <= loose.similarity[1] < 0.8


def test_removed_rows_are_not_indexed_chain_keeps_the_far_end() -> None:
    # word 1-grams give exact control: J(A,B) = J(B,C) = 9/11 >= 0.8, J(A,C) = 8/12 < 0.8;
    # B is a duplicate of A; C is compared with kept rows only (A), so it stays
    a = [f"w{i}" for i in range(1, 11)]
    b = [*a[:9], "w11"]
    c = [*a[:8], "w11", "w12"]
    df = qa_frame([" ".join(x) for x in (c, a, b)], ids=["q_c", "q_a", "q_b"])
    res = dedup(df, DedupConfig(shingle="word", ngram=1))
    assert res.keep.to_list() == [True, True, False]
    assert res.duplicate_of.to_list() == [None, None, "q_a"]
    assert res.similarity[2] == pytest.approx(9 / 11)


def test_cluster_points_at_its_earliest_row() -> None:
    q = LONG[1]
    vs = near_variants(q)
    df = qa_frame([vs[0], vs[1], q, vs[2]], ids=["q_b", "q_c", "q_a", "q_d"])
    res = dedup(df)
    # the base question (q_a) is first in id order, though third in the input: the variants point at it
    assert res.keep.to_list() == [False, False, True, False]
    assert res.duplicate_of.to_list() == ["q_a", "q_a", None, "q_a"]


def test_estimated_similarity_mode_and_word_shingles() -> None:
    questions, ids = [], []
    for k, q in enumerate(LONG):
        for v, text in enumerate([q, *near_variants(q)]):
            ids.append(f"q_{k}{v}")
            questions.append(text)
    df = qa_frame(questions, ids=ids)
    est = dedup(df, DedupConfig(verify_jaccard=False))
    # the estimate (64 perms, sd ~0.05) may miss a variant at J ~0.82, never a base row
    assert est.keep.filter(df["qa_id"].str.ends_with("0")).all()
    assert est.stats["near_removed"] >= 2 * len(LONG)
    assert est.similarity.drop_nulls().min() >= 0.8
    # word 2-grams with a lower threshold: the appended and punctuation variants are caught
    words = dedup(df, DedupConfig(shingle="word", ngram=2, threshold=0.7))
    assert words.stats["near_removed"] >= 2 * len(LONG)
    assert set(words.reason.drop_nulls()) == {NEAR}


def test_question_plus_answer_text() -> None:
    df = qa_frame([LONG[0], LONG[0]], refined_answer=["ATP is made by oxidative phosphorylation.", "It makes energy."])
    assert dedup(df).keep.to_list() == [True, False]
    assert dedup(df, DedupConfig(text="question+answer")).keep.to_list() == [True, True]


# ------------------------------------------------------------------------------- determinism, chunking


def test_same_result_twice_and_with_the_input_shuffled() -> None:
    base = synthetic(600, seed=11)
    rng = random.Random(5)
    questions = base + [rng.choice(base).upper() for _ in range(40)] + [rng.choice(base) + " Why?" for _ in range(40)]
    df = qa_frame(questions, ids=[f"q_{rng.getrandbits(48):012x}" for _ in questions])
    first = outcome(df)
    assert outcome(df) == first
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=9)
    assert shuffled["qa_id"].to_list() != df["qa_id"].to_list()
    assert outcome(shuffled) == first
    kept = {q for q, (k, _, _) in first.items() if k}
    assert len(kept) < len(questions) - 40  # the exact plants at least


def test_chunking_does_not_change_the_result() -> None:
    base = synthetic(300, seed=4)
    questions = base + [q.replace("and", "as well as") for q in base[:30]] + base[:20] + ["", "ab", "", None]
    df = qa_frame(questions)
    assert outcome(df, DedupConfig(chunk_rows=7)) == outcome(df)


def test_empty_input() -> None:
    res = dedup(pl.DataFrame(schema=REFINED_SCHEMA))
    assert res.keep.len() == res.duplicate_of.len() == res.reason.len() == res.similarity.len() == 0
    assert res.keep.dtype == pl.Boolean and res.duplicate_of.dtype == pl.Utf8
    assert res.stats["rows_in"] == res.stats["rows_kept"] == 0


def test_short_and_empty_texts() -> None:
    df = qa_frame(["", "", "ab", "AB", "abc", None])
    res = dedup(df)
    # "" and None are the same (empty) text; "ab"/"AB" exact; "abc" is its own (single-shingle) text
    assert res.keep.to_list() == [True, False, True, False, True, False]
    assert res.duplicate_of.to_list() == [None, "q_0000", None, "q_0002", None, "q_0000"]


def test_stats_add_up_on_the_refined_schema() -> None:
    questions = [*LONG, LONG[0].lower(), LONG[1] + " Give one example.", *synthetic(50)]
    rows = [
        {
            **{c: "x" for c, t in REFINED_SCHEMA.items() if t == pl.Utf8},
            "flags": [],
            "qa_id": f"q_{i:03d}",
            "question": q,
            "status": "kept",
        }
        for i, q in enumerate(questions)
    ]
    df = frame(rows, REFINED_SCHEMA)
    res = dedup(df)
    s = res.stats
    assert s["rows_in"] == len(questions) == s["rows_kept"] + s["exact_removed"] + s["near_removed"]
    assert s["rows_kept"] == int(res.keep.sum())
    assert s["exact_removed"] == (res.reason == EXACT).sum() == 1
    assert s["near_removed"] == (res.reason == NEAR).sum() >= 1
    assert res.duplicate_of.null_count() == s["rows_kept"]
    assert set(res.duplicate_of.drop_nulls()) <= set(df.filter(res.keep)["qa_id"])


# ---------------------------------------------------------------------------------------- the engine


def test_lsh_params_catch_pairs_at_the_threshold() -> None:
    b, r = lsh_params(0.8, 64)
    assert (b, r) == (10, 6)
    assert candidate_probability(0.8, b, r) >= 0.9
    assert candidate_probability(0.5, b, r) < 0.2
    for t in (0.5, 0.7, 0.9):
        b, r = lsh_params(t, 64)
        assert b * r <= 64 and candidate_probability(t, b, r) >= 0.9
    assert lsh_params(0.8, 64, bands=16) == (16, 4)


def test_signatures_are_stable_and_chunk_independent() -> None:
    # pins the MinHash engine's output: a dependency upgrade that changes signatures (and so which near
    # duplicates are found) fails here instead of silently changing the dataset
    cfg = DedupConfig()
    flat, offsets = shingle_hashes(["what is the speed of light?", "abc", ""], cfg)
    assert offsets.tolist() == [0, 23, 24, 24]
    sig = signatures(flat, offsets, cfg)
    assert sig.shape == (3, 64) and sig.dtype == np.uint32
    assert sig[0, :4].tolist() == GOLDEN_SIG
    assert (sig[2] == 0xFFFFFFFF).all()
    one, off1 = shingle_hashes(["what is the speed of light?"], cfg)
    assert np.array_equal(signatures(one, off1, cfg)[0], sig[0])


GOLDEN_SIG = [353717122, 2993707344, 985051667, 389297111]  # rensa 0.5.0, seed 1, 64 perms


def test_config_and_input_errors() -> None:
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=0.0)
    with pytest.raises(ValueError, match="bands"):
        DedupConfig(bands=65)
    with pytest.raises(ValueError, match="id column"):
        dedup(qa_frame(["a"]), id_col="nope")
    with pytest.raises(ValueError, match="null"):
        dedup(pl.DataFrame({"qa_id": [None, "q"], "question": ["a", "b"]}))


# --------------------------------------------------------------------------------------------- scale


def test_scale_sanity_20k_rows() -> None:
    base = synthetic(19_000, seed=1)
    rng = random.Random(2)
    questions = base + [rng.choice(base).upper() for _ in range(500)]
    questions += [rng.choice(base) + " Explain briefly." for _ in range(500)]
    df = qa_frame(questions, ids=[f"q_{rng.getrandbits(60):015x}" for _ in questions])
    t = time.perf_counter()
    res = dedup(df)
    dt = time.perf_counter() - t
    print(f"dedup of {df.height:,} rows: {dt:.2f} s ({df.height / dt:,.0f} rows/s); stats {res.stats}")
    assert res.stats["exact_removed"] >= 500
    assert res.stats["near_removed"] >= 450
