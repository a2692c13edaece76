"""Tests for boostqa_assets.memory: importing the package caps glibc's malloc arenas (seen in malloc_info)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc arenas are Linux-only")

# Six threads allocate at once (strings past pymalloc's 512 bytes come from malloc), then malloc_info lists the
# arenas: one <heap nr=...> each.
PROBE = textwrap.dedent(
    """
    import ctypes, sys, threading
    if sys.argv[1] == "import":
        import boostqa_assets  # noqa: F401
    barrier = threading.Barrier(6)
    keep = []
    def work():
        barrier.wait()
        keep.append([b"x" * 4096 + bytes([i % 256]) for i in range(2000)])
    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    f = libc.fopen(sys.argv[2].encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    """
)


def _arenas(tmp_path: Path, mode: str) -> int:
    out = tmp_path / f"{mode}.xml"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    subprocess.run([sys.executable, "-c", PROBE, mode, str(out)], check=True, env=env, timeout=120)
    return out.read_text().count("<heap nr=")


def test_importing_the_package_caps_malloc_arenas(tmp_path: Path) -> None:
    assert _arenas(tmp_path, "plain") > 2  # glibc's default: an arena per thread, up to 8 per core
    assert _arenas(tmp_path, "import") <= 2


def test_an_explicit_malloc_arena_max_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from boostqa_assets import memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.limit_malloc_arenas() is False


# 400k strings of ~1 KB (past pymalloc, so from malloc), then all but every 64th freed: the free pages sit between
# live chunks, below the top of the heap, where glibc does not return them on its own.
FRAGMENT = textwrap.dedent(
    """
    import sys
    from boostqa_assets.memory import release_free_memory
    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    keep = [b"x" * 1000 + i.to_bytes(4, "little") for i in range(400_000)]
    keep = keep[::64]
    before = rss_mb()
    released = release_free_memory()
    print(before, rss_mb(), released)
    """
)


def test_release_free_memory_returns_freed_pages_to_the_system() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", FRAGMENT], check=True, env=env, timeout=120, capture_output=True)
    before, after, released = out.stdout.decode().split()
    assert released == "True"
    assert int(before) - int(after) >= 200, (before, after)  # ~390 MB were freed


# Arrow's pool and polars' jemalloc settings are read when each is imported: a fresh interpreter shows them.
ALLOCATORS = textwrap.dedent(
    """
    import os
    import boostqa_assets  # noqa: F401
    import polars  # noqa: F401
    import pyarrow as pa
    print(pa.default_memory_pool().backend_name, os.environ["_RJEM_MALLOC_CONF"].split(",")[-1])
    """
)


def _allocators(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "_RJEM_MALLOC_CONF")}
    found = subprocess.run(
        [sys.executable, "-c", ALLOCATORS], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert found.returncode == 0, found.stderr[-2000:]
    return found.stdout.split()


def test_importing_the_package_puts_arrow_and_polars_on_allocators_that_release() -> None:
    assert _allocators() == ["system", "muzzy_decay_ms:0"]  # not mimalloc, and polars' freed pages go back
    assert _allocators(ARROW_DEFAULT_MEMORY_POOL="mimalloc", _RJEM_MALLOC_CONF="narenas:2") == [
        "mimalloc",
        "narenas:2",
    ]  # what the environment says wins
