"""A remote mirror of the artifact store on any fsspec file system (s3://, gs://, file://, memory://, ...).

The local root stays the working copy (DuckDB, pyarrow and transformers read local files); the remote is where
pods on different machines meet. Object stores have no directory rename, so the remote uses a
write-then-commit-marker protocol instead of the local store's atomic rename:

```
<remote>/artifacts/<stage>/<key>/_manifest.json        the commit marker, written last, never overwritten
<remote>/artifacts/<stage>/<key>/<manifest sha256>/...  the artifact's files, under the hash of its manifest
<remote>/artifacts/<stage>/<key>/<manifest sha256>/_seal  the seal of "(stage, key) published this manifest"
<remote>/retired/<stage>/<key>-<time>-<rand>/_manifest.json   a manifest moved aside by `retire` (--refresh, or a
                                                              copy that a pull found damaged or unsealed)
```

- Push: upload every file and the seal under `<key>/<manifest sha256>/`, then write the manifest. A push cut off
  before the manifest leaves only unreferenced files: readers see no artifact.
- Pull: read the manifest, check its seal against this machine's key (storage/seal.py: machines that share a
  remote share the key file), download the files it lists into a local temp dir, check every size and sha256,
  then publish locally with the local store's atomic rename (`ArtifactStore.lookup` does this). A copy that
  fails (rewritten consistently, unsealed, damaged) is retired on the remote and recomputed, so that it neither
  blocks the run nor comes back.
- Files live under the manifest's hash, so two writers that race on one key with different bytes never
  overwrite each other's files, and a reader always gets the files its manifest names.

I/O failures talking to the remote raise `TransientError` (retried by the flow); an unsafe manifest raises
`ArtifactError` (not retried). Only JSON is read (no pickle).
Credentials come from the file system's own mechanisms (e.g. AWS_* variables, ~/.aws,
GOOGLE_APPLICATION_CREDENTIALS, fsspec's FSSPEC_<PROTOCOL>_<KEY> variables); a URI holding a password is
refused, and URIs are shown with any user info masked.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage.errors import ArtifactError, ConfigError, TransientError
from storage.layout import MANIFEST

#: The seal file beside an artifact's files on the remote (storage/seal.py).
SEAL_FILE = "_seal"

_URI = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$")

#: The schemes a remote may use: file systems an artifact can be written to and read back (object stores, a
#: mounted path, memory for tests). Others fsspec knows are refused at config load, before anything reaches the
#: network: read-only ones (http, https, hf, github, zip) cannot hold a push, and each would be a lookup for nothing.
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oci", "oss", "hdfs", "webhdfs", "dbfs",
                  "file", "local", "memory", "sftp", "ssh", "ftp")


def redact(uri: str) -> str:
    """`uri` with any user info (`user:password@`) masked, for messages and logs."""
    if not isinstance(uri, str):
        return uri
    m = _URI.match(uri)
    prefix, rest = (f"{m.group(1)}://", m.group(2)) if m else ("", uri)
    host, sep, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    return f"{prefix}{host}{sep}{path}"


def check_remote_uri(uri: str) -> str:
    """Validate a remote URI (`scheme://...` of a protocol fsspec knows); returns it without a trailing '/'.

    Does not import the protocol's package: that is checked when a store opens the remote.
    """
    import fsspec

    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"remote {uri!r} must be a non-empty fsspec URI such as s3://bucket/prefix")
    uri = uri.strip()
    m = _URI.match(uri)
    if not m or "::" in uri:
        raise ConfigError(
            f"remote {redact(uri)!r} is not a plain fsspec URI: use scheme://location, e.g. s3://bucket/opd, "
            "gs://bucket/opd or file:///mnt/shared/opd (chained URIs with '::' are not supported)"
        )
    scheme = m.group(1)
    if scheme not in fsspec.available_protocols():
        raise ConfigError(
            f"remote {redact(uri)!r}: fsspec knows no scheme {scheme!r} (known: s3, gs, gcs, abfs, file, memory, ...)"
        )
    try:
        has_password = urlsplit(uri).password is not None
    except ValueError:
        has_password = False
    if has_password:
        raise ConfigError(
            f"remote {redact(uri)!r} embeds a password; pass credentials the file system's usual way instead "
            "(environment variables such as AWS_ACCESS_KEY_ID, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, "
            "or fsspec config)"
        )
    if scheme not in REMOTE_SCHEMES:
        raise ConfigError(f"remote {redact(uri)!r}: scheme {scheme!r} is not one a remote mirror can use (it must "
                          f"be written to and read back): use one of {', '.join(REMOTE_SCHEMES)}")
    stripped = uri.rstrip("/")
    return uri if stripped.endswith(":") else stripped  # "s3://b/p/" -> "s3://b/p"; "file:///" stays whole


def default_remote() -> str | None:
    """$OPD_REMOTE if set and non-empty (validated), else None."""
    env = os.environ.get("OPD_REMOTE", "").strip()
    if not env:
        return None
    try:
        return check_remote_uri(env)
    except ConfigError as e:
        raise ConfigError(f"OPD_REMOTE: {e}") from None


def _package_of(scheme: str) -> str:
    from fsspec.registry import known_implementations

    cls = known_implementations.get(scheme, {}).get("class", "")
    return cls.split(".", 1)[0] if cls else f"the fsspec implementation of {scheme!r}"


def check_rel_path(rel: Any, where: str) -> str:
    """A manifest file path must stay inside its artifact: relative, POSIX, no '..', not the manifest."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (
        not parts
        or rel.startswith("/")
        or "\\" in rel
        or any(p in ("", ".", "..") for p in parts)
        or rel == MANIFEST
    ):
        raise ArtifactError(f"{where}: file path {rel!r} is not a safe relative path; refusing to use it")
    return rel


