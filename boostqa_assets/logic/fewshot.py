"""Few-shot echo: QA that reproduces an example of the very prompt that made it.

The prompts are few-shot (``prompts/<id>/v<N>.j2``) so that a small base model can follow them, and a small model
often copies an example instead of following it: the demo's Gemma 270M turned 3 of 6 mixture documents into the
refine prompt's "... from its Latin name natrium". Such a row says nothing about its seed and teaches the trained
model the prompt, so it is rejected with reason ``fewshot_echo``.

The examples are derived from the released template itself, never kept in a second list that could drift from it:
the template is rendered with every variable set to a sentinel, the blocks that hold no sentinel are the examples,
and each example's ``Key: value`` lines and ``JSON:`` object give its question and answer (``question``/``answer``
keys of the JSON, else the ``Question:`` / ``Answer:`` lines).

Match (``echo_score``): texts are compared normalized (NFKC, lower case, only letters and digits, so spacing and
punctuation do not matter), by exact equality or by the overlap of their character 5-grams. The score is the larger
of the share of the example's 5-grams found in the text (the example copied inside a longer reply) and the share of
the text's 5-grams found in the example (a reply that is a piece of the example, counted only when it is at least
half the example's length: short true phrases such as an MMLU answer "atmospheric pressure" sit inside long examples
without copying them). Texts under ``MIN_GRAMS`` 5-grams (12 characters) match only when equal.
``THRESHOLD`` = 0.8: one changed character removes at most five 5-grams, so 0.8 still catches a copy with a word or
two changed, a prefix added ("Refined: ...") or the tail cut off, while text that is not a copy stays well below:
``benchmarks/fewshot_echo.py`` scores 81,279 real texts (Wikipedia summaries, FanOutQA, HumanEval, MMLU, the
project's Chinese QA) against every example; none reaches 0.8, the highest is 0.67 (an MMLU question on sodium
phosphate against the refine example about sodium), only 3 reach 0.5. Character n-grams, not words, so Chinese (no
spaces) is matched the same way.

Exemption: a model may repeat what its input says. An example that the row's input already echoes (the seed it was
made from, or the question and draft answer a refiner was given) does not count, so a seed that really asks for the
chemical symbol of sodium is not rejected for getting the example's answer.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2

from boostqa_assets.settings import PROMPTS_DIR

logger = logging.getLogger(__name__)

REASON = "fewshot_echo"
THRESHOLD = 0.8
NGRAM = 5
MIN_GRAMS = 8  # 12 normalized characters: shorter texts match only when equal

_SENTINEL = "\x00slot\x00"
_FIELD = re.compile(r"^([A-Z][A-Za-z ]{0,30}): ?(.*)$")


class _Slot(jinja2.Undefined):
    """Every template variable while the examples are extracted: renders as the sentinel, is never greater or
    smaller than anything (``{% if variant > 0 %}`` takes the plain branch), iterates as one sentinel."""

    def __str__(self) -> str:
        return _SENTINEL

    def __iter__(self) -> Iterator[str]:
        yield _SENTINEL

    def __gt__(self, other: object) -> bool:
        return False

    __lt__ = __ge__ = __le__ = __gt__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)), undefined=_Slot, keep_trailing_newline=False, autoescape=False
)


@dataclass(frozen=True)
class FewShotExample:
    """One worked example of a prompt: its input lines (``Seed``, ``Question``, ...) and the QA it shows."""

    prompt_id: str
    version: str
    index: int  # 1-based position among the prompt's examples
    fields: tuple[tuple[str, str], ...]  # the example's ``Key: value`` lines, JSON line excluded
    question: str | None
    answer: str | None

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) pairs a reply must not repeat: the example's question and answer."""
        return [(k, v) for k, v in (("question", self.question), ("answer", self.answer)) if v]


def _parse_block(lines: list[str]) -> tuple[dict[str, str], dict[str, Any]] | None:
    """A block's ``Key: value`` fields and its JSON object; None when a line is not a field (not an example)."""
    fields: dict[str, str] = {}
    reply: dict[str, Any] = {}
    for line in lines:
        m = _FIELD.match(line)
        if not m:
            return None
        key, value = m.group(1), m.group(2).strip()
        if key == "JSON":
            try:
                parsed = json.loads(value)
            except ValueError:
                return None
            if not isinstance(parsed, dict):
                return None
            reply = parsed
        else:
            fields[key] = value
    return fields, reply


