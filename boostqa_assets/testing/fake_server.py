"""OpenAI-compatible fake LLM server with on-demand fault injection.

Why: tests and benchmarks of the QA pipeline need an endpoint that is fast, deterministic and
can misbehave on purpose (rate limits, 5xx, hangs, dropped connections, broken JSON) without a
GPU, a model or network access.  Runs in-process (``FakeOpenAIServer``, uvicorn in a thread) or
as a child process (``python -m boostqa_assets.testing.fake_server`` / ``start_fake_server_process``).
Also serves the Batch API (``/v1/files``, ``/v1/batches``): lines are answered by the same responder,
with the same per-body faults, once ``batch_delay_s`` has passed.
Binds to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import email.parser
import email.policy
import hashlib
import json
import logging
import math
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
FAULT_KINDS = ("500", "503", "429", "400", "timeout", "drop", "malformed", "schema_mismatch", "truncated")
# Order of the cumulative draw for random faults; fixed so a seed always gives the same sequence.
_RANDOM_FAULTS = (
    ("500", "error_500_rate"),
    ("503", "error_503_rate"),
    ("400", "error_400_rate"),
    ("timeout", "timeout_rate"),
    ("drop", "drop_rate"),
    ("malformed", "malformed_rate"),
    ("schema_mismatch", "schema_mismatch_rate"),
    ("truncated", "truncated_rate"),
)
_ERRORS = {
    "500": (500, "server_error", "Injected internal server error"),
    "503": (503, "server_error", "Injected service unavailable"),
    "429": (429, "rate_limit_exceeded", "Injected rate limit"),
    "400": (400, "invalid_request_error", "Injected bad request (not retryable)"),
}
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class FaultConfig(BaseModel):
    """Which faults the server injects; every default means 'behave like a healthy endpoint'."""

    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(default=0.0, ge=0.0, description="base latency added to every admitted request")
    latency_jitter_s: float = Field(default=0.0, ge=0.0, description="uniform +/- jitter on latency")
    rpm: int | None = Field(default=None, ge=1, description="requests admitted per window")
    tpm: int | None = Field(default=None, ge=1, description="prompt+completion tokens admitted per window")
    window_s: float = Field(default=60.0, gt=0.0, description="sliding rate-limit window (60 = per minute)")
    enforce_window_s: float | None = Field(
        default=None,
        gt=0.0,
        description="also enforce rpm/tpm over this shorter sliding window, pro rata (rpm 600 per 60 s with "
        "enforce_window_s 1: at most 10 in any 1 s), as providers that quantize a per-minute limit do",
    )
    error_500_rate: Probability = 0.0
    error_503_rate: Probability = 0.0
    error_400_rate: Probability = 0.0
    timeout_rate: Probability = 0.0
    hang_s: float = Field(default=30.0, ge=0.0, description="how long a 'timeout' fault hangs, then answers")
    drop_rate: Probability = 0.0
    malformed_rate: Probability = 0.0
    schema_mismatch_rate: Probability = 0.0
    truncated_rate: Probability = 0.0
    fail_first_n: dict[str, int] = Field(default_factory=dict, description='JSON, e.g. {"429": 1}')
    reasoning: Literal["none", "field", "think_tags"] = "none"
    seed: int = 0
    batch_delay_s: float = Field(
        default=0.0, ge=0.0, description="seconds from a batch's creation until a poll sees it completed"
    )

    @field_validator("fail_first_n")
    @classmethod
    def _check_kinds(cls, value: dict[str, int]) -> dict[str, int]:
        """Reject typos early: an unknown kind would otherwise silently never fire."""
        unknown = sorted(set(value) - set(FAULT_KINDS))
        if unknown or any(n < 0 for n in value.values()):
            raise ValueError(f"fail_first_n kinds must be in {FAULT_KINDS} with N >= 0; got {value}")
        return value


@dataclass(frozen=True)
class ResponderReply:
    """What a custom responder may return when plain content is not enough."""

    content: str
    reasoning: str | None = None
    finish_reason: str = "stop"


Responder = Callable[[dict[str, Any]], "str | ResponderReply"]
_ASGICallable = Callable[..., Any]


def prompt_text(body: dict[str, Any]) -> str:
    """Flatten chat messages or a completions prompt into one string (for tokens and hashing)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for msg in messages:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else str(prompt)


