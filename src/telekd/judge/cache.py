"""The judge-call cache: one JSON file per call, keyed by sha256(judge identity + prompt + bounded schema).

Entries live in ``cache/judge/`` (`CACHE_DIR`, relative to the working directory), each written to a temporary
name and renamed (telekd.io.write_json), so processes that share the cache never read a partial entry. Only
outputs that passed every check are written (see telekd.judge.ragas_adapter), so a failed call is asked again
on the next run. An in-memory copy serves repeats within one process.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Optional

CACHE_DIR = "cache/judge"


class JudgeCache:
    """sha256(judge identity + prompt + schema) -> the judge's raw output that parsed; one file per call.

    `root` is the cache folder (None: memory only). Thread-safe.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self._mem: dict[str, str] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    @staticmethod
    def key(identity: str, prompt: str, schema: dict) -> str:
        """The entry's name: sha256 hex digest of the judge identity, the prompt and the bounded schema."""
        blob = json.dumps({"judge": identity, "prompt": prompt, "schema": schema}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def key_lock(self, key: str) -> threading.Lock:
        """One lock per key: concurrent threads asking the same prompt wait for the first one's answer."""
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[str]:
        """The cached raw output for `key`, or None when there is none (or the file is unreadable or corrupt)."""
        with self._lock:
            if key in self._mem:
                return self._mem[key]
        if self.root is None:
            return None
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["output"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, output: str, meta: dict) -> None:
        """Keep `output` under `key` in memory and, with a root folder, on disk with `meta` (atomic write)."""
        with self._lock:
            self._mem[key] = output
        if self.root is not None:
            from ..io import write_json

            write_json(self._path(key), {**meta, "output": output})
