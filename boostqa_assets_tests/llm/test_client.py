"""Tests for the LLM client against the fake OpenAI-compatible server: request bodies, every injected fault,
rate limits, reasoning, the response cache, the circuit breaker and API-key hygiene."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from boostqa_assets.configs import ConfigError, RoleConfig
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.client import LLMClient, ReplayMissError
from boostqa_assets.llm.limits import retry_after_s
from boostqa_assets.llm.parsing import extract_json as _extract_json
from boostqa_assets.llm.reasoning import split_reasoning
from boostqa_assets.llm.types import LLMRequest, LLMResult, LLMStats, request_hash
from boostqa_assets.testing.fake_server import (
    FakeOpenAIServer,
    FaultConfig,
    ResponderReply,
    default_responder,
    prompt_text,
)

SECRET = "sk-test-9f8e7d6c5b4a-SECRET-KEY"
KEY_ENV = "BOOSTQA_TEST_CLIENT_API_KEY"
N = 20
Serve = Callable[..., FakeOpenAIServer]
QA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}


def qa_validator(obj: Any) -> dict[str, str]:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("question", "answer")):
        raise ValueError(f"not a question/answer object: {str(obj)[:80]}")
    return {"question": obj["question"], "answer": obj["answer"]}


def make_requests(n: int = N, schema: dict[str, Any] | None = QA_SCHEMA, **kw: Any) -> list[LLMRequest]:
    return [
        LLMRequest(
            key=f"row-{i:03d}",
            prompt_id="qa",
            prompt_version="v1",
            prompt=f"Write one exam question about topic number {i}.",
            schema=schema,
            **kw,
        )
        for i in range(n)
    ]


def role(**kw: Any) -> RoleConfig:
    """Small timeouts and backoffs so the whole file runs in seconds."""
    base: dict[str, Any] = {
        "base_url": "http://unused",
        "model": "fake-model",
        "api": "chat",
        "structured_output": "json_schema",
        "max_tokens": 64,
        "timeout_s": 2.0,
        "max_concurrency": 8,
        "max_retries": 4,
        "max_parse_retries": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.2,
    }
    return RoleConfig(**{**base, **kw})


def server_key(body: dict[str, Any]) -> str:
    """The fake server's per-body key (what ``requests_by_body`` / ``ok_by_body`` are keyed by)."""
    return hashlib.blake2b(json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), digest_size=8).hexdigest()


class Recorder:
    """Responder that answers like the default one and remembers every body it was asked to answer."""

    def __init__(self, inner: Callable[[dict[str, Any]], str | ResponderReply] = default_responder) -> None:
        self.inner = inner
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str | ResponderReply:
        with self._lock:
            self.bodies.append(body)
        return self.inner(body)

    def by_hash(self) -> dict[str, dict[str, Any]]:
        return {request_hash(b): b for b in self.bodies}


class HeaderServer(FakeOpenAIServer):
    """The fake server, also recording each completion request's Authorization header."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auth: list[str | None] = []

    async def _completion(self, request: Request, chat: bool) -> Response:
        self.auth.append(request.headers.get("authorization"))
        return await super()._completion(request, chat)


class EchoKeyServer(FakeOpenAIServer):
    """A careless endpoint whose error bodies echo the Authorization header back."""

    def __init__(self, status: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.status = status

    async def _handle(self, request: Request, chat: bool, st: Any) -> Response:
        msg = f"invalid credentials: {request.headers.get('authorization')} for this model"
        return JSONResponse({"error": {"message": msg}}, status_code=self.status)


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeOpenAIServer]]:
    started: list[FakeOpenAIServer] = []

    def make(
        config: FaultConfig | None = None, cls: type[FakeOpenAIServer] = FakeOpenAIServer, **kwargs: Any
    ) -> FakeOpenAIServer:
        srv = cls(config=config, **kwargs).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def client_for(srv: FakeOpenAIServer | str, **kw: Any) -> LLMClient:
    extra = {k: kw.pop(k) for k in ("cache", "replay_only", "circuit_breaker_failures") if k in kw}
    base_url = srv if isinstance(srv, str) else srv.base_url
    return LLMClient("synthesizer", role(**kw), base_url, **extra)


def assert_one_per_request(results: list[LLMResult], requests: list[LLMRequest]) -> None:
    assert [r.key for r in results] == [q.key for q in requests]  # none lost, none duplicated, in order
    assert len({r.key for r in results}) == len(requests)


def assert_stats_consistent(stats: LLMStats, results: list[LLMResult]) -> None:
    assert stats.logical_requests == len(results)
    assert stats.ok == sum(r.ok for r in results)
    assert stats.failed == sum(not r.ok for r in results)
    assert sum(stats.failures_by_reason.values()) == stats.failed
    assert_results_add_up(stats, results)


def assert_results_add_up(stats: LLMStats, results: list[LLMResult]) -> None:
    """Each result says what its request cost, so a partition's figures are the sum of its rows' results: over a
    run, they add up to the client's."""
    for name in ("http_requests", "cache_hits", "retries"):
        assert sum(getattr(r, name) for r in results) == getattr(stats, name), name
    assert sum(r.paid_tokens_in for r in results) == stats.tokens_in
    assert sum(r.paid_tokens_out for r in results) == stats.tokens_out


# --- 1. request bodies -----------------------------------------------------------------------------------


def _body_client(**kw: Any) -> LLMClient:
    return LLMClient("annotator", role(**kw), "http://127.0.0.1:9/v1")


