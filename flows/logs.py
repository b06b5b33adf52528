"""What a command's terminal shows of Prefect's logs.

An expected failure (an `OpdError` that is not retried: a gate that stops an iteration, a config, data, model or
artifact error) ends the command with one `error:` line naming its cause (flows/cli/app.py, `fail`). Prefect also
logs it where it is raised, with its traceback: 30 lines of the engine's frames above that line, which say nothing
the message does not. So the terminal's Prefect handler prints such a record's message without the traceback; the
record keeps it for Prefect's API log (the UI shows it), and `OPD_DEBUG=1` prints it on the terminal too. Any
other exception (a bug, a transient error) keeps its traceback everywhere.
"""

from __future__ import annotations

import logging
import os

from opd_tasks.errors import OpdError


def _expected(record: logging.LogRecord) -> bool:
    err = record.exc_info[1] if record.exc_info else None
    return isinstance(err, OpdError) and not err.retryable


def terse_expected_failures() -> None:
    """Make the terminal's Prefect handlers print an expected failure's record without its traceback (the module
    docstring). Idempotent; a no-op with OPD_DEBUG set or before Prefect set up its logging."""
    if os.environ.get("OPD_DEBUG"):
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                     if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}:
        if getattr(handler, "_opd_terse", False):
            continue
        full = handler.format

        def format(record: logging.LogRecord, full=full) -> str:
            if not _expected(record):
                return full(record)
            saved = record.exc_info, record.exc_text
            record.exc_info = record.exc_text = None  # for this handler only: restored for the API log's
            try:
                return full(record)
            finally:
                record.exc_info, record.exc_text = saved

        handler.format = format
        handler._opd_terse = True
