"""Batch mode for one role: the OpenAI-compatible Batch API (``/v1/files``, ``/v1/batches``), half price for
bulk runs that can wait.

Requests already in the response cache are answered from it; the rest go in one JSONL batch (custom_id = the
request hash). The batch id is saved under ``state_dir`` before polling starts, so a restarted run with the same
requests resumes polling that batch instead of paying for a second one. Replies are written to the cache in the
format the synchronous client writes (a later sync run hits them); replies that fail validation, and lines the
batch failed, go through ``LLMClient.run``, whose first attempt re-reads the cached batch reply and whose
bounded re-asks then proceed as usual. The API key is sent as a header only: never logged, never saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from boostqa_assets.llm import parsing
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.transport import LLMEndpointError, Reply
from boostqa_assets.llm.types import LLMRequest, LLMResult, LLMStats, Validator, request_hash

if TYPE_CHECKING:
    from boostqa_assets.configs import RoleConfig

logger = logging.getLogger(__name__)

_TERMINAL = ("completed", "failed", "expired", "cancelled")


class LLMClient(Protocol):
    """What batch mode needs of ``client.LLMClient`` (which calls it): a protocol, so the two modules do not
    import each other."""

    role: str
    cfg: RoleConfig
    base_url: str
    cache: ResponseCache | None
    replay_only: bool
    stats: LLMStats

    def build_body(self, req: LLMRequest, attempt: int = 0, max_tokens: int | None = None) -> dict[str, Any]: ...

    def redact(self, text: str) -> str: ...

    def parse_payload(self, payload: dict[str, Any], latency: float = 0.0) -> Reply: ...

    def _headers(self) -> dict[str, str]: ...

    def run(self, requests: list[LLMRequest], validator: Validator) -> list[LLMResult]: ...


class BatchError(RuntimeError):
    """The Batch API refused or failed a call (``status`` is the HTTP status, 0 for a transport error)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class BatchTimeout(BatchError):
    """The batch did not finish within ``timeout_s``; its id stays saved, so a re-run resumes polling."""


