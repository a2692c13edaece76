"""Batch mode: the fake server's /v1/files and /v1/batches, and BatchRunner against it (submit, cache,
resume after a restart, bad lines re-asked synchronously, no API key on disk)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from boostqa_assets.configs import RoleConfig
from boostqa_assets.llm.batch import BatchError, BatchRunner, BatchTimeout
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.client import LLMClient
from boostqa_assets.llm.types import LLMRequest, LLMResult
from boostqa_assets.testing.fake_server import (
    FakeOpenAIServer,
    FaultConfig,
    ResponderReply,
    config_to_cli_args,
    default_responder,
    parse_cli_args,
    prompt_text,
)
from boostqa_assets_tests.llm.test_client import assert_results_add_up

SECRET = "sk-test-batch-0a1b2c3d-SECRET-KEY"
KEY_ENV = "BOOSTQA_TEST_BATCH_API_KEY"
QA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
Serve = Callable[..., FakeOpenAIServer]


def qa_validator(obj: Any) -> dict[str, str]:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("question", "answer")):
        raise ValueError(f"not a question/answer object: {str(obj)[:80]}")
    return {"question": obj["question"], "answer": obj["answer"]}


def make_requests(n: int, start: int = 0) -> list[LLMRequest]:
    return [
        LLMRequest(
            key=f"row-{i:03d}",
            prompt_id="qa",
            prompt_version="v1",
            prompt=f"Write one exam question about topic number {i}.",
            schema=QA_SCHEMA,
        )
        for i in range(start, start + n)
    ]


def role(**kw: Any) -> RoleConfig:
    base: dict[str, Any] = {
        "base_url": "http://unused",
        "model": "fake-model",
        "api": "chat",
        "structured_output": "json_schema",
        "max_tokens": 64,
        "timeout_s": 5.0,
        "max_retries": 2,
        "max_parse_retries": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    return RoleConfig(**{**base, **kw})


class AuthServer(FakeOpenAIServer):
    """The fake server, also recording each request's path and Authorization header."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, str | None]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization")
            self.seen.append((scope["path"], auth.decode() if auth else None))
        await super().__call__(scope, receive, send)


@pytest.fixture
def serve() -> Iterator[Serve]:
    started: list[FakeOpenAIServer] = []

    def make(config: FaultConfig | None = None, cls: type[FakeOpenAIServer] = FakeOpenAIServer, **kw: Any) -> Any:
        srv = cls(config=config, **kw).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def make_client(srv: FakeOpenAIServer, tmp_path: Path, **kw: Any) -> LLMClient:
    return LLMClient("synthesizer", role(**kw), srv.base_url, cache=ResponseCache(str(tmp_path / "cache")))


def run_batch(client: LLMClient, reqs: list[LLMRequest], tmp_path: Path, **kw: Any) -> tuple[list[LLMResult], Any]:
    runner = BatchRunner()
    results = runner.run(client, reqs, qa_validator, tmp_path / "state", poll_s=0.02, **kw)
    return results, runner.summary


# --- the fake server's Batch API -----------------------------------------------------------------------


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")


