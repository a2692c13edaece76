"""Content-addressed response cache: replies by request hash, in append-only Parquet files on any fsspec
filesystem (local disk or S3).

One JSON file per reply exhausted a disk's inodes at 10^8 replies and cost one GET per lookup on S3. Now:

- ``<root>/segments/<utc time>-<writer>-<seq>.parquet``: what one writer flushed; about 1,000 replies (a
  flush happens at ``flush_entries`` replies or when the oldest buffered reply is ``flush_interval_s`` old,
  from a background thread, and on ``flush``/``close``/interpreter exit). A SIGKILL loses the unflushed
  buffer only: at most the last ``flush_interval_s`` of replies.
- ``<root>/shards/p=<hash prefix>/t<tier>-<utc time>-<writer>-<seq>.parquet``: compaction folds the oldest
  segments into one file per 2-hex-digit prefix once the tail holds ``compact_rows`` entries, and merges
  ``fanout`` files of a prefix and tier into one of the next tier (``compaction.py``).
- ``<root>/<hh>/<hash>.json``: the old layout, still read for misses when the root holds such folders.

Every file is written once, atomically (temp file + ``os.replace`` locally, one PUT on S3), sorted by a
64-bit key (the hash's first 16 hex digits) with row-group statistics, and never changed; compaction
deletes inputs only after its outputs are published. The same hash stored twice (two writers, two
compactors) is harmless: every reader keeps the earliest. A lookup reads the tail's key columns, then only
the row groups whose key range holds a wanted key in the shards of the wanted prefixes (``index.py``).
Entries hold the request body and the reply, never a header or an API key.
"""

from boostqa_assets.llm.cache.compaction import CompactionReport
from boostqa_assets.llm.cache.core import ResponseCache
from boostqa_assets.llm.cache.files import SCHEMA, Storage

__all__ = ["SCHEMA", "CompactionReport", "ResponseCache", "Storage", "stored_forms"]


def stored_forms(storage: Storage) -> set[str]:
    """Which layouts hold files under a cache root: ``segments``, ``shards``, ``legacy`` (for the DuckDB view)."""
    forms = {name for name in ("segments", "shards") if storage.list_parquet(f"{storage.root}/{name}")}
    if storage.has_legacy():
        forms.add("legacy")
    return forms
