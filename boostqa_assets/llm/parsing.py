"""What a reply means for its row: JSON pulled out of chatter, a bounded repair of almost-JSON, truncation,
and the caller's validator. Pure functions: a bad reply becomes an error code and a detail, never an
exception that stops a batch."""

from __future__ import annotations

import json
import re
from typing import Any

from boostqa_assets.llm.transport import Reply
from boostqa_assets.llm.types import LLMRequest, Validator


def extract_json(text: str) -> Any:
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


def repair_json(text: str) -> dict[str, Any] | None:
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


def validate(req: LLMRequest, reply: Reply, validator: Validator) -> tuple[Any, str | None, str, bool]:
    """``(value, error, detail, repaired)``: the validated value, or an error code (``truncated``,
    ``invalid_json``, ``schema_mismatch``) with a short detail. A reply cut at ``max_tokens`` is never a good
    row: without a schema (free text) it is ``truncated`` whatever it says; with one, only if it does not parse
    and validate as it is."""
    text = reply.content
    cut = reply.finish_reason == "length"
    if req.schema is None:
        if cut:
            return None, "truncated", "reply cut at max_tokens (finish_reason: length)", False
        try:
            return validator(text), None, "", False
        except (ValueError, TypeError, KeyError) as exc:
            return None, "schema_mismatch", str(exc)[:300], False
    repaired = False
    try:
        obj: Any = extract_json(text)
    except (json.JSONDecodeError, ValueError) as exc:
        if cut:
            return None, "truncated", "reply cut at max_tokens before the JSON closed", False
        obj = repair_json(text)
        if obj is None:
            return None, "invalid_json", f"not JSON: {exc}"[:200], False
        repaired = True
    try:
        return validator(obj), None, "", repaired
    except (ValueError, TypeError, KeyError) as exc:
        if cut:
            return None, "truncated", f"reply cut at max_tokens: {exc}"[:200], repaired
        if repaired:  # the reply was not JSON; what the repair recovered does not fit either
            return None, "invalid_json", f"not JSON, and the repaired object does not fit: {exc}"[:300], True
        return None, "schema_mismatch", str(exc)[:300], False
