"""The judge's on-disk answer cache: one JSON file per request key, written atomically."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


CACHE_FORMAT_VERSION = 1  # bump when the cache key or the stored value changes meaning


class _AnswerCache:
    """Validated judge answers on disk, one sqlite3 table ``key → JSON``.

    Why sqlite3 and not ``diskcache``: it is in the standard library (no dependency, and diskcache has had no release
    since 2023), values stay plain JSON (diskcache pickles, which is unsafe for a cache directory shared between
    users), and WAL mode lets the data-parallel ranks of one run read and write the same file concurrently. Reads and
    writes are sub-millisecond, so they run inline on the event loop. The connection is opened lazily, may be used from
    any thread (guarded by a lock), and a broken cache degrades to "no cache" with one warning, never a failed step.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory).expanduser() / "judge_cache.sqlite3"
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._broken = False

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL, created REAL)"
            )
            self._connection = connection
        return self._connection

    def _run(self, operation: str, sql: str, parameters: tuple) -> list[tuple]:
        if self._broken:
            return []
        with self._lock:
            try:
                return self._connect().execute(sql, parameters).fetchall()
            except (sqlite3.Error, OSError) as error:
                self._broken = True
                logger.warning(
                    "Judge cache %s failed (%s: %s); continuing without a cache.",
                    operation,
                    type(error).__name__,
                    error,
                )
                return []

    def get(self, key: str) -> dict[str, Any] | None:
        rows = self._run("read", "SELECT answer FROM answers WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def put(self, key: str, answer: dict[str, Any]) -> None:
        self._run(
            "write",
            "INSERT OR REPLACE INTO answers (key, answer, created) VALUES (?, ?, ?)",
            (key, json.dumps(answer), time.time()),
        )

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
