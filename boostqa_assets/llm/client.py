"""An OpenAI-compatible client for one role: concurrency cap, retries with backoff, structured output,
bounded re-asks for bad replies, a request cache, limits shared across processes, a budget, and accounting.

Transport retries use ``tenacity`` (well kept, async-aware, composable waits) with exponential backoff and
jitter, raised to the server's ``Retry-After`` when it sends one. Bad replies (invalid JSON, schema mismatch,
truncation) are re-asked a bounded number of times with a changed seed; then the row is rejected with its
raw output, and the batch goes on.

With an ``EndpointLimiter`` (``limits.py``) every HTTP attempt first takes a cross-process concurrency slot,
waits out any endpoint pause and takes room under the rates; its reply's rate-limit headers can pause the
endpoint for every process. With a ``Budget`` a request that no longer fits is not sent: its row comes back
with ``error="budget_exhausted"`` (see ``Budget`` for the rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from boostqa_assets.configs import ConfigError, RoleConfig
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.limits import Budget, BudgetExhausted, EndpointLimiter, parse_duration_s
from boostqa_assets.llm.reasoning import split_reasoning
from boostqa_assets.llm.types import LLMRequest, LLMResult, LLMStats, Validator, canonical_json

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, LLMStats], None]
CONNECTIONS_PER_HTTP_CLIENT = 4  # httpcore scans its whole pool on every request: many small pools are faster

if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    # httpcore runs `import sniffio` on every request to learn the async library; when sniffio is not
    # installed each failed import walks sys.path (~0.1 ms, a third of the client's time per request).
    # A None entry makes that import fail at once, which httpcore reads as "asyncio", as before.
    sys.modules["sniffio"] = None  # type: ignore[assignment]


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying SSL context per process (loading the CA bundle costs ~25 ms per httpx client)."""
    return httpx.create_ssl_context()


def _encode(body: dict[str, Any]) -> tuple[bytes, str]:
    """The wire bytes of a body and its request hash (``types.request_hash``).

    The wire keeps the body's key order: a schema's ``properties`` order is the order a constrained model
    writes the fields in (question before answer), so sorted keys are for the hash only.
    """
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return data, hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _prompt_chars(req: LLMRequest) -> int:
    return len(req.prompt) + len(req.system or "") + len(req.prefill or "")


class LLMEndpointError(RuntimeError):
    """The endpoint is dead or refusing: the circuit breaker opened. The run fails with this message."""


class ReplayMissError(RuntimeError):
    """Replay-only mode and a request that is not in the cache."""


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass
class _Reply:
    content: str
    reasoning: str
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    latency_s: float
    cached: bool

    @classmethod
    def from_cache(cls, entry: dict[str, Any]) -> _Reply:
        """A reply read back from a response-cache entry (see ``ResponseCache``)."""
        return cls(
            entry["content"],
            entry.get("reasoning", ""),
            entry.get("finish_reason"),
            entry.get("tokens_in", 0),
            entry.get("tokens_out", 0),
            0.0,
            True,
        )


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return parse_duration_s(
        response.headers.get("x-ratelimit-reset-requests") or response.headers.get("x-ratelimit-reset-tokens")
    )


@dataclass
class _Pool:
    """The HTTP side of one run: the in-process cap, free local slot numbers, httpx clients by slot."""

    clients: list[httpx.AsyncClient]
    sem: asyncio.Semaphore
    free: list[int] = field(default_factory=list)


