"""flows/server.py without a real server: the API a command uses, and a clear error when the temporary server cannot
start (the real start and the parent-death behaviour: tests/e2e/test_server_lifetime_slow.py)."""

from __future__ import annotations

import errno

import pytest

import flows.server
from opd_tasks.errors import ConfigError, TransientError


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


def test_a_full_prefect_home_fails_at_once_not_after_the_start_timeout(monkeypatch) -> None:
    """Issue 32, class 10: with less than MIN_FREE_BYTES free (or a home that cannot be written) no server is
    started at all: the error names PREFECT_HOME before any wait."""
    import shutil
    from collections import namedtuple

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(flows.server, "_tied_server", lambda *a: pytest.fail("a server was started"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 5 << 20))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(TransientError, match=r"PREFECT_HOME \(.*\) has 5 MiB free, under the 64 MiB"):
            with flows.server.prefect_api():
                pytest.fail("the body must not run")


def test_a_configured_api_is_used_and_nothing_is_started(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(flows.server, "_tied_server", lambda: pytest.fail("no server may start"))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        with flows.server.prefect_api() as url:
            assert url == "http://127.0.0.1:1/api"


@pytest.mark.parametrize("raw", ["soon", "-1", "inf", "nan"])
def test_a_bad_idle_time_names_the_variable(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("OPD_SERVER_IDLE_MINUTES", raw)
    with pytest.raises(ConfigError, match=rf"OPD_SERVER_IDLE_MINUTES='{raw}': expected a number of minutes >= 0"):
        flows.server.idle_minutes()


def test_the_idle_time_defaults_and_parses(monkeypatch) -> None:
    monkeypatch.delenv("OPD_SERVER_IDLE_MINUTES", raising=False)
    assert flows.server.idle_minutes() == flows.server.DEFAULT_IDLE_MINUTES
    monkeypatch.setenv("OPD_SERVER_IDLE_MINUTES", " 2.5 ")
    assert flows.server.idle_minutes() == 2.5


def test_an_unreadable_or_partial_state_file_is_no_server(tmp_path) -> None:
    files = flows.server.SharedServerFiles(tmp_path)
    assert flows.server.read_state(files) is None
    files.state.write_text('{"url": "http://127.0.0.1:1/api"')  # cut short
    assert flows.server.read_state(files) is None
    files.state.write_text('{"url": "http://127.0.0.1:1/api", "pid": 1}')  # no Prefect version
    assert flows.server.read_state(files) is None
    files.state.write_text('{"url": "http://127.0.0.1:1/api", "pid": 1, "prefect": "3.9.1"}')  # an older opd's
    assert flows.server.read_state(files) is None
    files.state.write_text('{"url": "http://127.0.0.1:1/api", "pid": "1", "prefect": "3.9.1", "token": "t"}')
    assert flows.server.read_state(files) is None
    files.state.write_text('{"url": "http://127.0.0.1:1/api", "pid": 1, "prefect": "3.9.1", "token": "t"}')
    assert flows.server.read_state(files)["pid"] == 1
    assert not flows.server.server_is_ours(flows.server.read_state(files))  # pid 1 is no supervisor of ours
