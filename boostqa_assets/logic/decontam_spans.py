"""Tokens and span hashes for decontamination (``decontam.py``): normalization, the flat token arrays of many
texts, rolling span hashes, and the span kinds an index holds (word windows and whole short segments; CJK
character windows and whole short CJK segments)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

# CJK scripts have no spaces between words: each Han, kana or Hangul character is a token of its own (a run of
# them would be one "word" of a whole sentence); every other run of letters, digits and marks is one word.
CJK_CLASS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
WORD_PATTERN = rf"[{CJK_CLASS}]|[[\p{{L}}\p{{N}}\p{{M}}]--[{CJK_CLASS}]]+"
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]")
_WORD_HASH_SEED = 0x5EED_DEC0
_P = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_SHORT_SALT = 0xD6E8FEB86659FD93
_CJK_SALT = 0x2545F4914F6CDD1D  # CJK windows and whole CJK segments hash apart from word spans of the same length


def ngram_words(texts: pl.Series) -> pl.Series:
    """The normalized words of each text (list[str]); null and empty texts give []."""
    texts = texts.cast(pl.Utf8).fill_null("")
    non_ascii = texts.str.contains(r"[^\x00-\x7F]").arg_true()  # ASCII text is already NFKC
    if non_ascii.len():
        texts = texts.scatter(non_ascii, texts.gather(non_ascii).str.normalize("NFKC"))
    return texts.str.to_lowercase().str.extract_all(WORD_PATTERN).fill_null([])


def _words_of(text: str) -> list[str]:
    return ngram_words(pl.Series([text], dtype=pl.Utf8))[0].to_list()


class _Powers:
    """P^j and P^-j mod 2^64 for j < size, grown on demand."""

    def __init__(self) -> None:
        self.pw = np.ones(1, dtype=np.uint64)
        self.ipw = np.ones(1, dtype=np.uint64)

    def get(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size > self.pw.size:
            size = max(size, 2 * self.pw.size)
            self.pw = np.cumprod(np.concatenate(([np.uint64(1)], np.full(size - 1, _P, dtype=np.uint64))))
            self.ipw = np.cumprod(np.concatenate(([np.uint64(1)], np.full(size - 1, _P_INV, dtype=np.uint64))))
        return self.pw, self.ipw


_POWERS = _Powers()


@dataclass
class _Flat:
    """The words of many texts, flattened: word hashes, owning text, text starts, and the prefix sums."""

    lists: pl.Series  # list[str] per text
    lens: np.ndarray  # int64 words per text
    owner: np.ndarray  # int64 text of each word
    starts: np.ndarray  # int64 first word of each text
    prefix: np.ndarray  # uint64, prefix[i] = sum_{j<i} h_j P^j
    cjk: np.ndarray  # int64 CJK characters (tokens) per text

    @classmethod
    def of(cls, texts: pl.Series) -> _Flat:
        cjk = texts.cast(pl.Utf8).fill_null("").str.count_matches(f"[{CJK_CLASS}]").to_numpy().astype(np.int64)
        lists = ngram_words(texts)
        lens = lists.list.len().to_numpy().astype(np.int64)
        hashes = lists.explode(empty_as_null=False).hash(seed=_WORD_HASH_SEED).to_numpy()
        total = hashes.size
        pw, _ = _POWERS.get(total + 1)
        prefix = np.zeros(total + 1, dtype=np.uint64)
        np.cumsum(hashes * pw[:total], out=prefix[1:])
        starts = np.zeros(lens.size, dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        owner = np.repeat(np.arange(lens.size, dtype=np.int64), lens)
        return cls(lists, lens, owner, starts, prefix, cjk)

    def is_cjk(self) -> np.ndarray:
        """Per text: most of its tokens are CJK characters (its spans are counted in characters)."""
        return 2 * self.cjk > self.lens

    def span_hashes(self, m: int, salt: int) -> np.ndarray:
        """Hash of the m-word span starting at every position i < total - m + 1 (spans may cross texts)."""
        count = self.prefix.size - m
        if count <= 0:
            return np.zeros(0, dtype=np.uint64)
        _, ipw = _POWERS.get(count)
        out = self.prefix[m:] - self.prefix[:count]
        out *= ipw[:count]
        if salt:
            out += np.uint64(salt)
        return out


def _salt(m: int, n: int) -> int:
    return 0 if m == n else (_SHORT_SALT * m) & ((1 << 64) - 1)


@dataclass(frozen=True)
class _Span:
    """One span kind the index holds: ``m`` tokens, hashed with ``salt``; a window of a longer segment, or a whole
    short segment; of word segments or of CJK segments."""

    m: int
    salt: int
    whole: bool
    cjk: bool


def _spans(n: int, min_words: int, cjk_n: int, cjk_min: int) -> list[_Span]:
    words = [_Span(n, 0, False, False), *(_Span(m, _salt(m, n), True, False) for m in range(n - 1, min_words - 1, -1))]
    mask = (1 << 64) - 1
    cjk = [
        _Span(cjk_n, _CJK_SALT, False, True),
        *(_Span(m, (_CJK_SALT * (m + 7)) & mask, True, True) for m in range(cjk_n - 1, cjk_min - 1, -1)),
    ]
    return words + cjk


def _join(words: list[str]) -> str:
    """Tokens as text: CJK characters side by side, words with spaces."""
    out, out_cjk = "", False
    for w in words:
        cjk = len(w) == 1 and bool(_CJK_RE.match(w))
        out += w if not out or (cjk and out_cjk) else " " + w
        out_cjk = cjk
    return out