def _line(cid: str, prompt: str, url: str = "/v1/chat/completions") -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def _upload(srv: FakeOpenAIServer, data: bytes) -> str:
    files = {"file": ("in.jsonl", data, "application/jsonl")}
    resp = httpx.post(srv.base_url + "/files", files=files, data={"purpose": "batch"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "file" and resp.json()["bytes"] == len(data)
    file_id: str = resp.json()["id"]
    return file_id


def _create(srv: FakeOpenAIServer, file_id: str, endpoint: str = "/v1/chat/completions") -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    return httpx.post(srv.base_url + "/batches", json=body)


def test_fake_server_batch_lifecycle_and_output(serve: Serve) -> None:
    srv = serve(FaultConfig(batch_delay_s=0.3))
    lines = [_line(f"c{i}", f"café 日本 question {i}") for i in range(3)]
    data = _jsonl(lines)
    file_id = _upload(srv, data)
    assert httpx.get(f"{srv.base_url}/files/{file_id}/content").content == data  # bytes round-trip (UTF-8)
    batch = _create(srv, file_id).json()
    assert batch["id"].startswith("batch_") and batch["status"] == "validating"
    assert batch["request_counts"]["total"] == 3
    assert httpx.get(f"{srv.base_url}/batches/{batch['id']}").json()["status"] == "in_progress"
    time.sleep(0.35)
    done = httpx.get(f"{srv.base_url}/batches/{batch['id']}").json()
    assert done["status"] == "completed" and done["error_file_id"] is None
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    out = [json.loads(x) for x in httpx.get(f"{srv.base_url}/files/{done['output_file_id']}/content").text.splitlines()]
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"]
    for o, line in zip(out, lines, strict=True):
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["body"]["choices"][0]["message"]["content"] == default_responder(line["body"])
    stats = srv.stats()
    assert stats["batches_created"] == 1 and stats["batch_lines"] == 3
    assert stats["requests"] == 0  # batch lines are not HTTP completion requests


def test_fake_server_batch_faults_errors_and_raw_upload(serve: Serve) -> None:
    srv = serve(FaultConfig(fail_first_n={"503": 1}))
    # A raw JSONL body with ?purpose=batch is accepted as well as multipart.
    lines = [_line("a", "first prompt", "/v1/completions"), _line("b", "second prompt", "/v1/completions")]
    lines[0]["body"] = {"model": "m", "prompt": "first prompt"}
    lines[1]["body"] = {"model": "m", "prompt": "second prompt"}
    raw = httpx.post(srv.base_url + "/files?purpose=batch", content=_jsonl(lines))
    assert raw.status_code == 200
    batch = _create(srv, raw.json()["id"], "/v1/completions").json()
    done = httpx.get(f"{srv.base_url}/batches/{batch['id']}").json()  # batch_delay_s = 0: done at first poll
    assert done["status"] == "completed" and done["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    errors = httpx.get(f"{srv.base_url}/files/{done['error_file_id']}/content").text.splitlines()
    assert {json.loads(e)["response"]["status_code"] for e in errors} == {503}
    assert httpx.get(f"{srv.base_url}/files/{done['output_file_id']}/content").text == ""
    # the same bodies sent synchronously now succeed: the per-body fault history is shared
    assert httpx.post(srv.base_url + "/completions", json=lines[0]["body"]).status_code == 200
    # a bad line fails the whole batch at validation; unknown ids are 404; bad parameters 400
    bad = _upload(srv, _jsonl([_line("x", "p")]) + b"not json\n")
    failed = _create(srv, bad).json()
    assert failed["status"] == "failed" and failed["errors"]["data"][0]["line"] == 2
    assert _create(srv, "file-nope").status_code == 404
    assert _create(srv, bad, endpoint="/v1/embeddings").status_code == 400
    assert httpx.get(srv.base_url + "/batches/batch_nope").status_code == 404
    assert httpx.post(srv.base_url + "/files", files={"file": ("x", b"{}")}, data={"purpose": "x"}).status_code == 400
    assert parse_cli_args(config_to_cli_args(FaultConfig(batch_delay_s=2.5)))[1].batch_delay_s == 2.5


# --- BatchRunner ------------------------------------------------------------------------------------------


def test_batch_happy_path_in_order_and_fills_cache(serve: Serve, tmp_path: Path) -> None:
    srv = serve()
    client = make_client(srv, tmp_path)
    reqs = make_requests(12)
    reqs.append(reqs[3])  # a duplicate request: one batch line, two results
    results, summary = run_batch(client, reqs, tmp_path)
    assert [r.key for r in results] == [r.key for r in reqs]
    assert all(r.ok and r.attempts == 1 and not r.cached for r in results)
    assert results[3].value == results[-1].value and results[3].request_hash == results[-1].request_hash
    assert srv.stats()["batches_created"] == 1 and srv.stats()["batch_lines"] == 12
    assert srv.stats()["requests"] == 0
    s = client.stats
    assert (s.logical_requests, s.ok, s.failed, s.cache_hits) == (13, 13, 0, 0)
    assert s.tokens_in > 0 and s.tokens_out > 0 and s.tokens_in == summary["batch_tokens_in"]
    assert summary["batch"] is True and summary["submitted"] == 12 and summary["resumed"] is False
    assert_results_add_up(s, results)  # the duplicate's reply is paid once
    assert not list((tmp_path / "state").glob("*.json"))  # state is dropped once the replies are cached
    # The same content the synchronous path would produce, and a sync run afterwards sends nothing.
    again = make_client(srv, tmp_path)
    sync = again.run(reqs, qa_validator)
    assert again.stats.http_requests == 0 and srv.stats()["requests"] == 0
    assert [r.value for r in sync] == [r.value for r in results]
    assert [r.request_hash for r in sync] == [r.request_hash for r in results]
    assert all(r.cached for r in sync)


def test_cached_requests_skip_the_batch(serve: Serve, tmp_path: Path) -> None:
    srv = serve()
    reqs = make_requests(10)
    make_client(srv, tmp_path).run(reqs[:4], qa_validator)
    assert srv.stats()["requests"] == 4
    client = make_client(srv, tmp_path)
    results, summary = run_batch(client, reqs, tmp_path)
    assert srv.stats()["batch_lines"] == 6 and summary["submitted"] == 6
    assert [r.cached for r in results] == [True] * 4 + [False] * 6 and all(r.ok for r in results)
    assert client.stats.cache_hits == 4 and client.stats.logical_requests == 10
    assert_results_add_up(client.stats, results)
    # everything cached: no batch at all, no HTTP request
    other = make_client(srv, tmp_path)
    assert all(r.ok for r in run_batch(other, reqs, tmp_path)[0])
    assert srv.stats()["batches_created"] == 1 and other.stats.http_requests == 0


def test_restart_resumes_the_saved_batch(serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv: AuthServer = serve(FaultConfig(batch_delay_s=3600), cls=AuthServer)
    reqs = make_requests(5)
    first = make_client(srv, tmp_path, api_key_env=KEY_ENV)
    with pytest.raises(BatchTimeout, match="resumes polling"):
        run_batch(first, reqs, tmp_path, timeout_s=0.2)
    (state_file,) = (tmp_path / "state").glob("*.json")
    text = state_file.read_text()
    state = json.loads(text)
    assert state["batch_id"].startswith("batch_") and len(state["hashes"]) == 5
    assert SECRET not in text and "Bearer" not in text and "authorization" not in text.lower()
    assert srv.stats()["batches_created"] == 1
    # "Restart": a new client and runner; the server finishes the batch meanwhile.
    srv.set_config(FaultConfig(batch_delay_s=0))
    second = make_client(srv, tmp_path, api_key_env=KEY_ENV)
    results, summary = run_batch(second, reqs, tmp_path)
    assert summary["resumed"] is True and summary["batch_id"] == state["batch_id"]
    assert srv.stats()["batches_created"] == 1 and srv.stats()["batch_lines"] == 5
    assert all(r.ok for r in results) and [r.key for r in results] == [r.key for r in reqs]
    assert not state_file.exists()
    # the key went out as a header on every Batch API call, and nowhere else on disk
    assert srv.seen and all(auth == f"Bearer {SECRET}" for _, auth in srv.seen)
    assert {p for p, _ in srv.seen} >= {"/v1/files", "/v1/batches"}
    assert not any(SECRET in f.read_text() for f in tmp_path.rglob("*.json"))


def test_resume_of_a_batch_the_server_lost_submits_again(serve: Serve, tmp_path: Path) -> None:
    srv = serve(FaultConfig(batch_delay_s=3600))
    reqs = make_requests(3)
    with pytest.raises(BatchTimeout):
        run_batch(make_client(srv, tmp_path), reqs, tmp_path, timeout_s=0.05)
    fresh = serve()  # a different server knows nothing of the saved batch id
    results, summary = run_batch(make_client(fresh, tmp_path), reqs, tmp_path)
    assert summary["resumed"] is False and fresh.stats()["batches_created"] == 1 and all(r.ok for r in results)


def _flaky(body: dict[str, Any]) -> str | ResponderReply:
    """Attempt 0 (seed 0) of topic 1 is not JSON; topic 2 never fits the schema; the rest are fine."""
    text = prompt_text(body)
    if "topic number 1." in text and body.get("seed") == 0:
        return "Sure! Here is a question, no JSON though."
    if "topic number 2." in text:
        return '{"question": "only half of it"}'
    return default_responder(body)


def test_bad_batch_replies_are_reasked_synchronously(serve: Serve, tmp_path: Path) -> None:
    srv = serve(responder=_flaky)
    client = make_client(srv, tmp_path)
    reqs = make_requests(4)
    results, summary = run_batch(client, reqs, tmp_path)
    assert [r.key for r in results] == [r.key for r in reqs]
    ok, fixed, rejected = results[0], results[1], results[2]
    assert ok.ok and ok.attempts == 1 and results[3].ok
    assert fixed.ok and fixed.attempts == 2 and fixed.value["question"]  # batch reply + one sync re-ask
    assert not rejected.ok and rejected.attempts == 3 and rejected.error == "schema_mismatch"
    assert rejected.raw_output == '{"question": "only half of it"}'
    assert summary["sync_fallback"] == 2 and summary["ok"] == 3 and summary["failed"] == 1
    s = client.stats
    assert (s.logical_requests, s.ok, s.failed, s.cache_hits) == (4, 3, 1, 0)
    assert s.reasks == 3 and s.failures_by_reason == {"schema_mismatch": 1}
    assert srv.stats()["batch_lines"] == 4 and srv.stats()["requests"] == 3  # 1 + 2 re-asks, all bounded
    assert_results_add_up(client.stats, results)  # the batch's own calls spread over its requests


def test_error_and_malformed_lines(serve: Serve, tmp_path: Path) -> None:
    # Every batch line fails with a 500: each request is then sent once synchronously and succeeds.
    srv = serve(FaultConfig(fail_first_n={"500": 1}))
    client = make_client(srv, tmp_path)
    results, summary = run_batch(client, make_requests(4), tmp_path)
    assert all(r.ok for r in results) and summary["batch_errors"] == 4 and summary["sync_fallback"] == 4
    assert srv.stats()["requests"] == 4 and client.stats.logical_requests == 4
    # Every first answer per body is malformed: the batch reply and both re-asks fail -> rejected, raw kept.
    srv2 = serve(FaultConfig(fail_first_n={"malformed": 1}))
    client2 = make_client(srv2, tmp_path / "two")
    results2, _ = run_batch(client2, make_requests(3, start=10), tmp_path / "two")
    assert all(not r.ok and r.error == "invalid_json" and r.attempts == 3 for r in results2)
    assert all(r.raw_output and r.raw_output.startswith('{"question": "unterminated') for r in results2)
    assert client2.stats.failed == 3 and srv2.stats()["requests"] == 6


def test_replay_only_no_cache_and_no_batch_api(serve: Serve, tmp_path: Path) -> None:
    srv = serve()
    reqs = make_requests(2)
    make_client(srv, tmp_path).run(reqs, qa_validator)
    replay = LLMClient(
        "synthesizer", role(), srv.base_url, cache=ResponseCache(str(tmp_path / "cache")), replay_only=True
    )
    assert all(r.ok and r.cached for r in run_batch(replay, reqs, tmp_path)[0])
    assert replay.stats.http_requests == 0 and srv.stats()["batches_created"] == 0
    with pytest.raises(ValueError, match="needs a response cache"):
        BatchRunner().run(LLMClient("synthesizer", role(), srv.base_url), make_requests(1), qa_validator, tmp_path)

    class NoBatchServer(FakeOpenAIServer):
        async def _file_create(self, request: Any) -> Any:
            return self._error(self._stats, 404, "not_found", "no such route", None)

    plain = serve(cls=NoBatchServer)
    with pytest.raises(BatchError, match="Batch API"):
        run_batch(make_client(plain, tmp_path), make_requests(2, start=50), tmp_path)
