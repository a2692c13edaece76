"""What a user sees in the Dagster UI, rendered by a real browser: headless Chromium (Debian's, `make services`)
against `dagster dev` on 127.0.0.1 over an instance the runner materialized. The pages are the ones the
screenshots in the issue's closing note show: an empty and a full partition, a check, the runs list."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pytest
import yaml

from boostqa_assets.devserver import DagsterDev, write_instance_yaml
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store
from boostqa_assets.testing.fake_server import FakeOpenAIServer
from boostqa_assets_tests.browser import chromium, dump_dom
from boostqa_assets_tests.conftest import write_project

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def page_text(dom: str) -> str:
    """The page's visible words, one space apart (tags and scripts dropped)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def metadata_value(text: str, label: str) -> str:
    """The value shown right after a metadata label in a page's text."""
    found = re.search(rf"(?:^| ){re.escape(label)} (\S+)", text)
    assert found, f"{label!r} not on the page: {text[:2000]}"
    return found.group(1)


def test_partition_pages_check_and_runs_list_show_each_partitions_own_numbers(
    tmp_path: Path, fake_llm: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert chromium(), "chromium is not installed: run `make services`"
    env = write_project(tmp_path, fake_llm.base_url, all_disciplines=False)  # 45 QA partitions, not 110
    pipeline_yaml = Path(env["BOOSTQA_CONFIG_DIR"]) / "pipeline.yaml"
    pipeline = yaml.safe_load(pipeline_yaml.read_text())
    pipeline.setdefault("orchestration", {})["automation"] = False
    pipeline_yaml.write_text(yaml.safe_dump(pipeline))
    home = tmp_path / "dagster_home"
    for k, v in {**env, "DAGSTER_HOME": str(home)}.items():
        monkeypatch.setenv(k, v)
    write_instance_yaml(home)

    from boostqa_assets.definitions import build_definitions
    from boostqa_assets.runner import run_pipeline

    with dg.DagsterInstance.from_config(str(home)) as instance:
        results = run_pipeline(build_definitions(), instance)
    assert all(r.success for r in results), [(r.asset, r.error) for r in results]
    store = Store(get_settings().data_root, get_settings().storage_options)
    full = store.read_partition("synthesized_qa", {"discipline": "physics", "grade": "graduate"}).height
    assert full > 0

    with DagsterDev(home, env=env) as dev:
        dev.wait_ready()

        def text_of(path: str) -> str:
            return page_text(dump_dom(dev.url + path))

        empty_page = text_of("/assets/synthesized_qa?view=partitions&partition=" + quote("literature|primary"))
        full_page = text_of("/assets/synthesized_qa?view=partitions&partition=" + quote("physics|graduate"))
        check_page = text_of("/assets/qa_mixture?view=checks")
        runs_page = text_of("/runs")

    # Each partition shows its own figures, not the run's (the run wrote every grade of physics and more).
    assert "literature|primary" in empty_page
    assert metadata_value(empty_page, "dagster/row_count") == "0" and metadata_value(empty_page, "rows") == "0"
    assert "physics|graduate" in full_page
    assert metadata_value(full_page, "dagster/row_count") == str(full) == metadata_value(full_page, "rows")
    assert "synthesized_qa_job" in full_page  # the run that wrote it is named after its stage
    # The mixture's one-partition run recorded its check against its partition, and it passed.
    assert "qa_mixture_valid" in check_page and "Passed" in check_page and "stem_heavy" in check_page
    # The runs list says which stage each run ran.
    for stage in ("seeds", "annotated_seeds", "synthesized_qa", "refined_qa", "qa_mixture"):
        assert f"{stage}_job" in runs_page, stage
