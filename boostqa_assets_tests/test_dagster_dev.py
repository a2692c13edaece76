"""`dagster dev -w workspace.yaml` serves the code location: five assets with partitions, descriptions and
checks, read back through the webserver's GraphQL API. Started on 127.0.0.1, stopped by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

QUERY = """
{
  assetNodes {
    assetKey { path }
    description
    isPartitioned
    partitionKeysByDimension { name partitionKeys }
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "BOOSTQA_HOME": str(tmp_path / "boostqa")}
    log = open(tmp_path / "dagster_dev.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the process group we started, by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_webserver_shows_assets_partitions_descriptions_and_checks(dagster_dev: str) -> None:
    deadline = time.monotonic() + 60
    nodes: list[dict] = []
    while time.monotonic() < deadline:  # the code server may still be loading
        reply = httpx.post(dagster_dev + "/graphql", json={"query": QUERY}, timeout=30).json()
        nodes = (reply.get("data") or {}).get("assetNodes") or []
        if nodes:
            break
        time.sleep(1)
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert set(by_key) == {"seeds", "annotated_seeds", "synthesized_qa", "refined_qa", "qa_mixture"}
    for name, node in by_key.items():
        assert node["isPartitioned"], name
        assert node["description"] and "row" in node["description"].lower()
        checks = node["assetChecksOrError"]["checks"]
        assert [c["name"] for c in checks] == [f"{name}_valid"] and checks[0]["blocking"]
    dims = {d["name"]: len(d["partitionKeys"]) for d in by_key["synthesized_qa"]["partitionKeysByDimension"]}
    assert dims == {"discipline": 22, "grade": 5}
    assert by_key["seeds"]["partitionKeysByDimension"][0]["partitionKeys"] == [
        "wikipedia",
        "fanoutqa",
        "humaneval",
    ]