def test_chat_body_has_messages_and_sampling_parameters() -> None:
    c = _body_client(api="chat", seed=7, stop=["\n\n", "END"], temperature=0.0, top_p=0.9)
    req = LLMRequest(
        key="k",
        prompt_id="qa",
        prompt_version="v1",
        prompt="Hello?",
        system="Be brief.",
        schema=QA_SCHEMA,
        seed_offset=3,
    )
    body = c.build_body(req)
    assert body["model"] == "fake-model" and body["max_tokens"] == 64 and body["top_p"] == 0.9
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
    ]
    assert "prompt" not in body
    assert body["stop"] == ["\n\n", "END"]
    assert body["seed"] == 7 + 3 and body["temperature"] == 0.0
    reask = c.build_body(req, attempt=1)
    assert reask["seed"] == 7 + 3 + 1  # a re-ask changes the seed...
    assert reask["temperature"] > 0  # ...and is not greedy, or it would repeat the same bad reply
    assert request_hash(reask) != request_hash(body)
    assert c.build_body(req, attempt=2)["seed"] == 12
    assert c.build_body(req, max_tokens=500)["max_tokens"] == 500
    no_system = c.build_body(LLMRequest(key="k", prompt_id="qa", prompt_version="v1", prompt="Hi"))
    assert no_system["messages"] == [{"role": "user", "content": "Hi"}]
    assert "response_format" not in no_system and "grammar" not in no_system


def test_completions_body_has_prompt_and_prefill() -> None:
    c = _body_client(api="completions", structured_output="none", stop=["\n\n"])
    req = LLMRequest(
        key="k",
        prompt_id="qa",
        prompt_version="v1",
        prompt="Seed: x\nJSON:",
        system="Task.",
        schema=QA_SCHEMA,
        prefill='{"question": "',
        max_tokens=32,
        temperature=0.3,
    )
    body = c.build_body(req)
    assert "messages" not in body and "response_format" not in body and "grammar" not in body
    assert body["prompt"].startswith("Task.\n\nSeed: x\nJSON:")
    assert body["prompt"].endswith('{"question": "')
    assert body["max_tokens"] == 32 and body["temperature"] == 0.3 and body["stop"] == ["\n\n"]
    plain = c.build_body(LLMRequest(key="k", prompt_id="qa", prompt_version="v1", prompt="P"))
    assert plain["prompt"] == "P"


def test_no_seed_and_no_stop_when_not_configured() -> None:
    body = _body_client(seed=None, stop=None).build_body(make_requests(1)[0])
    assert "seed" not in body and "stop" not in body


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("mode", ["json_schema", "json_object_schema", "json_object", "gbnf", "none"])
def test_structured_output_modes(api: str, mode: str) -> None:
    c = _body_client(api=api, structured_output=mode, extra_body={"top_k": 5})
    body = c.build_body(make_requests(1)[0])
    assert body["top_k"] == 5  # extra_body passes through
    rf = body.get("response_format")
    if mode == "json_schema":
        assert rf == {
            "type": "json_schema",
            "json_schema": {"name": "qa", "schema": QA_SCHEMA, "strict": True},
        }
    elif mode == "json_object_schema":
        assert rf == {"type": "json_object", "schema": QA_SCHEMA}
    elif mode == "json_object":
        assert rf == {"type": "json_object"}
    else:
        assert rf is None
    if mode == "gbnf":
        grammar = body["grammar"]
        assert isinstance(grammar, str) and "root ::=" in grammar and "question" in grammar
    else:
        assert "grammar" not in body
    # without a schema no mode constrains the output
    free = c.build_body(make_requests(1, schema=None)[0])
    assert "response_format" not in free and "grammar" not in free


def test_request_hash_is_content_addressed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", "key-a-123")
    monkeypatch.setenv("KEY_B", "key-b-456")
    req = make_requests(1)[0]
    a = LLMClient("r", role(api_key_env="KEY_A"), "http://host-a:1/v1")
    b = LLMClient("r", role(api_key_env="KEY_B"), "https://other-host/v9/")
    assert request_hash(a.build_body(req)) == request_hash(b.build_body(req))  # not URL- or key-dependent
    assert request_hash(a.build_body(req)) == request_hash(a.build_body(req))  # stable
    base = request_hash(a.build_body(req))
    variants = [
        _body_client(model="other-model").build_body(req),
        _body_client(temperature=0.5).build_body(req),
        _body_client(top_p=0.5).build_body(req),
        _body_client(max_tokens=65).build_body(req),
        _body_client(stop=["x"]).build_body(req),
        _body_client(seed=5).build_body(req),
        _body_client(api="completions").build_body(req),
        _body_client(structured_output="json_object").build_body(req),
        _body_client(extra_body={"top_k": 2}).build_body(req),
        a.build_body(LLMRequest(**{**req.__dict__, "prompt": req.prompt + "!"})),
        a.build_body(LLMRequest(**{**req.__dict__, "system": "sys"})),
        a.build_body(LLMRequest(**{**req.__dict__, "seed_offset": 1})),
        a.build_body(LLMRequest(**{**req.__dict__, "schema": {**QA_SCHEMA, "required": ["question"]}})),
        a.build_body(req, attempt=1),
    ]
    hashes = [request_hash(v) for v in variants]
    assert base not in hashes and len(set(hashes)) == len(hashes)
    # the row key is bookkeeping, not part of the request: same body, same hash
    assert request_hash(a.build_body(LLMRequest(**{**req.__dict__, "key": "other"}))) == base


def test_reask_bodies_differ_even_without_a_configured_seed() -> None:
    """A re-ask identical to the attempt it replaces would be answered from the cache with the bad reply."""
    c = _body_client(seed=None, temperature=0.7)
    req = make_requests(1)[0]
    hashes = {request_hash(c.build_body(req, attempt)) for attempt in range(4)}
    assert len(hashes) == 4


# --- 2. faults: transport --------------------------------------------------------------------------------

TRANSPORT_FAULTS = [  # kind, times per body, stats counter it must move, extra config
    ("429", 1, "http_429", {}),
    ("500", 1, "http_5xx", {}),
    ("503", 1, "http_5xx", {}),
    ("timeout", 1, "timeouts", {"timeout_s": 0.75}),
    ("drop", 2, "transport_errors", {}),
]


