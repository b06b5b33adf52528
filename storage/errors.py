"""The project's error hierarchy (DESIGN.md section 8).

It lives in `storage`, the lowest layer, so that every layer can raise and catch the same classes;
`opd_tasks.errors` re-exports it. Messages name the file, field and what was expected.
"""

from __future__ import annotations


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