def response_schema(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """Return (wants_json, schema) for OpenAI ``json_schema`` and llama.cpp ``json_object`` styles
    (plus llama.cpp's / vLLM's top-level ``json_schema`` / ``guided_json``)."""
    for key in ("json_schema", "guided_json"):
        if isinstance(body.get(key), dict):
            return True, body[key]
    rf = body.get("response_format")
    if not isinstance(rf, dict):
        return False, None
    if rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        return True, schema if isinstance(schema, dict) else None
    if rf.get("type") == "json_object":
        schema = rf.get("schema")
        return True, schema if isinstance(schema, dict) else None
    return False, None


def _stable_int(*parts: str) -> int:
    """Hash that, unlike ``hash()``, is identical across processes and runs."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def _topic(text: str) -> str:
    """First words of the last non-empty prompt line: makes answers visibly prompt-dependent."""
    for line in reversed(text.splitlines()):
        words = line.split()
        if words:
            return " ".join(words[:6])
    return "the prompt"


class _SchemaFaker:
    """Builds a deterministic instance of a JSON schema, varied by the prompt text."""

    _FORMATS: ClassVar[dict[str, str]] = {
        "date": "2024-01-01",
        "date-time": "2024-01-01T00:00:00Z",
        "email": "user@example.com",
        "uri": "https://example.com/",
    }

    def __init__(self, root: dict[str, Any], text: str) -> None:
        self.root, self.text, self.topic = root, text, _topic(text)

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        while isinstance(ref, str) and ref.startswith("#/"):
            node: Any = self.root
            for key in ref[2:].split("/"):
                node = node.get(key, {}) if isinstance(node, dict) else {}
            schema, ref = node, node.get("$ref")
        return schema

    def value(self, schema: dict[str, Any], name: str, depth: int = 0) -> Any:
        schema = self._resolve(schema)
        h = _stable_int(self.text, name)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][h % len(schema["enum"])]
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                options = [o for o in schema[key] if self._resolve(o).get("type") != "null"] or schema[key]
                return self.value(options[0], name, depth)
        if schema.get("allOf"):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(self._resolve(part))
            return self.value(merged, name, depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            if depth > 8:
                return {}
            props = schema.get("properties") or {}
            out = {k: self.value(v, k, depth + 1) for k, v in props.items()}
            for k in schema.get("required") or []:
                out.setdefault(k, self._string({}, k))
            return out
        if kind == "array":
            lo, hi = schema.get("minItems", 0), schema.get("maxItems", 2)
            n = 0 if depth > 8 else max(lo, min(2, hi))
            items = [self.value(schema.get("items") or {}, f"{name}[{i}]", depth + 1) for i in range(n)]
            if schema.get("uniqueItems"):
                items = [x for i, x in enumerate(items) if x not in items[:i]]
            return items
        if kind in ("integer", "number"):
            lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
            hi = schema.get("maximum", schema.get("exclusiveMaximum", lo + 100))
            if kind == "integer":
                lo = math.ceil(lo) + (1 if "exclusiveMinimum" in schema and "minimum" not in schema else 0)
                hi = math.floor(hi) - (1 if "exclusiveMaximum" in schema and "maximum" not in schema else 0)
                return lo + h % (hi - lo + 1) if hi >= lo else lo
            return lo + (0.1 + 0.8 * (h % 1000) / 1000) * (hi - lo)
        if kind == "boolean":
            return h % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, name)

    def _string(self, schema: dict[str, Any], name: str) -> str:
        if schema.get("format") in self._FORMATS:
            return self._FORMATS[schema["format"]]
        if name == "answer":
            s = f"The answer regarding {self.topic} is supported by the provided context."
        else:
            s = f"{name} about {self.topic}"
        s = s.ljust(max(20, schema.get("minLength", 0)), ".")
        return s[: schema["maxLength"]] if "maxLength" in schema else s


def default_responder(body: dict[str, Any]) -> str:
    """Deterministic content: schema-valid JSON when asked for JSON, else a prompt-derived sentence."""
    text = prompt_text(body)
    wants_json, schema = response_schema(body)
    if not wants_json:
        return f"This is a deterministic reply about {_topic(text)}."
    if schema is None:
        return json.dumps({"result": f"result about {_topic(text)}"})
    return json.dumps(_SchemaFaker(schema, text).value(schema, "root"))


def _duration(seconds: float) -> str:
    return f"{round(max(seconds, 0.0), 3):g}s"


class _Stats:
    """Counters; replaced wholesale on reset so readers in other threads see a consistent object."""

    def __init__(self, max_in_flight: int = 0) -> None:
        self.requests = self.answered_ok = self.tokens_in = self.tokens_out = 0
        self.max_in_flight = max_in_flight
        self.by_status: dict[str, int] = {}
        self.by_fault: dict[str, int] = {}
        self.requests_by_body: dict[str, int] = {}
        self.ok_by_body: dict[str, int] = {}
        self.batches_created = self.batch_lines = 0

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered_ok": self.answered_ok,
            "in_flight": in_flight,
            "max_in_flight": self.max_in_flight,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "by_status": dict(self.by_status),
            "by_fault": dict(self.by_fault),
            "requests_by_body": dict(self.requests_by_body),
            "ok_by_body": dict(self.ok_by_body),
            "batches_created": self.batches_created,
            "batch_lines": self.batch_lines,
        }


class _Runtime:
    """Per-config mutable state (RNGs, rate window, per-body attempts); swapped atomically."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.jitter_rng = random.Random(config.seed + 1)  # separate so jitter never shifts faults
        self.window: deque[list[float]] = deque()  # [admitted_at, tokens], oldest first
        self.window_tokens = 0.0
        self.short: deque[list[float]] = deque()  # the same entries, over enforce_window_s
        self.short_tokens = 0.0
        self.attempts: dict[str, int] = {}
        self.sequence = [kind for kind, n in config.fail_first_n.items() for _ in range(n)]
        self.rates = [(kind, getattr(config, attr)) for kind, attr in _RANDOM_FAULTS if getattr(config, attr)]
        self.limited = config.rpm is not None or config.tpm is not None

    def draw(self) -> str | None:
        """One uniform draw mapped onto cumulative rates: reproducible for a given seed."""
        if not self.rates:
            return None
        u, acc = self.rng.random(), 0.0
        for kind, p in self.rates:
            acc += p
            if u < acc:
                return kind
        return None

    @staticmethod
    def _wait(
        w: deque[list[float]], total: float, tokens: int, rpm: float | None, tpm: float | None, span: float, now: float
    ) -> float:
        """Seconds until one more request of ``tokens`` fits the window ``w`` (0: it fits now)."""
        wait = 0.0
        if rpm is not None and len(w) >= rpm:
            wait = w[len(w) - int(rpm)][0] + span - now
        if tpm is not None and w and total + tokens > tpm:
            freed = 0.0
            for ts, tk in w:  # wait until enough of the oldest entries have expired
                freed += tk
                if total - freed + tokens <= tpm:
                    wait = max(wait, ts + span - now)
                    break
            else:
                wait = max(wait, w[-1][0] + span - now)
        return wait

    def admit(self, tokens: int) -> tuple[list[float] | None, dict[str, str]]:
        """Sliding-window rpm/tpm check (and the short enforcement window, if any); returns (window entry or
        None if rejected, headers)."""
        c, w, now = self.config, self.window, time.monotonic()
        while w and w[0][0] <= now - c.window_s:
            self.window_tokens -= w.popleft()[1]
        wait = self._wait(w, self.window_tokens, tokens, c.rpm, c.tpm, c.window_s, now)
        e = c.enforce_window_s
        if e is not None and e < c.window_s:
            while self.short and self.short[0][0] <= now - e:
                self.short_tokens -= self.short.popleft()[1]
            share = e / c.window_s
            rpm_short = None if c.rpm is None else max(1, math.floor(c.rpm * share))
            tpm_short = None if c.tpm is None else max(1.0, c.tpm * share)
            wait = max(wait, self._wait(self.short, self.short_tokens, tokens, rpm_short, tpm_short, e, now))
        entry = None
        if wait <= 0:
            entry = [now, float(tokens)]
            w.append(entry)
            self.window_tokens += tokens
            if e is not None and e < c.window_s:
                self.short.append(entry)
                self.short_tokens += tokens
        reset = _duration(w[0][0] + c.window_s - now if w else 0.0)
        headers: dict[str, str] = {}
        if c.rpm is not None:
            headers.update(
                {
                    "x-ratelimit-limit-requests": str(c.rpm),
                    "x-ratelimit-reset-requests": reset,
                    "x-ratelimit-remaining-requests": str(max(0, c.rpm - len(w))),
                }
            )
        if c.tpm is not None:
            headers.update(
                {
                    "x-ratelimit-limit-tokens": str(c.tpm),
                    "x-ratelimit-reset-tokens": reset,
                    "x-ratelimit-remaining-tokens": str(max(0, int(c.tpm - self.window_tokens))),
                }
            )
        if entry is None:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))  # OpenAI's precise form
        return entry, headers

    def settle(self, entry: list[float], tokens: int) -> None:
        """Replace the admission estimate (prompt only) with prompt+completion once known."""
        delta = tokens - entry[1]
        if self.window and self.window[0][0] <= entry[0]:
            self.window_tokens += delta
        if self.short and self.short[0][0] <= entry[0]:
            self.short_tokens += delta
        entry[1] = float(tokens)


