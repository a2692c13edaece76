"""Per-endpoint limits shared by every process on the machine (or, with Redis/PostgreSQL, every machine).

An endpoint is a ``base_url`` + ``model`` pair (``endpoint_key``). For each one ``EndpointLimiter`` holds:

- **Pacing** (``pacing.py``): requests, input tokens and output tokens per window (``rpm``, ``tpm_in``,
  ``tpm_out`` per ``window_s``, 60 s unless told otherwise) leave spread evenly at that rate, with a burst of
  ``burst_s`` seconds' worth once earned, slowed down by 429s and recovering (AIMD). The state is one small
  file per endpoint under the directory the caller gives (``<BOOSTQA_HOME>/limits``), shared by every process
  of the machine, or a PostgreSQL row / Redis key (``backend_url``) shared by every machine.
- **A concurrency cap** (``max_concurrency``): N slot files, each held with a non-blocking ``flock`` while a
  request is on the wire. The kernel drops the lock when its holder dies, so a ``kill -9`` never leaks a slot.
  The cap is per machine, also with a remote backend (the slots are local files).
- **A shared pause**: a reply whose ``x-ratelimit-remaining-requests`` or ``-tokens`` is 0 pauses the endpoint
  until its ``x-ratelimit-reset-*``; a 503 with ``Retry-After``, a 429 when nothing is paced, and a 429 that
  asks for a long wait (``PAUSE_ALL_AFTER_S``) pause it for that long. A 429 on a paced endpoint slows the pace
  instead of stopping everyone: the request that got it waits its own ``Retry-After``.

How tokens are charged. A request's input tokens are estimated from its text (``estimate_tokens``: 4
characters a token) and its output tokens reserved at the running mean of the completions seen so far
(``max_tokens`` until the first reply) before it is sent; the reply's usage then corrects the schedule (a
debt moves it on, a credit back), so in-flight requests cannot overshoot the output rate by more than the
spread around that mean. A request that fails without usage (429, 5xx, timeout) is credited its tokens; it
still counts as a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import hashlib
import logging
import math
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boostqa_assets.llm import pacing
from boostqa_assets.llm.pacing import REQUESTS, TOKENS_IN, TOKENS_OUT, PacingRule

if TYPE_CHECKING:
    from boostqa_assets.configs import RoleConfig

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 60.0
RESERVE_AHEAD_S = 0.5  # a request takes its place in the shared schedule at most this long before it leaves
PAUSE_ALL_AFTER_S = 5.0  # a 429 that asks for at least this long pauses every process, paced or not
_SLOT_POLL_S = (0.002, 0.025)  # first and longest wait between tries for a slot held by another process


def endpoint_key(base_url: str, model: str) -> str:
    """Stable id of an endpoint (the same in every process and run): a hash of base URL and model."""
    return hashlib.sha256(f"{base_url.rstrip('/')}\n{model}".encode()).hexdigest()[:16]


def estimate_tokens(text: str) -> int:
    """Tokens a prompt will cost, before the server says: 4 characters a token (the fake server's rule, and
    close for English with OpenAI-style tokenizers). The server's count corrects it after the reply."""
    return len(text) // 4 + 1


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)?")


