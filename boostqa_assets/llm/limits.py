"""Per-endpoint limits shared by every process on the machine (or, with Redis/PostgreSQL, every machine),
and a spending budget for a run.

An endpoint is a ``base_url`` + ``model`` pair (``endpoint_key``). For each one ``EndpointLimiter`` holds:

- **Rates**: requests, input tokens and output tokens per window (``rpm``, ``tpm_in``, ``tpm_out``; the window
  is 60 s unless told otherwise), counted by ``pyrate-limiter``'s sliding-window log. The default store is one
  SQLite file per endpoint under the directory the caller gives (``<BOOSTQA_HOME>/limits``), its
  check-and-insert serialised by an ``flock`` on a lock file, so every process and every run on the machine
  shares one count: four partitions of a backfill running in parallel stay under the limit together.
  ``backend_url: redis://...`` or ``postgresql://...`` puts the counts in the library's ``RedisBucket`` or
  ``PostgresBucket`` instead, which holds them across machines (the client libraries, ``redis`` or
  ``psycopg[pool]``, are imported only then and are not dependencies of this project: install the one you use).
- **A concurrency cap** (``max_concurrency``): N slot files, each held with a non-blocking ``flock`` while a
  request is on the wire. The kernel drops the lock when its holder dies, so a ``kill -9`` never leaks a slot.
  The cap is per machine, also with a remote backend (the slots are local files).
- **A shared pause**: a 429 or 503 with ``Retry-After``, or a reply whose ``x-ratelimit-remaining-requests``
  or ``-tokens`` is 0 with its ``x-ratelimit-reset-*``, pauses the endpoint for every process until then (a
  small file holding the paused-until time; with a remote backend also a Redis key or a PostgreSQL row).

How tokens are charged. A request's input tokens are estimated from its text (``estimate_tokens``: 4
characters a token) and charged before it is sent; its output tokens are reserved up front at the running
mean of the completions seen so far (``max_tokens`` until the first reply). After the reply the difference
to the server's reported usage goes into a per-process carry that the next request pays (or is credited),
so the counts converge on the real usage with no extra round trip, and in-flight requests cannot overshoot
the output limit by more than the spread around that mean (reserving ``max_tokens`` for every request would
waste most of the limit; charging only afterwards lets every in-flight request overshoot together). A
request that fails without usage (429, 5xx, timeout) gets its token reservation credited back; it still
counts as a request.

Counts are kept in units of ``quantum`` tokens (or requests) so that a window never holds more than
``MAX_UNITS`` log entries whatever the limit (pyrate-limiter's log stores one row per unit); the rounding
remainder rides in the same carry, so each process is off by less than one quantum (0.02% of the limit).

``Budget`` is the spending cap of a run (tokens and/or US dollars): see its docstring for the rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrate_limiter import AbstractBucket, BucketFactory, Limiter, Rate, RateItem, SQLiteBucket, SQLiteQueries

if TYPE_CHECKING:
    from boostqa_assets.configs import RoleConfig

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 60.0
MAX_UNITS = 5000  # log entries one window may hold per quantity (bounds the per-request COUNT in the store)
REQUESTS, TOKENS_IN, TOKENS_OUT = "requests", "tokens_in", "tokens_out"
_SLOT_POLL_S = (0.002, 0.025)  # first and longest wait between tries for a slot held by another process
_REMOTE_PAUSE_TTL_S = 0.2  # how long a remote paused-until value is trusted before it is read again


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


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait a server asks for: ``Retry-After`` first, else the ``x-ratelimit-reset-*`` headers."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return parse_duration_s(headers.get("x-ratelimit-reset-requests") or headers.get("x-ratelimit-reset-tokens"))


# --- local building blocks -------------------------------------------------------------------------------


class _FileRLock:
    """A reentrant lock that also holds an ``flock`` on a file, so it serialises threads and processes.

    Why not ``filelock.FileLock`` (what ``SQLiteBucket.init_from_file`` uses): when another process holds it,
    it sleeps in 50 ms steps, in the event loop's thread; a blocking ``flock`` wakes the moment the holder
    (busy for well under a millisecond) lets go. The kernel releases it if the holder dies.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._rlock = threading.RLock()
        self._depth = 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._rlock.acquire(blocking, timeout if blocking else -1):
            return False
        if self._depth == 0 and self._fd >= 0:  # closed: only the leaker thread may still come by, to find no work
            try:
                if blocking and timeout in (-1, None):
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                elif not self._try_flock(time.monotonic() + (timeout if blocking else 0.0)):
                    self._rlock.release()
                    return False
            except BaseException:
                self._rlock.release()
                raise
        self._depth += 1
        return True

    def _try_flock(self, deadline: float) -> bool:
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._rlock.release()

    def __enter__(self) -> _FileRLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        with self._rlock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


