"""Pacing: requests and the tokens they carry leave at the configured rate, spread evenly, for every process
(and, with a remote store, every machine) sharing an endpoint.

The algorithm is GCRA (the generic cell rate algorithm: a leaky bucket used as a meter). Each quantity
(requests, input tokens, output tokens) keeps one number, the theoretical arrival time ``tat`` of the next
unit. A request of weight ``w`` at a rate with emission interval ``T`` may leave once the bucket's level
(``tat - now``) plus its own ``w * T`` fits the burst tolerance; it then moves ``tat`` on by ``w * T``. A
request is therefore one atomic read-modify-write of a few floats, whatever the limit, and callers reserve
their departure time instead of polling: a process that asks early leaves early, and requests of every process
leave one interval apart.

Why not a window counter (pyrate-limiter, which this module replaced): a limiter that counts a minute's window
lets the whole minute's quota out at once. Providers that enforce a per-minute limit over shorter periods
(OpenAI documents 600 RPM enforced as 10 per second) answer such bursts with 429s: measured, 82% of requests
and every row of a run. No well-kept library offers GCRA with a rate that adapts (below) over a local file,
Redis and PostgreSQL, and the algorithm is a dozen lines (``reserve``), so it lives here.

Adapting to the server (AIMD): a 429 multiplies the pace by ``decrease`` (at most once per ``cooldown_s``),
turns the burst off, and remembers a ceiling a little under the pace that drew it (``margin``). The pace
recovers quickly (``recover_per_s``) up to that ceiling, then probes above it slowly (``probe_per_s``) back to
the configured rate; the burst recovers over ``burst_recover_s``. A fresh state starts with no burst: it is
earned by running without 429s. From its first 429 an endpoint also counts as quantized: the actual departures
of the last second are counted (``depart``) and none leaves while a second's quota has, so requests that a busy
process sends late do not crowd the ones a second before them at the server. So an endpoint whose limit is
exactly what is configured, counted over a minute, is used at its full rate with no 429; one that quantizes it
into 1 s windows costs a 429 now and then and runs a few percent under the limit.

The state of one endpoint is a small JSON object (``new_state``); the functions below are pure over it, and a
store (``FileStore``, ``PostgresStore``, ``RedisStore``) applies one of them atomically.

A shared pause (``extend_pause``: an exhausted ``x-ratelimit-remaining-*``, a long ``Retry-After``) stops every
process, and when it ends the first request to leave goes alone (``leave``): the others go once its reply is in
and has set a new pause or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)

REQUESTS, TOKENS_IN, TOKENS_OUT = "requests", "tokens_in", "tokens_out"
STATE_VERSION = 1
T = TypeVar("T")


@dataclass(frozen=True)
class PacingRule:
    """How one endpoint is paced.

    ``rates``: units per second of each limited quantity (``rpm / window_s`` and so on); ``burst_s``: how many
    seconds of the rate may leave at once after an idle spell (GCRA's burst tolerance); the AIMD constants
    say how a 429 slows the pace and how fast it recovers.
    """

    rates: Mapping[str, float]
    burst_s: float = 1.0
    decrease: float = 0.9
    margin: float = 0.03
    recover_per_s: float = 0.05
    probe_per_s: float = 0.001
    burst_recover_s: float = 600.0
    cooldown_s: float = 2.0
    floor: float = 0.05
    quantum_slack: float = 0.03  # the window ``depart`` keeps is this much longer than the server's

    def __post_init__(self) -> None:
        for name, rate in self.rates.items():
            if rate <= 0:
                raise ValueError(f"pacing rate of {name} must be > 0, got {rate}")
        if self.burst_s < 0:
            raise ValueError(f"burst_s must be >= 0, got {self.burst_s}")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {self.decrease}")


def new_state(now: float) -> dict[str, Any]:
    """A fresh endpoint: nothing reserved, full pace, no ceiling below it, no burst earned yet, no pause."""
    return {"v": STATE_VERSION, "tat": {}, "f0": 1.0, "ceil": 1.0, "g0": 0.0, "t0": now, "cut": 0.0, "pause": 0.0}


def valid_state(state: Any) -> bool:
    return isinstance(state, dict) and state.get("v") == STATE_VERSION and isinstance(state.get("tat"), dict)


def factor(state: Mapping[str, Any], now: float, rule: PacingRule) -> float:
    """The share of the configured rate in force now (1.0 unless 429s slowed it down)."""
    f0, ceil, elapsed = state["f0"], state["ceil"], max(0.0, now - state["t0"])
    fast = f0 + rule.recover_per_s * elapsed
    if fast <= ceil:
        return fast
    reached = max(0.0, (ceil - f0) / rule.recover_per_s)  # seconds it took to get back to the ceiling
    return min(1.0, max(f0, ceil) + rule.probe_per_s * (elapsed - reached))


def burst_scale(state: Mapping[str, Any], now: float, rule: PacingRule) -> float:
    """The share of ``burst_s`` allowed now: 0 on a fresh state or after a 429, back to 1 over time."""
    if rule.burst_recover_s <= 0:
        return 1.0
    return min(1.0, state["g0"] + max(0.0, now - state["t0"]) / rule.burst_recover_s)


def reserve(
    state: dict[str, Any], now: float, weights: Mapping[str, float], rule: PacingRule, horizon: float = math.inf
) -> tuple[float, bool]:
    """Reserve one request's departure: ``(time, True)``, the epoch time at which it may leave (``>= now``).

    Every limited quantity must fit at that time, and it never leaves during a pause. A departure later than
    ``now + horizon`` is not reserved: ``(time, False)`` says when to ask again (reserving far ahead would keep
    today's pace for requests that leave after a 429 has slowed it down). Mutates ``state`` only on success.
    """
    f = factor(state, now, rule)
    tolerance = rule.burst_s * burst_scale(state, now, rule)
    tat = state["tat"]
    start = max(now, state["pause"])
    steps: dict[str, float] = {}
    for name, rate in rule.rates.items():
        step = weights.get(name, 0.0) / (rate * f)  # seconds of this quantity's schedule the request uses
        steps[name] = step
        # The bucket holds max(tolerance, step): a request bigger than the burst still goes when it is empty.
        start = max(start, tat.get(name, now) - max(0.0, max(tolerance, step) - step))
    if start > now + horizon:
        return start, False
    for name, step in steps.items():
        tat[name] = max(tat.get(name, now), start) + step
    return start, True


def settle(state: dict[str, Any], now: float, corrections: Mapping[str, float], rule: PacingRule) -> None:
    """Correct what a request reserved with what it really used (``used - reserved`` units per quantity):
    a debt moves the schedule on, a credit moves it back (never before now)."""
    f = factor(state, now, rule)
    tat = state["tat"]
    for name, delta in corrections.items():
        rate = rule.rates.get(name)
        if rate is None or not delta or name not in tat:
            continue
        tat[name] = max(now, tat[name] + delta / (rate * f)) if delta < 0 else tat[name] + delta / (rate * f)


QUANTUM_S = 1.0  # the short window providers count a per-minute limit over (OpenAI: per second)
BIN_S = 0.01  # departures are counted in bins of 10 ms


def depart(state: dict[str, Any], now: float, rule: PacingRule) -> float:
    """On an endpoint that has answered 429s (it counts its limit over short windows), record this request's
    actual departure if fewer than a window's quota left in the last ``QUANTUM_S`` (plus ``quantum_slack``), and
    return 0; otherwise return how long to wait. The schedule (``reserve``) spaces requests evenly; this catches
    what a busy machine does to it: requests of a process that woke late leave together, and at the server's
    1 s window they would crowd the requests that left on time a second earlier. Elsewhere: always 0."""
    rate = rule.rates.get(REQUESTS)
    if rate is None or not state.get("quantized"):
        return 0.0
    quota = max(1, math.floor(rate * QUANTUM_S))
    span = QUANTUM_S * (1.0 + rule.quantum_slack)
    bins: dict[str, int] = state.setdefault("bins", {})
    oldest = math.floor((now - span) / BIN_S)  # bins up to this one have left the window
    for k in [k for k in bins if int(k) <= oldest]:
        del bins[k]
    total = sum(bins.values())
    if total < quota:
        current = str(math.floor(now / BIN_S))
        bins[current] = bins.get(current, 0) + 1
        return 0.0
    excess = total - quota + 1
    for k in sorted(bins, key=int):  # the window must lose `excess` departures: wait for the bins holding them
        excess -= bins[k]
        if excess <= 0:
            return max(BIN_S / 2, (int(k) + 1) * BIN_S + span - now)
    return BIN_S


def slow_down(state: dict[str, Any], now: float, rule: PacingRule) -> bool:
    """A 429: multiply the pace by ``decrease`` and drop the burst, unless that already happened within
    ``cooldown_s`` (the other requests of the same burst bring their 429s in too). True if it slowed down."""
    if now - state["cut"] < rule.cooldown_s:
        return False
    current = factor(state, now, rule)
    # At or above the ceiling (a fresh state's is 1.0), probing found the limit: the ceiling goes a margin under
    # it. A 429 while still recovering below it means the ceiling is a little too high: it gives way a little.
    if current >= state["ceil"] - 1e-9:
        state["ceil"] = max(rule.floor, current * (1.0 - rule.margin))
    else:
        state["ceil"] = max(rule.floor, state["ceil"] * (1.0 - rule.margin / 3))
    state["f0"] = max(rule.floor, current * rule.decrease)
    state["g0"] = 0.0
    state["t0"] = state["cut"] = now
    state["quantized"] = True
    return True


def extend_pause(state: dict[str, Any], until: float) -> bool:
    """Nothing leaves before ``until`` (a longer pause already set wins), and then the first request leaves
    alone (``leave``). True if it changed."""
    if until <= state["pause"]:
        return False
    state["pause"] = until
    state["probe"] = True
    return True


PROBE_HOLD_S = 10.0  # after a pause, the others wait at most this long for the first request's reply
HOLD_POLL_S = 0.02  # how often the next request looks whether that reply is in


def leave(state: dict[str, Any], now: float, rule: PacingRule) -> tuple[float, bool]:
    """May a request whose reserved time has come leave now? ``(0, probe)`` if it may, ``(seconds, False)`` to
    wait. Nothing leaves during a pause. The first request after one leaves alone (``probe`` True) and the
    others wait for its reply (``end_probe``) or ``PROBE_HOLD_S``: a pause ends when one slot frees at the
    server, and every process releasing its queue then would draw a 429 each and pause again. On a quantized
    endpoint the departure is also counted (``depart``)."""
    if now < state["pause"]:
        return state["pause"] - now, False
    if now < state.get("hold", 0.0):  # the first request's reply is awaited: look again soon
        return min(state["hold"] - now, HOLD_POLL_S), False
    wait = depart(state, now, rule)
    if wait > 0:
        return wait, False
    if not state.get("probe"):
        return 0.0, False
    state["probe"] = False
    state["hold"] = now + PROBE_HOLD_S
    return 0.0, True


def end_probe(state: dict[str, Any]) -> None:
    """The request that left first after a pause has its answer: the others may go (a new pause holds them)."""
    state["hold"] = 0.0


# --- stores ------------------------------------------------------------------------------------------------


class StateStore(Protocol):
    """Applies a function to one endpoint's state atomically (for every process and machine sharing it)."""

    def update(self, fn: Callable[[dict[str, Any]], T]) -> T: ...

    def close(self) -> None: ...


_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


class FileStore:
    """The state in a small file, read and written under an ``flock``: every process of the machine.

    A transaction is a blocking ``flock`` (held for tens of microseconds), ``pread``, the function, ``pwrite``.
    A thread lock guards it too: ``flock`` does not exclude threads sharing a descriptor. The descriptor is
    reopened in a forked child (a shared open file description would share the lock).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = -1
        self._pid = -1
        with _FILE_LOCKS_GUARD:
            self._lock = _FILE_LOCKS.setdefault(str(self.path.resolve()), threading.Lock())

    def _open(self) -> int:
        if self._pid != os.getpid() or self._fd < 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._fd

    def update(self, fn: Callable[[dict[str, Any]], T]) -> T:
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, 1 << 16, 0)
                state: Any = None
                if raw:
                    try:
                        state = json.loads(raw)
                    except ValueError:
                        logger.warning("pacing state %s is unreadable; starting it afresh", self.path)
                if not valid_state(state):
                    state = new_state(time.time())
                before = raw
                out = fn(state)
                data = json.dumps(state, separators=(",", ":")).encode()
                if data != before:
                    os.pwrite(fd, data, 0)
                    if len(data) < len(before):
                        os.ftruncate(fd, len(data))
                return out
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._pid = -1, -1


class PostgresStore:
    """The state in a PostgreSQL row per endpoint (``SELECT ... FOR UPDATE``): every machine of a deployment.

    Uses ``psycopg2``, which the scale-out profile installs anyway (``dagster-postgres``); one connection per
    process, three round trips a request.
    """

    TABLE = "boostqa_pacing"

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self._conn: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        if self._conn is None or self._pid != os.getpid():
            try:
                import psycopg2
            except ImportError:
                raise ImportError(
                    f"limits_backend_url {redact_url(self.url)!r} needs `psycopg2`: pip install psycopg2-binary"
                ) from None
            self._conn = psycopg2.connect(self.url)
            self._pid = os.getpid()
            with self._conn, self._conn.cursor() as cur:
                # Two processes creating the table at once collide even with IF NOT EXISTS: serialise them.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.TABLE,))
                cur.execute(f"CREATE TABLE IF NOT EXISTS {self.TABLE} (key TEXT PRIMARY KEY, state TEXT NOT NULL)")
        return self._conn

    def update(self, fn: Callable[[dict[str, Any]], T]) -> T:
        with self._lock:
            conn = self._connect()
            with conn, conn.cursor() as cur:  # one transaction: commit on success, roll back on error
                cur.execute(
                    f"INSERT INTO {self.TABLE} (key, state) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                    (self.key, json.dumps(new_state(time.time()))),
                )
                cur.execute(f"SELECT state FROM {self.TABLE} WHERE key = %s FOR UPDATE", (self.key,))
                state = json.loads(cur.fetchone()[0])
                if not valid_state(state):
                    state = new_state(time.time())
                out = fn(state)
                cur.execute(f"UPDATE {self.TABLE} SET state = %s WHERE key = %s", (json.dumps(state), self.key))
            return out

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


class RedisStore:
    """The state in a Redis key per endpoint, updated in an optimistic ``WATCH``/``MULTI`` transaction."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, f"boostqa:pacing:{key}"
        self._client: Any = None
        self._pid = -1

    def _connect(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            try:
                import redis
            except ImportError:
                raise ImportError(
                    f"limits_backend_url {redact_url(self.url)!r} needs the `redis` package: pip install 'redis>=5'"
                ) from None
            self._client = redis.Redis.from_url(self.url)
            self._pid = os.getpid()
        return self._client

    def update(self, fn: Callable[[dict[str, Any]], T]) -> T:
        import redis

        client = self._connect()
        while True:
            with client.pipeline() as pipe:
                try:
                    pipe.watch(self.key)
                    raw = pipe.get(self.key)
                    state = json.loads(raw) if raw else None
                    if not valid_state(state):
                        state = new_state(time.time())
                    out = fn(state)
                    pipe.multi()
                    pipe.set(self.key, json.dumps(state, separators=(",", ":")))
                    pipe.execute()
                    return out
                except redis.WatchError:  # another process changed it in between: apply again to the new state
                    continue

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None


def redact_url(url: str) -> str:
    """A backend URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(directory: str | os.PathLike[str], key: str, backend_url: str | None) -> StateStore:
    """The store a limiter's configuration asks for: a file under ``directory`` unless ``backend_url`` names
    PostgreSQL (``postgresql://``) or Redis (``redis://``, ``rediss://``, ``unix://``)."""
    if backend_url is None:
        return FileStore(Path(directory) / f"{key}.pacing")
    if backend_url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(backend_url, key)
    return RedisStore(backend_url, key)
