"""Tests for the fake OpenAI-compatible server: response shapes, schema-valid JSON and every fault."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from boostqa_assets.testing.fake_server import (
    FAULT_KINDS,
    FakeOpenAIServer,
    FaultConfig,
    ResponderReply,
    config_to_cli_args,
    parse_cli_args,
    start_fake_server_process,
    stop_process,
)

QA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "difficulty": {"enum": ["easy", "medium", "hard", "expert"]},
    },
    "required": ["question", "answer", "difficulty"],
}


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> None:
    """Tiny JSON-schema check (the subset the fake server promises), so no jsonschema dependency."""
    root = root or schema
    if "$ref" in schema:
        node: Any = root
        for key in schema["$ref"][2:].split("/"):
            node = node[key]
        return _check(value, node, root)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return _check(value, option, root)
            except AssertionError as exc:
                errors.append(exc)
        raise AssertionError(f"{value!r} matches no anyOf option: {errors}")
    if "enum" in schema:
        assert value in schema["enum"], (value, schema["enum"])
        return None
    kind = schema.get("type")
    python_types: dict[str, type | tuple[type, ...]] = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "null": type(None),
        "integer": int,
        "number": (int, float),
    }
    if kind is not None:
        assert isinstance(value, python_types[kind]), (value, kind)
        assert not (kind in ("integer", "number") and isinstance(value, bool))
    if kind == "object":
        for key in schema.get("required", []):
            assert key in value, f"missing required {key!r} in {value!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, root)
    elif kind == "array":
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9)
        for item in value:
            _check(item, schema.get("items", {}), root)
    elif kind in ("integer", "number"):
        assert schema.get("minimum", -1e18) <= value <= schema.get("maximum", 1e18), (value, schema)
    elif kind == "string":
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9)
    return None


def _chat(
    content: str = "Context: cats sleep a lot.\nWhy do cats sleep so much?",
    schema: dict[str, Any] | None = QA_SCHEMA,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "test-model", "messages": [{"role": "user", "content": content}]}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "qa", "schema": schema}}
    return {**body, **extra}


@pytest.fixture
def server() -> Iterator[Callable[..., FakeOpenAIServer]]:
    """Factory fixture: start servers with any config, always stopped at teardown."""
    started: list[FakeOpenAIServer] = []

    def make(config: FaultConfig | None = None, **kwargs: Any) -> FakeOpenAIServer:
        srv = FakeOpenAIServer(config=config, **kwargs).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def _post(
    srv: FakeOpenAIServer, body: dict[str, Any], timeout: float = 5.0, path: str = "/chat/completions"
) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=timeout)


def _content(resp: httpx.Response) -> str:
    content: str = resp.json()["choices"][0]["message"]["content"]
    return content


def test_models_and_chat_response_shape(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", srv.base_url)
    models = httpx.get(srv.base_url + "/models").json()
    assert models["object"] == "list" and models["data"][0]["id"]
    resp = _post(srv, _chat(schema=None))
    assert resp.status_code == 200
    data = resp.json()
    assert data["model"] == "test-model" and data["id"] and data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert "cats sleep so much" in choice["message"]["content"]
    usage = data["usage"]
    prompt = "Context: cats sleep a lot.\nWhy do cats sleep so much?"
    assert usage["prompt_tokens"] == len(prompt) // 4 + 1
    assert usage["completion_tokens"] == len(choice["message"]["content"]) // 4 + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completions_endpoint_shape(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server()
    resp = _post(srv, {"model": "m2", "prompt": "Say something about owls"}, path="/completions")
    data = resp.json()
    assert resp.status_code == 200 and data["model"] == "m2" and data["object"] == "text_completion"
    assert "owls" in data["choices"][0]["text"] and data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == len("Say something about owls") // 4 + 1


def test_invalid_body_is_400(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server()
    resp = httpx.post(srv.base_url + "/chat/completions", content=b"not json")
    assert resp.status_code == 400 and "error" in resp.json()
    assert _post(srv, {"model": "m"}).status_code == 400  # chat without messages


def test_schema_json_is_valid_deterministic_and_prompt_dependent(
    server: Callable[..., FakeOpenAIServer],
) -> None:
    srv = server()
    first = json.loads(_content(_post(srv, _chat())))
    _check(first, QA_SCHEMA)
    assert first == json.loads(_content(_post(srv, _chat())))  # repeatable
    assert len(first["question"]) >= 20 and first["answer"].endswith(".")
    assert "Why do cats sleep" in first["answer"]
    llama_style = _chat()
    llama_style["response_format"] = {"type": "json_object", "schema": QA_SCHEMA}
    _check(json.loads(_content(_post(srv, llama_style))), QA_SCHEMA)
    difficulties = {
        json.loads(_content(_post(srv, _chat(f"Passage {i}\nQuestion {i}?"))))["difficulty"] for i in range(20)
    }
    assert len(difficulties) >= 3  # different prompts pick different enum values


def test_nested_schema_with_refs_ranges_and_arrays(server: Callable[..., FakeOpenAIServer]) -> None:
    schema = {
        "$defs": {
            "Pair": {
                "type": "object",
                "properties": {
                    "q": {"type": "string", "maxLength": 30},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "ok": {"type": "boolean"},
                },
                "required": ["q", "score", "ok"],
            }
        },
        "type": "object",
        "properties": {
            "pairs": {"type": "array", "items": {"$ref": "#/$defs/Pair"}, "minItems": 3, "maxItems": 5},
            "count": {"type": "integer", "minimum": 10, "maximum": 12},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "meta": {"type": "object", "properties": {"lang": {"enum": ["en", "de"]}}, "required": ["lang"]},
        },
        "required": ["pairs", "count", "meta"],
    }
    srv = server()
    for i in range(5):
        _check(json.loads(_content(_post(srv, _chat(f"doc {i}", schema=schema)))), schema)


def test_json_object_without_schema_and_plain_text(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server()
    body = _chat(schema=None, response_format={"type": "json_object"})
    parsed = json.loads(_content(_post(srv, body)))
    assert isinstance(parsed, dict) and parsed["result"]
    text = _content(_post(srv, _chat(schema=None)))
    assert text.endswith(".") and len(text) > 20


def test_rpm_limit_returns_429_with_headers(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server(FaultConfig(rpm=2, window_s=0.5))
    ok = [_post(srv, _chat(f"q{i}")) for i in range(2)]
    assert [r.status_code for r in ok] == [200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "2"
    assert ok[1].headers["x-ratelimit-remaining-requests"] == "0"
    limited = _post(srv, _chat("q2"))
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    reset = limited.headers["x-ratelimit-reset-requests"]
    assert reset.endswith("s") and 0 < float(reset[:-1]) <= 0.5
    time.sleep(0.55)
    assert _post(srv, _chat("q2")).status_code == 200
    stats = srv.stats()
    assert stats["by_fault"] == {"rate_limit": 1} and stats["by_status"] == {"200": 3, "429": 1}


def test_a_per_minute_limit_enforced_over_short_windows(server: Callable[..., FakeOpenAIServer]) -> None:
    """100 a minute counted over 3 s windows: 5 in any 3 seconds, however empty the minute is. (3 s, not a
    shorter window: seven requests must land inside one window even with both cores busy, where a request
    can take ~0.2 s.)"""
    srv = server(FaultConfig(rpm=100, window_s=60.0, enforce_window_s=3.0))
    codes = [_post(srv, _chat(f"q{i}")).status_code for i in range(6)]
    assert codes == [200] * 5 + [429]
    limited = _post(srv, _chat("q6"))
    assert limited.status_code == 429
    assert limited.headers["x-ratelimit-limit-requests"] == "100"  # the headers speak of the minute...
    assert int(limited.headers["x-ratelimit-remaining-requests"]) == 95  # ...which has room left
    wait_ms = int(limited.headers["retry-after-ms"])
    assert 0 < wait_ms <= 3000 and int(limited.headers["retry-after"]) == max(1, -(-wait_ms // 1000))
    time.sleep(wait_ms / 1000 + 0.05)
    assert _post(srv, _chat("q7")).status_code == 200
    paced = server(FaultConfig(rpm=600, window_s=60.0, enforce_window_s=0.5))
    for i in range(8):  # one every 0.11 s: never more than 5 in half a second
        assert _post(paced, _chat(f"p{i}")).status_code == 200
        time.sleep(0.11)


def test_tpm_limit_counts_prompt_and_completion_tokens(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server()
    total = _post(srv, _chat()).json()["usage"]["total_tokens"]
    srv.set_config(FaultConfig(tpm=total + 3, window_s=0.5))
    assert _post(srv, _chat()).status_code == 200
    limited = _post(srv, _chat())
    assert limited.status_code == 429
    assert limited.headers["x-ratelimit-limit-tokens"] == str(total + 3)
    assert int(limited.headers["retry-after"]) >= 1 and "x-ratelimit-reset-tokens" in limited.headers


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_fail_first_n_each_kind_then_succeeds(server: Callable[..., FakeOpenAIServer], kind: str) -> None:
    srv = server(FaultConfig(fail_first_n={kind: 1}, hang_s=1.0))
    body = _chat()
    if kind == "timeout":
        with pytest.raises(httpx.TimeoutException):
            _post(srv, body, timeout=0.2)
    elif kind == "drop":
        with pytest.raises(httpx.TransportError):
            _post(srv, body)
    else:
        first = _post(srv, body)
        if kind in ("500", "503", "429", "400"):
            assert first.status_code == int(kind) and "error" in first.json()
            assert ("retry-after" in first.headers) == (kind != "400")
        else:
            assert first.status_code == 200
            content = _content(first)
            if kind == "malformed":
                with pytest.raises(ValueError):
                    json.loads(content)
            elif kind == "schema_mismatch":
                with pytest.raises(AssertionError):
                    _check(json.loads(content), QA_SCHEMA)
            else:  # truncated
                assert first.json()["choices"][0]["finish_reason"] == "length"
                with pytest.raises(ValueError):
                    json.loads(content)
    second = _post(srv, body)
    assert second.status_code == 200 and second.json()["choices"][0]["finish_reason"] == "stop"
    _check(json.loads(_content(second)), QA_SCHEMA)
    stats = srv.stats()
    assert stats["by_fault"] == {kind: 1} and stats["answered_ok"] == 1
    assert list(stats["requests_by_body"].values()) == [2]
    assert list(stats["ok_by_body"].values()) == [1]


def test_fail_first_n_applies_kinds_in_order_per_distinct_body(
    server: Callable[..., FakeOpenAIServer],
) -> None:
    srv = server(FaultConfig(fail_first_n={"429": 1, "malformed": 1, "500": 2}))
    a, b = _chat("body A"), _chat("body B")
    responses = [_post(srv, a) for _ in range(6)]
    assert [r.status_code for r in responses] == [429, 200, 500, 500, 200, 200]
    with pytest.raises(ValueError):  # second attempt: malformed
        json.loads(_content(responses[1]))
    assert _content(responses[4]) == _content(responses[5])  # then served normally, every time
    _check(json.loads(_content(responses[4])), QA_SCHEMA)
    assert _post(srv, b).status_code == 429  # an independent body starts its own sequence
    stats = srv.stats()
    assert sorted(stats["requests_by_body"].values()) == [1, 6]
    assert list(stats["ok_by_body"].values()) == [2]
    assert stats["by_fault"] == {"429": 2, "malformed": 1, "500": 2}


def test_drop_rate_one_raises_transport_error(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server(FaultConfig(drop_rate=1.0))
    with httpx.Client(timeout=5) as client:
        for _ in range(3):
            with pytest.raises(httpx.RemoteProtocolError):
                client.post(srv.base_url + "/chat/completions", json=_chat())
    stats = srv.stats()
    assert stats["by_fault"] == {"drop": 3} and stats["by_status"] == {} and stats["requests"] == 3


def test_timeout_rate_hangs_then_answers(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server(FaultConfig(timeout_rate=1.0, hang_s=0.4))
    with pytest.raises(httpx.ReadTimeout):
        _post(srv, _chat(), timeout=0.1)
    start = time.monotonic()
    assert _post(srv, _chat(), timeout=5).status_code == 200  # a patient client gets a late answer
    assert time.monotonic() - start >= 0.4
    time.sleep(0.05)
    stats = srv.stats()
    assert stats["by_fault"] == {"timeout": 2} and stats["answered_ok"] == 0
    assert stats["by_status"] == {"499": 1, "200": 1}  # 499: client went away during the hang


def test_random_faults_are_seeded_and_reproducible(server: Callable[..., FakeOpenAIServer]) -> None:
    cfg = FaultConfig(error_500_rate=0.3, error_503_rate=0.2, error_400_rate=0.1, seed=7)

    def statuses(srv: FakeOpenAIServer) -> list[int]:
        with httpx.Client(timeout=5) as client:
            return [client.post(srv.base_url + "/chat/completions", json=_chat(f"p{i}")).status_code for i in range(40)]

    srv = server(cfg)
    first = statuses(srv)
    assert {200, 500, 503, 400} <= set(first)
    srv.reset_stats()
    assert statuses(srv) == first
    srv.set_config(cfg.model_copy(update={"seed": 8}))
    assert statuses(srv) != first


def test_malformed_schema_mismatch_truncated_rates(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server(FaultConfig(malformed_rate=1.0))
    assert _content(_post(srv, _chat())).startswith('{"question": "unterminated')
    srv.set_config(FaultConfig(schema_mismatch_rate=1.0))
    assert "question" not in json.loads(_content(_post(srv, _chat())))
    srv.set_config(FaultConfig(truncated_rate=1.0))
    full = json.dumps(json.loads(_content(_post(server(), _chat()))))
    resp = _post(srv, _chat())
    assert resp.json()["choices"][0]["finish_reason"] == "length"
    assert _content(resp) == full[: len(full) // 2]


def test_latency_and_concurrency_tracking(server: Callable[..., FakeOpenAIServer]) -> None:
    # 8 requests of ~1 s: at least 7.6 s one after another, ~1 s at once. The bound leaves 3 s for a loaded
    # machine's thread scheduling (at 0.3 s a request, a CI run beside two CPU-bound jobs took 1.52 s of 1.5).
    srv = server(FaultConfig(latency_s=1.0, latency_jitter_s=0.05))
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: _post(srv, _chat(f"c{i}")).status_code, range(8)))
    elapsed = time.monotonic() - start
    assert codes == [200] * 8 and 0.95 <= elapsed < 4.0  # concurrent, not serialised
    assert srv.stats()["max_in_flight"] == 8


def test_reasoning_modes(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server(FaultConfig(reasoning="field"))
    message = _post(srv, _chat()).json()["choices"][0]["message"]
    assert message["reasoning_content"] and "<think>" not in message["content"]
    _check(json.loads(message["content"]), QA_SCHEMA)
    srv.set_config(FaultConfig(reasoning="think_tags"))
    content = _content(_post(srv, _chat()))
    match = re.fullmatch(r"<think>(.+)</think>\n(.*)", content, re.S)
    assert match and match.group(1)
    _check(json.loads(match.group(2)), QA_SCHEMA)
    srv.set_config(FaultConfig())
    assert "reasoning_content" not in _post(srv, _chat()).json()["choices"][0]["message"]


def test_custom_responder(server: Callable[..., FakeOpenAIServer]) -> None:
    calls: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> ResponderReply:
        calls.append(body)
        return ResponderReply(content="custom!", reasoning="because", finish_reason="length")

    srv = server(responder=responder)
    choice = _post(srv, _chat()).json()["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "custom!", "reasoning_content": "because"},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert calls[0]["model"] == "test-model"
    srv2 = server(responder=lambda body: "plain " + body["prompt"])
    assert _post(srv2, {"prompt": "hi"}, path="/completions").json()["choices"][0]["text"] == "plain hi"


def test_stats_endpoints_and_reset(server: Callable[..., FakeOpenAIServer]) -> None:
    srv = server()
    usages = [_post(srv, _chat(p)).json()["usage"] for p in ("one", "two", "one")]
    stats = srv.stats()
    assert stats["requests"] == 3 and stats["answered_ok"] == 3 and stats["by_status"] == {"200": 3}
    assert sorted(stats["requests_by_body"].values()) == [1, 2]
    assert stats["tokens_in"] == sum(u["prompt_tokens"] for u in usages)
    assert stats["tokens_out"] == sum(u["completion_tokens"] for u in usages)
    root = srv.base_url.removesuffix("/v1")
    assert httpx.get(root + "/_stats").json() == stats
    assert httpx.post(root + "/_reset").status_code == 200
    fresh = httpx.get(root + "/_stats").json()
    assert fresh["requests"] == 0 and fresh["requests_by_body"] == {} and fresh["by_status"] == {}
    srv.set_config(FaultConfig(fail_first_n={"503": 1}))
    assert _post(srv, _chat("one")).status_code == 503
    srv.reset_stats()  # also forgets attempt history: the same body fails again
    assert _post(srv, _chat("one")).status_code == 503 and srv.stats()["requests"] == 1


def test_cli_flags_round_trip() -> None:
    cfg = FaultConfig(
        latency_s=1.0,
        latency_jitter_s=0.1,
        rpm=600,
        tpm=9000,
        window_s=2.0,
        error_500_rate=0.1,
        drop_rate=0.05,
        hang_s=3.0,
        fail_first_n={"429": 1, "drop": 2},
        reasoning="think_tags",
        seed=3,
    )
    port, parsed = parse_cli_args(["--port", "0", *config_to_cli_args(cfg)])
    assert port == 0 and parsed == cfg
    _, short = parse_cli_args(["--latency", "1.0", "--rpm", "600", "--window", "2", "--hang", "3"])
    assert (short.latency_s, short.rpm, short.window_s, short.hang_s) == (1.0, 600, 2.0, 3.0)
    with pytest.raises(ValueError):
        FaultConfig(fail_first_n={"418": 1})


def test_subprocess_mode_ready_and_sigterm() -> None:
    proc, base_url = start_fake_server_process(FaultConfig(fail_first_n={"500": 1}, rpm=600))
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url)
        body = _chat()
        assert httpx.post(base_url + "/chat/completions", json=body).status_code == 500
        resp = httpx.post(base_url + "/chat/completions", json=body)
        assert resp.status_code == 200 and resp.headers["x-ratelimit-limit-requests"] == "600"
        stats = httpx.get(base_url.removesuffix("/v1") + "/_stats").json()
        assert stats["answered_ok"] == 1 and stats["by_fault"] == {"500": 1}
    finally:
        code = stop_process(proc)
    assert code is not None and proc.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(base_url + "/models", timeout=1)
