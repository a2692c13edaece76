"""Versioned prompt templates shipped in the package (``prompts/<prompt_id>/v<N>.j2``).

A released version is never edited: a change is a new file, so every row's ``prompt_version`` names the
exact text that made it, and the request hash changes with it (no stale cache hit).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2

from boostqa_assets.settings import PROMPTS_DIR

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=False,
    autoescape=False,
)


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    version: str
    text: str


def versions(prompt_id: str) -> list[str]:
    folder = PROMPTS_DIR / prompt_id
    found = [p.stem for p in folder.glob("v*.j2") if re.fullmatch(r"v\d+", p.stem)]
    if not found:
        raise FileNotFoundError(f"no prompt templates for {prompt_id!r} under {folder}")
    return sorted(found, key=lambda v: int(v[1:]))


def latest_version(prompt_id: str) -> str:
    return versions(prompt_id)[-1]


@lru_cache(maxsize=64)
def _template(prompt_id: str, version: str) -> jinja2.Template:
    return _ENV.get_template(f"{prompt_id}/{version}.j2")


def render(prompt_id: str, version: str | None = None, **variables: Any) -> Prompt:
    version = version or latest_version(prompt_id)
    text = _template(prompt_id, version).render(**variables).strip()
    return Prompt(prompt_id, version, text)


def prompt_fingerprint(*prompt_ids: str) -> str:
    """A short hash of the current templates of ``prompt_ids`` (a Dagster code version component)."""
    h = hashlib.sha256()
    for pid in prompt_ids:
        v = latest_version(pid)
        h.update(f"{pid}/{v}".encode())
        h.update((PROMPTS_DIR / pid / f"{v}.j2").read_bytes())
    return h.hexdigest()[:12]
