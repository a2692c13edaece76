"""Planted problems, end to end: exact and near duplicates, MMLU questions (verbatim and edited), refusals and
truncated answers are all removed before the mixture, counted, and traceable to their seed and LLM calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from boostqa_assets.definitions import build_definitions
from boostqa_assets.inspect import connect
from boostqa_assets.runner import run_pipeline
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer

pytestmark = pytest.mark.small_taxonomy  # not about the taxonomy: 45 QA partitions, not 110

MMLU_920 = (
    'Who said "Globalization is not something we can hold off or turn off. It is the economic equivalent of a '
    'force of nature-like wind or water"?'
)
PLANTED = [
    {"id": "base", "q": "A force of 10 N acts on a 2 kg mass resting on ice. What is its acceleration?", "a": "5"},
    # Same first words as `base`: the fake synthesizer writes the same questions -> exact duplicates.
    {"id": "exact", "q": "A force of 10 N acts on a 2 kg mass standing on a table. Find its acceleration.", "a": "5"},
    # One character differs in what the synthesizer copies -> near duplicates.
    {"id": "near", "q": "A force of 12 N acts on a 2 kg mass sliding on glass. Find its acceleration.", "a": "6"},
    {"id": "mmlu_verbatim", "q": MMLU_920, "a": "Thomas Friedman"},
    {
        "id": "mmlu_edited",
        "q": "Which author, in a 1999 book, argued: " + MMLU_920.lower().replace("water", "fire"),
        "a": "Thomas Friedman",
    },
    {"id": "refuse", "q": "Which cell organelle makes ATP?", "a": "The mitochondrion. REFUSE"},
    {"id": "truncate", "q": "Which acid is found in the stomach?", "a": "Hydrochloric acid. TRUNCATE"},
]


@pytest.fixture
def planted_env(project_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PLANTED))
    (tmp_path / "config" / "sources.yaml").write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "planted",
                        "path": str(path),
                        "kind": "qa",
                        "fields": {"id": "id", "question": "q", "answer": "a"},
                    }
                ]
            }
        )
    )
    return project_env


def test_planted_problems_are_removed_counted_and_traceable(
    planted_env: dict[str, str], fake_llm: FakeOpenAIServer
) -> None:
    results = run_pipeline(build_definitions(), dg.DagsterInstance.ephemeral())
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]
    con = connect(Store(get_settings().data_root))
    reasons = dict(con.sql("SELECT stage || ':' || reason, count(*) FROM rejects GROUP BY ALL").fetchall())
    # Every STEM seed yields one QA per grade (5); each planted problem removes all five.
    assert reasons == {
        "qa_mixture:exact_duplicate": 5,
        "qa_mixture:near_duplicate": 5,
        "qa_mixture:contaminated": 10,
        "refined_qa:refusal": 5,
        "refined_qa:truncated": 5,
    }
    mixture = con.sql("SELECT count(*) FROM qa_mixture").fetchall()[0][0]
    assert mixture == 7 * 5 - sum(reasons.values())  # one QA per grade of the force question survives

    # Traceable: which seed, why, and against what.
    by_seed = dict(
        con.sql(
            "SELECT s.native_id, list(DISTINCT r.reason ORDER BY r.reason) FROM rejects r JOIN seeds s USING (seed_id) "
            "GROUP BY ALL"
        ).fetchall()
    )
    # Of two exact duplicates the smaller qa_id stays (a stable hash), so per grade either `base` or `exact` wins.
    assert (
        set(by_seed.pop("base", ["exact_duplicate"]))
        == set(by_seed.pop("exact", ["exact_duplicate"]))
        == {"exact_duplicate"}
    )
    assert by_seed == {
        "near": ["near_duplicate"],
        "mmlu_verbatim": ["contaminated"],
        "mmlu_edited": ["contaminated"],
        "refuse": ["refusal"],
        "truncate": ["truncated"],
    }
    kept = {q for (q,) in con.sql("SELECT qa_id FROM qa_mixture").fetchall()}
    dup_of = {
        r[0].split("duplicate of ")[1].split(" ")[0]
        for r in con.sql("SELECT detail FROM rejects WHERE reason LIKE '%duplicate'").fetchall()
    }
    assert dup_of and dup_of <= kept  # every duplicate points at a row that is in the mixture
    details = [d for (d,) in con.sql("SELECT detail FROM rejects WHERE reason = 'contaminated'").fetchall()]
    assert all("mmlu item 920" in d for d in details), details[:2]

    # The dataset card counts every filter.
    card = (Path(get_settings().data_root) / "qa_mixture" / "recipe=stem_heavy" / "DATASET_CARD.md").read_text()
    assert "| qa_mixture | contaminated | 10 |" in card and "| refined_qa | truncated | 5 |" in card

    # And a rejected row's whole history is one command away.
    contaminated = con.sql("SELECT qa_id FROM rejects WHERE reason = 'contaminated' LIMIT 1").fetchall()[0][0]
    out = subprocess.run(
        [str(Path(sys.executable).parent / "boostqa"), "lineage", contaminated],
        env={**os.environ, **planted_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "Globalization" in out.stdout and "raw output:" in out.stdout
