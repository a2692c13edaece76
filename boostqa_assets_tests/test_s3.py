"""The same pipeline with the data root (and the LLM cache) on S3: moto's server on 127.0.0.1."""

from __future__ import annotations

import uuid
from pathlib import Path

import dagster as dg
import pytest
import s3fs

from boostqa_assets.definitions import build_definitions
from boostqa_assets.inspect import connect
from boostqa_assets.runner import run_pipeline
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer
from boostqa_assets_tests.conftest import keep_answered_disciplines, write_project

pytestmark = pytest.mark.s3


@pytest.fixture
def s3_project(tmp_path: Path, fake_llm: FakeOpenAIServer, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    bucket = f"boostqa-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})
    fs.mkdir(bucket)
    env = write_project(tmp_path, fake_llm.base_url, data_root=f"s3://{bucket}/data")
    # Only the disciplines the fake annotator can answer (45 cells, not 110): this test is about the storage
    # path, and every cell costs a dozen requests to moto per stage, which made it the slowest test (7 minutes).
    keep_answered_disciplines(tmp_path / "config")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BOOSTQA_S3_ENDPOINT_URL", moto_endpoint)
    # The physics source itself is read from S3 too.
    fs.put(str(tmp_path / "sources" / "physics.jsonl"), f"{bucket}/sources/physics.jsonl")
    cfg = tmp_path / "config" / "sources.yaml"
    cfg.write_text(
        cfg.read_text().replace(str(tmp_path / "sources" / "physics.jsonl"), f"s3://{bucket}/sources/physics.jsonl")
    )
    return bucket


def test_pipeline_on_s3(s3_project: str, fake_llm: FakeOpenAIServer) -> None:
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    results = run_pipeline(defs, instance)
    assert all(r.success for r in results), [(r.asset, r.success) for r in results]

    settings = get_settings()
    store = Store(settings.data_root, settings.storage_options)
    files = store.list_partition_files("synthesized_qa")
    assert files and all(f.startswith(f"s3://{s3_project}/data/synthesized_qa/discipline=") for f in files)
    assert store.fs.exists(f"{s3_project}/data/qa_mixture/recipe=stem_heavy/manifest.json")
    assert store.fs.find(f"{s3_project}/data/_llm_cache/segments"), "the request cache lives on S3 too"

    con = connect(store)  # DuckDB reads the Parquet on S3 through the registered s3fs filesystem
    assert con.sql("SELECT count(*) FROM seeds").fetchall()[0][0] == 9
    assert con.sql("SELECT count(*) FROM qa_mixture").fetchall()[0][0] == 29
    orphans = con.sql("SELECT count(*) FROM qa_mixture ANTI JOIN seeds USING (seed_id)").fetchall()[0][0]
    assert orphans == 0

    # A second run of the LLM stages over S3 answers every request from the S3 cache.
    before = fake_llm.stats()["requests"]
    llm_stages = ["annotated_seeds", "deficiency_probe", "synthesized_qa", "refined_qa"]
    again = run_pipeline(defs, instance, stages=llm_stages)
    assert [r.asset for r in again] == llm_stages and all(r.success for r in again)
    assert fake_llm.stats()["requests"] == before
