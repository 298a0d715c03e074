"""The persistent cache of paid Solar answers: SQLite in a folder that outlives runs.

An answer is keyed by a hash of everything that determines it: endpoint, model, prompt name and version,
generation parameters and the exact messages (dialogue and few-shot examples). Each answer is committed in its
own transaction the moment it arrives (WAL journal, synchronous=FULL), so a crash or a kill loses at most the
answers still in flight and never leaves a half-written row. Failed rows are never cached: a re-run retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dialogsum.solar.client import Completion

CACHE_FILE = "completions.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    fname TEXT NOT NULL,
    summary TEXT NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    created_at TEXT NOT NULL
)
"""
_LOOKUP_CHUNK = 500  # stays below SQLite's limit on bound parameters


class CacheError(RuntimeError):
    """The cache file exists but cannot be used."""


def default_cache_dir() -> Path:
    """`$DIALOGSUM_CACHE_DIR/solar`, else `~/.cache/dialogsum/solar`."""
    root = os.environ.get("DIALOGSUM_CACHE_DIR")
    return Path(root) / "solar" if root else Path.home() / ".cache" / "dialogsum" / "solar"


def request_key(base_url: str, prompt_name: str, prompt_version: str, payload: dict[str, Any]) -> str:
    """The cache key of one request: a SHA-256 over the endpoint, the prompt identity and the full payload."""
    identity = {"base_url": base_url.rstrip("/"), "prompt": prompt_name, "prompt_version": prompt_version, **payload}
    canonical = json.dumps(identity, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CompletionCache:
    """Thread-safe get/put of answers by request key."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / CACHE_FILE
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise CacheError(f"{self.path}: not a usable SQLite cache ({e}); move it away to start a new cache") from e

    def __enter__(self) -> "CompletionCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Completion] = {}
        with self._lock:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                rows = self._conn.execute(
                    "SELECT key, summary, tokens_in, tokens_out, latency_s FROM completions"
                    f" WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                for key, summary, tokens_in, tokens_out, latency_s in rows:
                    found[key] = Completion(summary, tokens_in, tokens_out, latency_s, attempts=0)
        return found

    def put(
        self, key: str, completion: Completion, *, model: str, prompt: str, prompt_version: str, fname: str
    ) -> None:
        """Store one answer, committed before returning; an existing answer for the key is kept."""
        row = (
            key,
            model,
            prompt,
            prompt_version,
            fname,
            completion.text,
            completion.tokens_in,
            completion.tokens_out,
            completion.latency_s,
            time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
