"""flows/server.py without a real server: the API a command uses, and a clear error when the temporary server cannot
start (the real start and the parent-death behaviour: tests/e2e/test_server_lifetime_slow.py)."""

from __future__ import annotations

import errno

import pytest

import flows.server
from opd_tasks.errors import TransientError


class _Unstartable:
    stopped = False

    def start(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def stop(self) -> None:
        _Unstartable.stopped = True


def test_a_server_that_cannot_start_is_a_clear_error(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(flows.server, "_tied_server", _Unstartable)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(TransientError, match=r"did not start \(OSError: .*No space left.*PREFECT_HOME .*writable"):
            with flows.server.prefect_api():
                pytest.fail("the body must not run")
    assert _Unstartable.stopped


def test_a_configured_api_is_used_and_nothing_is_started(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(flows.server, "_tied_server", lambda: pytest.fail("no server may start"))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        with flows.server.prefect_api() as url:
            assert url == "http://127.0.0.1:1/api"
