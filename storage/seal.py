"""The seal on the store's records: a keyed MAC whose key lives outside the storage root.

When the store publishes an artifact it records the manifest's sha256 under `<root>/published/<stage>/<key>`
(storage/store.py). Someone who can write the root could rewrite an artifact, its manifest and that record
consistently; a check against the record alone would then adopt the rewrite. So the record also carries
HMAC-SHA256(key, "<stage>/<key>/<sha256>") under a secret key kept outside the root, and a cache hit is adopted
only when the seal verifies: a record without one (a root written before seals, a record rewritten, another
machine's) is no record, and the artifact is recomputed, never adopted (`opd verify` names it).

The key: the file `$OPD_SEAL_KEY_FILE`, default `$XDG_CONFIG_HOME/opd/seal.key` (`~/.config/opd/seal.key`),
32 random bytes made on first use, readable by this user only. It is the one file opd writes outside the root
and the user's named outputs. Processes that share a root share the key through that file; to use a root on
another machine (or as another user) as a cache, give it the same key file, or its artifacts are recomputed
there. What the seal cannot stop: someone who can read the key file (this user), and someone who deletes
artifacts (a miss: they are recomputed).

A root remembers which key sealed it: `<root>/seal.id` holds the MAC of a fixed text under that key
(`check_root`). A process whose key is another (a pod that shares the root but not the key file) is refused with
one error naming `OPD_SEAL_KEY_FILE`, instead of retiring every artifact the others sealed. To re-seal a root on
purpose (a new key), remove `seal.id`: its artifacts are then recomputed once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path

from storage.errors import ConfigError

KEY_ENV = "OPD_SEAL_KEY_FILE"
_KEY_BYTES = 32
_cache: dict[Path, bytes] = {}
_lock = threading.Lock()


def key_file() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "opd" / "seal.key"


def _key() -> bytes:
    """The key, made on first use (atomically: two processes starting at once end with the same key)."""
    path = key_file()
    with _lock:
        if path in _cache:
            return _cache[path]
        try:
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(_KEY_BYTES))
                try:
                    os.link(tmp, path)  # fails if another process made it first: theirs is the key
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink(missing_ok=True)
            key = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"the store's seal key {path} cannot be made or read ({e.strerror}); set {KEY_ENV} "
                              "to a file this user can write (docs/operations.md, \"Trust\")") from e
        if len(key) < 16:
            raise ConfigError(f"the store's seal key {path} holds {len(key)} bytes, not a key; remove it (a new one "
                              "is made, and the root's artifacts are recomputed once) or restore it")
        _cache[path] = key
        return key


ROOT_ID = "seal.id"
_checked_roots: set[Path] = set()


def mac(text: str) -> str:
    """HMAC-SHA256 of `text` under the key (hex)."""
    return hmac.new(_key(), text.encode(), hashlib.sha256).hexdigest()


def check_root(root: Path) -> None:
    """ConfigError when `root` was sealed with another key than this process's (`<root>/seal.id`); a root without
    one gets this key's. Checked once per root and process."""
    root = root.resolve()
    if root in _checked_roots:
        return
    ident, want = root / ROOT_ID, mac("opd storage root")
    try:
        if not ident.is_file():
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".{ROOT_ID}.{os.getpid()}.tmp"
            tmp.write_text(want + "\n")
            try:
                os.link(tmp, ident)  # the first process to seal the root decides
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        have = ident.read_text(errors="replace").strip()
    except OSError as e:
        raise ConfigError(f"cannot read or write {ident} ({e.strerror or e})") from e
    if not hmac.compare_digest(have, want):
        raise ConfigError(f"the storage root {root} was sealed with another key than this process's "
                          f"({key_file()}): point {KEY_ENV} at the key the root's other users have (a pod that shares "
                          f"the root needs the same key file), or, to re-seal the root with this key and recompute "
                          f"its artifacts once, remove {ident}")
    _checked_roots.add(root)


def seal(stage: str, key: str, sha256: str) -> str:
    """The seal of the record "(stage, key) published the manifest with this sha256"."""
    return mac(f"{stage}/{key}/{sha256}")


def sealed(stage: str, key: str, sha256: str, mac: str) -> bool:
    return hmac.compare_digest(seal(stage, key, sha256), mac)
