"""MinHash machinery shared by the in-memory dedup (``dedup.py``) and the out-of-core one (``dedup_ooc.py``):
the text compared, shingle hashes, MinHash signatures (rensa), LSH band keys, exact keys, signature agreement
and exact Jaccard. Both paths call exactly these functions, so they hash, band and screen identically; the
rule and the measured figures are in ``dedup.py``'s docstring.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import rensa

WORD_PATTERN = r"[\p{L}\p{N}\p{M}]+"
_WORD_HASH_SEED = 0xDED0_5EED
_RECALL_AT_THRESHOLD = 0.9
_SCREEN_SDS = 3.0
_PAIR_BLOCK = 262_144  # pairs compared per numpy block (x num_perm x 4 B x 2 transient)

_U64 = np.uint64
_M64 = (1 << 64) - 1
_P1_INT = 0x9E3779B97F4A7C15
_P2_INT = 0x100000001B3
_P1 = _U64(_P1_INT)
_P2 = _U64(_P2_INT)


@dataclass(frozen=True)
class DedupConfig:
    """How rows are compared. Defaults: exact + near at char 5-gram Jaccard >= 0.8 on the question."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard threshold for near-duplicates
    num_perm: int = 64
    shingle: Literal["char", "word"] = "char"
    ngram: int = 5  # character 5-grams (word n-gram size when shingle="word")
    text: Literal["question", "question+answer"] = "question"
    verify_jaccard: bool = True  # confirm LSH candidates with exact Jaccard on the shingle sets
    chunk_rows: int = 50_000  # rows hashed per chunk (bounded memory)
    seed: int = 1
    bands: int | None = None  # LSH bands; None: chosen from threshold and num_perm (recall >= 0.9 at threshold)
    max_candidates: int = 32  # earlier rows paired per bucket and checks per row (caps hub buckets)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"DedupConfig.threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            raise ValueError(f"DedupConfig.num_perm must be >= 2, got {self.num_perm}")
        if self.ngram < 1:
            raise ValueError(f"DedupConfig.ngram must be >= 1, got {self.ngram}")
        if self.chunk_rows < 1:
            raise ValueError(f"DedupConfig.chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.max_candidates < 1:
            raise ValueError(f"DedupConfig.max_candidates must be >= 1, got {self.max_candidates}")
        if self.shingle not in ("char", "word"):
            raise ValueError(f"DedupConfig.shingle must be 'char' or 'word', got {self.shingle!r}")
        if self.text not in ("question", "question+answer"):
            raise ValueError(f"DedupConfig.text must be 'question' or 'question+answer', got {self.text!r}")
        if self.bands is not None and not 1 <= self.bands <= self.num_perm:
            raise ValueError(f"DedupConfig.bands must be in [1, num_perm={self.num_perm}], got {self.bands}")


def lsh_params(threshold: float, num_perm: int, bands: int | None = None) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band (fewest false candidates) such that a pair at exactly
    ``threshold`` shares a band with probability >= 0.9; ``bands`` given: rows = num_perm // bands."""
    if bands is not None:
        return bands, max(1, num_perm // bands)
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold**r) ** b >= _RECALL_AT_THRESHOLD:
            return b, r
    return num_perm, 1


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The LSH S-curve: probability that a pair of true Jaccard ``similarity`` shares at least one band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def dedup_text(df: pl.DataFrame, cfg: DedupConfig) -> pl.Series:
    """The text compared (before normalization): the question, or question + newline + answer
    (``refined_answer`` when the frame has it, else ``answer``). Null is the empty string."""
    if "question" not in df.columns:
        raise ValueError(f"dedup needs a 'question' column; the frame has {df.columns}")
    q = pl.col("question").cast(pl.Utf8).fill_null("")
    if cfg.text == "question":
        expr = q
    else:
        answer_col = "refined_answer" if "refined_answer" in df.columns else "answer"
        if answer_col not in df.columns:
            raise ValueError(f"dedup text='question+answer' needs 'refined_answer' or 'answer'; has {df.columns}")
        expr = q + "\n" + pl.col(answer_col).cast(pl.Utf8).fill_null("")
    return df.select(expr.alias("_text"))["_text"]


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (an avalanching bijection on uint64), in place."""
    h ^= h >> _U64(30)
    h *= _U64(0xBF58476D1CE4E5B9)
    h ^= h >> _U64(27)
    h *= _U64(0x94D049BB133111EB)
    h ^= h >> _U64(31)
    return h


def _units(texts: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Flat units (uint32 code points, or uint64 word hashes) and per-row unit counts."""
    if cfg.shingle == "char":
        lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        return np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32), lens
    words = pl.Series("t", texts, dtype=pl.Utf8).str.extract_all(WORD_PATTERN)
    lens = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = words.explode().drop_nulls()
    units = flat.hash(seed=_WORD_HASH_SEED).to_numpy().astype(np.uint64) if flat.len() else np.empty(0, np.uint64)
    return units, lens


