"""Live progress bars for the LLM stages of ``boostqa demo``: one bar per stage and LLM client, with requests
done/total, rate, tokens, cost so far and ETA, drawn with Rich on the real terminal.

Why Rich and not tqdm: several bars at once (a stage's synthesizer and its fidelity re-annotation) with
custom columns (tokens, cost, cache hits) redrawn by one refresh thread, so the LLM client's callback only
updates counters; and a ``Live`` display that prints other output (stage lines, Dagster's log lines) above the
bars instead of through them. Rich already comes with Dagster.

Why a terminal file of our own: during a step Dagster's compute-log capture points file descriptors 1 and 2 at
files (and mirrors them with ``tail``), so ``sys.stderr.isatty()`` is false inside a step and any bar written
there lands in the capture file. The CLI duplicates the terminal's descriptor before the first run and hands it
to this display; assets reach it through ``active()`` (runs of ``boostqa demo`` execute in-process). Anywhere
else (``dagster dev``, a daemon, no TTY) there is no display and only the periodic log lines remain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from boostqa_assets.llm.types import LLMStats

logger = logging.getLogger(__name__)

_active: LiveProgress | None = None


def active() -> LiveProgress | None:
    """The display of this process (the ``boostqa demo`` CLI in a terminal), or None."""
    return _active


def bar_key(label: str) -> str:
    """One bar per stage and client: ``annotated_seeds[physics_qa]`` counts into ``annotated_seeds``."""
    return re.sub(r"\[[^\]]*\]", "", label).strip()


def stage_of(label: str) -> str:
    return re.split(r"[\s\[]", label, maxsplit=1)[0]


def _short(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}"


def _speed(task: Task) -> float | None:
    """Requests per second: Rich's estimate over its last 30 s once the bar has run 10 s (a resumed run answers
    its first requests from the cache at once: an average would promise far too soon an end), the average before
    (the first samples are milliseconds apart)."""
    elapsed = task.elapsed or 0.0
    if task.finished:
        return task.completed / elapsed if elapsed else None
    if elapsed >= 10 and task.speed:
        return task.speed
    return task.completed / elapsed if elapsed > 0.5 and task.completed else None


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = _speed(task)
        return Text(f"{speed:.1f}/s" if speed else "-/s", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """Time left for the requests known so far (a stage that streams chunks adds each chunk's as it starts)."""

    def render(self, task: Task) -> Text:
        speed = _speed(task)
        if task.total is None or not speed:
            return Text("ETA -:--:--", style="progress.remaining")
        left = int(max(task.total - task.completed, 0) / speed)
        return Text(f"ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}", style="progress.remaining")


class _LLMColumn(ProgressColumn):
    """Tokens in/out, cache hits and cost so far, read from the live ``LLMStats`` of the bar's clients (the cost
    only, in a narrow terminal)."""

    def __init__(self, wide: bool, table_column: Column | None = None) -> None:
        super().__init__(table_column)
        self.wide = wide

    def render(self, task: Task) -> Text:
        bar: _Bar | None = task.fields.get("bar")
        if bar is None:
            return Text("")
        stats = list(bar.stats.values())
        t_in = sum(s.tokens_in for s in stats)
        t_out = sum(s.tokens_out for s in stats)
        hits = sum(s.cache_hits for s in stats)
        cost = sum(s.cost_usd for s in stats)
        failed = sum(s.failed for s in stats)
        text = f"tok {_short(t_in)}/{_short(t_out)} ${cost:.4f} cached {hits}" if self.wide else f"${cost:.4f}"
        return Text(text + (f" failed {failed}" if failed else ""))


def _description(key: str, role: str) -> str:
    """The stage and the client: ``annotated_seeds (annotator)``; a label that names its purpose
    (``synthesized_qa fidelity check``, ``deficiency_probe judge``) stays as it is, to keep the bars narrow."""
    return key if role in key or " " in key else f"{key} ({role})"


@dataclass
class _Bar:
    task: TaskID
    stage: str
    calls: dict[int, tuple[int, int]] = field(default_factory=dict)  # reporter id -> (done, total) over its calls
    stats: dict[int, LLMStats] = field(default_factory=dict)  # one per LLM client feeding this bar


class LiveProgress:
    """A Rich ``Progress`` on ``stream`` (the terminal); thread-safe ``update`` from the LLM clients."""

    def __init__(self, stream: IO[str], redirect_stdout: bool) -> None:
        self.stream = stream
        # soft_wrap: lines printed above the bars (stage lines, log lines) are left whole for the terminal to wrap.
        self.console = Console(file=stream, force_terminal=True, soft_wrap=True)

        def cut(max_width: int | None = None) -> Column:  # a narrow terminal shortens columns, never wraps a bar
            return Column(no_wrap=True, overflow="ellipsis", max_width=max_width)

        # Every column fits 120 characters; an 80-column terminal gets the ones that matter most.
        wide = self.console.width >= 120
        columns = [
            TextColumn("{task.description}", table_column=cut(30 if wide else 22)),
            BarColumn(bar_width=20 if wide else 10),
            MofNCompleteColumn(table_column=cut()),
            _RateColumn(table_column=cut()),
            _LLMColumn(wide, table_column=cut()),
            *([TimeElapsedColumn(table_column=cut())] if wide else []),
            _EtaColumn(table_column=cut()),
        ]
        self.progress = Progress(
            *columns,
            console=self.console,
            refresh_per_second=4,
            redirect_stdout=redirect_stdout,
            redirect_stderr=True,
        )
        self._bars: dict[str, _Bar] = {}
        self._lock = threading.Lock()

    def update(self, label: str, reporter: int, done: int, total: int, stats: LLMStats) -> None:
        """``reporter`` (one progress callback) has ``done`` of ``total`` requests over all its calls so far."""
        key = bar_key(label)
        with self._lock:
            bar = self._bars.get(key)
            if bar is None:
                task = self.progress.add_task(_description(key, stats.role), total=total, bar=None)
                bar = self._bars[key] = _Bar(task, stage_of(label))
                self.progress.update(task, bar=bar)
            bar.calls[reporter] = (done, total)
            bar.stats[id(stats)] = stats
            self.progress.update(
                bar.task,
                completed=sum(d for d, _ in bar.calls.values()),
                total=sum(t for _, t in bar.calls.values()),
            )

    def finish_stage(self, stage: str) -> None:
        """Take the stage's bars off the screen (its summary line follows)."""
        with self._lock:
            for key in [k for k, b in self._bars.items() if b.stage == stage]:
                self.progress.remove_task(self._bars.pop(key).task)

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # stopping must never hide the error that stopped the demo
            self.progress.stop()
        with contextlib.suppress(OSError):
            self.stream.flush()


@contextlib.contextmanager
def live_progress(enabled: bool = True) -> Iterator[LiveProgress | None]:
    """Show the bars while the block runs if stderr is a terminal (and ``enabled``); else yield None.

    The terminal is a duplicate of descriptor 2 taken now, before any Dagster run captures it."""
    global _active
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8", errors="replace")
    display = LiveProgress(stream, redirect_stdout=sys.stdout.isatty())
    display.start()
    _active = display
    try:
        yield display
    finally:
        _active = None
        display.stop()
        stream.close()
