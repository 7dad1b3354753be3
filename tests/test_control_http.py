"""The control API's HTTP layer and client against hostile peers and careless operators.

Malformed requests go through raw sockets to a real :class:`ControlServer` (a real registry
and fork manager behind it), and what the request would have done is checked to not have
happened. Bursts and the CLI go through the real client, one burst to a ``pagefork daemon``
process.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pagefork.cli import main
from pagefork.daemon.api import ControlApi, ControlServer
from pagefork.daemon.client import DaemonClient, DaemonError, connect_unix
from pagefork.daemon.httpserver import Response, ServerLimits
from pagefork.daemon.manager import ForkManager, ManagerConfig
from pagefork.daemon.metrics import DaemonMetrics
from pagefork.errors import PageforkError
from pagefork.templates import TemplateRegistry

#: Bound on every wait in these tests; none is expected to come near it.
WAIT = 30.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Control:
    """A running control server and what is behind it."""

    server: ControlServer
    registry: TemplateRegistry
    manager: ForkManager
    path: str
    snapshot: dict[str, str]  # the fields of a valid firecracker template

    def client(self) -> DaemonClient:
        return DaemonClient(self.path, timeout=WAIT)


StartControl = Callable[..., Control]


@pytest.fixture
def start_control(no_leaks: None, tmp_path: Path, short_dir: Path) -> Iterator[StartControl]:
    """Start a control server with the given limits, serving on a thread; closed at the end."""
    started: list[tuple[Control, threading.Thread]] = []
    mem = tmp_path / "mem"
    mem.write_bytes(bytes(8192))
    (tmp_path / "snap").write_bytes(b"state")
    snapshot = {"mem_file": str(mem), "snapshot_path": str(tmp_path / "snap")}

    def start(wrap: Callable[[ControlApi], Any] | None = None, **limits: Any) -> Control:
        registry = TemplateRegistry(tmp_path / "state")
        (short_dir / "forks").mkdir(exist_ok=True)
        manager = ForkManager(registry, ManagerConfig(socket_dir=str(short_dir / "forks")), {})
        api = ControlApi(registry, manager, DaemonMetrics())
        path = str(short_dir / "control.sock")
        server = ControlServer(path, api, ServerLimits(**limits))
        if wrap is not None:
            server.handler = wrap(api)
        thread = threading.Thread(target=server.serve_forever, name="test-control")
        thread.start()
        control = Control(server, registry, manager, path, snapshot)
        started.append((control, thread))
        return control

    yield start
    for control, thread in started:
        control.server.shutdown()
        thread.join()
        control.server.server_close()
        control.manager.close()


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(WAIT)
    sock.connect(path)
    return sock


def _read_answer(sock: socket.socket, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer from ``sock``: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = 0 if head_only else int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside an answer"
        body += chunk
    assert len(body) == length, f"more bytes than the answer's length: {body!r}"
    return int(status_line.split()[1]), headers, body


def _exchange(path: str, data: bytes, half_close: bool = False) -> tuple[int, dict[str, Any]]:
    """Send raw bytes on a fresh connection; the status and JSON body of the one answer."""
    with _connect(path) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        status, headers, body = _read_answer(sock)
    assert headers["content-type"] == "application/json", headers
    return status, json.loads(body)


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed ``sock`` (EOF, or a reset after its answer)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _fc_body(control: Control, template_id: str) -> bytes:
    return json.dumps({"id": template_id, "kind": "firecracker", **control.snapshot}).encode()


def _post_head(path: str, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{extra}".encode()


# --- framing: nothing is executed unless the whole request arrived, framed once -------------


def test_a_truncated_body_then_half_close_is_refused_and_not_executed(
    start_control: StartControl,
) -> None:
    control = start_control()
    body = _fc_body(control, "t")
    head = _post_head("/templates", f"Content-Length: {len(body) + 40}\r\n\r\n")
    status, doc = _exchange(control.path, head + body, half_close=True)
    assert status == 400
    assert f"received {len(body)} bytes, expected {len(body) + 40}" in doc["error"]
    assert not control.registry.exists("t")
    # The same body, whole, creates it: the refusal was the truncation.
    whole = _post_head("/templates", f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    assert _exchange(control.path, whole + body)[0] == 201
    assert control.registry.exists("t")


def test_a_chunked_body_is_decoded_and_its_bytes_are_not_a_next_request(
    start_control: StartControl,
) -> None:
    control = start_control()
    body = _fc_body(control, "chunky")
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    request = _post_head("/templates", "Transfer-Encoding: chunked\r\n\r\n") + chunks + b"0\r\n\r\n"
    following = b"GET /templates HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with _connect(control.path) as sock:
        sock.sendall(request + following)  # pipelined: the list must come second, whole
        status, _, created = _read_answer(sock)
        assert status == 201 and json.loads(created)["id"] == "chunky"
        status, _, listing = _read_answer(sock)
        assert status == 200
        assert [t["id"] for t in json.loads(listing)["templates"]] == ["chunky"]
        assert _closed_by_server(sock)  # and nothing else was answered


@pytest.mark.parametrize(
    "lengths",
    [
        "Content-Length: {n}\r\nContent-Length: {n}\r\n",
        "Content-Length: {n}\r\ncontent-length: {n}\r\n",
        "Content-Length: {n}\r\nContent-Length: 2\r\n",
        "Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=["equal", "case", "conflicting", "with-chunked"],
)
def test_a_body_framed_twice_is_refused_and_not_executed(
    start_control: StartControl, lengths: str
) -> None:
    control = start_control()
    body = _fc_body(control, "twice")
    head = _post_head("/templates", lengths.format(n=len(body)) + "\r\n")
    status, doc = _exchange(control.path, head + body)
    assert status == 400
    assert any(
        why in doc["error"]
        for why in ("duplicate Content-Length", "conflicting Content-Length", "Transfer-Encoding")
    ), doc
    assert not control.registry.exists("twice")


def test_an_oversized_body_is_refused_before_it_is_read(start_control: StartControl) -> None:
    control = start_control(max_body=1024)
    status, doc = _exchange(control.path, _post_head("/templates", "Content-Length: 5000\r\n\r\n"))
    assert (status, doc) == (413, {"error": "request body larger than 1024 bytes"})
    chunk = b"800\r\n" + b" " * 0x800 + b"\r\n"
    chunked = _post_head("/templates", "Transfer-Encoding: chunked\r\n\r\n") + chunk
    status, doc = _exchange(control.path, chunked)
    assert status == 413 and not control.registry.listing().templates


def test_a_head_over_the_limit_is_431_however_it_arrives(start_control: StartControl) -> None:
    control = start_control()
    head = b"GET /templates HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000
    with _connect(control.path) as sock:  # in pieces: h11's own limit on a partial head
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused midway
            for at in range(0, len(head), 1000):
                sock.sendall(head[at : at + 1000])
            sock.sendall(b"\r\n\r\n")
        status, _, body = _read_answer(sock)
    assert (status, json.loads(body)) == (431, {"error": "request head larger than 16384 bytes"})


@pytest.mark.parametrize(
    "request_bytes, status, message",
    [
        (b"GET /templates HTTP/1.1\r\n\r\n", 400, "Host"),
        (b"GET /templ\x00ates HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad request"),
        (b"GET /t\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad request"),
        (b"POST /templates HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, ""),
        (b"POST /templates HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, ""),
        (
            b"GET /templates HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n",
            431,
            "request head larger than 16384 bytes",
        ),
    ],
    ids=["no-host", "nul", "raw-utf8", "gzip", "negative-length", "huge-head"],
)
def test_malformed_requests_get_a_json_error(
    start_control: StartControl, request_bytes: bytes, status: int, message: str
) -> None:
    control = start_control()
    got, doc = _exchange(control.path, request_bytes)
    assert got == status and message in doc["error"], doc


# --- methods --------------------------------------------------------------------------------


def test_head_options_and_unknown_methods_get_json_405_and_501(
    start_control: StartControl,
) -> None:
    control = start_control()
    with _connect(control.path) as sock:
        sock.sendall(b"HEAD /forks HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _read_answer(sock, head_only=True)
        assert (status, headers["allow"], body) == (405, "GET, POST", b"")
        assert headers["content-type"] == "application/json"
        # Headers only, as HTTP frames HEAD: the same connection carries the next request.
        sock.sendall(b"GET /forks HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _read_answer(sock)
        assert (status, json.loads(body)) == (200, {"forks": []})
    status, doc = _exchange(control.path, b"OPTIONS /templates/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and "OPTIONS is not allowed" in doc["error"]
    assert "allowed: GET, DELETE" in doc["error"]
    status, doc = _exchange(control.path, b"BREW /forks HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, doc) == (501, {"error": "method BREW is not implemented"})
    # The API alone answers the same without any socket.
    response = control.server.api.handle("TRACE", "/forks", b"")
    assert response.status == 405 and ("Allow", "GET, POST") in response.headers
    assert control.server.api.handle("BREW", "/forks", b"").status == 501


# --- ids in paths ---------------------------------------------------------------------------


def test_ids_are_percent_encoded_path_segments(start_control: StartControl) -> None:
    control = start_control()
    client = control.client()
    client.create_template("tmpx", "firecracker", **control.snapshot)
    for odd in ("tmpx?no-such-template", "tmpx#x", "a b", "a\nb", "tëmp", "..", "a/b", "%41"):
        with pytest.raises(DaemonError, match="unknown template") as info:
            client.delete_template(odd)
        assert info.value.status == 404 and repr(odd) in str(info.value)
        with pytest.raises(DaemonError, match="unknown fork"):
            client.fork(odd)
    assert control.registry.exists("tmpx")
    for call in (client.template, client.delete_template, client.fork, client.release_fork):
        with pytest.raises(DaemonError, match="id must not be empty"):
            call("")
    status, doc = _exchange(control.path, b"GET /templates/%ff HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and "percent-encoding is not UTF-8" in doc["error"]


def test_cli_ids_never_hit_another_template_and_errors_are_one_line(
    start_control: StartControl, capsys: pytest.CaptureFixture[str]
) -> None:
    control = start_control()
    control.client().create_template("tmpx", "firecracker", **control.snapshot)
    ctl = ["--control", control.path]
    capsys.readouterr()
    assert main(["templates", "delete", "tmpx?no-such-template", *ctl]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pagefork: error: daemon: unknown template 'tmpx?no-such-template'"]
    assert control.registry.exists("tmpx")
    for odd in ("a b", "a\nb", "tëmp"):
        for verb in (["templates", "show"], ["forks", "show"], ["forks", "delete"]):
            assert main([*verb, odd, *ctl]) == 2
            out = capsys.readouterr()
            assert out.out == "" and len(out.err.strip().splitlines()) == 1, out
            assert repr(odd) in out.err
    assert main(["templates", "show", "", *ctl]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "pagefork: error: template id must not be empty\n"


# --- connections: idle timeout, cap, concurrency, disconnects ------------------------------


def test_idle_and_slow_connections_are_closed_after_the_idle_timeout(
    start_control: StartControl,
) -> None:
    control = start_control(idle_timeout=0.3)
    with _connect(control.path) as idle, _connect(control.path) as slow:
        start = time.monotonic()
        slow.sendall(b"GET /templ")  # never finished
        assert _closed_by_server(idle) and _closed_by_server(slow)
        assert time.monotonic() - start >= 0.25
    with _connect(control.path) as kept:  # after an answer, the clock starts again
        kept.sendall(b"GET /forks HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(kept)[0] == 200
        answered = time.monotonic()
        assert _closed_by_server(kept)
        assert time.monotonic() - answered >= 0.25
    assert control.server.connections == 0


def test_connections_beyond_the_cap_wait_in_the_backlog_until_one_closes(
    start_control: StartControl,
) -> None:
    control = start_control(max_connections=2, idle_timeout=1.0)
    first, second = _connect(control.path), _connect(control.path)
    with first, second:
        for sock in (first, second):
            sock.sendall(b"GET /forks HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_answer(sock)[0] == 200  # both accepted and kept alive
        with _connect(control.path) as third:  # connects: the backlog holds it
            third.sendall(b"GET /templates HTTP/1.1\r\nHost: x\r\n\r\n")
            order: list[str] = []
            waiting = {first: "first closed", second: "second closed", third: "third answered"}
            while waiting:
                ready, _, _ = select.select(list(waiting), [], [], WAIT)
                assert ready, f"nothing happened; so far {order}"
                for sock in ready:
                    if sock is third:
                        assert _read_answer(third)[0] == 200
                    else:
                        assert _closed_by_server(sock)
                    order.append(waiting.pop(sock))
            # The third is served only once an idle one made room.
            assert order.index("third answered") > min(
                order.index("first closed"), order.index("second closed")
            )


def test_hundreds_of_idle_connections_hold_no_thread_and_lock_nobody_out(
    start_control: StartControl,
) -> None:
    control = start_control(max_connections=32, idle_timeout=0.5)
    threads_before = threading.active_count()
    idle = [_connect(control.path) for _ in range(300)]
    try:
        assert threading.active_count() == threads_before
        assert control.server.connections <= 32
        # A real client still gets through: idle peers time out and make room.
        assert control.client().forks() == []
    finally:
        for sock in idle:
            sock.close()


class PrefetchStarts:
    """Wraps the API so that a test waits for a prefetch request to start running."""

    def __init__(self) -> None:
        self._started = threading.Semaphore(0)

    def wrap(self, api: ControlApi) -> Callable[[str, str, bytes], Response]:
        def handle(method: str, target: str, body: bytes) -> Response:
            if target.endswith("/prefetch"):
                self._started.release()
            return api.handle(method, target, body)

        return handle

    def wait(self) -> None:
        assert self._started.acquire(timeout=WAIT), "no prefetch request started"


def test_a_blocking_manager_call_does_not_block_other_requests(
    start_control: StartControl,
) -> None:
    starts = PrefetchStarts()
    control = start_control(wrap=starts.wrap)
    client = control.client()
    client.create_template("t", "firecracker", **control.snapshot)
    client.create_fork("t", fork_id="f")
    with _connect(control.path) as slow:
        # Nobody connects to the fork's socket: this waits for a handshake for 3 s.
        body = b'{"timeout": 3}'
        slow.sendall(_post_head("/forks/f/prefetch", f"Content-Length: {len(body)}\r\n\r\n") + body)
        starts.wait()
        assert control.server.in_flight == 1
        assert client.templates()["templates"][0]["id"] == "t"
        assert client.fork("f")["fork"] == "f"
        assert select.select([slow], [], [], 0)[0] == []  # still waiting meanwhile
        status, _, answer = _read_answer(slow)
    assert status == 409 and "no handshake within 3s" in json.loads(answer)["error"]


def test_a_peer_that_hangs_up_before_its_answer_costs_no_traceback(
    start_control: StartControl, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    starts = PrefetchStarts()
    control = start_control(wrap=starts.wrap)
    client = control.client()
    client.create_template("t", "firecracker", **control.snapshot)
    client.create_fork("t", fork_id="f")
    caplog.set_level("DEBUG", logger="pagefork")
    capfd.readouterr()
    for _ in range(3):
        sock = _connect(control.path)
        body = b'{"timeout": 0.2}'
        sock.sendall(_post_head("/forks/f/prefetch", f"Content-Length: {len(body)}\r\n\r\n") + body)
        starts.wait()
        sock.close()  # gone before the answer is written
    assert control.server.drain(WAIT)  # every answer was tried, every connection closed
    assert control.server.in_flight == 0
    lost = [r for r in caplog.records if "answer not delivered" in r.getMessage()]
    assert len(lost) == 3 and all(r.levelname == "DEBUG" and not r.exc_info for r in lost)
    assert not [r for r in caplog.records if r.levelno >= 30 or r.exc_info]
    assert "Traceback" not in capfd.readouterr().err


def test_a_handler_bug_is_a_json_500_and_the_server_keeps_serving(
    start_control: StartControl, caplog: pytest.LogCaptureFixture
) -> None:
    def wrap(api: ControlApi) -> Callable[[str, str, bytes], Response]:
        def handle(method: str, target: str, body: bytes) -> Response:
            if target == "/boom":
                raise RuntimeError("boom")
            return api.handle(method, target, body)

        return handle

    control = start_control(wrap=wrap)
    status, doc = _exchange(control.path, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 500 and "RuntimeError('boom')" in doc["error"]
    assert control.client().forks() == []
    # The bug is in the log, with its traceback, for whoever has to fix it.
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.getMessage() == "control: GET /boom failed"


# --- stopping and handing the socket over ---------------------------------------------------


def test_stop_accepting_finishes_requests_in_flight_and_a_new_server_takes_the_socket(
    start_control: StartControl,
) -> None:
    starts = PrefetchStarts()
    control = start_control(wrap=starts.wrap)
    client = control.client()
    client.create_template("t", "firecracker", **control.snapshot)
    client.create_fork("t", fork_id="f")
    listening = control.server.socket.dup()  # what a hand-over would pass on
    with _connect(control.path) as slow:
        body = b'{"timeout": 0.5}'
        slow.sendall(_post_head("/forks/f/prefetch", f"Content-Length: {len(body)}\r\n\r\n") + body)
        starts.wait()
        control.server.stop_accepting()
        with _connect(control.path) as late:  # queued in the backlog, not taken
            late.sendall(b"GET /templates HTTP/1.1\r\nHost: x\r\n\r\n")
            assert control.server.drain(WAIT)
            status, headers, _ = _read_answer(slow)  # the request in flight was answered
            assert status == 409 and headers["connection"] == "close"
            assert select.select([late], [], [], 0)[0] == []
            successor = ControlServer.from_socket(listening, control.server.api)
            thread = threading.Thread(target=successor.serve_forever)
            thread.start()
            try:
                status, _, body_out = _read_answer(late)
                assert status == 200 and json.loads(body_out)["templates"][0]["id"] == "t"
            finally:
                successor.shutdown()
                thread.join()
                successor.server_close()


def test_from_socket_refuses_what_is_not_a_listening_unix_stream_socket(
    start_control: StartControl,
) -> None:
    control = start_control()
    unbound = socket.socket(socket.AF_UNIX)
    with unbound, pytest.raises(PageforkError, match="not listening"):
        ControlServer.from_socket(unbound, control.server.api)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with dgram, pytest.raises(PageforkError, match="not a Unix stream socket"):
        ControlServer.from_socket(dgram, control.server.api)


def test_server_limits_refuse_values_that_cannot_work() -> None:
    for bad in ({"workers": 0}, {"idle_timeout": float("inf")}, {"max_connections": -1}):
        with pytest.raises(PageforkError, match="must be positive and finite"):
            ServerLimits(**bad)


# --- bursts: the backlog fills, clients wait ------------------------------------------------


def _wait_in_connect(tid: list[int]) -> None:
    """Wait (bounded) until the thread whose id lands in ``tid`` is blocked in connect(2).

    The kernel offers no event for "a thread sleeps in a syscall", so this re-reads
    /proc/self/task/TID/syscall (x86-64 connect is 42) until it says so.
    """
    deadline = time.monotonic() + WAIT
    while True:
        if tid:
            with open(f"/proc/self/task/{tid[0]}/syscall") as f:
                if f.read().split()[0] == "42":
                    return
        assert time.monotonic() < deadline, "the client never waited in connect"
        time.sleep(0.001)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86-64 syscall numbers")
def test_a_client_waits_while_the_backlog_is_full_and_times_out_if_it_stays_full(
    start_control: StartControl, short_dir: Path
) -> None:
    control = start_control()
    path = str(short_dir / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fillers: list[socket.socket] = []
    try:
        while True:  # fill the backlog until the kernel says EAGAIN
            filler = socket.socket(socket.AF_UNIX)
            filler.setblocking(False)
            try:
                filler.connect(path)
            except BlockingIOError:
                filler.close()
                break
            fillers.append(filler)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="backlog stayed full"):
            connect_unix(path, timeout=0.3)
        assert time.monotonic() - start >= 0.29
        with pytest.raises(DaemonError, match="backlog stayed full"):
            DaemonClient(path, timeout=0.2).forks()

        tid: list[int] = []
        got: list[Any] = []
        thread = threading.Thread(
            target=lambda: (
                tid.append(threading.get_native_id()),
                got.append(DaemonClient(path, timeout=WAIT).forks()),
            )
        )
        thread.start()
        _wait_in_connect(tid)
        server = ControlServer.from_socket(listener, control.server.api)
        listener = None  # the server owns it now
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        try:
            thread.join(WAIT)
            assert got == [[]]
        finally:
            server.shutdown()
            serving.join()
            server.server_close()
    finally:
        if listener is not None:
            listener.close()
        for filler in fillers:
            filler.close()


def test_a_burst_of_200_create_fork_calls_on_tiny_limits_all_succeed(
    start_control: StartControl,
) -> None:
    peak = {"handlers": 0, "connections": 0}
    running = [0]
    lock = threading.Lock()

    def wrap(api: ControlApi) -> Callable[[str, str, bytes], Response]:
        def handle(method: str, target: str, body: bytes) -> Response:
            with lock:
                running[0] += 1
                peak["handlers"] = max(peak["handlers"], running[0])
                peak["connections"] = max(peak["connections"], control.server.connections)
            try:
                return api.handle(method, target, body)
            finally:
                with lock:
                    running[0] -= 1

        return handle

    # POST /forks may wait on a VMM: it runs on the long pool (2), the rest on the quick one (4).
    control = start_control(wrap=wrap, workers=4, long_workers=2, max_connections=8, backlog=2)
    client = control.client()
    client.create_template("t", "firecracker", **control.snapshot)
    with ThreadPoolExecutor(200) as pool:
        forks = list(pool.map(lambda i: client.create_fork("t", fork_id=f"f{i}"), range(200)))
        assert sorted(f["fork"] for f in forks) == sorted(f"f{i}" for i in range(200))
        assert len({f["socket"] for f in forks}) == 200
        released = list(pool.map(lambda f: client.release_fork(f["fork"]), forks))
    assert len(released) == 200 and client.forks() == []
    assert peak["handlers"] <= 4 + 2 and peak["connections"] <= 8, peak
    workers = [t for t in threading.enumerate() if t.name.startswith("pagefork-http")]
    assert len(workers) <= 4 + 2


def test_a_burst_of_200_create_fork_calls_on_the_daemon_all_succeed(
    tmp_path: Path, short_dir: Path
) -> None:
    control = str(short_dir / "control.sock")
    command = [sys.executable, "-m", "pagefork", "daemon", "--state-dir", str(tmp_path / "s")]
    command += ["--socket-dir", str(short_dir / "forks"), "--control", control]
    daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stderr is not None
        assert json.loads(daemon.stdout.readline())["event"] == "listening"
        client = DaemonClient(control, timeout=WAIT)
        (tmp_path / "mem").write_bytes(bytes(8192))
        (tmp_path / "snap").write_bytes(b"state")
        client.create_template(
            "t", "firecracker", mem_file=str(tmp_path / "mem"), snapshot_path=str(tmp_path / "snap")
        )
        with ThreadPoolExecutor(200) as pool:
            forks = list(pool.map(lambda _: client.create_fork("t"), range(200)))
            assert len({f["fork"] for f in forks}) == 200
            assert all(os.path.exists(f["socket"]) for f in forks)
            assert len(client.forks()) == 200
            list(pool.map(lambda f: client.release_fork(f["fork"]), forks))
        assert client.forks() == []
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=WAIT) == 0
        assert "Traceback" not in daemon.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()
        for stream in (daemon.stdout, daemon.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def test_cli_verbs_find_the_daemon_through_pagefork_control(
    start_control: StartControl,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    control = start_control()
    control.client().create_template("tmpx", "firecracker", **control.snapshot)
    monkeypatch.setenv("PAGEFORK_CONTROL", control.path)
    assert main(["templates", "list", "--json"]) == 0
    assert [t["id"] for t in json.loads(capsys.readouterr().out)["templates"]] == ["tmpx"]
    # --control wins over the environment.
    monkeypatch.setattr("pagefork.daemon.client.START_WAIT", 0.1)  # no daemon is starting
    assert main(["templates", "list", "--control", control.path + ".none"]) == 2
    assert "cannot reach the daemon at " + control.path + ".none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["forks", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--control PATH, else $PAGEFORK_CONTROL, else /run/pagefork.sock" in text


def test_expect_100_continue_gets_its_go_ahead_before_the_body(
    start_control: StartControl,
) -> None:
    control = start_control()
    body = _fc_body(control, "patient")
    with _connect(control.path) as sock:
        head = f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        sock.sendall(_post_head("/templates", head))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert not control.registry.exists("patient")
        sock.sendall(body)
        assert _read_answer(sock)[0] == 201
    assert control.registry.exists("patient")


def test_client_timeouts_must_be_positive_and_finite(tmp_path: Path) -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(DaemonError, match="client timeout must be within"):
            DaemonClient(str(tmp_path / "c.sock"), timeout=bad)


_FD_STARVED_SERVER = """
import logging, os, resource, socket, sys
from pagefork.daemon.httpserver import HttpServer, Response
logging.basicConfig(level=logging.WARNING, format="%(message)s")
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1])
sock.listen(64)
server = HttpServer(sock, lambda method, target, body: Response.json(200, {"target": target}))
open_fds = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 2, hard))
print("ready", flush=True)
server.serve_forever()
"""


def test_out_of_fds_the_server_backs_off_then_serves_everyone(short_dir: Path) -> None:
    path = str(short_dir / "starved.sock")
    server = subprocess.Popen(
        [sys.executable, "-c", _FD_STARVED_SERVER, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        assert server.stdout.readline() == "ready\n"
        client = DaemonClient(path, timeout=WAIT)
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda i: client.request("GET", f"/x{i}"), range(20)))
        assert answers == [{"target": f"/x{i}"} for i in range(20)]
    finally:
        server.terminate()
        server.wait()
    assert server.stderr is not None
    with server.stderr:
        warnings = server.stderr.read().splitlines()
    assert warnings, "the server never ran out of fds: the test proves nothing"
    assert set(warnings) == {"control: cannot accept (Too many open files); backing off"}
    assert len(warnings) <= 20  # once per episode, not once per retry
    assert server.stdout is not None
    server.stdout.close()


def test_a_wait_longer_than_the_client_timeout_gets_the_daemons_answer(
    start_control: StartControl,
) -> None:
    control = start_control()
    client = DaemonClient(control.path, timeout=0.3)
    client.create_template("t", "firecracker", **control.snapshot)
    client.create_fork("t", fork_id="f")
    # Nobody connects to the fork: the daemon gives up after 1 s, the client waits for that.
    with pytest.raises(DaemonError, match="no handshake within 1s") as info:
        client.prefetch("f", timeout=1)
    assert info.value.status == 409
    with pytest.raises(DaemonError, match="no handshake within 1s"):
        client.wait_fork("f", timeout=1)


def _mutations(seed: int, count: int) -> Iterator[bytes]:
    """Valid requests with random bytes flipped, cut, repeated or inserted (seeded)."""
    import random

    rng = random.Random(seed)
    body = b'{"template": "t", "fork": "x"}'
    valid = [
        b"GET /templates HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE /forks/f HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /forks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        b"POST /forks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    ]
    for _ in range(count):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            kind = rng.randrange(4)
            if kind == 0:
                data[at] = rng.randrange(256)
            elif kind == 1:
                del data[at:]
                if not data:
                    data = bytearray(b"G")
            elif kind == 2:
                data[at:at] = data[at : at + rng.randint(1, 40)]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        yield bytes(data)


def test_random_mutations_of_requests_get_json_or_a_close_and_never_break_the_server(
    start_control: StartControl, caplog: pytest.LogCaptureFixture
) -> None:
    control = start_control(idle_timeout=5.0)
    statuses: dict[int, int] = {}
    for data in _mutations(seed=11, count=1000):
        with _connect(control.path) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # whatever is missing never comes
            answers = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    answers += chunk
        # Each answer the server gave is an HTTP answer with a JSON body.
        while answers:
            head, sep, rest = answers.partition(b"\r\n\r\n")
            assert sep and head.startswith(b"HTTP/1.1 "), (data, answers)
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            length = int(fields[b"Content-Length"])
            assert isinstance(json.loads(rest[:length]), dict), (data, answers)
            status = int(head.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
            answers = rest[length:]
    # The mutations reach every layer: routing, the API, and h11's refusals.
    assert {200, 400, 404} <= set(statuses), statuses
    assert not [r for r in caplog.records if r.exc_info], "an internal error was logged"
    assert control.client().forks() == []


def test_requests_that_wait_on_a_vmm_never_hold_up_the_quick_ones(tmp_path: Path) -> None:
    from pagefork.daemon.api import takes_long
    from pagefork.daemon.httpserver import HttpServer
    from pagefork.server import bind_private_socket

    release = threading.Event()
    entered = threading.Semaphore(0)

    def handler(method: str, target: str, body: bytes) -> Response:
        if takes_long(method, target):
            entered.release()
            release.wait(WAIT)  # a guest that takes its time
        return Response.json(200, {"target": target})

    path = str(tmp_path / "c.sock")
    limits = ServerLimits(workers=2, long_workers=4)
    server = HttpServer(bind_private_socket(path), handler, limits, is_long=takes_long)
    runner = threading.Thread(target=server.serve_forever, daemon=True)
    runner.start()
    waits = []
    try:
        for i in range(4):  # every long thread busy, more than the quick pool has threads
            sock = _connect(path)
            request = f"POST /forks/f{i}/wait HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            sock.sendall(request.encode())
            waits.append(sock)
        for _ in range(4):
            assert entered.acquire(timeout=WAIT)
        status, answer = _exchange(path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, answer) == (200, {"target": "/metrics"})  # answered while they wait
        release.set()
        for sock in waits:
            assert _read_answer(sock)[0] == 200
    finally:
        release.set()
        for sock in waits:
            sock.close()
        server.shutdown()
        runner.join(WAIT)
        server.server_close()


def test_idle_connections_beyond_the_cap_never_crowd_out_a_client_with_a_request(
    start_control: StartControl,
) -> None:
    # The idle timeout is far longer than the wait below: only making room gets it through.
    control = start_control(max_connections=16, idle_timeout=600, evict_after=0.05)
    idle = [_connect(control.path) for _ in range(300)]
    try:
        client = DaemonClient(control.path, timeout=WAIT)
        assert client.forks() == []
        assert control.server.connections <= 16
    finally:
        for sock in idle:
            sock.close()


def test_waiters_never_hold_up_the_creation_of_a_fork(tmp_path: Path) -> None:
    from pagefork.daemon.api import request_pool
    from pagefork.daemon.httpserver import HttpServer
    from pagefork.server import bind_private_socket

    release = threading.Event()
    entered = threading.Semaphore(0)

    def handler(method: str, target: str, body: bytes) -> Response:
        if target.endswith("/wait"):
            entered.release()
            release.wait(WAIT)  # guests that take their time
        return Response.json(200, {"target": target})

    path = str(tmp_path / "c.sock")
    limits = ServerLimits(workers=2, long_workers=4, wait_workers=4)
    server = HttpServer(bind_private_socket(path), handler, limits, is_long=request_pool)
    runner = threading.Thread(target=server.serve_forever, daemon=True)
    runner.start()
    waits = []
    try:
        for i in range(6):  # more waiters than the wait pool, and than the long pool, has
            sock = _connect(path)
            request = f"POST /forks/f{i}/wait HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            sock.sendall(request.encode())
            waits.append(sock)
        for _ in range(4):
            assert entered.acquire(timeout=WAIT)
        create = b"POST /forks HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        assert _exchange(path, create) == (200, {"target": "/forks"})  # while they all wait
        release.set()
        for sock in waits:
            assert _read_answer(sock)[0] == 200
    finally:
        release.set()
        for sock in waits:
            sock.close()
        server.shutdown()
        runner.join(WAIT)
        server.server_close()


def test_a_server_full_of_idle_connections_sleeps_until_something_happens(
    start_control: StartControl,
) -> None:
    control = start_control(max_connections=4, idle_timeout=600, evict_after=0.01)
    idle = [_connect(control.path) for _ in range(4)]
    try:
        while control.server.connections < 4:  # until all are accepted
            select.select([], [], [], 0.01)
        evictable = time.monotonic() + 0.01
        while time.monotonic() < evictable:  # until every one may go for a newcomer
            select.select([], [], [], 0.01)
        # At the cap, and every one may go for a newcomer: the loop waits for one (or an
        # idle timeout), it does not spin.
        timeout = control.server._next_timeout()
        assert timeout is not None and timeout > 100, timeout
    finally:
        for sock in idle:
            sock.close()
