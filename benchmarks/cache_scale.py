"""Benchmark of the LLM response cache at scale: Parquet segments + hash-prefix shards vs one JSON file per entry.

Writes ``--entries`` replies through ``ResponseCache.put`` (the client's put path: request body built and hashed
as ``transport.encode`` does, prompt ~600 characters, reply ~400, from a pool of random-word sentences), closes the
writer (its own compaction on, as in production) and runs ``compact()`` once more with the same thresholds. A
fresh process then looks up ``--lookups`` hashes in ``--batch``-sized ``get_many`` calls reading the reply
fields (a run's prefetch), ``--miss-rate`` of them never stored, then one batch of whole entries, then
``--gets`` single ``get`` calls on another fresh instance. The same for the old layout (one JSON file per entry,
the code of the old ``cache.py``) at ``--legacy-entries``. Each phase runs in its own child process, so each
peak RSS (VmHWM) is that phase's alone. Prints figures, no asserts.

    .venv/bin/python benchmarks/cache_scale.py                         # local disk, 10^6 entries
    .venv/bin/python benchmarks/cache_scale.py --entries 100000        # quicker
    .venv/bin/python benchmarks/cache_scale.py --s3                    # moto's S3 server on 127.0.0.1

Measured on the 2-core machine while other work kept its load at 3-8 (figures move by ~2x with that load):

    local disk, 10^6 entries (old layout: 20,000)     new                         old
      objects per 1,000 replies                     1.84 (1,836 files, 793 MB)  1,000
      put path                                      10,000-19,000 entries/s     3,500-4,000 entries/s
      bulk lookup, reply fields (a run's prefetch)  2,300-3,100 hashes/s        7,300-16,000 hashes/s
      bulk lookup, whole entries                    1,500-2,300 hashes/s        (the same: one file each)
      single get, cold instance                     120-220/s                   7,700-20,000/s
      peak RSS write / lookup                       450-470 / 650-820 MB        150 / 90 MB
    S3 (moto on 127.0.0.1), 200,000 entries (old: 1,000)
      objects per 1,000 replies                     1.32                        1,000
      put path                                      10,000 entries/s            41 entries/s
      bulk lookup, reply fields                     2,700 hashes/s              23 hashes/s
      single get, cold instance                     15/s                        27/s
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS_SEED = 11


def _sentences(n: int = 50_000) -> list[str]:
    """Random-word sentences (~100 characters): text that compresses like text, not like repeated templates."""
    rng = random.Random(WORDS_SEED)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(20_000)]
    return [" ".join(rng.choices(vocab, k=rng.randint(14, 20))).capitalize() + "." for _ in range(n)]


def _entry(i: int, pool: list[str], rng: random.Random) -> tuple[str, dict[str, Any]]:
    """Request body, hash and cache entry of reply ``i``, the way ``LLMClient`` builds them (the hash as
    ``transport.encode`` computes it, without the wire bytes the benchmark does not send)."""
    from boostqa_assets.llm.types import request_hash

    prompt = f"Item {i}. " + " ".join(rng.choices(pool, k=6))  # ~600 characters
    body = {
        "model": "bench-model",
        "max_tokens": 512,
        "temperature": 0.7,
        "top_p": 1.0,
        "seed": 1000 + i,
        "messages": [{"role": "user", "content": prompt}],
        "response_format": {"type": "json_object"},
    }
    rhash = request_hash(body)
    reply = " ".join(rng.choices(pool, k=4))  # ~400 characters
    entry = {"request_hash": rhash, "role": "synthesizer", "model": "bench-model", "request": body}
    entry.update(content=reply, reasoning="", finish_reason="stop", tokens_in=150, tokens_out=100, latency_s=1.234)
    return rhash, entry


class LegacyCache:
    """The old layout, as the old ``cache.py`` wrote and read it: ``<root>/<hh>/<hash>.json``."""

    def __init__(self, root: str, fs: Any) -> None:
        self.root, self.fs = root.rstrip("/"), fs
        self.is_local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    def _path(self, rhash: str) -> str:
        return f"{self.root}/{rhash[:2]}/{rhash}.json"

    def get(self, rhash: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._path(rhash), "rb") as f:
                return json.loads(f.read())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def put(self, rhash: str, entry: dict[str, Any]) -> None:
        path, data = self._path(rhash), json.dumps(entry, ensure_ascii=False, sort_keys=True).encode("utf-8")
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)


# --- phases (each in a child process) -------------------------------------------------------------------------


def _fs(spec: dict[str, Any]) -> Any:
    import fsspec

    if spec.get("endpoint"):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": spec["endpoint"]})
    return fsspec.filesystem("file")


def _cache(spec: dict[str, Any]) -> Any:
    from boostqa_assets.llm.cache import ResponseCache

    if spec["layout"] == "legacy":
        return LegacyCache(spec["root"], _fs(spec))
    return ResponseCache(spec["root"], _fs(spec))


def phase_write(spec: dict[str, Any]) -> dict[str, Any]:
    """Put ``n`` entries. Bodies and hashes are built beforehand, 10,000 at a time, so ``put_s`` is the time
    spent in ``put`` and the final ``close`` (background flushes that ran while a batch was being built are
    not in it; ``write_s``, end to end, has everything)."""
    pool, rng = _sentences(), random.Random(spec["seed"])
    cache = _cache(spec)
    put_s, started = 0.0, time.perf_counter()
    with open(spec["hashes"], "wb") as out:
        for at in range(0, spec["n"], 10_000):
            batch = [_entry(i, pool, rng) for i in range(at, min(at + 10_000, spec["n"]))]
            t0 = time.perf_counter()
            for rhash, entry in batch:
                cache.put(rhash, entry)
            put_s += time.perf_counter() - t0
            out.write(b"".join(bytes.fromhex(rhash) for rhash, _ in batch))
        t0 = time.perf_counter()
        if spec["layout"] == "new":
            cache.close()  # the last buffer
        put_s += time.perf_counter() - t0
    result = {"write_s": time.perf_counter() - started, "put_s": put_s, "objects_after_write": _objects(spec)[0]}
    if spec["layout"] == "new":  # what the writer's own compaction has not folded yet (same thresholds)
        started, merges = time.perf_counter(), 0
        while (report := cache.compact()).segments_in:
            merges += report.merges
        result.update(compact_s=time.perf_counter() - started, merges=merges)
    return result


def phase_lookup(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    raw = np.fromfile(spec["hashes"], dtype=np.uint8).reshape(-1, 32)
    rng = np.random.default_rng(spec["seed"])

    def sample(k: int) -> tuple[list[str], int]:
        """``k`` distinct stored hashes in random order, ``miss_rate`` of them swapped for hashes never stored."""
        picks = raw[rng.choice(len(raw), size=k, replace=False)]
        misses = rng.random(k) < spec["miss_rate"]
        out = [uuid.uuid4().hex * 2 if m else bytes(p).hex() for p, m in zip(picks, misses, strict=True)]
        return out, int((~misses).sum())

    result: dict[str, Any] = {}
    cache = _cache(spec)
    wanted, expected = sample(spec["lookups"])
    found, started = 0, time.perf_counter()
    for at in range(0, len(wanted), spec["batch"]):
        chunk = wanted[at : at + spec["batch"]]
        if spec["layout"] == "new":  # what LLMClient's prefetch reads: the reply fields, not the request body
            found += len(cache.get_many(chunk, reply_only=True))
        else:  # the old cache has no bulk lookup: one file per hash
            found += sum(cache.get(x) is not None for x in chunk)
    result.update(bulk_s=time.perf_counter() - started, bulk_n=len(wanted), bulk_found=found, bulk_expected=expected)
    if spec["layout"] == "new":  # one more batch of whole entries (request bodies parsed), on a fresh instance
        chunk, _ = sample(min(spec["batch"], spec["lookups"]))
        started = time.perf_counter()
        _cache(spec).get_many(chunk)
        result.update(full_s=time.perf_counter() - started, full_n=len(chunk))
    cache = _cache(spec)  # cold: single gets on a fresh instance
    wanted, expected = sample(spec["gets"])
    started = time.perf_counter()
    found = sum(cache.get(x) is not None for x in wanted)
    result.update(gets_s=time.perf_counter() - started, gets_n=len(wanted), gets_found=found, gets_expected=expected)
    return result


def _objects(spec: dict[str, Any]) -> tuple[int, int]:
    fs, root = _fs(spec), spec["root"].removeprefix("s3://")
    fs.invalidate_cache()
    sizes = fs.find(root, detail=True)
    return len(sizes), sum(int(v.get("size") or 0) for v in sizes.values())


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, not ru_maxrss, which keeps the parent's peak across fork + exec."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _child(phase: str, spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", phase, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{phase} ({spec['layout']}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_layout(layout: str, n: int, args: argparse.Namespace, base: str, endpoint: str | None, work: Path) -> dict:
    spec = {"layout": layout, "n": n, "seed": 7, "root": f"{base}/{layout}/_llm_cache", "endpoint": endpoint}
    spec.update(hashes=str(work / f"{layout}.hashes"), miss_rate=args.miss_rate, batch=args.batch)
    spec.update(lookups=min(args.lookups, n), gets=args.gets)
    print(f"  {layout}: writing {n:,} entries ...", flush=True)
    result = _child("write", spec)
    result["objects"], result["bytes"] = _objects(spec)
    print(f"  {layout}: looking up ...", flush=True)
    result.update(_child("lookup", spec))
    return {**spec, **result}


def report(rows: list[dict[str, Any]]) -> None:
    def rate(n: float, s: float) -> str:
        return f"{n / s:,.0f}/s" if s > 0 else "-"

    print()
    head = ("layout", "entries", "objects", "obj/1000", "MB", "put/s", "bulk get/s", "get/s", "RSS w/r MB")
    widths = (25, 11, 9, 9, 8, 10, 11, 8, 12)
    print("".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(head, widths, strict=True))))
    for r in rows:
        name = "segments+shards (new)" if r["layout"] == "new" else "one JSON per entry (old)"
        cells = (
            name,
            f"{r['n']:,}",
            f"{r['objects']:,}",
            f"{1000 * r['objects'] / r['n']:.2f}",
            f"{r['bytes'] / 1e6:.1f}",
            rate(r["n"], r["put_s"]),
            rate(r["bulk_n"], r["bulk_s"]),
            rate(r["gets_n"], r["gets_s"]),
            f"{r['rss_write_mb']:.0f}/{r['rss_lookup_mb']:.0f}",
        )
        print("".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    print()
    for r in rows:
        name = "new" if r["layout"] == "new" else "old"
        extra = f", then compaction {r['compact_s']:.1f} s ({r['merges']} tier merges)" if r.get("merges") else ""
        print(
            f"{name}: {r['objects_after_write']:,} objects right after writing{extra}; put path "
            f"{r['put_s']:.1f} s, end to end with building bodies and hashes {r['write_s']:.1f} s"
        )
        print(
            f"{name}: bulk {r['bulk_n']:,} hashes in batches of {r['batch']:,} ({r['miss_rate']:.0%} never stored): "
            f"{r['bulk_s']:.2f} s, found {r['bulk_found']:,} of {r['bulk_expected']:,}; single gets on a cold "
            f"instance: {r['gets_n']:,} in {r['gets_s']:.2f} s ({rate(r['gets_n'], r['gets_s'])}), found "
            f"{r['gets_found']:,} of {r['gets_expected']:,}"
        )
        if "full_s" in r:
            print(f"{name}: bulk of whole entries (request body too): {rate(r['full_n'], r['full_s'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, help="entries in the new layout (default 1,000,000; 200,000 with --s3)")
    ap.add_argument("--legacy-entries", type=int, help="entries in the old layout (default 20,000; 1,000 with --s3)")
    ap.add_argument("--lookups", type=int, default=100_000, help="hashes looked up in bulk (capped at entries)")
    ap.add_argument("--batch", type=int, default=20_000, help="hashes per get_many call (a run's prefetch)")
    ap.add_argument("--gets", type=int, help="single get() calls on a cold instance (default 1,000; 200 with --s3)")
    ap.add_argument("--miss-rate", type=float, default=0.1, help="share of looked-up hashes never stored")
    ap.add_argument("--s3", action="store_true", help="against moto's S3 server on 127.0.0.1, started here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        phase, spec = args.child[0], json.loads(args.child[1])
        result = (phase_write if phase == "write" else phase_lookup)(spec)
        result[f"rss_{phase}_mb"] = _peak_rss_mb()
        print(json.dumps(result))
        return
    n = args.entries or (200_000 if args.s3 else 1_000_000)
    legacy = args.legacy_entries or (1_000 if args.s3 else 20_000)  # the old layout costs a request per entry
    args.gets = min(args.gets if args.gets is not None else (200 if args.s3 else 1_000), legacy)
    server = None
    with tempfile.TemporaryDirectory(prefix="cache-scale-") as tmp:
        work, endpoint, base = Path(tmp), None, f"{tmp}/data"
        if args.s3:
            import s3fs
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
            server.start()
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            bucket = f"cache-scale-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
            base = f"s3://{bucket}"
        print(f"cache benchmark on {'S3 (moto, 127.0.0.1)' if args.s3 else 'local disk'}", flush=True)
        try:
            rows = [
                run_layout("new", n, args, base, endpoint, work),
                run_layout("legacy", legacy, args, base, endpoint, work),
            ]
        finally:
            if server is not None:
                server.stop()
    report(rows)


if __name__ == "__main__":
    main()
