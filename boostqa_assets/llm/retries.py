"""When a failed attempt goes again, how long it waits, and when the endpoint counts as down.

- A 429 is not a failure: the request waits what the server asks (``Retry-After``, or exponential backoff
  when it says nothing) and goes again, for as long as ``rate_limit_max_wait_s`` in all; it never uses up
  ``max_retries`` and never counts toward the circuit breaker.
- Timeouts, dropped connections, 5xx and non-JSON bodies are retried ``max_retries`` times with exponential
  backoff and jitter, raised to the server's ``Retry-After`` when it sends one (a floor, never capped).
- The circuit breaker opens after ``threshold`` requests in a row failed all their retries, or at once on an
  endpoint that refuses (401, 403, 404). Once open, nothing more is sent; requests on the wire finish.

``tenacity`` runs the loop (async-aware, well kept); the stop and wait rules are ours because they depend on
what kind of failure came back.
"""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from boostqa_assets.llm.transport import RateLimited, RetryableError

if TYPE_CHECKING:
    from boostqa_assets.configs import RoleConfig


class RequestRetries:
    """The retry state of one request: transport failures so far and seconds waited on 429s."""

    def __init__(self, cfg: RoleConfig) -> None:
        self.cfg = cfg
        self.failures = 0
        self.rate_limits = 0
        self.rate_limited_s = 0.0

    def _stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            self.rate_limits += 1
            return self.rate_limited_s >= self.cfg.rate_limit_max_wait_s
        self.failures += 1
        return self.failures > self.cfg.max_retries

    def _backoff(self, n: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** max(0, n - 1))
        return base + random.uniform(0, self.cfg.backoff_base_s)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            wait = exc.retry_after if exc.retry_after is not None else self._backoff(self.rate_limits)
            wait = max(wait, 0.01) + random.uniform(0, 0.05)  # the pacer orders the retries; this only spreads
            self.rate_limited_s += wait
            return wait
        base = self._backoff(self.failures)
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            # Retry-After is a floor: capping it at backoff_max_s would retry early into more refusals.
            return max(exc.retry_after, 0.05) + 0.1 * base
        return base

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_exception(lambda e: isinstance(e, RetryableError)),
            reraise=True,
        )


class CircuitBreaker:
    """Opens after ``threshold`` requests in a row failed after their retries, or when ``trip`` is called."""

    def __init__(self, threshold: int) -> None:
        self.threshold = max(1, threshold)
        self.consecutive = 0
        self.reason: str | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.reason is not None

    def success(self) -> None:
        with self._lock:
            self.consecutive = 0

    def failure(self, reason: str) -> bool:
        """Count a request that failed all its retries; True if that opened the breaker."""
        with self._lock:
            self.consecutive += 1
            if self.reason is None and self.consecutive >= self.threshold:
                self.reason = reason
                return True
            return False

    def trip(self, reason: str) -> bool:
        """Open at once (the endpoint refuses); True if it was closed."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
                return True
            return False
