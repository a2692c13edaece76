"""Requests, results and accounting of the LLM layer (no I/O here)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A validator turns the reply's content into a value, or raises ValueError with a short reason.
Validator = Callable[[str], Any]


@dataclass(frozen=True)
class LLMRequest:
    """One logical request. ``key`` is the caller's id for the row it belongs to."""

    key: str
    prompt_id: str
    prompt_version: str
    prompt: str
    schema: dict[str, Any] | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed_offset: int = 0
    # Completion APIs only: text the reply is forced to start with (e.g. '{"question": "'), appended to the
    # prompt and put back in front of the reply. Keeps a small base model on the JSON shape cheaply.
    prefill: str | None = None


@dataclass
class LLMResult:
    """What came back for one request, after transport retries and bounded re-asks for bad replies."""

    key: str
    prompt_id: str
    prompt_version: str
    model: str
    request_hash: str
    ok: bool
    value: Any = None
    content: str | None = None
    reasoning: str = ""
    finish_reason: str | None = None
    error: str | None = None  # reason code: invalid_json, schema_mismatch, truncated, http_4xx, transport, ...
    detail: str = ""
    raw_output: str | None = None
    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    cached: bool = False
    # What this request cost the run, so figures can be given per partition: summed over a run's results they are
    # the client's ``LLMStats`` (a batch's own calls, upload and polls, are spread over its requests).
    http_requests: int = 0  # HTTP attempts sent for it, retries included (0 when every attempt came from the cache)
    cache_hits: int = 0  # attempts answered by the cache or by an identical request already in flight
    retries: int = 0
    paid_tokens_in: int = 0  # tokens of the replies the endpoint produced for this run (not from the cache)
    paid_tokens_out: int = 0


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(body: dict[str, Any]) -> str:
    """Content address of a wire request: model, messages or prompt, sampling parameters, output schema.

    The endpoint URL and the API key are not part of the body and never part of the hash.
    """
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


class Latencies:
    """Latency quantiles in fixed memory, however many requests a run makes: counts in buckets spaced by a factor
    ``GAMMA``, each reported by the value within ``ALPHA`` (0.5%) of everything in it (the DDSketch rule). A run
    of 10^7 requests keeps ~1,500 counters instead of 10^7 floats (320 MB as a list). Hand-rolled: the rule is ten
    lines and the ``ddsketch`` package would add protobuf for it."""

    ALPHA = 0.005
    GAMMA = (1 + ALPHA) / (1 - ALPHA)
    _LOG_GAMMA = math.log(GAMMA)
    _FLOOR_S = 1e-6  # faster than this is one bucket (a cache or a fake server)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def append(self, seconds: float) -> None:
        key = math.ceil(math.log(max(seconds, self._FLOOR_S)) / self._LOG_GAMMA)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (the value at rank ceil(q*n)), within ALPHA of the true one; 0.0 when empty."""
        if not self.n:
            return 0.0
        rank = min(self.n - 1, max(0, math.ceil(q * self.n) - 1))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen > rank:
                return 2 * self.GAMMA**key / (self.GAMMA + 1)
        return 0.0  # unreachable: the counts sum to n


@dataclass
class LLMStats:
    """Counters for one role within one materialization."""

    role: str
    model: str
    price_per_mtok_in: float = 0.0
    price_per_mtok_out: float = 0.0
    logical_requests: int = 0
    http_requests: int = 0
    cache_hits: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    http_429: int = 0
    http_5xx: int = 0
    timeouts: int = 0
    transport_errors: int = 0
    reasks: int = 0
    repairs: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latencies: Latencies = field(default_factory=Latencies)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    # True once the run's budget refused a request: that row and every later one came back with
    # error="budget_exhausted" without being sent (see ``limits.Budget``).
    budget_exhausted: bool = False
    limiter_wait_s: float = 0.0  # time requests waited for a concurrency slot, a pause or room under a rate
    pauses: int = 0  # endpoint pauses this client set after a 429 or exhausted rate-limit headers
    rate_limit_wait_s: float = 0.0  # time requests waited out 429s before going again (summed over requests)
    stopped: str = ""  # why the client stopped sending before the end (the circuit breaker's message)

    price_factor: float = 1.0  # 0.5 when the role runs through a half-price Batch API

    @property
    def cost_usd(self) -> float:
        sync = (self.tokens_in * self.price_per_mtok_in + self.tokens_out * self.price_per_mtok_out) / 1e6
        return sync * self.price_factor

    def to_metadata(self) -> dict[str, Any]:
        """Flat, JSON-friendly figures for Dagster materialization metadata."""
        return {
            "role": self.role,
            "model": self.model,
            "requests": self.logical_requests,
            "http_requests": self.http_requests,
            "cache_hits": self.cache_hits,
            "ok": self.ok,
            "failed": self.failed,
            "retries": self.retries,
            "http_429": self.http_429,
            "http_5xx": self.http_5xx,
            "timeouts": self.timeouts,
            "reasks": self.reasks,
            "json_repairs": self.repairs,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "latency_p50_s": round(self.latencies.quantile(0.5), 3),
            "latency_p95_s": round(self.latencies.quantile(0.95), 3),
            "est_cost_usd": round(self.cost_usd, 6),
            "budget_exhausted": self.budget_exhausted,
            "limiter_wait_s": round(self.limiter_wait_s, 3),
            "endpoint_pauses": self.pauses,
            "rate_limit_wait_s": round(self.rate_limit_wait_s, 3),
            "stopped": self.stopped or "-",
            "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
        }