def parse_duration_s(value: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` or ``Retry-After`` value: ``"2"``, ``"1.5s"``, ``"250ms"``,
    ``"1m30s"``, ``"1h2m"``. None for anything else (an HTTP date, ``"soon"``)."""
    if not value:
        return None
    text = value.strip().lower()
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        number, unit = float(match.group(1)), match.group(2)
        if unit is None and match.end() != len(text):  # a bare number is only valid alone or last
            return None
        total += number * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}[unit]
        pos = match.end()
    return max(0.0, total) if text else None


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a server asks for: ``retry-after-ms`` (OpenAI's precise form), ``Retry-After`` (seconds or an
    HTTP date), else the ``x-ratelimit-reset-*`` headers. None when it says nothing usable."""
    value = headers.get("retry-after-ms")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000.0)
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                when = email.utils.parsedate_to_datetime(value).timestamp()
                return max(0.0, when - (time.time() if now is None else now))
            return None
    return parse_duration_s(headers.get("x-ratelimit-reset-requests") or headers.get("x-ratelimit-reset-tokens"))


class _Slots:
    """A cross-process counting semaphore: ``n`` slot files, each held by one request with ``flock``."""

    def __init__(self, directory: Path, key: str, n: int) -> None:
        self.n = n
        folder = directory / f"{key}.slots"
        folder.mkdir(parents=True, exist_ok=True)
        self._fds = [os.open(folder / str(i), os.O_RDWR | os.O_CREAT, 0o644) for i in range(n)]
        self._held: set[int] = set()
        self._start = random.randrange(n)  # processes start their search at different slots
        self._waiters: list[asyncio.Future[None]] = []

    def try_acquire(self) -> int | None:
        n = self.n
        for j in range(n):
            i = (self._start + j) % n
            if i in self._held:
                continue
            try:
                fcntl.flock(self._fds[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self._held.add(i)
            self._start = (i + 1) % n
            return i
        return None

    async def acquire(self) -> int:
        slot = self.try_acquire()
        delay = _SLOT_POLL_S[0]
        while slot is None:
            # A slot freed in this process wakes a waiter at once; one freed elsewhere is found by polling.
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, delay)
            except TimeoutError:
                delay = min(delay * 2, _SLOT_POLL_S[1])
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            slot = self.try_acquire()
        return slot

    def release(self, slot: int) -> None:
        if slot in self._held:
            self._held.discard(slot)
            fcntl.flock(self._fds[slot], fcntl.LOCK_UN)
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    @property
    def held(self) -> int:
        return len(self._held)

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor drops its flock
        self._fds, self._held = [], set()


@dataclass(frozen=True)
class Permit:
    """What ``EndpointLimiter.acquire`` took for one request; hand it back to ``release``."""

    slot: int | None
    tokens_in: int
    tokens_out: int
    waited_s: float
    probe: bool = False  # the first request to leave after a shared pause: the others wait for its reply


class EndpointLimiter:
    """Pacing, a concurrency cap and a shared pause for one endpoint (see the module docstring).

    Build one per client with the directory that holds the machine's shared state
    (``<BOOSTQA_HOME>/limits``); every limit left at None is not enforced. Use::

        permit = await limiter.acquire(prompt_tokens, max_tokens)   # before each HTTP attempt
        try:
            response = ...                                          # send
            limiter.observe(response.status_code, response.headers) # 429 / rate-limit headers
        finally:
            limiter.release(permit, tokens_in, tokens_out)          # usage from the reply, None if none

    State (the pacing store, slot files) opens on first use, again after ``close`` and in a forked child.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        base_url: str,
        model: str,
        *,
        rpm: int | None = None,
        tpm_in: int | None = None,
        tpm_out: int | None = None,
        max_concurrency: int | None = None,
        backend_url: str | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        burst_s: float = 1.0,
        key: str | None = None,
    ) -> None:
        for name, value in (
            ("rpm", rpm),
            ("tpm_in", tpm_in),
            ("tpm_out", tpm_out),
            ("max_concurrency", max_concurrency),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (no limit), got {value}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if backend_url is not None and not backend_url.startswith(
            ("redis://", "rediss://", "unix://", "postgresql://", "postgres://")
        ):
            raise ValueError(
                f"limits backend URL {pacing.redact_url(backend_url)!r} is not supported; use redis://..., "
                "rediss://..., postgresql://... or none (a file under the limits directory)"
            )
        self.directory = Path(directory)
        self.base_url, self.model = base_url.rstrip("/"), model
        self.key = key or endpoint_key(base_url, model)
        self.rpm, self.tpm_in, self.tpm_out = rpm, tpm_in, tpm_out
        self.max_concurrency = max_concurrency
        self.backend_url = backend_url
        self.window_s = window_s
        rates = {
            name: limit / window_s
            for name, limit in ((REQUESTS, rpm), (TOKENS_IN, tpm_in), (TOKENS_OUT, tpm_out))
            if limit is not None
        }
        self.rule = PacingRule(rates, burst_s=burst_s)
        self._out_mean: float | None = None
        self._pid: int | None = None
        self._store: pacing.StateStore | None = None
        self._slots: _Slots | None = None
        self._turn: tuple[asyncio.AbstractEventLoop, tuple[asyncio.Lock, asyncio.Lock]] | None = None
        self.pauses_set = 0  # pauses this instance set (exhausted rate-limit headers, long Retry-After, ...)
        self.slowdowns = 0  # times a 429 seen by this instance slowed the shared pace down

    @classmethod
    def from_role(
        cls, cfg: RoleConfig, base_url: str, directory: str | os.PathLike[str], **overrides: Any
    ) -> EndpointLimiter:
        """The limiter a role's configuration asks for (``max_concurrency`` becomes the cross-process cap)."""
        kwargs: dict[str, Any] = {
            "rpm": cfg.rpm,
            "tpm_in": cfg.tpm_in,
            "tpm_out": cfg.tpm_out,
            "max_concurrency": cfg.max_concurrency,
            "backend_url": cfg.limits_backend_url,
            "window_s": cfg.limits_window_s,
            "burst_s": cfg.limits_burst_s,
        }
        kwargs.update(overrides)
        return cls(directory, base_url, cfg.model, **kwargs)

    def __repr__(self) -> str:
        backend = "file" if self.backend_url is None else self.backend_url.split(":", 1)[0]
        return (
            f"EndpointLimiter(key={self.key!r}, rpm={self.rpm}, tpm_in={self.tpm_in}, tpm_out={self.tpm_out}, "
            f"max_concurrency={self.max_concurrency}, window_s={self.window_s}, burst_s={self.rule.burst_s}, "
            f"backend={backend})"
        )

    @property
    def has_rates(self) -> bool:
        return bool(self.rule.rates)

    # --- opening and closing -----------------------------------------------------------------------------

    def _ensure_open(self) -> pacing.StateStore:
        if self._pid == os.getpid() and self._store is not None:
            return self._store
        if self._pid is not None and self._pid != os.getpid():  # a forked child: the parent's handles are not ours
            self._store, self._slots = None, None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._store = pacing.open_store(self.directory, self.key, self.backend_url)
        if self.max_concurrency is not None:
            self._slots = _Slots(self.directory, self.key, self.max_concurrency)
        self._pid = os.getpid()
        return self._store

    def close(self) -> None:
        """Release the store's connection and the slot files (held slots are released too)."""
        if self._pid != os.getpid():
            self._pid, self._store, self._slots = None, None, None
            return
        if self._store is not None:
            self._store.close()
        if self._slots is not None:
            self._slots.close()
        self._store, self._slots, self._pid = None, None, None

    def __enter__(self) -> EndpointLimiter:
        self._ensure_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the pause and the pace ------------------------------------------------------------------------

    def paused_until(self) -> float:
        """Epoch seconds until which every process leaves this endpoint alone (0 or past: not paused)."""
        return float(self._ensure_open().update(lambda s: s["pause"]))

    def pause(self, seconds: float, reason: str = "") -> None:
        """Pause this endpoint for every process sharing the limits for ``seconds`` (a longer pause wins)."""
        if seconds <= 0:
            return
        until = time.time() + seconds
        if self._ensure_open().update(lambda s: pacing.extend_pause(s, until)):
            self.pauses_set += 1
            why = f" ({reason})" if reason else ""
            logger.info("endpoint %s/%s paused for %.2fs%s", self.base_url, self.model, seconds, why)

    def pace_factor(self) -> float:
        """The share of the configured rates in force now (below 1 after recent 429s)."""
        now = time.time()
        return float(self._ensure_open().update(lambda s: pacing.factor(s, now, self.rule)))

    def observe(self, status: int, headers: Mapping[str, str]) -> float | None:
        """Adapt to what the server said; returns the shared pause it set, if any.

        - 429 on a paced endpoint: slow the pace down (AIMD); only a ``Retry-After`` of at least
          ``PAUSE_ALL_AFTER_S`` also pauses everyone. 429 with nothing paced: pause everyone for its
          ``Retry-After`` (1 s when it gives none). 503 with ``Retry-After``: pause everyone that long.
        - any reply with ``x-ratelimit-remaining-requests`` or ``-tokens`` at 0: pause until the matching
          ``x-ratelimit-reset-requests`` / ``-tokens``.
        """
        if status == 429:
            delay = retry_after_s(headers)
            if self.has_rates:
                now = time.time()
                if self._ensure_open().update(lambda s: pacing.slow_down(s, now, self.rule)):
                    self.slowdowns += 1
                    logger.info(
                        "endpoint %s/%s answered 429: pace slowed to %.0f%% of the configured rate",
                        self.base_url,
                        self.model,
                        100 * self.pace_factor(),
                    )
                if delay is None or delay < PAUSE_ALL_AFTER_S:
                    return None
            delay = 1.0 if delay is None else delay
            self.pause(delay, "HTTP 429")
            return delay
        if status == 503:
            delay = retry_after_s(headers)
            if delay:
                self.pause(delay, "HTTP 503")
                return delay
            return None
        pause = None
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is None:
                continue
            try:
                exhausted = float(remaining) <= 0
            except ValueError:
                continue
            if exhausted:
                reset = parse_duration_s(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    pause = max(pause or 0.0, reset)
        if pause:
            self.pause(pause, "rate-limit headers: none remaining")
        return pause

    # --- one request -----------------------------------------------------------------------------------

    async def acquire(self, prompt_tokens: int, max_tokens: int) -> Permit:
        """Wait for a concurrency slot, then for this request's turn under every rate and any pause.

        ``prompt_tokens`` is charged as input; output is reserved at the running mean of earlier replies
        (``max_tokens`` before the first). Always pair with ``release``.
        """
        started = time.perf_counter()
        store = self._ensure_open()
        slot = await self._slots.acquire() if self._slots is not None else None
        tokens_out = max_tokens if self._out_mean is None else min(max_tokens, math.ceil(self._out_mean))
        weights = {REQUESTS: 1.0, TOKENS_IN: float(prompt_tokens), TOKENS_OUT: float(tokens_out)}
        try:
            # One request of this process at a time asks the shared schedule for its place (FIFO), and only
            # when its departure is near: the others wait here instead of polling the store.
            async with self._local_turn(0):
                while True:
                    now = time.time()
                    leave, reserved = store.update(
                        lambda s, now=now: pacing.reserve(s, now, weights, self.rule, RESERVE_AHEAD_S)
                    )
                    if reserved:
                        break
                    await asyncio.sleep(max(0.0, leave - RESERVE_AHEAD_S - time.time()))
            if (delay := leave - time.time()) > 0:
                await asyncio.sleep(delay)
            # A pause set while this request waited delays it too (its place in the schedule is kept), and the
            # first request after a pause goes alone. One request of this process at a time asks (FIFO again):
            # the others queue here rather than poll the store while the first one's reply is awaited.
            async with self._local_turn(1):
                while True:
                    wait, probe = store.update(lambda s: pacing.leave(s, time.time(), self.rule))
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
        except BaseException:
            if slot is not None:
                self._slots.release(slot)  # type: ignore[union-attr]
            raise
        return Permit(slot, prompt_tokens, tokens_out, time.perf_counter() - started, probe)

    def _local_turn(self, queue: int) -> asyncio.Lock:
        """This event loop's queues (0: for a place in the shared schedule, 1: to leave) for the shared state
        (``LLMClient.run`` starts a new loop per batch)."""
        loop = asyncio.get_running_loop()
        if self._turn is None or self._turn[0] is not loop:
            self._turn = (loop, (asyncio.Lock(), asyncio.Lock()))
        return self._turn[1][queue]

    def release(self, permit: Permit, tokens_in: int | None = None, tokens_out: int | None = None) -> None:
        """Settle a request: the server's usage (None when there was no reply) corrects what was reserved."""
        try:
            if permit.probe:
                self._ensure_open().update(pacing.end_probe)
            if self.rule.rates and (TOKENS_IN in self.rule.rates or TOKENS_OUT in self.rule.rates):
                corrections = {
                    TOKENS_IN: float((tokens_in or 0) - permit.tokens_in),
                    TOKENS_OUT: float((tokens_out or 0) - permit.tokens_out),
                }
                now = time.time()
                self._ensure_open().update(lambda s: pacing.settle(s, now, corrections, self.rule))
            if tokens_out is not None:
                mean = self._out_mean
                self._out_mean = float(tokens_out) if mean is None else 0.8 * mean + 0.2 * tokens_out
        finally:
            if permit.slot is not None and self._slots is not None:
                self._slots.release(permit.slot)

    @property
    def slots_held(self) -> int:
        """Concurrency slots this process holds now."""
        return self._slots.held if self._slots is not None else 0
