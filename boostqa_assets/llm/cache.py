"""Content-addressed response cache: one JSON object per request hash, written as each response arrives.

Stored under ``<root>/<hash[:2]>/<hash>.json`` on any fsspec filesystem (local disk or S3), so a killed run
loses at most the requests in flight and a re-run of a finished partition sends nothing. Entries hold the
request body (model, prompt, parameters, schema) and the reply, never a header or an API key.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec

logger = logging.getLogger(__name__)


class ResponseCache:
    """Get/put replies by request hash."""

    def __init__(self, root: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
        self.root = root.rstrip("/")
        self.fs = fs or fsspec.filesystem("file")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols

    def _path(self, rhash: str) -> str:
        return posixpath.join(self.root, rhash[:2], rhash + ".json")

    def get(self, rhash: str) -> dict[str, Any] | None:
        path = self._path(rhash)
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("cache entry %s is unreadable; ignoring it", path)
            return None

    def put(self, rhash: str, entry: dict[str, Any]) -> None:
        path = self._path(rhash)
        data = json.dumps(entry, ensure_ascii=False, sort_keys=True).encode("utf-8")
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)