@pytest.mark.parametrize(("kind", "times", "counter", "extra"), TRANSPORT_FAULTS, ids=[f[0] for f in TRANSPORT_FAULTS])
def test_transport_faults_are_retried_without_losing_or_duplicating_rows(
    serve: Serve, kind: str, times: int, counter: str, extra: dict[str, Any]
) -> None:
    rec = Recorder()
    srv = serve(FaultConfig(fail_first_n={kind: times}, hang_s=10), responder=rec)
    c = client_for(srv, max_concurrency=N, **extra)
    reqs = make_requests()
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    assert all(r.ok and r.error is None and r.attempts == 1 for r in results), [r.detail for r in results]
    assert all(r.value == qa_validator(json.loads(r.content or "")) for r in results)
    st = srv.stats()
    s = c.stats
    assert getattr(s, counter) == N * times
    assert s.retries == N * times
    assert s.http_requests == N * (times + 1) == st["requests"]
    assert s.reasks == 0 and s.ok == N and s.failed == 0 and s.cache_hits == 0
    assert st["by_fault"][kind] == N * times
    # every accepted body was answered OK exactly once by the server, and that body is the one we accepted
    accepted = {server_key(rec.by_hash()[r.request_hash]) for r in results}
    assert st["ok_by_body"] == dict.fromkeys(accepted, 1) and len(accepted) == N
    assert set(st["requests_by_body"].values()) == {times + 1}
    assert_stats_consistent(s, results)


def test_transport_retries_exhausted_reject_rows_and_keep_going(serve: Serve) -> None:
    srv = serve(FaultConfig(fail_first_n={"drop": 3}))
    c = client_for(srv, max_retries=2, circuit_breaker_failures=10_000)
    reqs = make_requests()
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    assert all(not r.ok and r.error == "transport" and "after 2 retries" in r.detail for r in results)
    assert c.stats.http_requests == srv.stats()["requests"] == 3 * N
    assert c.stats.retries == 2 * N and c.stats.transport_errors == 3 * N
    assert c.stats.failures_by_reason == {"transport": N}
    assert srv.stats()["ok_by_body"] == {}
    assert_stats_consistent(c.stats, results)


def test_http_400_is_not_retried(serve: Serve) -> None:
    srv = serve(FaultConfig(fail_first_n={"400": 1}))
    c = client_for(srv)
    reqs = make_requests()
    results = c.run(reqs, qa_validator)  # 20 rejected rows in a row must not open the circuit breaker
    assert_one_per_request(results, reqs)
    assert all(not r.ok and r.error == "http_400" and "HTTP 400" in r.detail and r.attempts == 1 for r in results)
    assert c.stats.http_requests == srv.stats()["requests"] == N
    assert c.stats.retries == 0 and c.stats.reasks == 0
    assert c.stats.failures_by_reason == {"http_400": N}
    assert_stats_consistent(c.stats, results)


def test_http_400_at_random_only_rejects_its_own_rows(serve: Serve) -> None:
    srv = serve(FaultConfig(error_400_rate=0.5, seed=3))
    c = client_for(srv)
    reqs = make_requests(40)
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    assert {r.error for r in results} == {None, "http_400"}  # seed 3 gives both outcomes
    assert c.stats.http_requests == srv.stats()["requests"] == 40  # nothing sent twice
    assert srv.stats()["by_status"].get("400", 0) == c.stats.failed
    assert_stats_consistent(c.stats, results)


# --- 2. faults: bad replies ------------------------------------------------------------------------------

PARSE_FAULTS = [
    ("malformed", "invalid_json"),
    ("schema_mismatch", "schema_mismatch"),
    ("truncated", "truncated"),
]


@pytest.mark.parametrize(("kind", "error"), PARSE_FAULTS, ids=[f[0] for f in PARSE_FAULTS])
def test_persistent_bad_replies_are_reasked_then_rejected_with_raw_output(serve: Serve, kind: str, error: str) -> None:
    # fail_first_n counts per distinct body and every re-ask is a new body: each attempt gets the fault.
    rec = Recorder()
    srv = serve(FaultConfig(fail_first_n={kind: 1}), responder=rec)
    c = client_for(srv, seed=100, max_parse_retries=2)
    reqs = make_requests()
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    for r in results:
        assert not r.ok and r.value is None and r.error == error and r.attempts == 3
        assert r.raw_output and r.raw_output == r.content
    if kind == "malformed":
        assert all(r.raw_output == '{"question": "unterminated' for r in results)
    elif kind == "schema_mismatch":
        assert all(r.raw_output == '{"unexpected_field": "schema mismatch"}' for r in results)
    else:
        assert all(r.finish_reason == "length" for r in results)
    s, st = c.stats, srv.stats()
    assert s.reasks == 2 * N and s.retries == 0
    assert s.http_requests == st["requests"] == 3 * N == st["by_fault"][kind]
    assert set(st["requests_by_body"].values()) == {1}  # each re-ask was a new body, sent once
    assert s.failures_by_reason == {error: N}
    assert_stats_consistent(s, results)
    # re-asks change the seed; a truncated reply also doubles max_tokens
    for req in reqs[:3]:
        sent = [b for b in rec.bodies if prompt_text(b) == req.prompt]
        assert sorted(b["seed"] for b in sent) == [100, 101, 102]
        expected_tokens = [64, 128, 256] if kind == "truncated" else [64, 64, 64]
        assert [b["max_tokens"] for b in sorted(sent, key=lambda b: b["seed"])] == expected_tokens


