"""Test-session isolation: Prefect state and the OPD storage root live under a temp dir, never in ~."""

from __future__ import annotations

import os
import tempfile

_session_tmp = tempfile.mkdtemp(prefix="opd-tests-")
os.environ["PREFECT_HOME"] = os.path.join(_session_tmp, "prefect-home")
os.environ["OPD_HOME"] = os.path.join(_session_tmp, "opd-home")
os.environ["OPD_SEAL_KEY_FILE"] = os.path.join(_session_tmp, "seal.key")  # never the user's own key
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ.pop("OPD_REMOTE", None)  # a developer's remote mirror must not leak into tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads on a shared 2-core CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Each test's command gets a temporary Prefect server of its own (flows/server.py), not the shared one that would
# outlive it; tests of the shared server set the variable themselves.
os.environ["OPD_SERVER_IDLE_MINUTES"] = "0"

# Prefect binds its console log handler to whatever sys.stderr is when it first sets up logging (lazily, on first
# use). Set it up now, so that a CLI test cannot be that first use: typer's CliRunner swaps sys.stderr for a buffer
# it closes afterwards, and every later Prefect log line would then fail with "I/O operation on closed file".
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()
