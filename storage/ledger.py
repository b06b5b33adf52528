"""The ledger of verified files: which part files were hashed and found as their manifest says, so that a
second query over the same artifacts does not hash them again.

One SQLite table under the root (`<root>/verified.sqlite`): a file's path relative to the root, its size,
mtime (ns) and inode when it was hashed, and the sha256 it had. A file counts as verified when its `stat` still
shows the same size, mtime and inode and the recorded hash is the one its manifest expects; any change (a
rewrite, a copy, a moved root, a touched file) makes it hash again. What the ledger cannot see is a change
that keeps size, mtime and inode (a flipped bit on the disk, or an edit followed by resetting the mtime):
`opd verify` never uses the ledger and rehashes every byte.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

LEDGER_FILE = "verified.sqlite"


class VerifiedLedger:
    def __init__(self, root: Path):
        self.root = root
        self._db: sqlite3.Connection | None = None

    def _con(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.root / LEDGER_FILE, timeout=30, isolation_level=None)
            self._db.execute("CREATE TABLE IF NOT EXISTS verified(path TEXT PRIMARY KEY, size INTEGER, "
                             "mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")
        return self._db

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def known(self, path: Path, sha256: str) -> bool:
        """Whether `path` was hashed to `sha256` and has not changed since (by size, mtime and inode)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        row = self._con().execute("SELECT size, mtime_ns, inode, sha256 FROM verified WHERE path = ?",
                                  (self._key(path),)).fetchone()
        return row == (st.st_size, st.st_mtime_ns, st.st_ino, sha256)

    def add(self, path: Path, sha256: str, st: os.stat_result) -> None:
        """Record that `path`, as `st` describes it (taken before hashing), hashes to `sha256`."""
        self._con().execute("INSERT OR REPLACE INTO verified VALUES (?, ?, ?, ?, ?)",
                            (self._key(path), st.st_size, st.st_mtime_ns, st.st_ino, sha256))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
