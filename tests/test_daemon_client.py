"""The daemon client waits, briefly and boundedly, for a daemon that is starting: a verb run
right after ``pagefork daemon &`` reaches it instead of failing."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pagefork.daemon.client import DaemonClient, DaemonError

WAIT = 60.0


class _Attempts(logging.Handler):
    """Counts the client's "not up yet" records, per reason, and signals each one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.cond:
            self.reasons.append(record.getMessage())
            self.cond.notify_all()

    def wait_for(self, reason: str, timeout: float = WAIT) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(reason in r for r in self.reasons), timeout)
        assert ok, f"the client never reported waiting on {reason!r}: {self.reasons}"


@pytest.fixture
def attempts() -> Iterator[_Attempts]:
    logger = logging.getLogger("pagefork.daemon.client")
    handler = _Attempts()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _start_daemon(state: Path, control: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pagefork", "daemon", "--state-dir", str(state)]
    return subprocess.Popen(
        [*cmd, "--control", control, "--workers", "1"], stdout=subprocess.PIPE, text=True
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_a_request_waits_for_a_daemon_that_is_starting(
    tmp_path: Path, short_dir: Path, attempts: _Attempts
) -> None:
    control = str(short_dir / "control.sock")
    # First the state between a daemon's bind and its listen: the socket exists and refuses.
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.bind(control)
    got: list[Any] = []
    client = DaemonClient(control, timeout=WAIT, start_wait=WAIT)
    thread = threading.Thread(target=lambda: got.append(_call(client)))
    thread.start()
    proc = None
    try:
        attempts.wait_for("Connection refused")
        early.close()
        os.unlink(control)  # then no socket at all, until the daemon binds its own
        attempts.wait_for("No such file or directory")
        proc = _start_daemon(tmp_path / "state", control)
        thread.join(WAIT)
        assert not thread.is_alive()
        assert got == [{"templates": [], "errors": []}]
    finally:
        early.close()
        thread.join(WAIT)
        if proc is not None:
            _stop(proc)


def _call(client: DaemonClient) -> object:
    try:
        return client.templates()
    except DaemonError as exc:
        return exc


@pytest.mark.parametrize("start_wait", [0.0, 0.3])
def test_no_daemon_is_a_clear_error_once_the_wait_is_over(
    short_dir: Path, start_wait: float
) -> None:
    control = str(short_dir / "none.sock")
    begun = time.monotonic()
    with pytest.raises(DaemonError) as info:
        DaemonClient(control, start_wait=start_wait).forks()
    assert time.monotonic() - begun >= start_wait
    message = str(info.value)
    assert message.startswith(f"cannot reach the daemon at {control}: No such file or directory")
    if start_wait:
        assert message.endswith(f"(no daemon came up within {start_wait:g} s)")
    else:
        assert "came up" not in message


def test_a_path_that_is_not_a_socket_fails_at_once(tmp_path: Path) -> None:
    """Only a daemon that is starting is waited for: a regular file in its place is not one."""
    path = tmp_path / "file"
    path.write_text("")
    begun = time.monotonic()
    with pytest.raises(DaemonError, match=f"cannot reach the daemon at {path}: not a socket$"):
        DaemonClient(str(path), start_wait=WAIT).forks()
    assert time.monotonic() - begun < WAIT
