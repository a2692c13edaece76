"""Headless Chromium (Debian's ``chromium``, installed by ``make services``) against a local page: the rendered DOM
or a screenshot, with a fresh profile each time and nothing that reaches past 127.0.0.1 (no sync, no component
updates, no background networking, no QUIC).

``--virtual-time-budget`` lets the page's scripts and requests run for that much virtual time before the DOM is
dumped or the screenshot taken (virtual time waits for pending network requests), so a single-page app such as
the Dagster UI has loaded its GraphQL data by then.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium() -> str | None:
    """The Chromium binary, or None where ``make services`` has not installed it."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], budget_ms: int, window: tuple[int, int], timeout_s: float) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed: run `make services` (Debian's chromium package)")
    with tempfile.TemporaryDirectory(prefix="boostqa-chromium-") as profile:
        cmd = [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={budget_ms}",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=True)


def dump_dom(url: str, budget_ms: int = 15_000, window: tuple[int, int] = (1600, 1200), timeout_s: float = 90) -> str:
    """The page's DOM (HTML text) after ``budget_ms`` of virtual time."""
    return _run(["--dump-dom", url], budget_ms, window, timeout_s).stdout.decode("utf-8", "replace")


def screenshot(
    url: str, path: Path, budget_ms: int = 15_000, window: tuple[int, int] = (1600, 1200), timeout_s: float = 90
) -> Path:
    """A PNG of the page's viewport after ``budget_ms`` of virtual time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={path}", url], budget_ms, window, timeout_s)
    return path
