"""One end-to-end run of the whole graph against the real embedded model (llama.cpp + Gemma 3 270M), on a
tiny input and a reduced taxonomy so it takes about a minute. The resource starts and stops the server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
import yaml

from boostqa_assets.definitions import STAGES, build_definitions
from boostqa_assets.inspect import connect
from boostqa_assets.runner import run_pipeline
from boostqa_assets.settings import DEFAULT_CONFIG_DIR, get_settings
from boostqa_assets.storage import Store

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "config"
    config.mkdir()
    for name in ("llm.yaml", "recipes.yaml"):
        (config / name).write_text((DEFAULT_CONFIG_DIR / name).read_text())
    (config / "taxonomy.yaml").write_text(
        yaml.safe_dump(
            {
                "grades": ["high", "undergraduate"],
                "difficulties": ["easy", "medium", "hard"],
                "disciplines": [
                    {"name": "physics", "category": "stem"},
                    {"name": "history", "category": "humanities"},
                    {"name": "general_knowledge", "category": "other"},
                ],
            }
        )
    )
    recipes = yaml.safe_load((DEFAULT_CONFIG_DIR / "recipes.yaml").read_text())
    recipes["recipes"][0]["grade_weights"] = {"high": 1.0, "undergraduate": 2.0}
    recipes["recipes"][0]["category_weights"] = {"stem": 3.0, "humanities": 1.0, "other": 0.5}
    (config / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    pipeline = yaml.safe_load((DEFAULT_CONFIG_DIR / "pipeline.yaml").read_text())
    pipeline["synthesis"].update({"high_difficulty_grades": ["undergraduate"], "max_seeds_per_partition": 1})
    (config / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    rows = [
        {"id": "1", "q": "What is the SI unit of force?", "a": "The newton."},
        {"id": "2", "q": "In which year did the French Revolution begin?", "a": "1789."},
    ]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (config / "sources.yaml").write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "tiny",
                        "path": str(tmp_path / "tiny.jsonl"),
                        "kind": "qa",
                        "fields": {"id": "id", "question": "q", "answer": "a"},
                    }
                ]
            }
        )
    )
    # The GGUF is assembled once per machine; reuse the demo's models folder when it exists.
    home = Path(os.environ.get("BOOSTQA_HOME", Path.cwd() / ".boostqa"))
    monkeypatch.setenv("BOOSTQA_HOME", str(home))
    monkeypatch.setenv("BOOSTQA_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("BOOSTQA_CONFIG_DIR", str(config))
    monkeypatch.delenv("BOOSTQA_EMBEDDED_BASE_URL", raising=False)
    for key in [
        k
        for k in os.environ
        if k.startswith(("BOOSTQA_LLM_", "BOOSTQA_ANNOTATOR_", "BOOSTQA_SYNTHESIZER_", "BOOSTQA_REFINER_"))
    ]:
        monkeypatch.delenv(key)
    return tmp_path


def test_whole_graph_on_the_embedded_model(tiny_project: Path) -> None:
    defs = build_definitions()
    results = run_pipeline(defs, dg.DagsterInstance.ephemeral())
    assert [r.asset for r in results] == list(STAGES)
    assert all(r.success for r in results), [(r.asset, r.success, r.checks_failed) for r in results]

    settings = get_settings()
    con = connect(Store(settings.data_root))
    counts = {v: con.sql(f"SELECT count(*) FROM {v}").fetchall()[0][0] for v in STAGES}
    assert counts["seeds"] == 2
    assert all(counts[v] > 0 for v in STAGES), counts
    # Nothing is lost: every synthesis task is either a row or a reject with a reason.
    synth_requests = next(r for r in results if r.asset == "synthesized_qa").metadata["llm_requests"]
    synth_rejects = con.sql("SELECT count(*) FROM rejects WHERE stage = 'synthesized_qa'").fetchall()[0][0]
    assert counts["synthesized_qa"] + synth_rejects == synth_requests
    assert con.sql("SELECT count(*) FROM qa_mixture ANTI JOIN seeds USING (seed_id)").fetchall()[0][0] == 0
    # Real tokens were spent on the local model, and labels stayed inside the reduced taxonomy.
    assert next(r for r in results if r.asset == "annotated_seeds").metadata["tokens_in"] > 0
    labels = {d for (d,) in con.sql("SELECT DISTINCT discipline FROM annotated_seeds").fetchall()}
    assert labels <= {"physics", "history", "general_knowledge"}