_BATCH_ENDPOINTS = {"/v1/chat/completions": True, "/v1/completions": False}  # endpoint -> chat?


@dataclass
class _Batch:
    """One Batch API job: its public object, its parsed input lines and when it was created."""

    obj: dict[str, Any]
    lines: list[dict[str, Any]]
    created: float = dataclasses.field(default_factory=time.monotonic)


def parse_multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``{field: (filename, bytes)}`` of a multipart/form-data body, with the stdlib email parser
    (starlette's ``request.form()`` needs python-multipart, which is not a dependency)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + data)
    out: dict[str, tuple[str | None, bytes]] = {}
    if msg.is_multipart():
        for part in msg.get_payload():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str):
                payload = part.get_payload(decode=True)
                out[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return out


class FakeOpenAIApp:
    """The ASGI application; holds config, stats and the responder, shared by both run modes."""

    def __init__(self, config: FaultConfig | None = None, responder: Responder | None = None) -> None:
        self.responder: Responder = responder or default_responder
        self._rt = _Runtime(config or FaultConfig())
        self._stats = _Stats()
        self._in_flight = 0
        # Batch API storage survives set_config and reset_stats, like a real server's files.
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, _Batch] = {}
        self._app = Starlette(
            routes=[
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._text, methods=["POST"]),
                Route("/v1/files", self._file_create, methods=["POST"]),
                Route("/v1/files/{file_id}", self._file_get, methods=["GET"]),
                Route("/v1/files/{file_id}/content", self._file_content, methods=["GET"]),
                Route("/v1/batches", self._batch_create, methods=["POST"]),
                Route("/v1/batches/{batch_id}", self._batch_get, methods=["GET"]),
                Route("/_stats", self._stats_ep, methods=["GET"]),
                Route("/_reset", self._reset_ep, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: dict[str, Any], receive: _ASGICallable, send: _ASGICallable) -> None:
        """Keep the server's own ``send`` in scope: the 'drop' fault needs its transport."""
        scope["fake.raw_send"] = send
        await self._app(scope, receive, send)

    @property
    def config(self) -> FaultConfig:
        return self._rt.config

    def set_config(self, config: FaultConfig) -> None:
        """Swap faults live; also restarts RNGs, rate window and fail_first_n attempt history."""
        self._rt = _Runtime(config)

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot(self._in_flight)

    def reset_stats(self) -> None:
        """Zero counters and forget per-body attempts, rate window and RNG state (fresh server)."""
        self._rt = _Runtime(self._rt.config)
        self._stats = _Stats(max_in_flight=self._in_flight)

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "boostqa"}],
            }
        )

    async def _stats_ep(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _reset_ep(self, request: Request) -> Response:
        self.reset_stats()
        return JSONResponse({"ok": True})

    async def _chat(self, request: Request) -> Response:
        return await self._completion(request, chat=True)

    async def _text(self, request: Request) -> Response:
        return await self._completion(request, chat=False)

    async def _completion(self, request: Request, chat: bool) -> Response:
        st = self._stats
        st.requests += 1
        self._in_flight += 1
        st.max_in_flight = max(st.max_in_flight, self._in_flight)
        try:
            return await self._handle(request, chat, st)
        finally:
            self._in_flight -= 1

    def _error(self, st: _Stats, status: int, kind: str, msg: str, headers: dict[str, str] | None) -> Response:
        st.by_status[str(status)] = st.by_status.get(str(status), 0) + 1
        return JSONResponse(
            {"error": {"message": msg, "type": kind, "code": kind, "param": None}},
            status_code=status,
            headers=headers,
        )

    async def _handle(self, request: Request, chat: bool, st: _Stats) -> Response:
        rt = self._rt
        cfg = rt.config
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict) or (chat and not isinstance(body.get("messages"), list)):
            return self._error(
                st,
                400,
                "invalid_request_error",
                "body must be a JSON object" + (" with a 'messages' list" if chat else ""),
                None,
            )
        key = hashlib.blake2b(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), digest_size=8
        ).hexdigest()
        st.requests_by_body[key] = st.requests_by_body.get(key, 0) + 1
        text = prompt_text(body)
        p_tok = len(text) // 4 + 1
        entry, headers = rt.admit(p_tok) if rt.limited else (None, {})
        if rt.limited and entry is None:
            st.by_fault["rate_limit"] = st.by_fault.get("rate_limit", 0) + 1
            return self._error(st, 429, "rate_limit_exceeded", "Rate limit reached, retry later", headers)
        n = rt.attempts.get(key, 0)
        rt.attempts[key] = n + 1
        fault = rt.sequence[n] if n < len(rt.sequence) else rt.draw()
        if fault is not None:
            st.by_fault[fault] = st.by_fault.get(fault, 0) + 1
        delay = cfg.latency_s
        if cfg.latency_jitter_s:
            delay += rt.jitter_rng.uniform(-1, 1) * cfg.latency_jitter_s
        if delay > 0:
            await asyncio.sleep(delay)
        if fault == "drop":
            return await self._drop(request)
        if fault in _ERRORS:
            status, kind, msg = _ERRORS[fault]
            retry = {"retry-after": "1"} if status != 400 else {}
            return self._error(st, status, kind, msg, {**headers, **retry})
        if fault == "timeout" and await self._hang(request, cfg.hang_s):
            st.by_status["499"] = st.by_status.get("499", 0) + 1  # nginx's 'client closed request'
            return Response(status_code=499)
        payload = self._answer(rt, body, chat, fault, st, key, entry, p_tok, st.requests)
        st.by_status["200"] = st.by_status.get("200", 0) + 1
        return JSONResponse(payload, headers=headers or None)

    def _answer(
        self,
        rt: _Runtime,
        body: dict[str, Any],
        chat: bool,
        fault: str | None,
        st: _Stats,
        key: str,
        entry: list[float] | None,
        p_tok: int,
        seq: int,
    ) -> dict[str, Any]:
        """The completion payload for ``body`` with a content fault (malformed, schema_mismatch, truncated)
        applied; shared by the synchronous endpoints and batch lines."""
        cfg = rt.config
        text = prompt_text(body)
        reply = self.responder(body)
        if isinstance(reply, str):
            reply = ResponderReply(reply)
        content, finish, reasoning = reply.content, reply.finish_reason, reply.reasoning
        if fault == "malformed":
            props = list((response_schema(body)[1] or {}).get("properties") or {"result": 0})
            content = '{"%s": "unterminated' % (props[0] if props else "result")
        elif fault == "schema_mismatch":
            content = '{"unexpected_field": "schema mismatch"}'
        elif fault == "truncated":
            content, finish = content[: len(content) // 2], "length"
        if cfg.reasoning != "none" and reasoning is None:
            reasoning = f"Let me think step by step about {_topic(text)}."
        if cfg.reasoning == "think_tags":
            content, reasoning = f"<think>{reasoning}</think>\n{content}", None
        c_tok = len(content) // 4 + 1
        if entry is not None:
            rt.settle(entry, p_tok + c_tok)
        st.tokens_in += p_tok
        st.tokens_out += c_tok
        if fault is None:
            st.answered_ok += 1
            st.ok_by_body[key] = st.ok_by_body.get(key, 0) + 1
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{key}-{seq}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or "fake-model",
            "choices": [choice],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok},
        }

    # --- Batch API: /v1/files and /v1/batches -----------------------------------------------------

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        meta = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self._files[meta["id"]] = (meta, data)
        return meta

    async def _file_create(self, request: Request) -> Response:
        """Multipart upload (``purpose`` + ``file``); a raw body with ``?purpose=batch`` is accepted too."""
        ctype = request.headers.get("content-type", "")
        data = await request.body()
        if ctype.startswith("multipart/form-data"):
            form = parse_multipart(ctype, data)
            purpose = form.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
            filename, data = form.get("file", (None, b""))
            if "file" not in form:
                return self._error(self._stats, 400, "invalid_request_error", "missing multipart field 'file'", None)
        else:
            purpose = request.query_params.get("purpose", "")
            filename = request.query_params.get("filename")
        if purpose != "batch":
            return self._error(self._stats, 400, "invalid_request_error", "purpose must be 'batch'", None)
        return JSONResponse(self._store_file(data, filename or "upload.jsonl", purpose))

    def _file_or_404(self, file_id: str) -> tuple[dict[str, Any], bytes] | Response:
        found = self._files.get(file_id)
        if found is None:
            return self._error(self._stats, 404, "invalid_request_error", f"No such file: {file_id}", None)
        return found

    async def _file_get(self, request: Request) -> Response:
        found = self._file_or_404(request.path_params["file_id"])
        return found if isinstance(found, Response) else JSONResponse(found[0])

    async def _file_content(self, request: Request) -> Response:
        found = self._file_or_404(request.path_params["file_id"])
        return found if isinstance(found, Response) else Response(found[1], media_type="application/octet-stream")

    async def _batch_create(self, request: Request) -> Response:
        st = self._stats
        try:
            req = json.loads(await request.body())
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return self._error(st, 400, "invalid_request_error", "body must be a JSON object", None)
        endpoint, window = req.get("endpoint"), req.get("completion_window")
        if endpoint not in _BATCH_ENDPOINTS or window != "24h":
            msg = f"endpoint must be one of {sorted(_BATCH_ENDPOINTS)} and completion_window '24h'"
            return self._error(st, 400, "invalid_request_error", msg, None)
        found = self._file_or_404(str(req.get("input_file_id")))
        if isinstance(found, Response):
            return found
        lines, errors, seen = [], [], set()
        for n, raw in enumerate(found[1].decode("utf-8", "replace").splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if not (
                isinstance(line, dict)
                and isinstance(line.get("body"), dict)
                and line.get("url") == endpoint
                and isinstance(line.get("custom_id"), str)
                and line["custom_id"] not in seen
            ):
                msg = f"line {n}: needs custom_id (unique), url {endpoint!r} and a JSON body"
                errors.append({"code": "invalid_request", "message": msg, "line": n})
                continue
            seen.add(line["custom_id"])
            lines.append(line)
        now = int(time.time())
        obj: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": req["input_file_id"],
            "completion_window": window,
            "status": "failed" if errors or not lines else "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "completed_at": None,
            "failed_at": now if errors or not lines else None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": req.get("metadata"),
        }
        self._batches[obj["id"]] = _Batch(obj, lines)
        st.batches_created += 1
        st.batch_lines += len(lines)
        return JSONResponse(obj)

    async def _batch_get(self, request: Request) -> Response:
        """Status moves validating -> in_progress -> completed once ``batch_delay_s`` (read at poll time,
        so a test can shorten it for a 'restarted' run) has passed since creation."""
        batch = self._batches.get(request.path_params["batch_id"])
        if batch is None:
            msg = f"No such batch: {request.path_params['batch_id']}"
            return self._error(self._stats, 404, "invalid_request_error", msg, None)
        obj = batch.obj
        if obj["status"] in ("validating", "in_progress"):
            obj["status"] = "in_progress"
            obj["in_progress_at"] = obj["in_progress_at"] or int(time.time())
            if time.monotonic() - batch.created >= self._rt.config.batch_delay_s:
                self._complete(batch)
        return JSONResponse(obj)

    def _complete(self, batch: _Batch) -> None:
        """Answer every line like the matching endpoint would (same responder, same per-body faults; no
        rate limits or latency); HTTP-level faults become error-file lines."""
        st, rt, obj = self._stats, self._rt, batch.obj
        chat = _BATCH_ENDPOINTS[obj["endpoint"]]
        out, err = [], []
        for line in batch.lines:
            body = line["body"]
            rid = f"batch_req_{uuid.uuid4().hex[:24]}"
            key = hashlib.blake2b(
                json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), digest_size=8
            ).hexdigest()
            st.requests_by_body[key] = st.requests_by_body.get(key, 0) + 1
            n = rt.attempts.get(key, 0)
            rt.attempts[key] = n + 1
            fault = rt.sequence[n] if n < len(rt.sequence) else rt.draw()
            if fault is not None:
                st.by_fault[fault] = st.by_fault.get(fault, 0) + 1
            if chat and not isinstance(body.get("messages"), list):
                status, kind, msg = 400, "invalid_request_error", "body must have a 'messages' list"
            elif fault in _ERRORS or fault in ("timeout", "drop"):
                status, kind, msg = _ERRORS.get(fault or "", (500, "server_error", f"Injected {fault}"))
            else:
                payload = self._answer(rt, body, chat, fault, st, key, None, len(prompt_text(body)) // 4 + 1, 0)
                payload["id"] = f"{'chatcmpl' if chat else 'cmpl'}-{key}-{rid[-8:]}"
                resp = {"status_code": 200, "request_id": rid, "body": payload}
                out.append({"id": rid, "custom_id": line["custom_id"], "response": resp, "error": None})
                continue
            body_err = {"error": {"message": msg, "type": kind, "code": kind, "param": None}}
            resp = {"status_code": status, "request_id": rid, "body": body_err}
            err.append({"id": rid, "custom_id": line["custom_id"], "response": resp, "error": None})

        def jsonl(rows: list[dict[str, Any]]) -> bytes:
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")

        obj["output_file_id"] = self._store_file(jsonl(out), f"{obj['id']}_output.jsonl", "batch_output")["id"]
        if err:
            obj["error_file_id"] = self._store_file(jsonl(err), f"{obj['id']}_error.jsonl", "batch_output")["id"]
        obj["request_counts"] = {"total": len(batch.lines), "completed": len(out), "failed": len(err)}
        obj["status"], obj["completed_at"] = "completed", int(time.time())

    @staticmethod
    async def _hang(request: Request, seconds: float) -> bool:
        """Sleep like a stuck backend, but return True as soon as the client gives up, so hung
        handlers neither pile up in benchmarks nor hold up server shutdown."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        try:
            await asyncio.wait_for(disconnected(), seconds)
        except TimeoutError:
            return False
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown timeout: end quietly with 499
            pass
        return True

    async def _drop(self, request: Request) -> Response:
        """Abort the TCP connection with no response, as a crashed or overloaded proxy would."""
        raw_send: _ASGICallable = request.scope["fake.raw_send"]
        cycle = getattr(raw_send, "__self__", None)  # uvicorn's RequestResponseCycle
        transport = getattr(cycle, "transport", None)
        if transport is None:  # unknown server: start a response and die mid-way instead
            await raw_send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"99")]})
            raise ConnectionAbortedError("fake_server: injected drop")
        transport.abort()
        for _ in range(100):  # let connection_lost run so uvicorn ignores the response below
            if getattr(cycle, "disconnected", True):
                break
            await asyncio.sleep(0)
        return Response(status_code=204)


def _uvicorn_config(app: FakeOpenAIApp) -> uvicorn.Config:
    """Lean settings: no access log, no lifespan, and no changes to the host's logging config."""
    return uvicorn.Config(
        app,
        host=HOST,
        loop="asyncio",
        http="auto",
        lifespan="off",
        access_log=False,
        proxy_headers=False,
        log_config=None,
        timeout_graceful_shutdown=1,
        backlog=2048,
    )


def _listen(port: int) -> socket.socket:
    """Listening socket on 127.0.0.1.  proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on
    accepted sockets whose proto says TCP, and without it every response waits ~40 ms (Nagle)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(2048)
    return sock


class FakeOpenAIServer(FakeOpenAIApp):
    """The app plus uvicorn in a daemon thread; use as a context manager (stats/set_config inherited)."""

    def __init__(
        self,
        config: FaultConfig | None = None,
        responder: Responder | None = None,
        port: int = 0,
        startup_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(config, responder)
        self.port = port
        self._startup_timeout_s = startup_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        """Bind (port 0 = pick a free one) and block until uvicorn accepts connections."""
        sock = _listen(self.port)
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(_uvicorn_config(self))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"fake-openai-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake OpenAI server failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait; requests still hanging are cancelled after ~1 s."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        self._server, self._thread = None, None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_arg_parser() -> argparse.ArgumentParser:
    """One flag per FaultConfig field (``latency_s`` -> ``--latency-s``, alias ``--latency``)."""
    parser = argparse.ArgumentParser(
        prog="python -m boostqa_assets.testing.fake_server",
        allow_abbrev=False,
        description="OpenAI-compatible fake LLM server with fault injection",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = free port)")
    for name, field in FaultConfig.model_fields.items():
        flags = [_flag(name)] + ([_flag(name)[:-2]] if name.endswith("_s") else [])
        default = "probability in [0, 1]" if name.endswith("_rate") else str(field.annotation)
        parser.add_argument(*flags, dest=name, default=None, help=field.description or default)
    return parser


def parse_cli_args(argv: list[str] | None = None) -> tuple[int, FaultConfig]:
    """Parse CLI flags into (port, FaultConfig); pydantic does the str->number coercion."""
    parser = build_arg_parser()
    args = vars(parser.parse_args(argv))
    port = args.pop("port")
    values = {k: v for k, v in args.items() if v is not None}
    try:
        if "fail_first_n" in values:
            values["fail_first_n"] = json.loads(values["fail_first_n"])
        return port, FaultConfig.model_validate(values)
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError
        parser.error(str(exc))


def config_to_cli_args(config: FaultConfig) -> list[str]:
    """Inverse of ``parse_cli_args`` for non-default fields (used to launch the child process)."""
    out: list[str] = []
    for name, value in config.model_dump(exclude_defaults=True).items():
        out += [_flag(name), json.dumps(value) if isinstance(value, dict) else str(value)]
    return out


def start_fake_server_process(
    config: FaultConfig | None = None, timeout_s: float = 60.0
) -> tuple[subprocess.Popen[str], str]:
    """Launch the server in its own session (so signals to the test runner don't hit it) and
    wait for its READY line; returns (process, base_url)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "boostqa_assets.testing.fake_server",
        "--port",
        "0",
        *config_to_cli_args(config or FaultConfig()),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout_s)
    except queue.Empty:
        line = ""
    if not line.startswith("READY "):
        stop_process(proc)
        raise RuntimeError(f"fake server process did not become ready (got {line!r})")
    return proc, line.split()[1]


def stop_process(proc: subprocess.Popen[str], timeout_s: float = 15.0) -> int | None:
    """SIGTERM exactly this PID (never by name), wait, escalate to SIGKILL if it hangs."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("fake server pid %s ignored SIGTERM; killing", proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


async def _serve_cli(app: FakeOpenAIApp, sock: socket.socket) -> None:
    server = uvicorn.Server(_uvicorn_config(app))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"READY http://{HOST}:{sock.getsockname()[1]}/v1", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM/SIGINT (uvicorn handles both gracefully)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    port, config = parse_cli_args(argv)
    sock = _listen(port)
    asyncio.run(_serve_cli(FakeOpenAIApp(config), sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