def _extract_json(text: str) -> Any:
    """Parse a JSON object from a reply, tolerating code fences and chatter around it."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        if start != -1:
            try:  # the first object, ignoring whatever follows it (chatter, a next few-shot example)
                return json.JSONDecoder().raw_decode(text, start)[0]
            except json.JSONDecodeError:
                pass
        end = text.rfind("}")
        if start != -1 and end > start:
            return json.loads(text[start : end + 1])
        raise


def _repair_json(text: str) -> dict[str, Any] | None:
    """A bounded repair of almost-JSON (unescaped quotes, missing commas or braces) before a paid re-ask.

    ``json_repair`` is a well-kept, widely used library for exactly the output small models produce; the
    validator still decides whether what it recovers is acceptable.
    """
    import json_repair

    start = text.find("{")
    if start == -1:
        return None
    try:
        obj = json_repair.loads(text[start:])
    except Exception:  # the library's own parse errors vary by version
        return None
    if isinstance(obj, list):
        obj = next((o for o in obj if isinstance(o, dict)), None)
    return obj if isinstance(obj, dict) and obj else None


class LLMClient:
    """Calls one role's endpoint. Build one per role per materialization; read ``stats`` afterwards.

    ``limiter``: the endpoint's shared limits (``EndpointLimiter``, built by the caller). When None and the
    role configures a limit (``rpm``, ``tpm_in``, ``tpm_out``, ``limits_backend_url``) or ``limits_dir`` is
    given, the client builds one from the role under ``limits_dir`` (default ``<BOOSTQA_HOME>/limits``);
    then ``max_concurrency`` is the cap across every process sharing that directory. With no limiter it caps
    this process only, as before. ``budget``: a ``Budget`` to share between clients; when None the role's
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
        self.stats = LLMStats(
            role=role,
            model=cfg.model,
            price_per_mtok_in=cfg.price_per_mtok_in,
            price_per_mtok_out=cfg.price_per_mtok_out,
        )
        self.__api_key = self._read_api_key()
        self._grammar_cache: dict[str, str] = {}
        self._consecutive_failures = 0
        self._last_failure = ""
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
        self._inflight: dict[str, asyncio.Future[_Reply]] = {}
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

    # --- request bodies ----------------------------------------------------------------------------

    def _gbnf(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammar_cache:
            # llama.cpp's own converter keeps the grammar identical to what its server would build.
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            self._grammar_cache[key] = json_schema_to_gbnf(key)
        return self._grammar_cache[key]

    def build_body(self, req: LLMRequest, attempt: int = 0, max_tokens: int | None = None) -> dict[str, Any]:
        """The exact JSON body sent for ``req`` at ``attempt`` (re-asks change the seed, so the hash)."""
        cfg = self.cfg
        temperature = req.temperature if req.temperature is not None else cfg.temperature
        if attempt > 0 and temperature == 0:
            temperature = 0.7  # a greedy re-ask would repeat the same bad reply
        body: dict[str, Any] = {
            "model": cfg.model,
            "max_tokens": max_tokens or req.max_tokens or cfg.max_tokens,
            "temperature": temperature,
            "top_p": cfg.top_p,
        }
        if cfg.stop:
            body["stop"] = list(cfg.stop)
        if cfg.seed is not None:
            body["seed"] = cfg.seed + req.seed_offset + attempt
        elif attempt > 0:  # a re-ask identical to the failed attempt would get its cached bad reply back
            body["seed"] = req.seed_offset + attempt
        if cfg.api == "chat":
            messages = [{"role": "system", "content": req.system}] if req.system else []
            messages.append({"role": "user", "content": req.prompt})
            body["messages"] = messages
        else:
            prompt = (req.system + "\n\n" + req.prompt) if req.system else req.prompt
            body["prompt"] = prompt + " " + req.prefill if req.prefill else prompt
        if req.schema is not None:
            mode = cfg.structured_output
            if mode == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": req.prompt_id, "schema": req.schema, "strict": True},
                }
            elif mode == "json_object_schema":
                body["response_format"] = {"type": "json_object", "schema": req.schema}
            elif mode == "json_object":
                body["response_format"] = {"type": "json_object"}
            elif mode == "gbnf":
                body["grammar"] = self._gbnf(req.schema)
        body.update(cfg.extra_body)
        return body

    # --- transport ---------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.__api_key:
            headers["authorization"] = f"Bearer {self.__api_key}"
        return headers

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.cfg.price_per_mtok_in + tokens_out * self.cfg.price_per_mtok_out) / 1e6

    def _wait(self, state: RetryCallState) -> float:
        base = wait_exponential_jitter(initial=self.cfg.backoff_base_s, max=self.cfg.backoff_max_s)(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            # Retry-After is a floor: capping it at backoff_max_s would retry early into more 429s.
            return max(exc.retry_after, 0.05) + 0.1 * base
        return base

    async def _post_once(self, http: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
        """POST one request body (already encoded); the client's default headers carry type and key."""
        path = "/chat/completions" if self.cfg.api == "chat" else "/completions"
        self.stats.http_requests += 1
        try:
            response = await http.post(self.base_url + path, content=data)
        except httpx.TimeoutException as exc:
            self.stats.timeouts += 1
            raise _Retryable("timeout", f"timed out after {self.cfg.timeout_s}s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            self.stats.transport_errors += 1
            raise _Retryable("transport", f"{type(exc).__name__}: {self.redact(str(exc))[:200]}") from None
        if self.limiter is not None and self.limiter.observe(response.status_code, response.headers):
            self.stats.pauses += 1
        if response.status_code == 429:
            self.stats.http_429 += 1
            raise _Retryable("http_429", "rate limited (429)", _retry_after_seconds(response))
        if response.status_code >= 500:
            self.stats.http_5xx += 1
            raise _Retryable(
                f"http_{response.status_code}",
                f"server error {response.status_code}: {self.redact(response.text)[:200]}",
                _retry_after_seconds(response),
            )
        if response.status_code in (401, 403, 404):
            # Every other request would get the same answer: stop the run instead of rejecting every row.
            hint = {
                401: "unauthorized: check the API key",
                403: "forbidden: check the key's permissions",
                404: "not found: check the base URL and the model name",
            }[response.status_code]
            raise LLMEndpointError(
                f"role {self.role!r}: {self.base_url} answered HTTP {response.status_code} ({hint}; the key is read "
                f"from ${self.cfg.api_key_env or '<none configured>'}): {self.redact(response.text)[:200]}"
            )
        if response.status_code >= 400:
            raise _Fatal(
                f"http_{response.status_code}",
                f"HTTP {response.status_code}: {self.redact(response.text)[:300]}",
            )
        try:
            return response.json()
        except ValueError:
            raise _Retryable("bad_http_body", "the server answered 200 with a body that is not JSON") from None

    async def _attempt(self, pool: _Pool, data: bytes, prompt_tokens: int, max_tokens: int) -> tuple[Any, float]:
        """One HTTP attempt: budget, local slot, the limiter's slot/pause/rates, the POST; then settle both."""
        budget, limiter = self.budget, self.limiter
        async with pool.sem:  # requests queued here reserve nothing yet: the budget sees what is about to go
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
                    started = time.perf_counter()  # latency counts time on the wire, not time queued
                    try:
                        payload = await self._post_once(pool.clients[slot // CONNECTIONS_PER_HTTP_CLIENT], data)
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

    async def _send(self, pool: _Pool, body: dict[str, Any], data: bytes, rhash: str, prompt_tokens: int) -> _Reply:
        """Send one request, unless the same request is already in flight: then wait for its reply.

        Rows whose prompts come out identical (the same seed text at the same grade, say) share one paid
        reply instead of racing each other past the cache.
        """
        running = self._inflight.get(rhash)
        if running is not None:
            reply = await asyncio.shield(running)
            self.stats.cache_hits += 1
            return dataclasses.replace(reply, cached=True)
        task = asyncio.ensure_future(self._send_uncoalesced(pool, body, data, rhash, prompt_tokens))
        self._inflight[rhash] = task
        try:
            return await task
        finally:
            self._inflight.pop(rhash, None)

    async def _send_uncoalesced(
        self, pool: _Pool, body: dict[str, Any], data: bytes, rhash: str, prompt_tokens: int
    ) -> _Reply:
        if self.cache is not None:
            hit = self.cache.get(rhash)
            if hit is not None:
                self.stats.cache_hits += 1
                return _Reply.from_cache(hit)
        if self.replay_only:
            raise ReplayMissError(f"role {self.role!r}: replay-only mode and request {rhash[:16]} is not cached")

        max_tokens = int(body.get("max_tokens") or self.cfg.max_tokens)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
            reraise=True,
            before_sleep=lambda s: setattr(self.stats, "retries", self.stats.retries + 1),
        )
        latency = 0.0
        async for attempt in retrying:
            with attempt:
                payload, latency = await self._attempt(pool, data, prompt_tokens, max_tokens)
        reply = self._parse_payload(payload, latency)
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

    def _parse_payload(self, payload: dict[str, Any], latency: float) -> _Reply:
        choice = (payload.get("choices") or [{}])[0]
        if self.cfg.api == "chat":
            message = choice.get("message") or {}
            content = message.get("content") or ""
            field_reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        else:
            content = choice.get("text") or ""
            field_reasoning = ""
        content, tag_reasoning = split_reasoning(content)
        reasoning = "\n".join(r for r in (field_reasoning, tag_reasoning) if r)
        usage = payload.get("usage") or {}
        return _Reply(
            content,
            reasoning,
            choice.get("finish_reason"),
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            latency,
            False,
        )

    # --- one logical request -----------------------------------------------------------------------

    def _validate(self, req: LLMRequest, reply: _Reply, validator: Validator) -> tuple[Any, str | None, str]:
        text = reply.content
        repaired = False
        try:
            obj: Any = _extract_json(text) if req.schema is not None else text
        except (json.JSONDecodeError, ValueError) as exc:
            if reply.finish_reason == "length":
                return None, "truncated", "reply cut at max_tokens before the JSON closed"
            obj = _repair_json(text)
            if obj is None:
                return None, "invalid_json", f"not JSON: {exc}"[:200]
            repaired = True
            self.stats.repairs += 1
        try:
            return validator(obj), None, ""
        except (ValueError, TypeError, KeyError) as exc:
            if reply.finish_reason == "length":
                return None, "truncated", f"reply cut at max_tokens: {exc}"[:200]
            if repaired:  # the reply was not JSON; what the repair recovered does not fit either
                return None, "invalid_json", f"not JSON, and the repaired object does not fit: {exc}"[:300]
            return None, "schema_mismatch", str(exc)[:300]

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
        for attempt in range(self.cfg.max_parse_retries + 1):
            body = self.build_body(req, attempt, max_tokens)
            data, result.request_hash = _encode(body)
            result.attempts = attempt + 1
            try:
                reply = await self._send(pool, body, data, result.request_hash, prompt_tokens)
                if req.prefill and self.cfg.api == "completions":
                    reply.content = req.prefill + reply.content
            except BudgetExhausted as exc:
                self.stats.budget_exhausted = True
                previous = (
                    f"; the previous attempt was rejected: {result.error} {result.detail}" if result.error else ""
                )
                result.error = "budget_exhausted"
                result.detail = f"not sent: the run's budget is exhausted ({exc}){previous}"[:400]
                break
            except _Retryable as exc:
                result.error, result.detail = (
                    "transport",
                    f"{exc.kind} after {self.cfg.max_retries} retries: {exc}",
                )
                self._note_failure(result.detail)
                break
            except _Fatal as exc:
                result.error, result.detail = exc.kind, str(exc)
                break
            self._consecutive_failures = 0
            result.tokens_in += reply.tokens_in
            result.tokens_out += reply.tokens_out
            result.latency_s += reply.latency_s
            result.cached = reply.cached
            if not reply.cached:
                self.stats.tokens_in += reply.tokens_in
                self.stats.tokens_out += reply.tokens_out
                self.stats.latencies.append(reply.latency_s)
            value, error, detail = self._validate(req, reply, validator)
            result.content, result.reasoning, result.finish_reason = (
                reply.content,
                reply.reasoning,
                reply.finish_reason,
            )
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
            self.stats.failures_by_reason[result.error or "unknown"] = (
                self.stats.failures_by_reason.get(result.error or "unknown", 0) + 1
            )
        return result

    def _note_failure(self, detail: str) -> None:
        self._consecutive_failures += 1
        self._last_failure = detail
        if self._consecutive_failures >= self.circuit_breaker_failures:
            raise LLMEndpointError(
                f"role {self.role!r}: the endpoint {self.base_url} failed {self._consecutive_failures} requests in a "
                f"row, each after {self.cfg.max_retries} retries; last error: {self.redact(detail)}. "
                "Check that the server is up and the model name and limits are right; completed responses are "
                "cached, so a re-run pays only for the rest."
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
        # Local slot i always uses client i // per_client, so no client ever has more requests than connections.
        pool = _Pool(
            [
                httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers(), verify=_ssl_context())
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
                # Look at every exception before raising one (several tasks may see the breaker open):
                # the others would otherwise be logged as "Task exception was never retrieved".
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
        """Run every request (concurrently, up to the cap) and return results in request order."""
        if not requests:
            return []
        if self.cfg.batch and self.batch_state_dir is not None and not self._in_batch:
            from boostqa_assets.llm.batch import BatchRunner

            self._in_batch = True  # the runner calls run() again for replies that need a re-ask
            try:
                return BatchRunner().run(
                    self, list(requests), validator, self.batch_state_dir, poll_s=self.cfg.batch_poll_s
                )
            finally:
                self._in_batch = False
        try:
            return asyncio.run(self._run_all(requests, validator, progress))
        finally:
            if self._owns_limiter and self.limiter is not None:
                self.limiter.close()  # the shared state stays on disk; this process's handles go

    def close(self) -> None:
        """Release the limiter's handles if this client built it (``run`` does it after each batch)."""
        if self._owns_limiter and self.limiter is not None:
            self.limiter.close()
