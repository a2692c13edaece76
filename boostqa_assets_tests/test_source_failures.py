"""A source that cannot be read, or that gives no seed, fails its own partition and nothing else.

In-process: a multi-partition `seeds` run keeps the other sources, leaves the bad partition's previous data alone,
records why (names source, file and fix) and fails the blocking check for that partition only; a one-partition run
fails the run; `annotated_seeds` runs over the good sources only; readers leave the failed source out; fixing the
file clears it all. Slow: `boostqa demo` end to end with a truncated Parquet file, a JSON file that is not a list
and an empty file among good sources: the good ones reach the mixture, the CLI names each bad source, its path
and the fix, and exits non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from boostqa_assets import failures
from boostqa_assets.definitions import build_definitions
from boostqa_assets.records import ANNOTATED_SCHEMA
from boostqa_assets.runner import run_stage
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer, FaultConfig, start_fake_server_process, stop_process
from boostqa_assets_tests.conftest import write_project

BOOSTQA = str(Path(sys.executable).parent / "boostqa")
QA_FIELDS = {"id": "id", "question": "q", "answer": "a"}


def add_sources(config: Path, sources: dict[str, Path], fields: dict[str, str] | None = None) -> None:
    """Add QA sources (name -> file) to a `write_project` config, between the shipped test sources."""
    doc = yaml.safe_load((config / "sources.yaml").read_text())
    for i, (name, path) in enumerate(sources.items(), 1):
        doc["sources"].insert(i, {"name": name, "path": str(path), "kind": "qa", "fields": fields or QA_FIELDS})
    (config / "sources.yaml").write_text(yaml.safe_dump(doc))


def _store() -> Store:
    return Store(get_settings().data_root)


def test_a_source_that_breaks_fails_only_its_partition(
    project_env: dict[str, str], tmp_path: Path, fake_llm: FakeOpenAIServer
) -> None:
    good_parquet = (tmp_path / "sources" / "code.parquet").read_bytes()
    extra = tmp_path / "sources" / "extra.parquet"
    extra.write_bytes(good_parquet)  # a good Parquet source of its own, for now
    add_sources(tmp_path / "config", {"extra_qa": extra}, {"id": "task", "question": "prompt", "answer": "solution"})
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    store = _store()
    assert run_stage(defs, "seeds", instance).status == "ok"
    before = store.read_partition("seeds", {"source": "extra_qa"})

    extra.write_bytes(good_parquet[:100])  # truncated: a copy cut short
    res = run_stage(defs, "seeds", instance)

    assert res.status == "partial" and not res.success and res.error is None
    assert list(res.failed_partitions) == ["extra_qa"]
    why = res.failed_partitions["extra_qa"]
    assert "'extra_qa'" in why and str(extra) in why and "fix:" in why and "Parquet" in why
    assert sorted(res.materialized) == ["code_problems", "history_passages", "physics_qa"]
    assert res.stats.rows == 9  # the three good sources, counted once over the run
    assert store.read_partition("seeds", {"source": "extra_qa"}).equals(before)  # its previous data is left alone
    assert failures.read_failure(store, "seeds", "extra_qa").message == why  # type: ignore[union-attr]

    # annotated_seeds: only the good sources; readers leave the failed one out.
    annotated = run_stage(defs, "annotated_seeds", instance)
    assert annotated.status == "ok" and "extra_qa" in annotated.skipped_partitions
    assert sorted(annotated.materialized) == ["code_problems", "history_passages", "physics_qa"]
    good = failures.read_good_sources(store, "annotated_seeds", ANNOTATED_SCHEMA)
    assert "extra_qa" not in set(good["source"].to_list()) and good.height > 0

    # A run of that one partition fails the run, with the same message.
    one = dg.materialize(
        [*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
        selection=dg.AssetSelection.assets("seeds"),
        instance=instance,
        resources=defs.resources,
        partition_key="extra_qa",
        raise_on_error=False,
    )
    assert not one.success
    failure = one.get_step_failure_events()[0].step_failure_data
    assert failure is not None and failure.user_failure_data is not None
    assert "'extra_qa'" in (failure.user_failure_data.description or "")

    # Fixed: the partition is read again and the record is gone.
    extra.write_bytes(good_parquet)
    again = run_stage(defs, "seeds", instance)
    assert again.status == "ok" and failures.read_failures(store, "seeds") == {}


def test_an_empty_source_is_named_and_blocks_nothing_else(project_env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "sources" / "empty.jsonl"
    empty.write_text("")
    not_a_list = tmp_path / "sources" / "dict.json"
    not_a_list.write_text(json.dumps({"items": [{"id": "1", "q": "What is a force?", "a": "A push"}]}))
    add_sources(tmp_path / "config", {"empty_qa": empty, "dict_qa": not_a_list})
    res = run_stage(build_definitions(), "seeds", dg.DagsterInstance.ephemeral())
    assert res.status == "partial" and sorted(res.failed_partitions) == ["dict_qa", "empty_qa"]
    assert "'empty_qa'" in res.failed_partitions["empty_qa"] and "empty" in res.failed_partitions["empty_qa"]
    assert "fix:" in res.failed_partitions["empty_qa"]
    assert "json_records" in res.failed_partitions["dict_qa"] and str(not_a_list) in res.failed_partitions["dict_qa"]
    assert sorted(res.materialized) == ["code_problems", "history_passages", "physics_qa"]
    assert res.checks_failed == 2 and res.checks_passed == 3


@pytest.mark.slow
def test_demo_with_broken_sources_finishes_the_good_ones_and_names_the_bad(tmp_path: Path) -> None:
    proc, base_url = start_fake_server_process(FaultConfig())
    try:
        project = write_project(tmp_path, base_url, all_disciplines=False)
        env = {**os.environ, **project, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
        sources = tmp_path / "sources"
        truncated = sources / "truncated.parquet"
        truncated.write_bytes((sources / "code.parquet").read_bytes()[:-40])
        not_a_list = sources / "object.json"
        not_a_list.write_text(json.dumps({"q": "What is a force?", "a": "A push or a pull"}))
        empty = sources / "empty.jsonl"
        empty.write_text("")
        add_sources(tmp_path / "config", {"truncated_qa": truncated, "object_qa": not_a_list, "empty_qa": empty})

        res = subprocess.run([BOOSTQA, "demo"], env=env, capture_output=True, text=True, timeout=900)

        out = res.stdout
        assert res.returncode == 1, out[-4000:] + res.stderr[-4000:]
        assert "Traceback" not in out
        summary = out[out.index("FAILED (") :]
        for name, path in (("truncated_qa", truncated), ("object_qa", not_a_list), ("empty_qa", empty)):
            line = next(line for line in summary.splitlines() if f"seeds[{name}]:" in line)
            assert str(path) in line and "fix:" in line, line
        stage = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "checks" in line}
        assert stage["seeds"].split()[1] == "PARTIAL" and "3 failed" in stage["seeds"]
        for later in ("annotated_seeds", "deficiency_probe", "synthesized_qa", "refined_qa", "qa_mixture"):
            assert stage[later].split()[1] == "ok", stage[later]
        assert "3 partitions" in stage["annotated_seeds"] and "3 skipped" in stage["annotated_seeds"]
        manifest = json.loads((tmp_path / "data" / "qa_mixture" / "recipe=stem_heavy" / "manifest.json").read_text())
        good = {"physics_qa", "history_passages", "code_problems"}
        assert manifest["tokens_total"] > 0 and set(manifest["tokens_by_source"]) <= good
    finally:
        stop_process(proc)
