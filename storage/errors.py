"""The project's error hierarchy (DESIGN.md section 8).

It lives in `storage`, the lowest layer, so that every layer can raise and catch the same classes;
`opd_tasks.errors` re-exports it. Messages name the file, field and what was expected.
"""

from __future__ import annotations

import errno
import os
import re

#: errnos that mean "no room": the disk is full, a quota is reached, a file-size limit (ulimit -f) is hit.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OpdError(Exception):
    """Base class of every error this project raises on purpose."""

    #: Whether retrying the same call can succeed. Prefect tasks do not retry errors where this is False.
    retryable: bool = True


class ConfigError(OpdError):
    """A configuration value is missing, unknown, of the wrong type or out of range. Never retried."""

    retryable = False


class DataError(OpdError):
    """Input data (a dataset, a prompt, a table) is missing, empty or malformed. Never retried."""

    retryable = False


class ModelError(OpdError):
    """A model or tokenizer cannot be loaded or does not fit the job (e.g. tokenizer mismatch)."""

    retryable = False


class ArtifactError(OpdError):
    """An artifact is missing, corrupted (hash mismatch) or has the wrong schema."""

    retryable = False


class TransientError(OpdError):
    """A failure that may go away on retry (e.g. an injected fault, a flaky device)."""

    retryable = True


class TrainingError(OpdError):
    """Training diverged (NaN/inf loss or gradient). The previous checkpoint stays the latest. Not retried."""

    retryable = False


class DiskFullError(ArtifactError):
    """No room to write (disk full, quota, file-size limit). Nothing half-written is published. Not retried: free
    space and rerun (finished stages are cache hits)."""

    @classmethod
    def wrap(cls, e: BaseException, doing: str) -> DiskFullError | None:
        """The disk-full error for `e` raised while `doing` (e.g. "writing run.json"), else None. `e` is an OSError,
        or an error of a library that reports the OS error in its message (safetensors: "... (os error 28)")."""
        code = getattr(e, "errno", None)
        if code is None and (m := re.search(r"os error (\d+)", str(e))):
            code = int(m.group(1))
        if code not in DISK_FULL:
            return None
        where = getattr(e, "filename", None)
        return cls(f"disk full while {doing} ({os.strerror(code)}{': ' + str(where) if where else ''}): free space, "
                   "or raise the quota or file-size limit, and rerun")
