"""Dedup of generated QA across all ``refined_qa`` partitions: exact, then near-duplicate (MinHash LSH).

**Order and keep rule.** Rows are put in ``id_col`` order (qa_ids are stable hashes; ties, which should not
happen, are broken by the text itself), so the input order never matters. In that order the first row of each
duplicate cluster is kept and every other member points at it (``duplicate_of`` = the kept row's qa_id,
``reason``, ``similarity``). The result series are aligned with the input rows.

1. **Exact**: rows whose normalized text (``records.normalize_text``: NFKC, collapsed whitespace, lower case)
   is equal; ``similarity`` 1.0. The key is a 128-bit BLAKE2b digest of the normalized text (a collision is
   ~n^2 / 2^129 likely: never, in practice).
2. **Near**, among the exact survivors: rows are processed in id order; each queries an LSH index that holds
   the rows kept so far; if a kept candidate has Jaccard >= ``threshold`` the row is a duplicate of the
   earliest such kept row, else it is kept (and indexed). The Jaccard is over shingle sets of the normalized
   text: character ``ngram``-grams (default 5; texts shorter than that are one shingle) or, with
   ``shingle="word"``, word ``ngram``-grams where words are runs of letters, digits and marks.

**Threshold.** Char 5-gram Jaccard is strict for short texts: one word changed in a 48-character question
("What is the boiling point of water at sea level?" vs "... freezing point ...") is J = 0.68 ("capital city
of France/Spain" 0.65, "protons/neutrons" 0.63), while one word changed, punctuation changed or a few words
appended in a typical 100-300 character generated question is J ~ 0.8-0.95. The default 0.8 removes rewordings
of the same question and keeps short questions that differ in a meaningful word; 0.5-0.6 starts merging
those. The flip side: long templated questions that differ only in one or two slot words ("What is the role
of X in the formation of Y, according to the models usually taught at this level?") can reach J 0.80-0.87
and count as near duplicates (46 of 1 M rows in the benchmark); raise the threshold to 0.85-0.9 (or use
``text="question+answer"``) where templates dominate.

**How (the engine)** (hashing, signatures, band keys and the screen live in ``minhash.py``, shared with the
out-of-core path ``dedup_ooc.py``, which gives the same kept set and reasons in bounded memory). Shingles
are hashed to 64 bits with numpy (code points or word hashes, a polynomial
over the n-gram then the splitmix64 finalizer), a chunk of ``chunk_rows`` rows at a time; MinHash signatures
(``num_perm`` x uint32) come from ``rensa`` (Rust, ``RMinHash.digest_matrix_from_flat_token_hashes``: one call
per chunk, no Python object per row; 100 k questions of ~130 characters: 0.57 s, against 3.3 s for datasketch
2.0's ``MinHash.bulk`` on the same pre-hashed shingles and 2.5 s for datasketch's affine32 scheme vectorised
in numpy). The LSH banding is done here with numpy instead of a library index:
``b`` bands of ``r`` rows are chosen so that a pair at exactly the threshold becomes a candidate with
probability >= 0.9 (0.8 with 64 perms: 10 bands x 6 rows, P = 0.95; J = 0.85: 0.99; J = 0.5: 0.15). For each
band the signature slice is hashed to one uint64 key and sorted (stable, so id order survives within a
bucket); each row is paired with the first ``max_candidates`` earlier rows of its bucket (a cap against
"hub" buckets of template-like text). Pairs are screened by their estimated Jaccard (signature agreement):
with ``verify_jaccard`` the screen is ``threshold - 3 sd`` of the estimate (0.65 at 0.8/64: a pair at the
threshold passes with probability > 0.998), then the exact Jaccard of the two shingle sets decides; without
it the estimate itself must reach the threshold. The sequential rule above then runs over the screened pairs
in id order (a kept row's status is final before any later row looks at it, so this is exactly the LSH
query-then-insert loop, with at most ``max_candidates`` checks per row).

**Memory** (bounded: nothing grows with text length or with the square of anything). Per row for the whole
call: the signature (``4 * num_perm`` = 256 B), an exact key (16 B digest in a bytes object, ~60 B) and a few
index/status arrays (~40 B): ~0.35 KB a row, plus a copy of the compared text column (measured: peak +0.64 GB
over the input frame at 1 M rows); ~35 GB for 10^8 rows: past ~10^6 rows use ``dedup_ooc.py`` (DuckDB
group-bys, signatures on disk; the mixture always does). Shingle hashes exist per chunk only (~150 shingles x
8 B per short question: ~200 MB of numpy temporaries per 50k-row chunk). Exact verification re-shingles only
the rows that appear in a screened pair (the near duplicates and the rows they point at, ~12% of the rows in
the benchmark; ~1.2 KB each, ~140 MB at 1 M rows) instead of keeping every row's shingle set (~1.2 GB at 1 M
rows in numpy, 5-8 GB as Python sets). Band work is one band at a time (a few int64 arrays per row plus the
pairs of the band). A library LSH index would hold one bucket entry per row per band: measured at 1 M rows, 16
bands, ``rensa.RMinHashLSH`` +1.5 GB; ``datasketch.MinHashLSH`` (5 bands) +334 MB and 4.6 s for 200 k rows
(~1.7 GB, ~23 s at 1 M).

**Measured** (2-core machine shared with other work, ``benchmarks/dedup_scale.py``: template questions +
random vocabulary, ~130 characters, 5% planted exact and 5% planted near duplicates; the child process's
peak RSS includes the frame read from Parquet):

=========  =======  ==========  ==========  ==============================================================
rows       wall     peak RSS    frame only  result
=========  =======  ==========  ==========  ==============================================================
100,000    2.4 s    400 MB      129 MB      all 5,000 exact plants; 4,931 of the 4,931 near plants at J >= 0.8
1,000,000  28 s     1.30 GB     0.66 GB     all 50,000 exact; 49,147 of 49,199 near plants at J >= 0.8
=========  =======  ==========  ==========  ==============================================================

At 1 M rows: normalize 2.7 s, shingles + MinHash 15.5 s, LSH 6.1 s (10.6 M bucket pairs, 124 k after the
estimate screen), verification 2.8 s. ``verify_jaccard=False``: 17 s, but 135 removals outside the planted
clusters (estimate noise) instead of 46.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from boostqa_assets.logic.minhash import (
    WORD_PATTERN,
    DedupConfig,
    agreement,
    band_keys,
    candidate_probability,
    dedup_text,
    exact_key,
    lsh_params,
    min_agreement,
    set_jaccard,
    shingle_hashes,
    signatures,
    unique_rows,
)
from boostqa_assets.records import normalize_text

logger = logging.getLogger(__name__)

EXACT = "exact_duplicate"
NEAR = "near_duplicate"

# Re-exported: callers and tests import the hashing helpers from here, as before the split.
__all__ = [
    "EXACT",
    "NEAR",
    "WORD_PATTERN",
    "DedupConfig",
    "DedupResult",
    "candidate_probability",
    "dedup",
    "dedup_text",
    "lsh_params",
    "normalize_text",
    "shingle_hashes",
    "signatures",
    "unique_rows",
]


@dataclass
class DedupResult:
    """Per input row (input order): keep, the kept row it duplicates, why, how similar; and the counts."""

    keep: pl.Series  # bool per input row, in input order
    duplicate_of: pl.Series  # qa_id of the kept row this one duplicates (null when kept)
    reason: pl.Series  # "exact_duplicate" | "near_duplicate" | null
    similarity: pl.Series  # verified (or estimated) Jaccard for near dups, 1.0 for exact, null when kept
    stats: dict[str, int | float] = field(default_factory=dict)

    def annotate(self, df: pl.DataFrame) -> pl.DataFrame:
        """``df`` with ``dedup_keep``, ``dedup_reason``, ``dedup_duplicate_of``, ``dedup_similarity``."""
        return df.with_columns(
            self.keep.alias("dedup_keep"),
            self.reason.alias("dedup_reason"),
            self.duplicate_of.alias("dedup_duplicate_of"),
            self.similarity.alias("dedup_similarity"),
        )


def _band_pairs(key: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(later, earlier) index pairs of rows sharing a bucket: each row with the first ``cap`` earlier rows of
    its bucket. Indices are into ``key``, whose order is the id order (stable sort keeps it per bucket)."""
    m = len(key)
    if m < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    idx = np.arange(m, dtype=np.int64)
    new = np.empty(m, dtype=bool)
    new[0] = True
    np.not_equal(sk[1:], sk[:-1], out=new[1:])
    gstart = np.maximum.accumulate(np.where(new, idx, 0))
    counts = np.minimum(idx - gstart, cap)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    src = np.repeat(idx, counts)
    first = np.zeros(m, dtype=np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    t = np.arange(total, dtype=np.int64) - first[src]
    return order[src].astype(np.int64), order[gstart[src] + t].astype(np.int64)


def dedup(df: pl.DataFrame, cfg: DedupConfig | None = None, id_col: str = "qa_id") -> DedupResult:
    """Exact then near-duplicate dedup of ``df`` (see the module docstring for the rule and its memory)."""
    cfg = cfg or DedupConfig()
    t0 = time.perf_counter()
    if id_col not in df.columns:
        raise ValueError(f"dedup id column {id_col!r} is not in the frame {df.columns}")
    if df[id_col].null_count():
        raise ValueError(f"dedup id column {id_col!r} has {df[id_col].null_count()} null values")
    n = df.height
    raw = dedup_text(df, cfg)
    ids = df[id_col].cast(pl.Utf8)
    # id order, ties broken by the text: the same rows in any input order give the same sequence
    order = (
        (pl.DataFrame({"i": ids, "t": raw}).with_row_index("_pos").sort(["i", "t"], maintain_order=True)["_pos"])
        .to_numpy()
        .astype(np.int64)
    )
    b, r = lsh_params(cfg.threshold, cfg.num_perm, cfg.bands)

    # --- pass 1 (chunks in id order): normalize, exact key, shingles, MinHash --------------------------
    keys: list[bytes] = []
    sig = np.empty((n, cfg.num_perm), dtype=np.uint32) if cfg.near else np.empty((0, cfg.num_perm), np.uint32)
    has_shingles = np.zeros(n, dtype=bool)
    t_norm = t_sig = 0.0
    for s in range(0, n, cfg.chunk_rows):
        ta = time.perf_counter()
        chunk = raw.gather(order[s : s + cfg.chunk_rows]).to_list()
        normalized = [normalize_text(t) for t in chunk]
        if cfg.exact:
            keys.extend(exact_key(t) for t in normalized)
        tb = time.perf_counter()
        t_norm += tb - ta
        if cfg.near:
            flat, offsets = shingle_hashes(normalized, cfg)
            sig[s : s + len(chunk)] = signatures(flat, offsets, cfg)
            has_shingles[s : s + len(chunk)] = np.diff(offsets) > 0
            del flat, offsets
        t_sig += time.perf_counter() - tb

    # positions below are in id order (0..n-1); status: 0 kept, 1 exact, 2 near
    status = np.zeros(n, dtype=np.int8)
    dup_pos = np.full(n, -1, dtype=np.int64)
    sim = np.full(n, np.nan, dtype=np.float64)

    # --- exact --------------------------------------------------------------------------------------------
    ta = time.perf_counter()
    if cfg.exact and n:
        first = (
            pl.DataFrame({"k": pl.Series(keys, dtype=pl.Binary)})
            .with_row_index("p")
            .select(pl.col("p").min().over("k"))["p"]
            .to_numpy()
            .astype(np.int64)
        )
        is_dup = first != np.arange(n)
        status[is_dup] = 1
        dup_pos[is_dup] = first[is_dup]
        sim[is_dup] = 1.0
    del keys
    t_exact = time.perf_counter() - ta

    # --- near: LSH bands -> screened pairs -> sequential keep rule ----------------------------------------
    stats_near = {"lsh_pairs": 0, "screened_pairs": 0, "candidates_checked": 0, "verify_rows": 0}
    t_lsh = t_verify = 0.0
    if cfg.near and n:
        ta = time.perf_counter()
        cand = np.flatnonzero((status == 0) & has_shingles)  # id-order positions, ascending
        min_agree = min_agreement(cfg)
        later_parts, earlier_parts, agree_parts = [], [], []
        for band in range(b):
            key = band_keys(sig[cand, band * r : (band + 1) * r], 1, r)[:, 0]
            later, earlier = _band_pairs(key, cfg.max_candidates)
            stats_near["lsh_pairs"] += len(later)
            later, earlier = cand[later], cand[earlier]
            agree = agreement(sig, later, earlier)
            ok = agree >= min_agree
            later_parts.append(later[ok])
            earlier_parts.append(earlier[ok])
            agree_parts.append(agree[ok])
        later = np.concatenate(later_parts) if later_parts else np.empty(0, np.int64)
        earlier = np.concatenate(earlier_parts) if earlier_parts else np.empty(0, np.int64)
        agree = np.concatenate(agree_parts) if agree_parts else np.empty(0, np.int32)
        del later_parts, earlier_parts, agree_parts
        _, first_idx = np.unique(later * n + earlier, return_index=True)  # sorted: later, then earlier
        later, earlier, agree = later[first_idx], earlier[first_idx], agree[first_idx]
        stats_near["screened_pairs"] = len(later)
        t_lsh = time.perf_counter() - ta

        ta = time.perf_counter()
        exact_j = None
        if cfg.verify_jaccard and len(later):
            involved = np.unique(np.concatenate([later, earlier]))
            stats_near["verify_rows"] = len(involved)
            texts = raw.gather(order[involved]).to_list()
            flat, offsets = unique_rows(*shingle_hashes([normalize_text(t) for t in texts], cfg))
            local = {int(p): k for k, p in enumerate(involved)}

            def exact_j(i: int, j: int) -> float:
                a = flat[offsets[local[i]] : offsets[local[i] + 1]]
                c = flat[offsets[local[j]] : offsets[local[j] + 1]]
                return set_jaccard(a, c)

        kept = (status == 0).tolist()
        done, current, checks = -1, -1, 0
        for i, j, ag in zip(later.tolist(), earlier.tolist(), agree.tolist(), strict=True):
            if i == done:
                continue
            if i != current:
                current, checks = i, 0
            if not kept[j] or checks >= cfg.max_candidates:
                continue
            checks += 1
            stats_near["candidates_checked"] += 1
            s_ij = exact_j(i, j) if exact_j is not None else ag / cfg.num_perm
            if s_ij >= cfg.threshold:
                kept[i] = False
                status[i], dup_pos[i], sim[i] = 2, j, s_ij
                done = i
        t_verify = time.perf_counter() - ta
    del sig

    # --- back to input order --------------------------------------------------------------------------
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.arange(n, dtype=np.int64)
    st, dp, sm = status[inv], dup_pos[inv], sim[inv]
    sorted_ids = ids.gather(order)
    dup_ids = pl.Series("duplicate_of", [None] * n, dtype=pl.Utf8)
    removed = np.flatnonzero(st > 0)
    if len(removed):
        dup_ids = dup_ids.scatter(removed, sorted_ids.gather(dp[removed]))
    reason = pl.Series("reason", st).replace_strict([0, 1, 2], [None, EXACT, NEAR], return_dtype=pl.Utf8)
    result = DedupResult(
        keep=pl.Series("keep", st == 0, dtype=pl.Boolean),
        duplicate_of=dup_ids,
        reason=reason,
        similarity=pl.Series("similarity", sm, dtype=pl.Float64, nan_to_null=True),
        stats={
            "rows_in": n,
            "rows_kept": int((st == 0).sum()),
            "exact_removed": int((st == 1).sum()),
            "near_removed": int((st == 2).sum()),
            **stats_near,
            "bands": b,
            "rows_per_band": r,
            "num_perm": cfg.num_perm,
            "threshold": cfg.threshold,
            "seconds_normalize": round(t_norm, 3),
            "seconds_minhash": round(t_sig, 3),
            "seconds_exact": round(t_exact, 3),
            "seconds_lsh": round(t_lsh, 3),
            "seconds_verify": round(t_verify, 3),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    logger.info(
        "dedup: %d rows in, %d kept, %d exact and %d near duplicates removed (%d candidates checked) in %.1f s",
        n,
        result.stats["rows_kept"],
        result.stats["exact_removed"],
        result.stats["near_removed"],
        stats_near["candidates_checked"],
        result.stats["seconds"],
    )
    return result
