"""Process memory policy: fewer glibc malloc arenas, so memory one stage frees is reused by the next.

glibc gives threads their own malloc arenas (up to 8 per core), and memory freed in one arena is reused only by
allocations served from that arena. A BoostQA process runs many threads over its life (each stage's run thread,
the LLM client's event loop, the cache's flusher and compactor, Dagster's log watchers), so a long process (the
one-process runner of ``boostqa demo``/``run``, a code server) ends up holding freed memory in many arenas at
once. Measured in the 100k-seed benchmark: ~360 MB of a 1.3 GB process sat in nine thread arenas during
synthesis. ``MALLOC_ARENA_MAX=2`` is the usual remedy for long-lived Python data processes; setting it through
``mallopt`` when the package is imported applies it to every process that loads the code location (the
webserver's code server, every run worker, the CLI) without each launcher having to export it.

Freed memory also stays in the process: glibc returns only the top of a heap to the system on its own, so after a
stage (or a phase of one) that built and dropped a few hundred MB of short-lived objects, RSS stays near its
peak. ``release_free_memory`` hands the free pages back (``malloc_trim``); it is called where a large phase ends
(each run of the runner, the dedup merge's screen and verification). Measured on the 100k-seed mixture: 140-160
MB back after each of the dedup's pair screen and verification.

Arrow and polars bring allocators of their own, which keep freed pages that ``malloc_trim`` cannot reach:
``prefer_releasing_allocators`` (called when the package is imported, before pyarrow and polars are) puts
Arrow's buffers on the system allocator (``ARROW_DEFAULT_MEMORY_POOL=system``, instead of mimalloc) and has
polars' jemalloc return freed pages at once (``muzzy_decay_ms:0``; polars' own default keeps them for good).
Measured on a 10k-seed project re-run in one process, peak RSS per stage: refined 781 -> 682 MB, mixture 899 ->
807 MB; Arrow's pool alone gave most of it (mixture 834 MB), DuckDB's jemalloc settings nothing (the dedup merge
reopens its database instead, see ``dedup_ooc._reopen``). A value already in the environment wins.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from functools import cache

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
ARENAS = 2


def prefer_releasing_allocators() -> list[str]:
    """Default the Arrow and polars allocator settings described above; returns the variables it set. Takes
    effect only in a process that has not imported pyarrow or polars yet (each reads its variable at import)."""
    defaults = {"ARROW_DEFAULT_MEMORY_POOL": "system", "_RJEM_MALLOC_CONF": "muzzy_decay_ms:0"}
    applied = [name for name in defaults if name not in os.environ]
    for name in applied:
        os.environ[name] = defaults[name]
    return applied


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; True when applied. A ``MALLOC_ARENA_MAX`` set in the environment
    wins (glibc read it at start), and other platforms and C libraries are left alone."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _glibc()
    return bool(libc.mallopt(M_ARENA_MAX, arenas)) if libc is not None else False


def release_free_memory() -> bool:
    """Collect garbage (~25 ms with a few 100k live objects), then give glibc's free pages back to the system
    (~15 ms); True when glibc did release some. A no-op off glibc."""
    gc.collect()
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both are glibc's: fail here, not at the call
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 and no per-thread arenas)
        return None