def _short_hash(units: np.ndarray) -> int:
    """The n-gram hash (before the finalizer) of a row shorter than n: its whole unit sequence, width-salted."""
    h = 0
    for u in units.tolist():
        h = (((h ^ u) * _P2_INT) + _P1_INT) & _M64
    return h ^ ((len(units) * _P1_INT) & _M64)


def shingle_hashes(texts: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of each normalized text's n-grams: (flat hashes, offsets of length rows + 1).

    The n-gram hash is ``h = ((h ^ unit) * P2 + P1) mod 2^64`` over its n units, salted with the width, then
    the splitmix64 finalizer; computed for every position of the chunk's concatenated units at once (slices,
    no gathers), then the positions whose n-gram crosses a row end are dropped. A text with fewer than
    ``ngram`` units but at least one is a single shingle (its whole text); an empty text has none. Hashes of
    one row may repeat (MinHash does not care; ``unique_rows`` dedups)."""
    n = cfg.ngram
    units, lens = _units(texts, cfg)
    rows = len(texts)
    counts = np.where(lens >= n, lens - n + 1, np.where(lens > 0, 1, 0))
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return np.empty(0, dtype=np.uint64), offsets
    m = max(len(units) - n + 1, 0)
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h ^= units[k : k + m]
        h *= _P2
        h += _P1
    h ^= np.uint64((n * _P1_INT) & _M64)
    valid = np.ones(m, dtype=bool)
    ends = np.cumsum(lens)
    for k in range(1, n):
        p = ends - k
        valid[p[(p >= 0) & (p < m)]] = False
    full = h[valid]
    del h, valid
    short = np.flatnonzero((lens > 0) & (lens < n))
    if len(short) == 0:
        return _mix64(full), offsets
    starts = ends - lens
    out = np.empty(total, dtype=np.uint64)
    is_short_slot = np.zeros(total, dtype=bool)
    is_short_slot[offsets[short]] = True
    out[~is_short_slot] = full
    out[is_short_slot] = np.array([_short_hash(units[starts[r] : ends[r]]) for r in short.tolist()], dtype=np.uint64)
    return _mix64(out), offsets


def signatures(flat: np.ndarray, offsets: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures (rows x num_perm, uint32) from flat shingle hashes, via rensa; an empty row is all
    0xFFFFFFFF."""
    rows = len(offsets) - 1
    if rows == 0:
        return np.empty((0, cfg.num_perm), dtype=np.uint32)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        np.ascontiguousarray(flat, dtype=np.uint64),
        np.ascontiguousarray(offsets, dtype=np.uint64),
        cfg.num_perm,
        cfg.seed,
    )
    return np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(rows, cfg.num_perm)


def agreement(sig: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of equal signature positions per pair (rows a[k], b[k] of ``sig``), in blocks."""
    out = np.empty(len(a), dtype=np.int32)
    for s in range(0, len(a), _PAIR_BLOCK):
        e = s + _PAIR_BLOCK
        out[s:e] = (sig[a[s:e]] == sig[b[s:e]]).sum(axis=1)
    return out


def unique_rows(flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's hashes sorted and deduplicated (CSR). Rows are sorted in place one by one (short rows:
    ~2 us each, and no row-index arrays the size of ``flat``)."""
    rows = len(offsets) - 1
    if len(flat) == 0:
        return flat, np.zeros(rows + 1, dtype=np.int64)
    bounds = offsets.tolist()
    for a, b in itertools.pairwise(bounds):
        flat[a:b].sort()
    keep = np.ones(len(flat), dtype=bool)
    np.not_equal(flat[1:], flat[:-1], out=keep[1:])
    keep[offsets[:-1][np.diff(offsets) > 0]] = True  # a row's first hash is always new
    kept_before = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    new_off = kept_before[offsets]
    return flat[keep], new_off


def exact_key(normalized: str) -> bytes:
    """128-bit BLAKE2b digest of the normalized text (a collision is ~n^2 / 2^129 likely: never, in practice)."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 bucket key per row and band (rows x bands): the band's ``rows`` signature values folded
    with a multiply-xor, then the splitmix64 finalizer. Two rows share a bucket when their band slices are
    equal (or, with probability ~2^-64, collide)."""
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        cols = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.zeros(sig.shape[0], dtype=np.uint64)
        for c in range(cols.shape[1]):
            key = (key ^ cols[:, c]) * _P1
        out[:, band] = _mix64(key)
    return out


def min_agreement(cfg: DedupConfig) -> int:
    """Signature positions two rows must share to pass the screen: with ``verify_jaccard`` the threshold
    minus 3 sd of the estimate (0.65 at 0.8/64: a pair at the threshold passes with probability > 0.998;
    the exact Jaccard decides after), else the threshold itself."""
    if cfg.verify_jaccard:
        sd = math.sqrt(cfg.threshold * (1.0 - cfg.threshold) / cfg.num_perm)
        screen = max(0.0, cfg.threshold - _SCREEN_SDS * sd)
    else:
        screen = cfg.threshold
    return math.ceil(screen * cfg.num_perm - 1e-9)


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted unique hash sets."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)
