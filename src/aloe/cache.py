"""SQLite cache for LLM calls.

The key is a SHA-256 over everything that changes the answer: backend kind, model
id and revision, the call type, the messages, every sampling parameter, the seed
and sample index, candidate continuations for probability calls, and the prompt
version. Only successful results are stored; a failure is never cached, so a rerun
retries it. WAL mode and a busy timeout make concurrent writers (several
processes or threads) safe; each thread gets its own connection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from aloe.errors import AloeError

log = logging.getLogger(__name__)


def cache_key(payload: dict[str, Any]) -> str:
    """Stable key: canonical JSON (sorted keys, no whitespace) hashed with SHA-256."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


class CallCache:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.hits = 0
        self.misses = 0
        self._count = threading.Lock()  # engines may be called from many threads (aloe.trees' scheduler)
        self._local = threading.local()
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                con = self._con()
                con.execute(
                    "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                    "created REAL NOT NULL)"
                )
                con.commit()
            except sqlite3.DatabaseError as e:
                raise AloeError(
                    f"{self.path}: cannot use it as the call cache ({e}); it must be a SQLite "
                    f"database or a new file: set cache_path to another file, or move this one "
                    f"away"
                ) from None

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        if not self.path or not keys:
            with self._count:
                self.misses += len(keys)
            return {}
        found: dict[str, Any] = {}
        con = self._con()
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 500):
            chunk = uniq[i : i + 500]
            q = f"SELECT key, value FROM calls WHERE key IN ({','.join('?' * len(chunk))})"
            for k, v in con.execute(q, chunk):
                found[k] = json.loads(v)
        hits = sum(1 for k in keys if k in found)
        with self._count:
            self.hits += hits
            self.misses += len(keys) - hits
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        if not self.path or not items:
            return
        con = self._con()
        now = time.time()
        rows = [(k, json.dumps(v, ensure_ascii=False), now) for k, v in items.items()]
        for attempt in range(5):
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT OR REPLACE INTO calls (key, value, created) VALUES (?, ?, ?)", rows)
                con.execute("COMMIT")
                return
            except sqlite3.OperationalError as e:  # "database is locked" past the busy timeout
                try:
                    con.execute("ROLLBACK")
                except sqlite3.OperationalError:
                    pass
                if "full" in str(e):  # "database or disk is full": retrying cannot help
                    import errno

                    from aloe.io import no_space

                    raise no_space(self.path, OSError(errno.ENOSPC, f"the call cache: {e}")) from None
                if attempt == 4:
                    raise
                log.warning("cache write retry after %s", e)
                time.sleep(0.5 * (attempt + 1))
            except BaseException:  # Ctrl-C mid-commit: leave no transaction open (the caller stores it again)
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.OperationalError:
                        pass
                raise

    def __len__(self) -> int:
        if not self.path:
            return 0
        return self._con().execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}