class _Meter:
    """Turns an amount (requests or tokens) into whole units of ``quantum``, carrying the remainder, debts
    (usage above what was reserved) and credits (reserved but not used) to the next charge of this process."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.quantum = max(1, math.ceil(limit / MAX_UNITS))
        self.units_limit = max(1, limit // self.quantum)
        self.carry = 0

    def take(self, amount: int) -> int:
        total = self.carry + amount
        units = min(max(0, total // self.quantum), self.units_limit)
        self.carry = total - units * self.quantum
        return units

    def adjust(self, delta: int) -> None:
        # A credit never exceeds a window's worth: older over-reservations have left the window anyway.
        self.carry = max(self.carry + delta, -self.units_limit * self.quantum)


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


class _PauseFile:
    """The paused-until time (epoch seconds) of one endpoint, in a small file every local process reads.

    Reading costs one ``stat`` while the file is unchanged; writing keeps the later of two times.
    """

    def __init__(self, directory: Path, key: str) -> None:
        self.path = directory / f"{key}.pause"
        self._lock_path = directory / f"{key}.pause.lock"
        self._seen: tuple[int, int, int] | None = None
        self._until = 0.0

    def read(self) -> float:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0.0
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig != self._seen:
            try:
                self._until = float(self.path.read_text() or 0.0)
            except (OSError, ValueError):
                self._until = 0.0
            self._seen = sig
        return self._until

    def extend(self, until: float) -> bool:
        """Set the pause to ``until`` unless a later one is already set; True if it changed."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.read() >= until:
                return False
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(repr(until))
            os.replace(tmp, self.path)
            return True
        finally:
            os.close(fd)  # drops the flock


class _RedisPause:
    """Paused-until in a Redis key (expires with the pause), for limits shared across machines."""

    _SET_MAX = """
    local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
    if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
    return 0
    """

    def __init__(self, client: Any, key: str) -> None:
        self._client, self._key = client, f"boostqa:limits:{key}:pause"
        self._script = client.register_script(self._SET_MAX)
        self._cached, self._read_at = 0.0, 0.0

    def read(self) -> float:
        now = time.monotonic()
        if now - self._read_at > _REMOTE_PAUSE_TTL_S:
            value = self._client.get(self._key)
            self._cached, self._read_at = float(value) if value else 0.0, now
        return self._cached

    def extend(self, until: float) -> None:
        ttl_ms = max(1, int((until - time.time()) * 1000) + 1000)
        self._script(keys=[self._key], args=[repr(until), ttl_ms])
        self._cached = max(self._cached, until)


class _PostgresPause:
    """Paused-until in a PostgreSQL table row per endpoint, for limits shared across machines."""

    def __init__(self, pool: Any, key: str) -> None:
        self._pool, self._key = pool, key
        self._cached, self._read_at = 0.0, 0.0
        with pool.connection() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS boostqa_limits_pause "
                "(key TEXT PRIMARY KEY, until DOUBLE PRECISION NOT NULL)"
            )

    def read(self) -> float:
        now = time.monotonic()
        if now - self._read_at > _REMOTE_PAUSE_TTL_S:
            with self._pool.connection() as conn:
                row = conn.execute("SELECT until FROM boostqa_limits_pause WHERE key = %s", (self._key,)).fetchone()
            self._cached, self._read_at = float(row[0]) if row else 0.0, now
        return self._cached

    def extend(self, until: float) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO boostqa_limits_pause (key, until) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                "SET until = GREATEST(boostqa_limits_pause.until, EXCLUDED.until)",
                (self._key, until),
            )
        self._cached = max(self._cached, until)


