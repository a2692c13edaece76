"""Keep a reasoning model's thinking apart from its answer."""

from __future__ import annotations

import re

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_OPEN = re.compile(r"<think>", re.IGNORECASE)
_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def split_reasoning(content: str) -> tuple[str, str]:
    """Return ``(answer, reasoning)`` from a reply that may hold ``<think>...</think>`` blocks.

    DeepSeek-R1-style servers either put the thinking in ``reasoning_content`` (handled by the client) or
    inline as ``<think>`` blocks. An unclosed ``<think>`` (cut by max_tokens) is all reasoning, no answer; a
    ``</think>`` with no opening tag (the template put ``<think>`` in the prompt) ends the reasoning.
    """
    reasoning = [m.strip() for m in _THINK.findall(content)]
    answer = _THINK.sub("", content)
    closes = list(_CLOSE.finditer(answer))
    if closes:  # the opening tag was in the prompt (R1/Qwen3 templates): all before the last close is thought
        reasoning.insert(0, _CLOSE.sub("", answer[: closes[-1].start()]).strip())
        answer = answer[closes[-1].end() :]
    opened = _OPEN.search(answer)
    if opened:
        reasoning.append(answer[opened.end() :].strip())
        answer = answer[: opened.start()]
    return answer.strip(), "\n".join(r for r in reasoning if r)
