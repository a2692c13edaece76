"""The HTTP side of one role: request bodies on the wire, one POST and what its answer means, and the reply
read out of a completion payload. No retries here (``client.py``), no limits (``limits.py``)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from boostqa_assets.llm.limits import retry_after_s
from boostqa_assets.llm.reasoning import split_reasoning
from boostqa_assets.llm.types import LLMRequest, LLMStats, canonical_json

if TYPE_CHECKING:
    from boostqa_assets.configs import RoleConfig
    from boostqa_assets.llm.limits import EndpointLimiter

CONNECTIONS_PER_HTTP_CLIENT = 4  # httpcore scans its whole pool on every request: many small pools are faster

if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    # httpcore runs `import sniffio` on every request to learn the async library; when sniffio is not
    # installed each failed import walks sys.path (~0.1 ms, a third of the client's time per request).
    # A None entry makes that import fail at once, which httpcore reads as "asyncio", as before.
    sys.modules["sniffio"] = None  # type: ignore[assignment]


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One verifying SSL context per process (loading the CA bundle costs ~25 ms per httpx client)."""
    return httpx.create_ssl_context()


def encode(body: dict[str, Any]) -> tuple[bytes, str]:
    """The wire bytes of a body and its request hash (``types.request_hash``).

    The wire keeps the body's key order: a schema's ``properties`` order is the order a constrained model
    writes the fields in (question before answer), so sorted keys are for the hash only.
    """
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return data, hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _gbnf(schema: dict[str, Any], cache: dict[str, str]) -> str:
    key = json.dumps(schema, sort_keys=True)
    if key not in cache:
        # llama.cpp's own converter keeps the grammar identical to what its server would build.
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        cache[key] = json_schema_to_gbnf(key)
    return cache[key]


def build_body(
    cfg: RoleConfig,
    req: LLMRequest,
    attempt: int = 0,
    max_tokens: int | None = None,
    grammar_cache: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The exact JSON body sent for ``req`` at ``attempt`` (re-asks change the seed, so the hash): sampling
    parameters, messages or prompt (with the prefill), and the structured-output form the role's server takes."""
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
            body["grammar"] = _gbnf(req.schema, grammar_cache if grammar_cache is not None else {})
    body.update(cfg.extra_body)
    return body


class LLMEndpointError(RuntimeError):
    """The endpoint is dead or refusing (the circuit breaker opened, or the Batch API refused the key)."""


class ReplayMissError(RuntimeError):
    """Replay-only mode and a request that is not in the cache."""


class RetryableError(Exception):
    """A failed attempt worth repeating (timeout, dropped connection, 5xx, a body that is not JSON)."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after


class RateLimited(RetryableError):
    """HTTP 429: the request waits and goes again; it is never a failure of the row or of the endpoint."""


class FatalError(Exception):
    """An answer that repeating will not change for this request (HTTP 400, 422, ...): the row is rejected."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class EndpointRefused(FatalError):
    """HTTP 401, 403 or 404: every other request would get the same answer, so the breaker opens."""


@dataclass
class Reply:
    content: str
    reasoning: str
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    latency_s: float
    cached: bool

    @classmethod
    def from_cache(cls, entry: dict[str, Any]) -> Reply:
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


def parse_payload(payload: dict[str, Any], api: str, latency: float = 0.0) -> Reply:
    """The reply in a completion payload: content, reasoning kept apart (a ``reasoning_content`` field or
    ``<think>`` tags), finish reason and usage."""
    choice = (payload.get("choices") or [{}])[0]
    if api == "chat":
        message = choice.get("message") or {}
        content = message.get("content") or ""
        field_reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    else:
        content = choice.get("text") or ""
        field_reasoning = ""
    content, tag_reasoning = split_reasoning(content)
    reasoning = "\n".join(r for r in (field_reasoning, tag_reasoning) if r)
    usage = payload.get("usage") or {}
    return Reply(
        content,
        reasoning,
        choice.get("finish_reason"),
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        latency,
        False,
    )


_REFUSED_HINTS = {
    401: "unauthorized: check the API key",
    403: "forbidden: check the key's permissions",
    404: "not found: check the base URL and the model name",
}


async def post_once(
    http: httpx.AsyncClient,
    cfg: RoleConfig,
    role: str,
    base_url: str,
    data: bytes,
    stats: LLMStats,
    limiter: EndpointLimiter | None,
    redact: Callable[[str], str],
) -> dict[str, Any]:
    """POST one encoded body; return the JSON payload or raise what the answer means (the classes above).

    The client's default headers carry the content type and the key; every text that can reach a message is
    passed through ``redact`` first.
    """
    path = "/chat/completions" if cfg.api == "chat" else "/completions"
    stats.http_requests += 1
    try:
        response = await http.post(base_url + path, content=data)
    except httpx.TimeoutException as exc:
        stats.timeouts += 1
        raise RetryableError("timeout", f"timed out after {cfg.timeout_s}s ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        stats.transport_errors += 1
        raise RetryableError("transport", f"{type(exc).__name__}: {redact(str(exc))[:200]}") from None
    status = response.status_code
    if limiter is not None and limiter.observe(status, response.headers):
        stats.pauses += 1
    if status == 429:
        stats.http_429 += 1
        raise RateLimited("http_429", "rate limited (429)", retry_after_s(response.headers))
    if status >= 500:
        stats.http_5xx += 1
        raise RetryableError(
            f"http_{status}", f"server error {status}: {redact(response.text)[:200]}", retry_after_s(response.headers)
        )
    if status in _REFUSED_HINTS:
        raise EndpointRefused(
            f"http_{status}",
            f"role {role!r}: {base_url} answered HTTP {status} ({_REFUSED_HINTS[status]}; the key is read from "
            f"${cfg.api_key_env or '<none configured>'}): {redact(response.text)[:200]}",
        )
    if status >= 400:
        raise FatalError(f"http_{status}", f"HTTP {status}: {redact(response.text)[:300]}")
    try:
        return response.json()  # type: ignore[no-any-return]
    except ValueError:
        raise RetryableError("bad_http_body", "the server answered 200 with a body that is not JSON") from None