class _Router(BucketFactory):
    """One pyrate-limiter bucket per quantity (requests, input tokens, output tokens), picked by item name,
    with one background leaker for all of them."""

    def __init__(self, buckets: dict[str, AbstractBucket]) -> None:
        self._buckets = buckets
        for bucket in buckets.values():
            self.schedule_leak(bucket)

    def wrap_item(self, name: str, weight: int = 1) -> Any:
        now = self._buckets[name].now()  # each backend's own clock (wall time, or the database's)
        if isinstance(now, int):
            return RateItem(name, now, weight=weight)

        async def wrap() -> RateItem:
            return RateItem(name, await now, weight=weight)

        return wrap()

    def get(self, item: RateItem) -> AbstractBucket:
        return self._buckets[item.name]

    def owned_buckets(self) -> list[AbstractBucket]:
        return list(self._buckets.values())


@dataclass(frozen=True)
class Permit:
    """What ``EndpointLimiter.acquire`` took for one request; hand it back to ``release``."""

    slot: int | None
    tokens_in: int
    tokens_out: int
    waited_s: float


# --- the limiter ---------------------------------------------------------------------------------------


class EndpointLimiter:
    """Rate limits, a concurrency cap and a shared pause for one endpoint (see the module docstring).

    Build one per client with the directory that holds the machine's shared state
    (``<BOOSTQA_HOME>/limits``); every limit left at None is not enforced. Use::

        permit = await limiter.acquire(prompt_tokens, max_tokens)   # before each HTTP attempt
        try:
            response = ...                                          # send
            limiter.observe(response.status_code, response.headers) # 429 / rate-limit headers -> pause
        finally:
            limiter.release(permit, tokens_in, tokens_out)          # usage from the reply, None if none

    State (SQLite connection, slot files, the leaker thread) opens on first use and again after ``close``,
    and again in a forked child.
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
                f"limits backend URL {backend_url!r} is not supported; use redis://..., rediss://..., "
                "postgresql://... or none (SQLite under the limits directory)"
            )
        self.directory = Path(directory)
        self.base_url, self.model = base_url.rstrip("/"), model
        self.key = key or endpoint_key(base_url, model)
        self.rpm, self.tpm_in, self.tpm_out = rpm, tpm_in, tpm_out
        self.max_concurrency = max_concurrency
        self.backend_url = backend_url
        self.window_s = window_s
        self._meters = {
            name: _Meter(name, limit)
            for name, limit in ((TOKENS_IN, tpm_in), (TOKENS_OUT, tpm_out), (REQUESTS, rpm))
            if limit is not None
        }
        self._out_mean: float | None = None
        self._pid: int | None = None
        self._limiter: Limiter | None = None
        self._closers: list[Any] = []
        self._slots: _Slots | None = None
        self._pause_file: _PauseFile | None = None
        self._remote_pause: _RedisPause | _PostgresPause | None = None
        self.pauses_set = 0  # pauses this instance set (after a 429 or exhausted rate-limit headers)

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
        }
        kwargs.update(overrides)
        return cls(directory, base_url, cfg.model, **kwargs)

    def __repr__(self) -> str:
        return (
            f"EndpointLimiter(key={self.key!r}, rpm={self.rpm}, tpm_in={self.tpm_in}, tpm_out={self.tpm_out}, "
            f"max_concurrency={self.max_concurrency}, window_s={self.window_s}, "
            f"backend={'sqlite' if self.backend_url is None else self.backend_url.split(':', 1)[0]})"
        )

    @property
    def has_rates(self) -> bool:
        return bool(self._meters)

    # --- opening and closing -----------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._pid == os.getpid():
            return
        if self._pid is not None:  # a forked child: the parent's locks and connections are not ours to use
            self._limiter, self._closers, self._slots = None, [], None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pause_file = _PauseFile(self.directory, self.key)
        if self.max_concurrency is not None:
            self._slots = _Slots(self.directory, self.key, self.max_concurrency)
        if self._meters:
            window_ms = max(1, round(self.window_s * 1000))
            rates = {name: [Rate(m.units_limit, window_ms)] for name, m in self._meters.items()}
            if self.backend_url is None:
                buckets = self._sqlite_buckets(rates)
            elif self.backend_url.startswith(("postgresql://", "postgres://")):
                buckets = self._postgres_buckets(rates)
            else:
                buckets = self._redis_buckets(rates)
            self._limiter = Limiter(_Router(buckets))
        self._pid = os.getpid()

    def _sqlite_buckets(self, rates: dict[str, list[Rate]]) -> dict[str, AbstractBucket]:
        path = self.directory / f"{self.key}.sqlite"
        lock = _FileRLock(self.directory / f"{self.key}.sqlite.lock")
        with lock:
            conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for name in rates:
                conn.execute(SQLiteQueries.CREATE_BUCKET_TABLE.format(table=name))
                conn.execute(
                    SQLiteQueries.CREATE_INDEX_ON_TIMESTAMP.format(index_name=f"idx_{name}_ts", table_name=name)
                )
            conn.commit()
        self._closers += [conn.close, lock.close]
        return {name: SQLiteBucket(r, conn, name, lock=lock) for name, r in rates.items()}

    def _redis_buckets(self, rates: dict[str, list[Rate]]) -> dict[str, AbstractBucket]:
        try:
            import redis
        except ImportError:
            raise ImportError(
                f"limits_backend_url {self.backend_url!r} needs the `redis` package: pip install 'redis>=6.2'"
            ) from None
        from pyrate_limiter import RedisBucket

        client = redis.Redis.from_url(self.backend_url)
        self._closers.append(client.close)
        self._remote_pause = _RedisPause(client, self.key)
        return {
            name: RedisBucket.init(r, client, bucket_key=f"boostqa:limits:{self.key}:{name}")
            for name, r in rates.items()
        }

    def _postgres_buckets(self, rates: dict[str, list[Rate]]) -> dict[str, AbstractBucket]:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise ImportError(
                f"limits_backend_url {self.backend_url!r} needs `psycopg[pool]`: pip install 'psycopg[binary,pool]'"
            ) from None
        from pyrate_limiter import PostgresBucket

        pool = ConnectionPool(self.backend_url, min_size=1, max_size=4, open=True)
        self._closers.append(pool.close)
        self._remote_pause = _PostgresPause(pool, self.key)
        return {name: PostgresBucket(pool, f"boostqa_{self.key}_{name}", r) for name, r in rates.items()}

    def close(self) -> None:
        """Release connections, slot files and the leaker thread (held slots are released too)."""
        if self._pid != os.getpid():
            self._pid = None
            return
        if self._limiter is not None:
            self._limiter.close()  # stops the leaker; closes the buckets
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()
        if self._slots is not None:
            self._slots.close()
        self._limiter, self._closers, self._slots, self._remote_pause, self._pid = None, [], None, None, None

    def __enter__(self) -> EndpointLimiter:
        self._ensure_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the pause -------------------------------------------------------------------------------------

    def paused_until(self) -> float:
        """Epoch seconds until which every process leaves this endpoint alone (0 or past: not paused)."""
        self._ensure_open()
        assert self._pause_file is not None
        until = self._pause_file.read()
        if self._remote_pause is not None:
            until = max(until, self._remote_pause.read())
        return until

    def pause(self, seconds: float, reason: str = "") -> None:
        """Pause this endpoint for every process sharing the limits for ``seconds`` (a longer pause wins)."""
        if seconds <= 0:
            return
        self._ensure_open()
        assert self._pause_file is not None
        until = time.time() + seconds
        if self._pause_file.extend(until):
            self.pauses_set += 1
            why = f" ({reason})" if reason else ""
            logger.info("endpoint %s/%s paused for %.2fs%s", self.base_url, self.model, seconds, why)
        if self._remote_pause is not None:
            self._remote_pause.extend(until)

    async def _wait_pause(self) -> float:
        waited = 0.0
        while True:
            delay = self.paused_until() - time.time()
            if delay <= 0:
                return waited
            await asyncio.sleep(delay)  # then look again: another process may have extended it
            waited += delay

    def observe(self, status: int, headers: Mapping[str, str]) -> float | None:
        """Adapt to what the server said: returns the pause it set, if any.

        - 429 (or 503) with ``Retry-After`` or ``x-ratelimit-reset-*``: pause that long (a 429 without either
          pauses 1 s).
        - any reply with ``x-ratelimit-remaining-requests`` or ``-tokens`` at 0: pause until the matching
          ``x-ratelimit-reset-requests`` / ``-tokens``.
        """
        if status in (429, 503):
            delay = retry_after_s(headers)
            if delay is None and status == 429:
                delay = 1.0
            if delay:
                self.pause(delay, f"HTTP {status}")
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
        """Wait for a concurrency slot, the end of any pause, and room under every rate; take them.

        ``prompt_tokens`` is charged as input; output is reserved at the running mean of earlier replies
        (``max_tokens`` before the first). Always pair with ``release``.
        """
        started = time.perf_counter()
        self._ensure_open()
        slot = await self._slots.acquire() if self._slots is not None else None
        try:
            await self._wait_pause()
            tokens_out = max_tokens if self._out_mean is None else min(max_tokens, math.ceil(self._out_mean))
            if self._limiter is not None:
                for name, amount in ((TOKENS_IN, prompt_tokens), (TOKENS_OUT, tokens_out), (REQUESTS, 1)):
                    meter = self._meters.get(name)
                    if meter is None:
                        continue
                    units = meter.take(amount)
                    if units and not await self._limiter.try_acquire_async(name, units):
                        raise RuntimeError(f"rate limit {name} can never admit {units} units")  # clamped: unreachable
                await self._wait_pause()  # a pause may have begun while this request waited for room
        except BaseException:
            if slot is not None:
                self._slots.release(slot)  # type: ignore[union-attr]
            raise
        return Permit(slot, prompt_tokens, tokens_out, time.perf_counter() - started)

    def release(self, permit: Permit, tokens_in: int | None = None, tokens_out: int | None = None) -> None:
        """Settle a request: the server's usage (None when there was no reply) corrects what was reserved."""
        try:
            meter = self._meters.get(TOKENS_IN)
            if meter is not None:
                meter.adjust((tokens_in or 0) - permit.tokens_in)
            meter = self._meters.get(TOKENS_OUT)
            if meter is not None:
                meter.adjust((tokens_out or 0) - permit.tokens_out)
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