def _bad_first_time(kind: str) -> Callable[[dict[str, Any]], ResponderReply]:
    """A model that gets each prompt wrong the first time and right on the re-ask."""
    seen: set[str] = set()

    def respond(body: dict[str, Any]) -> ResponderReply:
        text = prompt_text(body)
        good = str(default_responder(body))
        if text in seen:
            return ResponderReply(good)
        seen.add(text)
        if kind == "malformed":
            return ResponderReply('{"question": "oops')
        if kind == "schema_mismatch":
            return ResponderReply('{"q": 1}')
        return ResponderReply(good[: len(good) // 2], finish_reason="length")

    return respond


@pytest.mark.parametrize("kind", [k for k, _ in PARSE_FAULTS])
def test_bad_reply_reasked_once_then_accepted(serve: Serve, kind: str) -> None:
    rec = Recorder(_bad_first_time(kind))
    srv = serve(responder=rec)
    c = client_for(srv, seed=5)
    reqs = make_requests()
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    assert all(r.ok and r.attempts == 2 and r.error is None and r.detail == "" for r in results)
    assert all(r.value and r.value["question"] and "oops" not in (r.content or "") for r in results)
    assert c.stats.reasks == N and c.stats.http_requests == srv.stats()["requests"] == 2 * N
    by_hash = rec.by_hash()
    for r in results:
        accepted = by_hash[r.request_hash]
        assert accepted["seed"] == 6  # the answer that was kept is the re-ask's
        assert accepted["max_tokens"] == (128 if kind == "truncated" else 64)
    assert_stats_consistent(c.stats, results)


def test_reask_is_not_answered_from_cache_without_a_seed(serve: Serve, tmp_path: Path) -> None:
    """With ``seed: null`` and temperature > 0 a re-ask used to be byte-identical to the failed attempt, so
    the cache handed back the same bad reply and every re-ask was wasted."""
    srv = serve(responder=_bad_first_time("malformed"))
    c = client_for(srv, seed=None, temperature=0.7, cache=ResponseCache(str(tmp_path)))
    reqs = make_requests(5)
    results = c.run(reqs, qa_validator)
    assert all(r.ok and r.attempts == 2 for r in results), [(r.error, r.raw_output) for r in results]
    assert srv.stats()["requests"] == 10


def test_random_mixed_faults_lose_and_duplicate_nothing(serve: Serve) -> None:
    srv = serve(
        FaultConfig(
            error_500_rate=0.05,
            error_503_rate=0.05,
            timeout_rate=0.05,
            drop_rate=0.05,
            malformed_rate=0.05,
            schema_mismatch_rate=0.05,
            truncated_rate=0.05,
            seed=11,
            hang_s=10,
        )
    )
    c = client_for(
        srv,
        max_retries=8,
        max_parse_retries=4,
        timeout_s=0.75,
        max_concurrency=N,
        circuit_breaker_failures=10_000,
    )
    reqs = make_requests(40)
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    st = srv.stats()
    assert sum(st["by_fault"].values()) > 0
    assert c.stats.http_requests == st["requests"]
    assert c.stats.reasks == sum(r.attempts - 1 for r in results)
    assert all(r.ok or r.error in ("invalid_json", "schema_mismatch", "truncated") for r in results)
    assert st["answered_ok"] == c.stats.ok and set(st["ok_by_body"].values()) == {1}
    assert c.stats.retries == st["by_fault"].get("500", 0) + st["by_fault"].get("503", 0) + st["by_fault"].get(
        "timeout", 0
    ) + st["by_fault"].get("drop", 0)
    assert_stats_consistent(c.stats, results)


def test_progress_and_order_with_more_requests_than_the_task_window(serve: Serve) -> None:
    srv = serve(FaultConfig(latency_s=0.002, latency_jitter_s=0.002))
    c = client_for(srv, max_concurrency=3)
    reqs = make_requests(150)
    calls: list[tuple[int, int]] = []
    results = c.run(reqs, qa_validator, progress=lambda done, total, stats: calls.append((done, total)))
    assert_one_per_request(results, reqs)
    assert all(r.ok for r in results)
    assert calls == [(i, 150) for i in range(1, 151)]
    assert srv.stats()["max_in_flight"] <= 3  # the concurrency cap holds
    assert c.stats.tokens_in == srv.stats()["tokens_in"] and c.stats.tokens_out == srv.stats()["tokens_out"]
    assert len(c.stats.latencies) == 150
    assert c.run([], qa_validator) == []


# --- 3. rate limits and Retry-After ----------------------------------------------------------------------


def test_rpm_limit_retry_after_is_honoured(serve: Serve) -> None:
    rpm, window, n = 4, 1.0, 12
    srv = serve(FaultConfig(rpm=rpm, window_s=window))
    # backoff_max_s is far below the server's Retry-After (1 s): the client must still wait what it is told
    c = client_for(srv, max_concurrency=n, max_retries=6, backoff_max_s=0.2)
    reqs = make_requests(n)
    started = time.perf_counter()
    results = c.run(reqs, qa_validator)
    elapsed = time.perf_counter() - started
    assert_one_per_request(results, reqs)
    assert all(r.ok for r in results), [r.detail for r in results]
    assert elapsed >= (n // rpm - 1) * window * 0.95  # 12 requests at 4 per window need 3 windows
    assert c.stats.http_429 > 0 and c.stats.retries == c.stats.http_429
    # honouring Retry-After means roughly one 429 per waiting request per window, not a retry storm
    assert c.stats.http_429 <= 2 * n
    assert set(srv.stats()["ok_by_body"].values()) == {1} and len(srv.stats()["ok_by_body"]) == n


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-3"}, 0.0),
        ({"x-ratelimit-reset-requests": "1.5s"}, 1.5),
        ({"x-ratelimit-reset-requests": "250ms"}, 0.25),
        ({"x-ratelimit-reset-tokens": "1m30s"}, 90.0),
        ({"retry-after": "3", "x-ratelimit-reset-requests": "9s"}, 3.0),
        ({}, None),
        ({"x-ratelimit-reset-requests": "soon"}, None),
    ],
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    value = retry_after_s(httpx.Response(429, headers=headers).headers)
    assert value == pytest.approx(expected) if expected is not None else value is None


# --- 4. reasoning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("api", "mode"), [("chat", "field"), ("chat", "think_tags"), ("completions", "think_tags")])
def test_reasoning_is_kept_apart_from_the_answer(serve: Serve, api: str, mode: str) -> None:
    srv = serve(FaultConfig(reasoning=mode))
    c = client_for(srv, api=api, structured_output="json_object_schema")
    reqs = make_requests(5)
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    for r, req in zip(results, reqs, strict=True):
        assert r.ok, (r.error, r.raw_output)
        assert r.reasoning.startswith("Let me think step by step") and req.prompt.split()[0] in r.reasoning
        for text in (r.content or "", json.dumps(r.value)):
            assert "think" not in text.lower() and "step by step" not in text


def test_no_reasoning_means_empty_reasoning(serve: Serve) -> None:
    results = client_for(serve()).run(make_requests(2), qa_validator)
    assert all(r.ok and r.reasoning == "" for r in results)


# --- prefill (completions) -------------------------------------------------------------------------------


def test_prefill_is_sent_and_put_back_in_front_of_the_reply(serve: Serve, tmp_path: Path) -> None:
    prefill = '{"question": "'

    def continue_prefill(body: dict[str, Any]) -> ResponderReply:
        assert body["prompt"].endswith(prefill)
        topic = body["prompt"].split("number ")[1].split(".")[0]
        return ResponderReply(f'What is {topic}?", "answer": "It is {topic}."}}')

    srv = serve(responder=continue_prefill)
    reqs = make_requests(5, prefill=prefill)
    for _ in range(2):  # the second run is served from the cache: the prefill is added once, not twice
        c = client_for(srv, api="completions", structured_output="none", cache=ResponseCache(str(tmp_path)))
        results = c.run(reqs, qa_validator)
        for i, r in enumerate(results):
            assert r.ok, (r.error, r.raw_output)
            assert r.value == {"question": f"What is {i}?", "answer": f"It is {i}."}
            assert r.content is not None and r.content.startswith(prefill) and r.content.count(prefill) == 1
    assert srv.stats()["requests"] == 5


def test_prefill_is_ignored_by_chat(serve: Serve) -> None:
    c = client_for(serve(), api="chat")
    req = make_requests(1, prefill='{"question": "')[0]
    sent = json.dumps(c.build_body(req))
    assert "prefill" not in sent and '{\\"question' not in sent
    (r,) = c.run([req], qa_validator)
    assert r.ok and r.content is not None and r.content.startswith("{")
    assert not r.content.startswith('{"question": "{')  # nothing was put in front of the reply


# --- 5. cache and replay ---------------------------------------------------------------------------------


def test_cache_second_run_sends_nothing_and_holds_no_key(serve: Serve, tmp_path: Path, api_key: str) -> None:
    srv = serve(cls=HeaderServer)
    assert isinstance(srv, HeaderServer)
    reqs = make_requests()
    first = client_for(srv, api_key_env=KEY_ENV, cache=ResponseCache(str(tmp_path)))
    r1 = first.run(reqs, qa_validator)
    assert all(r.ok and not r.cached for r in r1)
    assert srv.auth == [f"Bearer {api_key}"] * N  # the key travels only as a Bearer header
    srv.reset_stats()
    second = client_for(srv, api_key_env=KEY_ENV, cache=ResponseCache(str(tmp_path)))
    r2 = second.run(reqs, qa_validator)
    assert srv.stats()["requests"] == 0 and len(srv.auth) == N
    assert second.stats.http_requests == 0 and second.stats.cache_hits == N
    assert second.stats.tokens_in == 0  # cached replies cost nothing this time
    assert [r.value for r in r2] == [r.value for r in r1]
    assert [r.request_hash for r in r2] == [r.request_hash for r in r1]
    assert all(r.cached and r.ok for r in r2)
    # Every reply is stored (Parquet segments, see test_cache.py), and no stored byte or value holds the key.
    entries = ResponseCache(str(tmp_path)).get_many(r.request_hash for r in r1)
    assert len(entries) == N and not list(tmp_path.rglob("*.tmp"))
    for h, entry in entries.items():
        assert h == entry["request_hash"] == request_hash(entry["request"])
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert files and all(f.suffix == ".parquet" for f in files)
    for f in files:
        raw = f.read_bytes()
        text = json.dumps(pq.read_table(f).to_pylist(), default=str)
        assert api_key.encode() not in raw and b"Bearer" not in raw
        assert api_key not in text and "Bearer" not in text
    # a replay-only client over the full cache needs no server at all
    replay = client_for("http://127.0.0.1:9/v1", cache=ResponseCache(str(tmp_path)), replay_only=True)
    assert [r.value for r in replay.run(reqs, qa_validator)] == [r.value for r in r1]


def test_cache_replays_rejected_rows_identically(serve: Serve, tmp_path: Path) -> None:
    srv = serve(FaultConfig(fail_first_n={"schema_mismatch": 1}))
    reqs = make_requests(5)
    r1 = client_for(srv, cache=ResponseCache(str(tmp_path))).run(reqs, qa_validator)
    before = srv.stats()["requests"]
    r2 = client_for(srv, cache=ResponseCache(str(tmp_path))).run(reqs, qa_validator)
    assert srv.stats()["requests"] == before == 15

    def outcome(rs: list[LLMResult]) -> list[tuple[Any, ...]]:
        return [(r.error, r.raw_output, r.attempts) for r in rs]

    assert outcome(r2) == outcome(r1)


def test_replay_only_with_empty_cache_raises(serve: Serve, tmp_path: Path) -> None:
    srv = serve()
    c = client_for(srv, cache=ResponseCache(str(tmp_path / "empty")), replay_only=True)
    with pytest.raises(ReplayMissError, match="replay-only"):
        c.run(make_requests(3), qa_validator)
    assert srv.stats()["requests"] == 0


# --- 6. circuit breaker ----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_circuit_breaker_opens_on_a_failing_endpoint(
    serve: Serve, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    srv = serve(FaultConfig(error_500_rate=1.0))
    c = client_for(srv, api_key_env=KEY_ENV, max_retries=1)
    started = time.perf_counter()
    reqs = make_requests()
    with caplog.at_level(logging.ERROR):
        results = c.run(reqs, qa_validator)  # it returns: the run decides what an incomplete batch means
        gc.collect()  # finished tasks whose exception nobody looked at are reported when collected
    assert time.perf_counter() - started < 10
    assert_one_per_request(results, reqs)
    msg = c.stop_reason or ""
    assert srv.base_url in msg and "500" in msg and api_key not in msg
    assert {r.error for r in results} == {"transport", "endpoint_down"}  # failed after retries, or never sent
    not_sent = [r for r in results if r.error == "endpoint_down"]
    assert not_sent and all("not sent: the circuit breaker opened" in r.detail for r in not_sent)
    assert c.stats.http_requests < 2 * N  # it stopped early instead of working through the batch
    assert "never retrieved" not in caplog.text and "stopped sending" in caplog.text and api_key not in caplog.text


class DiesAfterServer(FakeOpenAIServer):
    """Answers ``ok`` requests, then every later one with a 500: an endpoint that goes down mid-run."""

    def __init__(self, ok: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ok, self.seen = ok, 0

    async def _handle(self, request: Request, chat: bool, st: Any) -> Response:
        self.seen += 1
        if self.seen > self.ok:
            return JSONResponse({"error": {"message": "down"}}, status_code=500)
        return await super()._handle(request, chat, st)


def test_a_run_cut_by_the_breaker_keeps_what_was_paid_and_the_rerun_pays_only_the_rest(
    serve: Serve, tmp_path: Path
) -> None:
    n, answered = 40, 15
    dying = serve(cls=DiesAfterServer, ok=answered)
    cache = ResponseCache(str(tmp_path / "cache"))
    reqs = make_requests(n)
    c = client_for(dying, cache=cache, max_concurrency=1, max_retries=1)
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    assert [r.ok for r in results[:answered]] == [True] * answered  # the replies paid for are kept
    assert c.stop_reason and not any(r.ok for r in results[answered:])
    # (a row backing off between retries lets the next one go: a few more than the threshold fail on the wire)
    assert sum(1 for r in results if r.error == "endpoint_down") >= n - answered - 2 * c.breaker.threshold
    healthy = serve()
    again = client_for(healthy, cache=ResponseCache(str(tmp_path / "cache")), max_concurrency=4)
    second = again.run(reqs, qa_validator)
    assert all(r.ok for r in second) and [r.content for r in second[:answered]] == [
        r.content for r in results[:answered]
    ]
    assert healthy.stats()["requests"] == n - answered and again.stats.cache_hits == answered


class BarrierServer(FakeOpenAIServer):
    """Holds every request until ``n`` have arrived, then fails them all at once with a 500."""

    def __init__(self, n: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n, self.arrived = n, 0
        self.all_here: asyncio.Event | None = None

    async def _handle(self, request: Request, chat: bool, st: Any) -> Response:
        self.all_here = self.all_here or asyncio.Event()
        self.arrived += 1
        if self.arrived >= self.n:
            self.all_here.set()
        await asyncio.wait_for(self.all_here.wait(), 5)
        return JSONResponse({"error": {"message": "down"}}, status_code=500)


def test_circuit_breaker_collects_every_task_that_failed_together(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Many rows failing in the same instant must not leave 'Task exception was never retrieved' noise."""
    srv = serve(cls=BarrierServer, n=N)
    c = client_for(srv, max_retries=0, max_concurrency=N, circuit_breaker_failures=1)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        results = c.run(make_requests(), qa_validator)
        gc.collect()  # a finished task whose exception nobody looked at is reported when it is collected
    assert c.stop_reason and all(r.error == "transport" for r in results)  # all were on the wire together
    assert c.stats.http_requests == N
    assert "never retrieved" not in caplog.text


def test_circuit_breaker_opens_on_a_closed_port(api_key: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    c = client_for(url, api_key_env=KEY_ENV, max_retries=2)
    started = time.perf_counter()
    results = c.run(make_requests(), qa_validator)
    assert time.perf_counter() - started < 10
    msg = c.stop_reason or ""
    assert url in msg and api_key not in msg and "ConnectError" in msg
    assert c.stats.transport_errors >= 5 and not any(r.ok for r in results)


def test_circuit_breaker_message_redacts_an_echoed_key(serve: Serve, api_key: str) -> None:
    srv = serve(cls=EchoKeyServer, status=500)
    c = client_for(srv, api_key_env=KEY_ENV, max_retries=1)
    results = c.run(make_requests(), qa_validator)
    msg = c.stop_reason or ""
    assert "invalid credentials: Bearer ***" in msg and api_key not in msg
    assert all(api_key not in r.detail for r in results)


def test_429s_never_use_up_retries_nor_open_the_breaker(serve: Serve) -> None:
    """A server that answers each request's first 12 attempts with 429 + Retry-After: more than max_retries
    (2) and than the breaker's threshold (2) in a row; every row still comes back."""
    srv = serve(FaultConfig(fail_first_n={"429": 12}), responder=Recorder())
    c = client_for(srv, max_retries=2, circuit_breaker_failures=2, max_concurrency=N)
    reqs = make_requests(5)
    started = time.perf_counter()
    results = c.run(reqs, qa_validator)
    assert_one_per_request(results, reqs)
    assert all(r.ok for r in results), [r.detail for r in results]
    assert c.stop_reason is None and c.stats.http_429 == 5 * 12
    assert time.perf_counter() - started >= 12 * 1.0 * 0.9  # each 429 said Retry-After: 1 and was honoured
    assert c.stats.rate_limit_wait_s >= 5 * 12 * 0.9


def test_a_request_that_waits_too_long_on_429s_is_rate_limited_not_down(serve: Serve) -> None:
    srv = serve(FaultConfig(fail_first_n={"429": 50}))
    c = client_for(srv, max_retries=1, circuit_breaker_failures=1, rate_limit_max_wait_s=2.5)
    results = c.run(make_requests(3), qa_validator)
    assert all(r.error == "rate_limited" and "rate_limit_max_wait_s" in r.detail for r in results)
    assert c.stop_reason is None and c.stats.failures_by_reason == {"rate_limited": 3}


def test_a_reply_cut_by_max_tokens_is_never_a_good_row_without_a_schema(serve: Serve) -> None:
    """The probe's requests have no schema: a reply that stopped at max_tokens is re-asked with more tokens,
    then rejected as truncated, never kept as an answer."""
    seen: set[str] = set()

    def cut_once(body: dict[str, Any]) -> ResponderReply:  # each row's first reply stops at max_tokens
        text = prompt_text(body)
        first = text not in seen
        seen.add(text)
        return ResponderReply(
            "Paris is the" if first else "Paris is the capital", finish_reason="length" if first else "stop"
        )

    srv = serve(responder=cut_once)
    c = client_for(srv, max_parse_retries=1)
    results = c.run(make_requests(4, schema=None), lambda text: text)
    assert all(r.ok and r.attempts == 2 and r.content == "Paris is the capital" for r in results)
    assert c.stats.reasks == 4
    rec = Recorder(lambda body: "Paris is the capital")
    srv2 = serve(FaultConfig(truncated_rate=1.0), responder=rec)
    c2 = client_for(srv2, max_parse_retries=1)
    results = c2.run(make_requests(4, schema=None), lambda text: text)
    assert all(not r.ok and r.error == "truncated" and r.attempts == 2 for r in results)
    assert c2.stats.failures_by_reason == {"truncated": 4}
    assert sorted({b["max_tokens"] for b in rec.bodies}) == [64, 128]  # the re-ask asked for twice the tokens


# --- 7. redaction ----------------------------------------------------------------------------------------


def test_redact_and_repr_hide_the_key(api_key: str) -> None:
    c = client_for("http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    assert c.redact(f"a {api_key} b {api_key}") == "a *** b ***"
    assert c.redact("nothing secret") == "nothing secret"
    assert api_key not in repr(c) and api_key not in str(c)
    assert client_for("http://127.0.0.1:9/v1").redact("x sk-abc") == "x sk-abc"  # no key: no change


def test_http_400_detail_never_leaks_an_echoed_key(serve: Serve, api_key: str) -> None:
    srv = serve(cls=EchoKeyServer, status=400)
    c = client_for(srv, api_key_env=KEY_ENV)
    results = c.run(make_requests(3), qa_validator)
    for r in results:
        assert r.error == "http_400" and "Bearer ***" in r.detail and api_key not in r.detail
        assert api_key not in json.dumps(r.__dict__, default=str)
    assert api_key not in json.dumps(c.stats.to_metadata())


# --- 8. missing key ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_missing_api_key_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(ConfigError) as info:
        client_for("http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    assert KEY_ENV in str(info.value) and "'synthesizer'" in str(info.value)


def test_no_api_key_env_sends_no_authorization(serve: Serve) -> None:
    srv = serve(cls=HeaderServer)
    assert isinstance(srv, HeaderServer)
    assert all(r.ok for r in client_for(srv).run(make_requests(2), qa_validator))
    assert srv.auth == [None, None]


# --- 9. split_reasoning ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "answer", "reasoning"),
    [
        ('<think>plan it</think>\n{"a": 1}', '{"a": 1}', "plan it"),
        ("<think>one</think>A<think> two </think>B", "AB", "one\ntwo"),
        ("<think>cut off by max_tokens", "", "cut off by max_tokens"),
        ("<think>done</think>answer<think>unclosed", "answer", "done\nunclosed"),
        ("plain answer", "plain answer", ""),
        ("<THINK>Upper</THINK>ans", "ans", "Upper"),
        ("<Think>\nmixed\n</tHiNk>\n\nans", "ans", "mixed"),
        ("<think></think>ans", "ans", ""),
        # the opening tag was part of the prompt (DeepSeek-R1 / Qwen3 templates): only the closing tag comes back
        ('the model mulls it over</think>\n\n{"a": 1}', '{"a": 1}', "the model mulls it over"),
        ("", "", ""),
    ],
)
def test_split_reasoning(content: str, answer: str, reasoning: str) -> None:
    assert split_reasoning(content) == (answer, reasoning)


# --- 10. _extract_json -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  \n{"a": {"b": [1, 2]}}\n ', {"a": {"b": [1, 2]}}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('```\n{"a": 1}\n```', {"a": 1}),
        ('Here you go:\n```json\n{"a": "x"}\n```\nAnything else?', {"a": "x"}),
        ('Sure! Here is the JSON: {"a": 1}', {"a": 1}),
        ('{"a": 1}\nI hope this helps.', {"a": 1}),
        ('Answer: {"a": "b"} -- done', {"a": "b"}),
        (
            '{"a": "x"}\nJSON: {"a": "y"}',
            {"a": "x"},
        ),  # a base model running on into the next few-shot example
        ('{"a": 1} (note: I assumed {x})', {"a": 1}),
        ("[1, 2]", [1, 2]),
    ],
)
def test_extract_json_accepts(text: str, expected: Any) -> None:
    assert _extract_json(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "unterminated',
        '{"a": {"b": 1}, "c": "cut',
        '```json\n{"a": 1,\n',
        "I cannot answer that.",
        "",
        "{not json}",
    ],
)
def test_extract_json_rejects(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        _extract_json(text)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refusing_endpoint_stops_the_run_without_leaking_the_key(
    serve: Callable[..., FakeOpenAIServer], api_key: str, status: int
) -> None:
    srv = serve(cls=EchoKeyServer, status=status)
    client = client_for(srv, api_key_env=KEY_ENV)
    started = time.monotonic()
    results = client.run(make_requests(10), qa_validator)
    assert time.monotonic() - started < 15  # it stops at once; slack for a loaded machine
    msg = client.stop_reason or ""
    assert f"HTTP {status}" in msg and KEY_ENV in msg and api_key not in msg
    assert {r.error for r in results} <= {f"http_{status}", "endpoint_down"} and "endpoint_down" in {
        r.error for r in results
    }
    assert all(api_key not in r.detail for r in results)
    assert srv.stats()["requests"] <= client.cfg.max_concurrency * 2  # it stopped, it did not try every row


def test_almost_json_is_repaired_before_a_paid_reask(serve: Callable[..., FakeOpenAIServer]) -> None:
    # Unescaped inner quotes and a missing closing brace: what small models emit.
    srv = serve(responder=lambda body: ResponderReply('{"question": "What is 2+2?", "answer": "It is "4"'))
    client = client_for(srv)
    results = client.run(make_requests(3), qa_validator)
    assert all(r.ok for r in results), [r.detail for r in results]
    assert results[0].value["question"] == "What is 2+2?"
    assert client.stats.repairs == 3 and client.stats.reasks == 0
    assert srv.stats()["requests"] == 3


# --- 11. shared endpoint limits (limits.py): header-driven pauses, the limiter the client builds --------------


def _limited_client(srv: FakeOpenAIServer, directory: Path, **kw: Any) -> LLMClient:
    from boostqa_assets.llm.limits import EndpointLimiter

    cfg = role(**kw)
    limiter = EndpointLimiter(directory, srv.base_url, cfg.model, max_concurrency=cfg.max_concurrency)
    return LLMClient("synthesizer", cfg, srv.base_url, limiter=limiter)


def test_exhausted_rate_limit_headers_pause_the_endpoint_before_a_429(serve: Serve, tmp_path: Path) -> None:
    """The server says 'remaining 0, resets in Xs' on a success: the next request waits instead of drawing a 429."""
    rpm, window, n = 3, 1.0, 7
    srv = serve(FaultConfig(rpm=rpm, window_s=window))
    blind = client_for(srv, max_concurrency=1)  # no limiter: the 4th request runs into the limit
    assert all(r.ok for r in blind.run(make_requests(n), qa_validator))
    assert blind.stats.http_429 > 0
    srv.reset_stats()
    c = _limited_client(srv, tmp_path, max_concurrency=1)
    started = time.perf_counter()
    results = c.run(make_requests(n), qa_validator)
    elapsed = time.perf_counter() - started
    assert all(r.ok for r in results)
    assert c.stats.http_429 == 0 and srv.stats()["by_status"].get("429", 0) == 0
    assert c.stats.pauses >= 2 and c.stats.limiter_wait_s > 0.5
    assert elapsed >= (n // rpm) * window * 0.9  # 7 at 3 per window: two waits for the window to reset
    assert c.stats.http_requests == n
    assert c.stats.to_metadata()["endpoint_pauses"] == c.stats.pauses


def test_a_429_retry_after_pauses_every_client_of_the_endpoint(serve: Serve, tmp_path: Path) -> None:
    from boostqa_assets.llm.limits import EndpointLimiter

    srv = serve(FaultConfig(fail_first_n={"429": 1}))  # each body's first attempt: 429, Retry-After: 1
    c = _limited_client(srv, tmp_path, max_concurrency=2)
    started = time.time()
    results = c.run(make_requests(2), qa_validator)
    assert all(r.ok for r in results) and c.stats.http_429 == 2 and c.stats.pauses >= 1
    other = EndpointLimiter(tmp_path, srv.base_url, "fake-model")  # another client, run or process
    assert other.paused_until() >= started + 1.0
    assert EndpointLimiter(tmp_path, srv.base_url, "another-model").paused_until() == 0.0


def test_the_client_builds_its_limiter_from_the_role(serve: Serve, tmp_path: Path) -> None:
    srv = serve(FaultConfig(latency_s=0.05))
    assert client_for(srv).limiter is None  # no limit configured, no directory: the old in-process cap
    assert LLMClient("synthesizer", role(rpm=60), srv.base_url, replay_only=True, limits_dir=tmp_path).limiter is None
    c = LLMClient("synthesizer", role(rpm=600, tpm_in=10**6, max_concurrency=2), srv.base_url, limits_dir=tmp_path)
    limiter = c.limiter
    assert limiter is not None and (limiter.rpm, limiter.tpm_in, limiter.max_concurrency) == (600, 10**6, 2)
    assert all(r.ok for r in c.run(make_requests(8), qa_validator))
    assert srv.stats()["max_in_flight"] <= 2
    assert (tmp_path / f"{limiter.key}.pacing").exists() and (tmp_path / f"{limiter.key}.slots").is_dir()
    assert limiter.slots_held == 0  # every slot went back; run() also closed the handles it opened
    only_dir = LLMClient("synthesizer", role(), srv.base_url, limits_dir=tmp_path)  # a directory alone: cap + pause
    assert only_dir.limiter is not None and not only_dir.limiter.has_rates


def test_identical_requests_in_flight_are_sent_once(serve: Callable[..., FakeOpenAIServer]) -> None:
    srv = serve(FaultConfig(latency_s=0.2))
    same = [LLMRequest(f"row-{i}", "qa", "v1", "the same prompt", schema=QA_SCHEMA) for i in range(10)]
    client = client_for(srv, max_concurrency=4)
    results = client.run(same, qa_validator)
    assert [r.key for r in results] == [q.key for q in same] and all(r.ok for r in results)
    assert srv.stats()["requests"] == 1
    assert client.stats.cache_hits == 9 and client.stats.tokens_in == results[0].tokens_in
    assert sorted(r.http_requests for r in results) == [0] * 9 + [1]  # the one that sent it
    assert_results_add_up(client.stats, results)