@lru_cache(maxsize=64)
def examples(prompt_id: str, version: str) -> tuple[FewShotExample, ...]:
    """The worked examples of ``prompts/<prompt_id>/<version>.j2``, in order (empty for a zero-shot prompt, and for
    a prompt that is not a file of the package: nothing to compare with, said once in the log)."""
    try:
        text = _ENV.get_template(f"{prompt_id}/{version}.j2").render()
    except jinja2.TemplateNotFound:
        logger.warning(
            "few-shot echo: no template %s/%s.j2 under %s; its rows are not checked", prompt_id, version, PROMPTS_DIR
        )
        return ()
    found: list[FewShotExample] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if _SENTINEL in block:  # the instructions naming a variable, or the live slot the model fills in
            continue
        parsed = _parse_block([line.strip() for line in block.strip().splitlines()])
        if parsed is None:
            continue
        fields, reply = parsed
        question = reply.get("question") if isinstance(reply.get("question"), str) else fields.get("Question")
        answer = reply.get("answer") if isinstance(reply.get("answer"), str) else fields.get("Answer")
        if not question and not answer:
            continue
        found.append(
            FewShotExample(prompt_id, version, len(found) + 1, tuple(fields.items()), question or None, answer or None)
        )
    return tuple(found)


def normalize(text: str) -> str:
    """NFKC, lower case, letters and digits only: the form echoes are compared in."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).lower())


def grams(norm: str, n: int = NGRAM) -> frozenset[str]:
    return frozenset(norm[i : i + n] for i in range(len(norm) - n + 1))


@dataclass(frozen=True)
class _Prepared:
    norm: str
    grams: frozenset[str]


def _prepare(text: str) -> _Prepared:
    norm = normalize(text)
    return _Prepared(norm, grams(norm))


def _score(a: _Prepared, b: _Prepared) -> float:
    """``a`` a reply's text, ``b`` an example's."""
    if not a.norm or not b.norm:
        return 0.0
    if a.norm == b.norm:
        return 1.0
    shared = len(a.grams & b.grams)
    scores = [shared / len(b.grams)] if len(b.grams) >= MIN_GRAMS else []
    # A piece of the example counts only when it is at least half of it: short true phrases ("atmospheric
    # pressure", an MMLU answer) sit inside long examples without copying them.
    if len(a.grams) >= MIN_GRAMS and 2 * len(a.grams) >= len(b.grams):
        scores.append(shared / len(a.grams))
    return max(scores, default=0.0)


def echo_score(text: str, example_text: str) -> float:
    """How much ``text`` reproduces ``example_text``: 1.0 when equal normalized, else the larger 5-gram containment
    either way (see the module docstring); 0.0 for texts too short to compare."""
    return _score(_prepare(text), _prepare(example_text))


@lru_cache(maxsize=64)
def _prepared_examples(prompt_id: str, version: str) -> tuple[tuple[FewShotExample, tuple[_Prepared, ...]], ...]:
    return tuple((ex, tuple(_prepare(t) for _, t in ex.texts())) for ex in examples(prompt_id, version))


def best_score(text: str, prompt_id: str, version: str) -> float:
    """The highest ``echo_score`` of ``text`` against the questions and answers of one prompt version's examples."""
    mine = _prepare(text)
    return max((_score(mine, t) for _, texts in _prepared_examples(prompt_id, version) for t in texts), default=0.0)


def find_echo(
    texts: dict[str, str | None],
    prompt_id: str,
    version: str,
    context: Iterable[str | None] = (),
    threshold: float = THRESHOLD,
) -> str | None:
    """Why a row is an echo, or None. ``texts``: the row's own output (``question``/``answer`` -> text);
    ``context``: what the model was given (seed, question, draft): an example it already echoes is exempt."""
    prepared = _prepared_examples(prompt_id, version)
    if not prepared:
        return None
    own = [(name, _prepare(t)) for name, t in texts.items() if t]
    given: list[_Prepared] | None = None
    for example, example_texts in prepared:
        best = max(
            (
                (_score(mine, theirs), name, field, raw)
                for name, mine in own
                for (field, raw), theirs in zip(example.texts(), example_texts, strict=True)
            ),
            default=None,
        )
        if best is None or best[0] < threshold:
            continue
        if given is None:  # prepared lazily: most rows echo nothing
            given = [_prepare(c) for c in context if c]
        if any(_score(g, t) >= threshold for g in given for t in example_texts):
            continue  # the input carries this example: repeating it is not an echo
        score, name, field, raw = best
        return (
            f"{name} repeats the {field} of few-shot example {example.index} of {prompt_id}/{version} "
            f"(score {score:.2f} >= {threshold}): {raw[:80]!r}"
        )
    return None
