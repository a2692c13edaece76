"""Process memory policy: fewer glibc malloc arenas, so memory one stage frees is reused by the next.

glibc gives threads their own malloc arenas (up to 8 per core), and memory freed in one arena is reused only by
allocations served from that arena. A BoostQA process runs many threads over its life (each stage's run thread,
the LLM client's event loop, the cache's flusher and compactor, Dagster's log watchers), so a long process (the
one-process runner of ``boostqa demo``/``run``, a code server) ends up holding freed memory in many arenas at
once. Measured in the 100k-seed benchmark: ~360 MB of a 1.3 GB process sat in nine thread arenas during
synthesis. ``MALLOC_ARENA_MAX=2`` is the usual remedy for long-lived Python data processes; setting it through
``mallopt`` when the package is imported applies it to every process that loads the code location (the
webserver's code server, every run worker, the CLI) without each launcher having to export it.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; True when applied. A ``MALLOC_ARENA_MAX`` set in the environment
    wins (glibc read it at start), and other platforms and C libraries are left alone."""
    if sys.platform != "linux" or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 and no per-thread arenas)
        return False
