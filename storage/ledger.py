"""The ledger of verified files: which part files were hashed and found as their manifest says, so that a
second query over the same artifacts does not hash them again.

One SQLite table under the root (`<root>/verified.sqlite`): a file's path relative to the root, its size,
mtime (ns) and inode when it was hashed, and the sha256 it had. A file counts as verified when its `stat` still
shows the same size, mtime and inode and the recorded hash is the one its manifest expects; any change (a
rewrite, a copy, a moved root, a touched file) makes it hash again. What the ledger cannot see is a change
that keeps size, mtime and inode (a flipped bit on the disk, or an edit followed by resetting the mtime):
`opd verify` never uses the ledger and rehashes every byte. Each row is sealed (storage/seal.py: an HMAC of the
row under the key outside the root), so a row written by anyone else, claiming a replaced file verified, is
ignored and the file hashed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)

LEDGER_FILE = "verified.sqlite"


class VerifiedLedger:
    """The ledger under `root`. Safe to share between threads (one connection, one lock). A ledger file that is
    not a database (damaged, or replaced) is no help but no harm: every file is hashed, with one warning."""

    def __init__(self, root: Path):
        self.root = root
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._broken = False

    def _con(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.root / LEDGER_FILE, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            # `sealed`: the rows with their seal (a ledger from before seals kept `verified`, now unread)
            self._db.execute("CREATE TABLE IF NOT EXISTS sealed(path TEXT PRIMARY KEY, size INTEGER, "
                             "mtime_ns INTEGER, inode INTEGER, sha256 TEXT, seal TEXT)")
        return self._db

    def _run(self, sql: str, args: tuple) -> list[tuple]:
        if self._broken:
            return []
        with self._lock:
            try:
                return self._con().execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:  # busy, locked, read-only: this call goes without the ledger
                log.debug("the ledger %s is unavailable now (%s)", self.root / LEDGER_FILE, e)
                return []
            except sqlite3.Error as e:
                self._broken = True
                log.warning("the ledger of verified files %s is not a usable database (%s): every file is hashed "
                            "in full", self.root / LEDGER_FILE, e)
                return []

    def __getstate__(self) -> dict:  # a store sent to another process opens its own connection there
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    @staticmethod
    def _seal(key: str, size: int, mtime_ns: int, inode: int, sha256: str) -> str:
        from storage import seal

        return seal.mac(f"ledger/{key}/{size}/{mtime_ns}/{inode}/{sha256}")

    def known(self, path: Path, sha256: str) -> bool:
        """Whether `path` was hashed to `sha256` and has not changed since (by size, mtime and inode)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = self._key(path)
        rows = self._run("SELECT size, mtime_ns, inode, sha256, seal FROM sealed WHERE path = ?", (key,))
        if not rows or rows[0][:4] != (st.st_size, st.st_mtime_ns, st.st_ino, sha256):
            return False
        import hmac

        return hmac.compare_digest(str(rows[0][4]), self._seal(key, st.st_size, st.st_mtime_ns, st.st_ino, sha256))

    def add(self, path: Path, sha256: str, st: os.stat_result) -> None:
        """Record that `path`, as `st` describes it (taken before hashing), hashes to `sha256`."""
        key = self._key(path)
        self._run("INSERT OR REPLACE INTO sealed VALUES (?, ?, ?, ?, ?, ?)",
                  (key, st.st_size, st.st_mtime_ns, st.st_ino, sha256,
                   self._seal(key, st.st_size, st.st_mtime_ns, st.st_ino, sha256)))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
