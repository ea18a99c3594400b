"""Content hashes and recipe keys.

Identities come from declared facts only: file BYTES for images and weights, and a canonical
JSON (sorted keys) of a recipe. Paths and mtimes never enter a key; (path, size, mtime, inode)
only index a local memo so a file already hashed is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path

_CHUNK = 1 << 20


def canonical_json(obj) -> str:
    """The one serialisation keys are built from: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def recipe_key(recipe: dict, length: int = 16) -> str:
    """A short hex key of a recipe; 16 hex digits (64 bits) make collisions negligible."""
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_home() -> Path:
    """Where local memos live; VERMOUTH_CACHE_HOME overrides (tests point it at a tmp dir)."""
    env = os.environ.get("VERMOUTH_CACHE_HOME")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vermouth-cache"


class FileHashMemo:
    """sha256 of files, memoised in sqlite by (absolute path, size, mtime_ns, inode, ctime_ns).

    Any change to the file changes the stat tuple, so a stale hash is never returned; the memo
    only saves re-reading unchanged multi-GB weight files and large image sets.
    """

    def __init__(self, db_path: Path | None = None):
        self.db_path = Path(db_path) if db_path else cache_home() / "file-hashes.sqlite"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection | None:
        if self._conn is None:
            try:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False)
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS h (path TEXT PRIMARY KEY, stat TEXT, sha TEXT)"
                )
            except (OSError, sqlite3.Error):
                return None  # a read-only home only costs re-hashing
        return self._conn

    def sha256(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stat = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"
        with self._lock:
            db = self._db()
            if db is not None:
                row = db.execute("SELECT stat, sha FROM h WHERE path=?", (str(path),)).fetchone()
                if row and row[0] == stat:
                    return row[1]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        sha = digest.hexdigest()
        with self._lock:
            db = self._db()
            if db is not None:
                try:
                    db.execute("REPLACE INTO h VALUES (?, ?, ?)", (str(path), stat, sha))
                    db.commit()
                except sqlite3.Error:
                    pass  # an unwritable memo only costs re-hashing next time
        return sha


_memo: FileHashMemo | None = None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, through the process-wide memo."""
    global _memo
    if _memo is None or _memo.db_path != cache_home() / "file-hashes.sqlite":
        _memo = FileHashMemo()
    return _memo.sha256(path)