class RemoteMirror:
    """The remote half of an `ArtifactStore` (see the module docstring for the protocol)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        import fsspec

        self.uri = check_remote_uri(uri)
        scheme = _URI.match(self.uri).group(1)
        try:
            self.fs, base = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except ImportError as e:
            pkg = _package_of(scheme)
            raise ConfigError(
                f"remote {redact(self.uri)!r}: scheme {scheme!r} needs the package {pkg!r}, which is not installed "
                f"(pip install {pkg}); fsspec says: {e}"
            ) from None
        except ValueError as e:
            raise ConfigError(f"remote {redact(self.uri)!r}: fsspec cannot open it: {e}") from None
        self.base = base.rstrip("/") if base.rstrip("/") else base
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def __repr__(self) -> str:
        return f"RemoteMirror({redact(self.uri)!r})"

    # -- names ----------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts]) if self.base not in ("", "/") else "/" + "/".join(parts)

    def artifact_path(self, stage: str, key: str) -> str:
        return self._path("artifacts", stage, key)

    def manifest_path(self, stage: str, key: str) -> str:
        return f"{self.artifact_path(stage, key)}/{MANIFEST}"

    def file_path(self, stage: str, key: str, sha256: str, rel: str) -> str:
        return f"{self.artifact_path(stage, key)}/{sha256}/{rel}"

    def display(self, path: str) -> str:
        """A path on the remote as a URI for messages (user info masked)."""
        rel = path[len(self.base.rstrip("/")):].lstrip("/") if path.startswith(self.base.rstrip("/")) else path
        scheme, _, rest = redact(self.uri).partition("://")
        return f"{scheme}://{rest.rstrip('/')}/{rel}"

    # -- reading --------------------------------------------------------------------------------------
    def manifest_bytes(self, stage: str, key: str) -> bytes | None:
        """The committed manifest of (stage, key), or None when there is none (no artifact, or a cut-off push)."""
        path = self.manifest_path(stage, key)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransientError(f"cannot read {self.display(path)}: {e}") from e

    def seal_text(self, stage: str, key: str, sha256: str) -> str | None:
        """The seal uploaded with the manifest of hash `sha256`, or None when there is none (an older push)."""
        path = self.file_path(stage, key, sha256, SEAL_FILE)
        try:
            return self.fs.cat_file(path).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransientError(f"cannot read {self.display(path)}: {e}") from e

    def has_manifest(self, stage: str, key: str) -> bool:
        path = self.manifest_path(stage, key)
        try:
            return bool(self.fs.exists(path))
        except OSError as e:
            raise TransientError(f"cannot reach {self.display(path)}: {e}") from e

    def download(self, stage: str, key: str, sha256: str, rels: list[str], dest: Path) -> None:
        """Copy the artifact's files (as named by its manifest) into local directory `dest`."""
        rpaths = [self.file_path(stage, key, sha256, r) for r in rels]
        lpaths = [str(dest / r) for r in rels]
        for d in {os.path.dirname(p) for p in lpaths}:
            os.makedirs(d, exist_ok=True)
        try:
            self.fs.get(rpaths, lpaths)
        except FileNotFoundError as e:
            raise ArtifactError(
                f"artifact {stage}/{key} on {redact(self.uri)}: a file its manifest lists is missing ({e})"
            ) from None
        except OSError as e:
            raise TransientError(f"artifact {stage}/{key}: cannot download from {redact(self.uri)}: {e}") from e

    # -- writing --------------------------------------------------------------------------------------
    def upload(self, stage: str, key: str, sha256: str, src: Path, rels: Iterable[str], manifest: bytes,
               seal: str) -> None:
        """Upload the files and the seal, then the manifest (the commit marker). The caller checked that no
        manifest exists."""
        rels = list(rels)
        rpaths = [self.file_path(stage, key, sha256, r) for r in rels]
        spath = self.file_path(stage, key, sha256, SEAL_FILE)
        try:
            if self._local:  # object stores have no directories (and s3fs.makedirs may create a bucket)
                for d in sorted({self.fs._parent(p) for p in [*rpaths, spath, self.manifest_path(stage, key)]}):
                    self.fs.makedirs(d, exist_ok=True)
            if rpaths:
                self.fs.put([str(src / r) for r in rels], rpaths)
            self.fs.pipe_file(spath, seal.encode())
            if self.has_manifest(stage, key):  # someone committed meanwhile: the caller compares
                return
            mpath = self.manifest_path(stage, key)
            if self._local:  # a POSIX target: write aside, then link: no half-written manifest, never replaced
                tmp = f"{mpath}.tmp-{uuid.uuid4().hex[:8]}"
                self.fs.pipe_file(tmp, manifest)
                try:
                    os.link(self.fs._strip_protocol(tmp), self.fs._strip_protocol(mpath))
                except FileExistsError:
                    pass  # someone committed meanwhile: the caller compares
                finally:
                    self.fs.rm_file(tmp)
            else:  # an object PUT appears whole or not at all
                self.fs.pipe_file(mpath, manifest)
        except OSError as e:
            raise TransientError(
                f"artifact {stage}/{key}: upload to {redact(self.uri)} failed ({e}); no manifest was written, so "
                "the remote copy is ignored by readers and the next lookup of this key uploads it again"
            ) from e

    def retire(self, stage: str, key: str, stamp: str) -> str | None:
        """Move the manifest to `<remote>/retired/...`, so readers stop seeing the artifact; files stay put."""
        data = self.manifest_bytes(stage, key)
        if data is None:
            return None
        dest = self._path("retired", stage, f"{key}-{stamp}", MANIFEST)
        try:
            if self._local:
                self.fs.makedirs(self.fs._parent(dest), exist_ok=True)
            self.fs.pipe_file(dest, data)
            self.fs.rm_file(self.manifest_path(stage, key))
        except OSError as e:
            raise TransientError(f"cannot retire {self.display(self.manifest_path(stage, key))}: {e}") from e
        return self.display(dest)
