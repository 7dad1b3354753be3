"""Hostile input at every door: deep JSON in a control request, a manifest and a takeover
message; control characters in an ``s3://`` URL; a takeover peer naming impossible pids. Each
is one clear error, never a traceback, and nothing is left half done."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from pagefork.errors import StoreError
from pagefork.store.layout import parse_manifest, parse_s3_url
from pagefork.takeover.old import Source, TakeoverListener
from pagefork.takeover.protocol import PROTOCOL_VERSION, Channel, TakeoverError

DEEP = 100_000  # far beyond the parser's recursion limit


def _deep(depth: int = DEEP) -> bytes:
    return b"[" * depth + b"]" * depth


# --- the control API ------------------------------------------------------------------------


def test_a_deeply_nested_request_body_is_a_400_without_a_traceback(
    tmp_path: Path, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pagefork.daemon.api import ControlApi
    from pagefork.daemon.manager import ForkManager, ManagerConfig
    from pagefork.daemon.metrics import DaemonMetrics
    from pagefork.templates import TemplateRegistry

    registry = TemplateRegistry(tmp_path / "state")
    manager = ForkManager(registry, ManagerConfig(socket_dir=str(short_dir / "forks")), {})
    api = ControlApi(registry, manager, DaemonMetrics())
    try:
        bodies = [
            b'{"id": "t", "kind": "kvm", "x": ' + _deep() + b"}",
            b'{"template": "t", "options": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}",
        ]
        for path, body in (("/templates", bodies[0]), ("/forks", bodies[1])):
            with caplog.at_level(logging.DEBUG, logger="pagefork"):
                response = api.handle("POST", path, body)
            assert response.status == 400, response.body
            assert b"nested" in response.body
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert registry.listing().templates == []
    finally:
        manager.close()


# --- object storage -------------------------------------------------------------------------


def test_a_deeply_nested_manifest_is_a_store_error() -> None:
    with pytest.raises(StoreError, match=r"^manifest s3://b/t: not a manifest \(JSON nested too"):
        parse_manifest(_deep(), "s3://b/t")


@pytest.mark.parametrize("url", ["s3://bucket/a\nb", "s3://bucket/a\tb", "s3://bucket/x\x1b[2J"])
def test_a_control_character_in_an_s3_url_is_one_line_naming_it(url: str) -> None:
    with pytest.raises(StoreError) as info:
        parse_s3_url(url)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert message == f"{url!r}: the URL holds a control character"


# --- takeover -------------------------------------------------------------------------------


class _Source(Source):
    """A source that must never be asked to hand anything over."""

    kind = "serve"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def plan(self) -> dict[str, Any]:
        return {}

    def quiesce(self, deadline: float) -> None:
        self.calls.append("quiesce")

    def release(self, deadline: float) -> None:
        self.calls.append("release")

    def export(self) -> tuple[dict[str, Any], list[int]]:
        self.calls.append("export")
        return {}, []

    def resume(self) -> None:
        self.calls.append("resume")


def test_a_deeply_nested_takeover_message_is_a_takeover_error(no_leaks: None) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    body = _deep()
    a.sendall(struct.pack("<II", len(body), 0) + body)
    receiver = Channel(b)
    with pytest.raises(TakeoverError, match="malformed message: JSON nested too deeply"):
        receiver.recv(time.monotonic() + 10, ["hello"])
    a.close()
    receiver.close()


@pytest.mark.parametrize(
    ("pids", "why"),
    [
        ([10**20], r"worker_pids\[0\] 100000000000000000000 is not a pid"),
        ([os.getpid(), -5], r"worker_pids\[1\] -5 is not a pid"),
        ([True], r"worker_pids\[0\] True is not a pid"),
        ("12", "worker_pids must be a list"),
    ],
)
def test_a_takeover_naming_impossible_worker_pids_is_refused_and_the_old_side_serves_on(
    short_dir: Path, caplog: pytest.LogCaptureFixture, pids: Any, why: str
) -> None:
    source = _Source()
    listener = TakeoverListener(str(short_dir / "t.sock"), source, lambda pid, forks: None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(short_dir / "t.sock"))
        ch = Channel(sock)
        hello = {"type": "hello", "protocol": list(PROTOCOL_VERSION), "pid": os.getpid()}
        ch.send({**hello, "version": "test", "kind": "serve"})
        ch.recv(time.monotonic() + 10, ["plan"])
        with caplog.at_level(logging.WARNING, logger="pagefork"):
            ch.send({"type": "ready", "worker_pids": pids})
            with pytest.raises(TakeoverError, match=f"the running process gave up: ready: {why}"):
                ch.recv(time.monotonic() + 10, ["state"])
            ch.close()
            listener.close()
        assert source.calls == []  # refused before anything was quiesced or released
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert any("failed" in r.getMessage() for r in caplog.records)
    finally:
        sock.close()
    json.dumps(pids)  # the case itself is JSON a peer can send
