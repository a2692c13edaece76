"""An OpenAI-compatible client for one role: structured output, bounded re-asks for bad replies, a request
cache, limits shared across processes, retries, a circuit breaker, a budget, and accounting.

The parts live beside it: ``transport.py`` (bodies on the wire, one POST, what an answer means),
``parsing.py`` (what a reply means for its row), ``retries.py`` (waits, 429 patience, the breaker),
``limits.py`` + ``pacing.py`` (the endpoint's shared pace, concurrency cap and pause), ``budget.py``,
``cache.py``. This module runs a batch of requests through them.

Nothing paid for is thrown away: ``run`` always returns one result per request. When the run stops early
(the breaker opened, the budget ran out) the requests already answered are kept, the ones not sent come back
with ``error="endpoint_down"`` or ``"budget_exhausted"``, and ``stop_reason`` says why; every reply is in the
response cache as it arrives, so a re-run pays only for what never came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from boostqa_assets.configs import ConfigError, RoleConfig
from boostqa_assets.llm import parsing
from boostqa_assets.llm.batch import BatchRunner
from boostqa_assets.llm.budget import Budget, BudgetExhausted
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.limits import EndpointLimiter
from boostqa_assets.llm.retries import CircuitBreaker, RequestRetries
from boostqa_assets.llm.transport import (
    CONNECTIONS_PER_HTTP_CLIENT,
    EndpointRefused,
    FatalError,
    LLMEndpointError,
    RateLimited,
    ReplayMissError,
    Reply,
    RetryableError,
    build_body,
    encode,
    parse_payload,
    post_once,
    ssl_context,
)
from boostqa_assets.llm.types import LLMRequest, LLMResult, LLMStats, Validator

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, LLMStats], None]
RATE_LIMIT_LOG_EVERY_S = 30.0  # how often a run waiting on 429s says so

__all__ = ["LLMClient", "LLMEndpointError", "ProgressFn", "ReplayMissError"]

# The result of the logical request the current task works for: each request runs in its own task (and a send
# shared by identical requests in the first one's), so what it costs (HTTP attempts, cache hits, retries) is added
# to its own result without threading the result through every call.
_CURRENT: contextvars.ContextVar[LLMResult | None] = contextvars.ContextVar("boostqa_llm_result", default=None)


def _tally(name: str, n: int = 1) -> None:
    current = _CURRENT.get()
    if current is not None:
        setattr(current, name, getattr(current, name) + n)


def _prompt_chars(req: LLMRequest) -> int:
    return len(req.prompt) + len(req.system or "") + len(req.prefill or "")


class _NotSent(Exception):
    """The breaker is open: this request is not sent."""


@dataclass
class _Pool:
    """The HTTP side of one run: the in-process cap, free local slot numbers, httpx clients by slot."""

    clients: list[httpx.AsyncClient]
    sem: asyncio.Semaphore
    free: list[int] = field(default_factory=list)


class LLMClient:
    """Calls one role's endpoint. Build one per role per materialization; read ``stats`` afterwards.

    ``limiter``: the endpoint's shared limits (``EndpointLimiter``, built by the caller). When None and the
    role configures a limit (``rpm``, ``tpm_in``, ``tpm_out``, ``limits_backend_url``) or ``limits_dir`` is
    given, the client builds one from the role under ``limits_dir`` (default ``<BOOSTQA_HOME>/limits``);
    then ``max_concurrency`` is the cap across every process sharing that directory. With no limiter it caps
    this process only. ``budget``: a ``Budget`` to share between clients; when None the role's
    ``budget_tokens`` / ``budget_usd`` give this client its own.
    """

    def __init__(
        self,
        role: str,
        cfg: RoleConfig,
        base_url: str,
        cache: ResponseCache | None = None,
        replay_only: bool = False,
        circuit_breaker_failures: int = 5,
        limiter: EndpointLimiter | None = None,
        limits_dir: str | os.PathLike[str] | None = None,
        budget: Budget | None = None,
        batch_state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.role = role
        self.cfg = cfg
        self.base_url = base_url.rstrip("/")
        self.cache = cache
        self.replay_only = replay_only
        self.circuit_breaker_failures = circuit_breaker_failures
        self.breaker = CircuitBreaker(circuit_breaker_failures)
        self.stats = LLMStats(
            role=role,
            model=cfg.model,
            price_per_mtok_in=cfg.price_per_mtok_in,
            price_per_mtok_out=cfg.price_per_mtok_out,
        )
        self.__api_key = self._read_api_key()
        self._grammar_cache: dict[str, str] = {}
        self._owns_limiter = False
        configured = any(v is not None for v in (cfg.rpm, cfg.tpm_in, cfg.tpm_out, cfg.limits_backend_url)) or (
            limits_dir is not None
        )
        if limiter is None and configured and not replay_only:
            if limits_dir is None:
                from boostqa_assets.settings import get_settings

                limits_dir = get_settings().home / "limits"
            limiter = EndpointLimiter.from_role(cfg, self.base_url, Path(limits_dir))
            self._owns_limiter = True
        self.limiter = limiter
        if budget is None and (cfg.budget_tokens is not None or cfg.budget_usd is not None):
            budget = Budget(cfg.budget_tokens, cfg.budget_usd)
        self.budget = budget
        # Batch mode (cfg.batch) keeps submitted batch ids here so a restarted run resumes polling.
        self.batch_state_dir = Path(batch_state_dir) if batch_state_dir is not None else None
        self._in_batch = False
        self._inflight: dict[str, asyncio.Future[Reply]] = {}
        self._rate_limited_now = 0  # requests waiting out a 429 at this moment
        self._rate_limit_logged = 0.0
        if cfg.batch:
            self.stats.price_factor = cfg.batch_price_factor
        if budget is not None and budget.usd is not None and not (cfg.price_per_mtok_in or cfg.price_per_mtok_out):
            logger.warning(
                "role %s: budget_usd is set but price_per_mtok_in/out are 0, so requests cost nothing and the "
                "money budget never stops the run; set the prices",
                role,
            )

    def __repr__(self) -> str:  # never show the key
        return f"LLMClient(role={self.role!r}, model={self.cfg.model!r}, base_url={self.base_url!r})"

    def _read_api_key(self) -> str | None:
        name = self.cfg.api_key_env
        if not name:
            return None
        value = os.environ.get(name)
        if not value:
            raise ConfigError(
                f"role {self.role!r}: api_key_env names {name!r}, but that environment variable "
                "is not set; fix: export it, or unset api_key_env for an endpoint without a key"
            )
        return value

    def redact(self, text: str) -> str:
        """Remove the API key from any text that may reach a log, metadata or an exception."""
        if self.__api_key and self.__api_key in text:
            text = text.replace(self.__api_key, "***")
        return text

    @property
    def stop_reason(self) -> str | None:
        """Why the last run stopped sending before the end (the breaker's message), or None."""
        return self.breaker.reason

    # --- request bodies ----------------------------------------------------------------------------

    def build_body(self, req: LLMRequest, attempt: int = 0, max_tokens: int | None = None) -> dict[str, Any]:
        """The exact JSON body sent for ``req`` at ``attempt`` (re-asks change the seed, so the hash)."""
        return build_body(self.cfg, req, attempt, max_tokens, self._grammar_cache)

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.__api_key:
            headers["authorization"] = f"Bearer {self.__api_key}"
        return headers

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.cfg.price_per_mtok_in + tokens_out * self.cfg.price_per_mtok_out) / 1e6

    def parse_payload(self, payload: dict[str, Any], latency: float = 0.0) -> Reply:
        return parse_payload(payload, self.cfg.api, latency)

    # --- one HTTP attempt --------------------------------------------------------------------------

    async def _attempt(self, pool: _Pool, data: bytes, prompt_tokens: int, max_tokens: int) -> tuple[Any, float]:
        """One HTTP attempt: budget, local slot, the limiter's slot/pace/pause, the POST; then settle both."""
        budget, limiter = self.budget, self.limiter
        async with pool.sem:  # requests queued here reserve nothing yet: the budget sees what is about to go
            if self.breaker.is_open:
                raise _NotSent()
            reserved_tokens, reserved_usd = 0, 0.0
            if budget is not None:
                reserved_tokens = prompt_tokens + max_tokens
                reserved_usd = self._cost(prompt_tokens, max_tokens)
                if not budget.try_reserve(reserved_tokens, reserved_usd):
                    raise BudgetExhausted(budget.describe())
            used_in: int | None = None
            used_out: int | None = None
            slot = pool.free.pop()
            try:
                permit = None
                if limiter is not None:
                    permit = await limiter.acquire(prompt_tokens, max_tokens)
                    self.stats.limiter_wait_s += permit.waited_s
                try:
                    if self.breaker.is_open:  # it opened while this request waited for its turn
                        raise _NotSent()
                    started = time.perf_counter()  # latency counts time on the wire, not time queued
                    try:
                        http = pool.clients[slot // CONNECTIONS_PER_HTTP_CLIENT]
                        _tally("http_requests")  # post_once counts the client's, once per call
                        payload = await post_once(
                            http, self.cfg, self.role, self.base_url, data, self.stats, limiter, self.redact
                        )
                    finally:
                        latency = time.perf_counter() - started
                    usage = payload.get("usage") if isinstance(payload, dict) else None
                    if isinstance(usage, dict):
                        used_in = int(usage.get("prompt_tokens") or 0)
                        used_out = int(usage.get("completion_tokens") or 0)
                    else:  # a reply without usage: count the worst case (never under the budget's cap)
                        used_in, used_out = prompt_tokens, max_tokens
                finally:
                    if permit is not None:
                        limiter.release(permit, used_in, used_out)  # type: ignore[union-attr]
            finally:
                pool.free.append(slot)
                if budget is not None:
                    spent_in, spent_out = used_in or 0, used_out or 0
                    budget.settle(reserved_tokens, reserved_usd, spent_in + spent_out, self._cost(spent_in, spent_out))
        return payload, latency

    def _log_rate_limited(self) -> None:
        """Say, at most every ``RATE_LIMIT_LOG_EVERY_S``, that requests are waiting on the endpoint's 429s."""
        now = time.monotonic()
        if now - self._rate_limit_logged >= RATE_LIMIT_LOG_EVERY_S:
            self._rate_limit_logged = now
            pace = f", pace {100 * self.limiter.pace_factor():.0f}% of the configured rate" if self.limiter else ""
            logger.warning(
                "role %s: %s answers 429 (rate limited): %d request(s) waiting to go again%s; %d 429s so far",
                self.role,
                self.base_url,
                self._rate_limited_now,
                pace,
                self.stats.http_429,
            )

    async def _send_uncoalesced(
        self, pool: _Pool, body: dict[str, Any], data: bytes, rhash: str, prompt_tokens: int
    ) -> Reply:
        if self.cache is not None:
            hit = self.cache.get(rhash)
            if hit is not None:
                self.stats.cache_hits += 1
                _tally("cache_hits")
                return Reply.from_cache(hit)
        if self.replay_only:
            raise ReplayMissError(f"role {self.role!r}: replay-only mode and request {rhash[:16]} is not cached")
        max_tokens = int(body.get("max_tokens") or self.cfg.max_tokens)
        retries = RequestRetries(self.cfg)
        latency = 0.0
        waiting = False  # this request is waiting out a 429
        try:
            async for attempt in retries.retrying():
                with attempt:
                    if waiting:
                        self._rate_limited_now -= 1
                        waiting = False
                    if retries.failures + retries.rate_limits:
                        self.stats.retries += 1
                        _tally("retries")
                    try:
                        payload, latency = await self._attempt(pool, data, prompt_tokens, max_tokens)
                    except RateLimited:
                        self._rate_limited_now += 1
                        waiting = True
                        self._log_rate_limited()
                        raise
        finally:
            if waiting:
                self._rate_limited_now -= 1
            self.stats.rate_limit_wait_s += retries.rate_limited_s
        reply = parse_payload(payload, self.cfg.api, latency)
        if self.cache is not None:
            self.cache.put(
                rhash,
                {
                    "request_hash": rhash,
                    "role": self.role,
                    "model": self.cfg.model,
                    "request": body,
                    "content": reply.content,
                    "reasoning": reply.reasoning,
                    "finish_reason": reply.finish_reason,
                    "tokens_in": reply.tokens_in,
                    "tokens_out": reply.tokens_out,
                    "latency_s": round(latency, 4),
                },
            )
        return reply

    async def _send(self, pool: _Pool, body: dict[str, Any], data: bytes, rhash: str, prompt_tokens: int) -> Reply:
        """Send one request, unless the same request is already in flight: then wait for its reply.

        Rows whose prompts come out identical (the same seed text at the same grade, say) share one paid
        reply instead of racing each other past the cache.
        """
        running = self._inflight.get(rhash)
        if running is not None:
            reply = await asyncio.shield(running)
            self.stats.cache_hits += 1
            _tally("cache_hits")
            return dataclasses.replace(reply, cached=True)
        task = asyncio.ensure_future(self._send_uncoalesced(pool, body, data, rhash, prompt_tokens))
        self._inflight[rhash] = task
        try:
            return await task
        finally:
            self._inflight.pop(rhash, None)

    # --- one logical request -----------------------------------------------------------------------

    async def _run_one(self, pool: _Pool, req: LLMRequest, validator: Validator) -> LLMResult:
        self.stats.logical_requests += 1
        max_tokens = req.max_tokens or self.cfg.max_tokens
        prompt_tokens = _prompt_chars(req) // 4 + 1  # limits.estimate_tokens, without joining the texts
        result = LLMResult(
            key=req.key,
            prompt_id=req.prompt_id,
            prompt_version=req.prompt_version,
            model=self.cfg.model,
            request_hash="",
            ok=False,
        )
        _CURRENT.set(result)  # this task's own context: see _tally
        for attempt in range(self.cfg.max_parse_retries + 1):
            body = self.build_body(req, attempt, max_tokens)
            data, result.request_hash = encode(body)
            result.attempts = attempt + 1
            previous = f"; the previous attempt was rejected: {result.error} {result.detail}" if result.error else ""
            try:
                reply = await self._send(pool, body, data, result.request_hash, prompt_tokens)
                if req.prefill and self.cfg.api == "completions":
                    reply.content = req.prefill + reply.content
            except BudgetExhausted as exc:
                self.stats.budget_exhausted = True
                result.error = "budget_exhausted"
                result.detail = f"not sent: the run's budget is exhausted ({exc}){previous}"[:400]
                break
            except _NotSent:
                result.error = "endpoint_down"
                result.detail = f"not sent: the circuit breaker opened ({self.breaker.reason}){previous}"[:600]
                break
            except RateLimited as exc:
                result.error = "rate_limited"
                result.detail = (
                    f"still answered 429 after waiting {self.cfg.rate_limit_max_wait_s:g}s "
                    f"(rate_limit_max_wait_s): {exc}"
                )
                break
            except RetryableError as exc:
                result.error, result.detail = "transport", f"{exc.kind} after {self.cfg.max_retries} retries: {exc}"
                if self.breaker.failure(self._breaker_message(result.detail)):
                    logger.error("role %s: %s", self.role, self.breaker.reason)
                break
            except EndpointRefused as exc:
                result.error, result.detail = exc.kind, str(exc)
                if self.breaker.trip(self.redact(str(exc))):
                    logger.error("role %s: %s", self.role, self.breaker.reason)
                break
            except FatalError as exc:
                result.error, result.detail = exc.kind, str(exc)
                break
            self.breaker.success()
            result.tokens_in += reply.tokens_in
            result.tokens_out += reply.tokens_out
            result.latency_s += reply.latency_s
            result.cached = reply.cached
            if not reply.cached:
                self.stats.tokens_in += reply.tokens_in
                self.stats.tokens_out += reply.tokens_out
                self.stats.latencies.append(reply.latency_s)
                result.paid_tokens_in += reply.tokens_in
                result.paid_tokens_out += reply.tokens_out
            value, error, detail, repaired = parsing.validate(req, reply, validator)
            self.stats.repairs += int(repaired)
            result.content, result.reasoning, result.finish_reason = reply.content, reply.reasoning, reply.finish_reason
            result.raw_output = reply.content
            if error is None:
                result.ok, result.value, result.error, result.detail = True, value, None, ""
                break
            result.error, result.detail = error, detail
            if error == "truncated":
                max_tokens = min(max_tokens * 2, 8 * (req.max_tokens or self.cfg.max_tokens))
            if attempt < self.cfg.max_parse_retries:
                self.stats.reasks += 1
        if result.ok:
            self.stats.ok += 1
        else:
            self.stats.failed += 1
            reason = result.error or "unknown"
            self.stats.failures_by_reason[reason] = self.stats.failures_by_reason.get(reason, 0) + 1
        return result

    def _breaker_message(self, last: str) -> str:
        return self.redact(
            f"the endpoint {self.base_url} failed {self.breaker.threshold} requests in a row, each after "
            f"{self.cfg.max_retries} retries; last error: {last}. Check that the server is up and the model name "
            "is right; the replies already received are kept and cached, so a re-run pays only for the rest"
        )

    # --- batches -----------------------------------------------------------------------------------

    async def _run_all(
        self, requests: Sequence[LLMRequest], validator: Validator, progress: ProgressFn | None
    ) -> list[LLMResult]:
        cap = self.cfg.max_concurrency
        per_client = CONNECTIONS_PER_HTTP_CLIENT
        limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
        timeout = httpx.Timeout(self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s))
        results: list[LLMResult | None] = [None] * len(requests)
        done = 0
        if self.cache is not None:
            # One bulk lookup of every first attempt, so each request's cache.get below is answered from memory.
            self.cache.prefetch([encode(self.build_body(req, 0))[1] for req in requests])
        # Local slot i always uses client i // per_client, so no client ever has more requests than connections.
        pool = _Pool(
            [
                httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers(), verify=ssl_context())
                for _ in range(math.ceil(cap / per_client))
            ],
            asyncio.Semaphore(cap),
            list(range(cap - 1, -1, -1)),
        )
        async with contextlib.AsyncExitStack() as stack:
            for http in pool.clients:
                await stack.enter_async_context(http)
            # A bounded window of tasks keeps memory flat for very large batches.
            window = max(64, self.cfg.max_concurrency * 4)
            pending: set[asyncio.Task[tuple[int, LLMResult]]] = set()

            async def run(i: int) -> tuple[int, LLMResult]:
                return i, await self._run_one(pool, requests[i], validator)

            def collect(finished: set[asyncio.Task[tuple[int, LLMResult]]]) -> None:
                nonlocal done
                # Look at every exception before raising one (replay misses): the others would otherwise be
                # logged as "Task exception was never retrieved".
                errors = [e for e in (t.exception() for t in finished) if e is not None]
                if errors:
                    raise errors[0]
                for task in finished:
                    j, res = task.result()
                    results[j] = res
                    done += 1
                    if progress:
                        progress(done, len(requests), self.stats)

            try:
                for i in range(len(requests)):
                    pending.add(asyncio.create_task(run(i)))
                    if len(pending) >= window:
                        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        collect(finished)
                while pending:
                    finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    collect(finished)
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        return [r for r in results if r is not None]

    def run(
        self, requests: Sequence[LLMRequest], validator: Validator, progress: ProgressFn | None = None
    ) -> list[LLMResult]:
        """Run every request (concurrently, up to the cap); one result per request, in request order.

        It never raises for the endpoint: a breaker that opens stops sending (see ``stop_reason``) and the
        rows not sent come back with ``error="endpoint_down"``. Only replay-only misses raise.
        """
        if not requests:
            return []
        if self.cfg.batch and self.batch_state_dir is not None and not self._in_batch:
            self._in_batch = True  # the runner calls run() again for replies that need a re-ask
            try:
                return BatchRunner().run(
                    self, list(requests), validator, self.batch_state_dir, poll_s=self.cfg.batch_poll_s
                )
            finally:
                self._in_batch = False
        try:
            results = asyncio.run(self._run_all(requests, validator, progress))
        finally:
            if self._owns_limiter and self.limiter is not None:
                self.limiter.close()  # the shared state stays on disk; this process's handles go
            if self.cache is not None:
                self.cache.close()  # every reply of this run written before it returns (or raises)
        if self.stop_reason:
            self.stats.stopped = self.stop_reason
            not_sent = sum(1 for r in results if r.error == "endpoint_down")
            logger.error(
                "role %s: stopped sending after the circuit breaker opened; %d of %d requests answered, %d not "
                "sent (error endpoint_down). %s",
                self.role,
                sum(1 for r in results if r.ok),
                len(results),
                not_sent,
                self.stop_reason,
            )
        return results

    def close(self) -> None:
        """Release the limiter's handles if this client built it and write the cache's buffered replies
        (``run`` does both after each batch)."""
        if self._owns_limiter and self.limiter is not None:
            self.limiter.close()
        if self.cache is not None:
            self.cache.close()