class BatchRunner:
    """Runs a role's requests through the Batch API; ``summary`` describes the last run (``batch: True``)."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def run(
        self,
        client: LLMClient,
        requests: list[LLMRequest],
        validator: Validator,
        state_dir: str | Path,
        poll_s: float = 5.0,
        timeout_s: float = 24 * 3600,
    ) -> list[LLMResult]:
        """One result per request, in request order, filled like ``LLMClient.run`` fills them."""
        if client.replay_only:  # nothing may be sent: the sync path answers from the cache or says what is missing
            return client.run(requests, validator)
        cache = client.cache
        if cache is None:
            raise ValueError(
                f"role {client.role!r}: batch mode needs a response cache (it resumes and re-asks from it)"
            )
        bodies = [client.build_body(r, 0) for r in requests]
        hashes = [request_hash(b) for b in bodies]
        replies = {h: Reply.from_cache(hit) for h, hit in cache.get_many(hashes, reply_only=True).items()}  # one lookup
        pending = {h: b for h, b in zip(hashes, bodies, strict=True) if h not in replies}
        key = hashlib.sha256("\n".join(sorted(set(hashes))).encode()).hexdigest()
        state_path = Path(state_dir) / f"{key}.json"
        self.summary = {"batch": True, "role": client.role, "requests": len(requests), "batch_id": None}
        self.summary.update(submitted=len(pending), resumed=False, batch_errors=0, sync_fallback=0)
        http_before, retries_before = client.stats.http_requests, client.stats.retries
        try:
            if pending:
                replies.update(self._batch(client, pending, state_path, poll_s, timeout_s))
            state_path.unlink(missing_ok=True)
            results = self._finish(client, requests, hashes, replies, validator)
            # The batch's own calls (upload, create, polls, download) belong to all of its requests: spread them,
            # so the results' figures still add up to the client's.
            _spread(results, "http_requests", client.stats.http_requests - http_before)
            _spread(results, "retries", client.stats.retries - retries_before)
            return results
        finally:
            cache.close()  # the batch's replies are written before this returns (or raises)

    # --- the batch itself ----------------------------------------------------------------------------

    def _batch(
        self, client: LLMClient, pending: dict[str, dict[str, Any]], state_path: Path, poll_s: float, timeout_s: float
    ) -> dict[str, Reply]:
        headers = {k: v for k, v in client._headers().items() if k != "content-type"}  # httpx sets it per call
        timeout = httpx.Timeout(client.cfg.timeout_s, connect=min(10.0, client.cfg.timeout_s))
        with httpx.Client(timeout=timeout, headers=headers) as http:
            api = _Api(client, http)
            batch = self._resume(api, state_path) or self._submit(api, pending, state_path)
            self.summary["batch_id"] = batch["id"]
            deadline = time.monotonic() + timeout_s
            while batch.get("status") not in _TERMINAL:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BatchTimeout(
                        f"role {client.role!r}: batch {batch['id']} still {batch.get('status')!r} after "
                        f"{timeout_s:g}s; its id is saved in {state_path}, so re-running resumes polling it"
                    )
                time.sleep(min(poll_s, left))
                batch = api.call("GET", f"/batches/{batch['id']}").json()
            self.summary["status"] = batch["status"]
            if batch["status"] != "completed":
                errors = client.redact(str(batch.get("errors")))[:300]
                logger.warning("role %s: batch %s ended %r (%s)", client.role, batch["id"], batch["status"], errors)
            payloads: dict[str, dict[str, Any]] = {}
            for file_key in ("output_file_id", "error_file_id"):
                if batch.get(file_key):
                    payloads.update(self._read_lines(api.call("GET", f"/files/{batch[file_key]}/content").text))
        replies: dict[str, Reply] = {}
        for h, body in pending.items():
            try:
                reply = client.parse_payload(payloads[h], 0.0)
            except KeyError:  # not answered (failed line, or a batch that failed, expired or was cancelled)
                continue
            except (AttributeError, TypeError, ValueError, IndexError):  # a body that is not a completion
                self.summary["batch_errors"] += 1
                continue
            replies[h] = reply
            client.stats.tokens_in += reply.tokens_in
            client.stats.tokens_out += reply.tokens_out
            entry = {"request_hash": h, "role": client.role, "model": client.cfg.model, "request": body}
            entry.update(content=reply.content, reasoning=reply.reasoning, finish_reason=reply.finish_reason)
            entry.update(tokens_in=reply.tokens_in, tokens_out=reply.tokens_out, latency_s=0.0)
            client.cache.put(h, entry)  # type: ignore[union-attr]  # run() checked it
        self.summary["batch_tokens_in"] = sum(r.tokens_in for r in replies.values())
        self.summary["batch_tokens_out"] = sum(r.tokens_out for r in replies.values())
        return replies

    def _resume(self, api: _Api, state_path: Path) -> dict[str, Any] | None:
        """The saved batch of an earlier run of the same requests, or None (none saved, or the server lost it)."""
        if not state_path.exists():
            return None
        batch_id = json.loads(state_path.read_text()).get("batch_id")
        try:
            batch: dict[str, Any] = api.call("GET", f"/batches/{batch_id}").json()
        except BatchError as exc:
            if exc.status != 404:
                raise
            logger.warning("role %s: saved batch %s is unknown; submitting again", api.client.role, batch_id)
            return None
        self.summary["resumed"] = True
        logger.info("role %s: resuming batch %s from %s", api.client.role, batch_id, state_path)
        return batch

    def _submit(self, api: _Api, pending: dict[str, dict[str, Any]], state_path: Path) -> dict[str, Any]:
        """Upload the JSONL, create the batch, and save its id before anything can go wrong while polling."""
        client = api.client
        endpoint = "/v1/chat/completions" if client.cfg.api == "chat" else "/v1/completions"
        lines = [{"custom_id": h, "method": "POST", "url": endpoint, "body": b} for h, b in pending.items()]
        data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
        upload = {"file": ("boostqa-batch.jsonl", data, "application/jsonl")}
        file_id = api.call("POST", "/files", files=upload, data={"purpose": "batch"}).json()["id"]
        create = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        batch: dict[str, Any] = api.call("POST", "/batches", json={**create, "metadata": {"role": client.role}}).json()
        state = {"batch_id": batch["id"], "input_file_id": file_id, "endpoint": endpoint, "role": client.role}
        state.update(model=client.cfg.model, hashes=sorted(pending), created_at=time.time())
        _save(state_path, state)  # request hashes and ids only: no header, no key
        logger.info("role %s: batch %s submitted, %d lines (batch=True)", client.role, batch["id"], len(lines))
        return batch

    def _read_lines(self, text: str) -> dict[str, dict[str, Any]]:
        """custom_id -> completion payload for the lines that succeeded; the others are counted and dropped."""
        out: dict[str, dict[str, Any]] = {}
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                response = line.get("response") or {}
                ok = not line.get("error") and response.get("status_code") == 200
                body = response.get("body")
            except (ValueError, AttributeError):
                ok, body, line = False, None, {}
            if ok and isinstance(body, dict) and isinstance(line.get("custom_id"), str):
                out[line["custom_id"]] = body
            else:
                self.summary["batch_errors"] += 1
        return out

    # --- results -------------------------------------------------------------------------------------

    def _finish(
        self,
        client: LLMClient,
        requests: list[LLMRequest],
        hashes: list[str],
        replies: dict[str, Reply],
        validator: Validator,
    ) -> list[LLMResult]:
        stats, cfg = client.stats, client.cfg
        results: list[LLMResult | None] = [None] * len(requests)
        redo: list[int] = []
        paid: set[str] = set()
        for i, (req, h) in enumerate(zip(requests, hashes, strict=True)):
            reply = replies.get(h)
            if reply is None:
                redo.append(i)
                continue
            if req.prefill and cfg.api == "completions":
                reply = dataclasses.replace(reply, content=req.prefill + reply.content)
            value, error, _, _ = parsing.validate(req, reply, validator)
            if error is not None:
                redo.append(i)
                continue
            stats.logical_requests += 1
            stats.ok += 1
            stats.cache_hits += int(reply.cached)
            # A reply's tokens are paid once (the client counted them when the batch came back), by its first request.
            fresh_in, fresh_out = (0, 0) if reply.cached or h in paid else (reply.tokens_in, reply.tokens_out)
            paid.add(h)
            results[i] = LLMResult(
                key=req.key,
                prompt_id=req.prompt_id,
                prompt_version=req.prompt_version,
                model=cfg.model,
                request_hash=h,
                ok=True,
                value=value,
                content=reply.content,
                reasoning=reply.reasoning,
                finish_reason=reply.finish_reason,
                raw_output=reply.content,
                attempts=1,
                tokens_in=reply.tokens_in,
                tokens_out=reply.tokens_out,
                cached=reply.cached,
                cache_hits=int(reply.cached),
                paid_tokens_in=fresh_in,
                paid_tokens_out=fresh_out,
            )
        if redo:
            # Bad replies and failed lines: the sync path re-reads a cached bad reply as attempt 1, then re-asks.
            self.summary["sync_fallback"] = len(redo)
            fresh = sum(1 for i in redo if hashes[i] in replies and not replies[hashes[i]].cached)
            for i, res in zip(redo, client.run([requests[i] for i in redo], validator), strict=True):
                results[i] = res
                batch_reply = replies.get(hashes[i])
                if batch_reply is not None and not batch_reply.cached and res.cache_hits:
                    # Its first attempt re-read this run's batch reply: paid for here, not a cache hit.
                    res.cache_hits -= 1
                    res.paid_tokens_in += batch_reply.tokens_in
                    res.paid_tokens_out += batch_reply.tokens_out
            stats.cache_hits = max(0, stats.cache_hits - fresh)  # re-reading this run's batch reply is no cache hit
        self.summary.update(ok=sum(1 for r in results if r and r.ok), failed=sum(1 for r in results if r and not r.ok))
        logger.info("role %s: batch run done: %s", client.role, self.summary)
        return [r for r in results if r is not None]


def _spread(results: list[LLMResult], name: str, total: int) -> None:
    """Add to ``results`` what the sync path did not already count of ``total`` (a counter of the client's), as
    evenly as whole numbers allow, so the results' figures sum to the client's."""
    extra = total - sum(getattr(r, name) for r in results)
    if extra <= 0 or not results:
        return
    share, rest = divmod(extra, len(results))
    for i, result in enumerate(results):
        setattr(result, name, getattr(result, name) + share + (1 if i < rest else 0))


class _Api:
    """Batch API calls with bounded retries on 429, 5xx and transport errors; error text is redacted."""

    def __init__(self, client: LLMClient, http: httpx.Client) -> None:
        self.client, self.http = client, http

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        c, cfg = self.client, self.client.cfg
        detail = ""
        for attempt in range(cfg.max_retries + 1):
            c.stats.http_requests += 1
            try:
                response = self.http.request(method, c.base_url + path, **kwargs)
            except httpx.TransportError as exc:
                c.stats.transport_errors += 1
                detail = f"{type(exc).__name__}: {c.redact(str(exc))[:200]}"
            else:
                status = response.status_code
                if status < 400:
                    return response
                detail = f"HTTP {status}: {c.redact(response.text)[:300]}"
                if status in (401, 403):
                    raise LLMEndpointError(f"role {c.role!r}: {method} {c.base_url}{path} answered {detail}")
                if status != 429 and status < 500:
                    hint = " (does this endpoint offer the Batch API?)" if status == 404 and method == "POST" else ""
                    raise BatchError(f"role {c.role!r}: {method} {path}: {detail}{hint}", status)
                c.stats.http_429 += status == 429
                c.stats.http_5xx += status >= 500
            if attempt < cfg.max_retries:
                c.stats.retries += 1
                time.sleep(min(cfg.backoff_max_s, cfg.backoff_base_s * 2**attempt))
        raise BatchError(f"role {c.role!r}: {method} {path} failed after {cfg.max_retries} retries: {detail}")


def _save(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a run killed mid-write leaves the old state or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)
