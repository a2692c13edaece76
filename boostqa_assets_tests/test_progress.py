"""Live progress: the bars' arithmetic over several LLM calls, the log lines with and without bars, and
`boostqa demo` in a real pseudo-terminal (bars drawn even though Dagster captures descriptors 1 and 2) and in a
pipe (no bar characters at all, the periodic log lines instead)."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boostqa_assets import progress
from boostqa_assets.defs.support import progress_logger
from boostqa_assets.llm.types import LLMStats
from boostqa_assets.testing.fake_server import FaultConfig, start_fake_server_process, stop_process
from boostqa_assets_tests.conftest import write_project

BOOSTQA = str(Path(sys.executable).parent / "boostqa")
BAR_CHARS = ("━", "╸", "╺", "\x1b[?25l")  # Rich's bar glyphs and its hide-cursor sequence


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


@pytest.fixture
def display(monkeypatch: pytest.MonkeyPatch) -> Iterator[progress.LiveProgress]:
    shown = progress.LiveProgress(io.StringIO(), redirect_stdout=False)  # never started: no refresh thread
    monkeypatch.setattr(progress, "_active", shown)
    yield shown


def _task(display: progress.LiveProgress, key: str) -> tuple[float, float | None, str]:
    task = next(t for t in display.progress.tasks if t.id == display._bars[key].task)
    return task.completed, task.total, str(task.description)


def test_a_bar_counts_every_call_of_a_stage_and_every_partition(display: progress.LiveProgress) -> None:
    stats = LLMStats(role="annotator", model="m")
    for key, n in (("physics_qa", 3), ("history_passages", 2)):  # one callback per partition, one client
        report = progress_logger(_Log(), f"annotated_seeds[{key}]")
        for done in range(1, n + 1):
            report(done, n, stats)
    assert _task(display, "annotated_seeds") == (5, 5, "annotated_seeds (annotator)")
    synth = LLMStats(role="synthesizer", model="m")
    report = progress_logger(_Log(), "synthesized_qa")  # one callback, three chunks (calls)
    for n in (4, 1, 2):
        for done in range(1, n + 1):
            report(done, n, synth)
    assert _task(display, "synthesized_qa")[:2] == (7, 7)
    checker = LLMStats(role="annotator", model="m")
    for _ in range(2):  # a new callback per chunk, same label: one bar
        check = progress_logger(_Log(), "synthesized_qa fidelity check")
        check(1, 2, checker)
    assert _task(display, "synthesized_qa fidelity check")[:2] == (2, 4)
    display.finish_stage("synthesized_qa")
    assert list(display._bars) == ["annotated_seeds"] and len(display.progress.tasks) == 1


def test_log_lines_without_a_bar_are_periodic_and_with_one_only_at_each_calls_end(
    display: progress.LiveProgress, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = LLMStats(role="refiner", model="m", price_per_mtok_in=1.0)
    stats.tokens_in = 2000
    with_bar = _Log()
    report = progress_logger(with_bar, "refined_qa", every_s=0.0)
    for done in range(1, 4):
        report(done, 3, stats)
    assert len(with_bar.lines) == 1 and with_bar.lines[0].startswith("refined_qa: 3/3 requests (100%)")
    assert "$0.0020" in with_bar.lines[0]
    monkeypatch.setattr(progress, "_active", None)  # no terminal: the log lines are all there is
    without = _Log()
    report = progress_logger(without, "refined_qa", every_s=0.0)
    for done in range(1, 4):
        report(done, 3, stats)
    assert [line.split(" requests")[0] for line in without.lines] == [
        "refined_qa: 1/3",
        "refined_qa: 2/3",
        "refined_qa: 3/3",
    ]


# --- boostqa demo in a terminal and in a pipe ----------------------------------------------------------


@pytest.fixture
def demo_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A project on a fake endpoint slow enough (0.5 s a request, 2 at a time) for the bars to be redrawn."""
    proc, base_url = start_fake_server_process(FaultConfig(latency_s=0.5))
    try:
        env = {
            **os.environ,
            **write_project(tmp_path, base_url, all_disciplines=False),
            "BOOSTQA_LLM_MAX_CONCURRENCY": "2",
            "DAGSTER_HOME": str(tmp_path / "dagster_home"),
            "COLUMNS": "140",  # the wide layout (tokens and cost); Rich reads the width from COLUMNS
        }
        env.pop("TERM", None)
        yield env
    finally:
        stop_process(proc)


def _run_in_pty(args: list[str], env: dict[str, str], timeout_s: float = 300) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as stdin, stdout and stderr (as in an interactive shell); everything the
    terminal received, and the exit code."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm-256color"})
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal (EIO): it has exited
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=30)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_demo_in_a_terminal_draws_a_bar_per_llm_stage(demo_env: dict[str, str]) -> None:
    code, out = _run_in_pty([BOOSTQA, "demo", "--stages", "seeds", "annotated_seeds"], demo_env)
    assert code == 0, out[-3000:]
    assert "annotated_seeds (annotator)" in out and "━" in out  # the bar, its label and glyphs
    assert "/9" in out and "/s" in out and "tok " in out and "ETA " in out and "cached " in out
    assert "\x1b[?25h" in out  # the cursor is given back
    assert "annotated_seeds  ok" in out and "LLM requests, tokens and estimated cost per role:" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_demo_in_a_pipe_draws_no_bar_and_logs_counts_and_rates(demo_env: dict[str, str]) -> None:
    res = subprocess.run(
        [BOOSTQA, "demo", "--stages", "seeds", "annotated_seeds"],
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for text in (res.stdout, res.stderr):
        assert not any(c in text for c in BAR_CHARS), text[-2000:]
    assert "requests (100%)" in res.stderr and "/s, " in res.stderr  # the log lines: counts and rates
    assert "annotated_seeds  ok" in res.stdout
    # The demo refreshed the DuckDB catalog after each stage: a plain DuckDB shell sees what it wrote.
    catalog = Path(demo_env["BOOSTQA_HOME"]) / "boostqa.duckdb"
    assert f"duckdb -readonly {catalog}" in res.stdout
    shell = subprocess.run(
        [
            str(Path(sys.executable).parent / "duckdb"),
            "-readonly",
            "-csv",
            "-noheader",
            str(catalog),
            "-c",
            "SELECT count(*) FROM annotated_seeds",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.stdout.strip() == "9", shell.stderr