# --- the budget ----------------------------------------------------------------------------------------


class BudgetExhausted(Exception):
    """Raised inside the client when a request does not fit the budget; its row gets ``budget_exhausted``."""


class Budget:
    """A spending cap for a run: tokens (input + output) and/or US dollars (from the role's price table).

    The rule: a request is sent only while what was spent, plus what requests already on the wire may still
    spend, plus this request's worst case (its estimated prompt tokens + ``max_tokens``, priced) stays within
    every cap. The first request that does not fit exhausts the budget for good: it and every later request
    (of every client sharing this object) are not sent, and come back with ``error="budget_exhausted"``;
    requests already on the wire finish and are kept. So a run never spends more than the cap (up to the
    error of the prompt estimate), stops cleanly, and keeps everything paid for (it is in the response cache:
    a re-run with a larger budget pays only for the rest). Cache hits cost nothing and are always served.

    The budget counts in this process: ``RoleConfig.budget_tokens`` / ``budget_usd`` give each client (one
    role in one materialization) its own; pass one ``Budget`` to several clients for a run-wide cap.
    """

    def __init__(self, tokens: int | None = None, usd: float | None = None) -> None:
        if tokens is not None and tokens < 1:
            raise ValueError(f"budget tokens must be >= 1 or None, got {tokens}")
        if usd is not None and usd <= 0:
            raise ValueError(f"budget usd must be > 0 or None, got {usd}")
        self.tokens, self.usd = tokens, usd
        self.spent_tokens, self.spent_usd = 0, 0.0
        self._reserved_tokens, self._reserved_usd = 0, 0.0
        self.exhausted = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Budget(tokens={self.tokens}, usd={self.usd}, spent_tokens={self.spent_tokens}, "
            f"spent_usd={self.spent_usd:.6f}, exhausted={self.exhausted})"
        )

    def try_reserve(self, tokens: int, usd: float) -> bool:
        """Reserve a request's worst case; False (and exhausted from now on) if it does not fit."""
        with self._lock:
            if self.exhausted:
                return False
            fits = (self.tokens is None or self.spent_tokens + self._reserved_tokens + tokens <= self.tokens) and (
                self.usd is None or self.spent_usd + self._reserved_usd + usd <= self.usd + 1e-12
            )
            if not fits:
                self.exhausted = True
                return False
            self._reserved_tokens += tokens
            self._reserved_usd += usd
            return True

    def settle(self, reserved_tokens: int, reserved_usd: float, tokens: int, usd: float) -> None:
        """Replace a reservation with what the request really cost (0 when nothing came back)."""
        with self._lock:
            self._reserved_tokens -= reserved_tokens
            self._reserved_usd -= reserved_usd
            self.spent_tokens += tokens
            self.spent_usd += usd

    def describe(self) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.spent_tokens} of {self.tokens} tokens")
        if self.usd is not None:
            parts.append(f"${self.spent_usd:.4f} of ${self.usd:g}")
        return ", ".join(parts)
