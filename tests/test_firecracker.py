"""The Firecracker driver: request shapes, error paths, and whole forks against the test double.

The double (:mod:`pagefork.testing.fcdouble`) serves Firecracker's HTTP API and performs the
uffd handshake with real memory in its own process, so a restored "guest" faults through a real
:class:`PageServer`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PAGE, needs_uffd, open_fds
from pagefork.errors import VmmError
from pagefork.hotpages import HotPage
from pagefork.server import PageServer
from pagefork.testing.fcdouble import EXIT_LOAD_FAILED, DoubleSnapshot, FcDoubleProcess
from pagefork.vmm import firecracker
from pagefork.vmm.base import RestoreRequest
from pagefork.vmm.firecracker import (
    FirecrackerApi,
    FirecrackerApiError,
    FirecrackerDriver,
    FirecrackerOptionError,
    create_snapshot,
    fault_message,
    parse_options,
    snapshot_create_body,
    snapshot_load_body,
    vm_state_body,
)

REGIONS = (8 << 20, 4 << 20)  # fits the 12 MiB mem_file fixture


@pytest.fixture
def doubles(tmp_path: Path) -> Iterator[Callable[..., FcDoubleProcess]]:
    """Start Firecracker doubles; all are reaped at the end."""
    procs: list[FcDoubleProcess] = []

    def start(name: str = "fc", *extra: str) -> FcDoubleProcess:
        proc = FcDoubleProcess(str(tmp_path / f"{name}.sock"), *extra)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


def _snapshot(tmp_path: Path, mem_file: Path, touch: list[tuple[int, int]] | None) -> str:
    path = tmp_path / "vmstate.json"
    DoubleSnapshot(REGIONS, str(mem_file), PAGE, None if touch is None else tuple(touch)).write(
        path
    )
    return str(path)


def _request(fork_id: str, uffd_socket: str, snapshot: str, api_socket: str) -> RestoreRequest:
    return RestoreRequest(
        fork_id=fork_id,
        uffd_socket=uffd_socket,
        snapshot_path=snapshot,
        mem_file="unused-by-the-uffd-backend",
        options={"api_socket": api_socket},
    )


# --- request bodies (pure) ------------------------------------------------------------------------


def test_snapshot_load_body_asks_for_the_uffd_backend_paused() -> None:
    assert snapshot_load_body("/s/vmstate", "/run/fork.sock") == {
        "snapshot_path": "/s/vmstate",
        "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/fork.sock"},
        "resume_vm": False,
    }


def test_snapshot_load_body_takes_extra_fields_but_not_a_second_backend() -> None:
    body = snapshot_load_body("s", "u", extra={"network_overrides": []})
    assert body["network_overrides"] == []
    with pytest.raises(VmmError, match="mem_file_path"):
        snapshot_load_body("s", "u", extra={"mem_file_path": "m"})


def test_snapshot_create_and_vm_state_bodies() -> None:
    assert snapshot_create_body("/t/vmstate", "/t/mem") == {
        "snapshot_type": "Full",
        "snapshot_path": "/t/vmstate",
        "mem_file_path": "/t/mem",
    }
    assert vm_state_body("Resumed") == {"state": "Resumed"}


def test_fault_message_prefers_firecrackers_field_then_the_raw_body() -> None:
    assert fault_message(400, b'{"fault_message": "bad snapshot"}') == "bad snapshot"
    assert fault_message(500, b"oops") == "oops"
    assert fault_message(404, b"") == "Not Found"


def test_restore_without_api_socket_is_refused() -> None:
    req = RestoreRequest("f", "/u.sock", "/s", "/m", options={})
    with pytest.raises(VmmError, match="api_socket"):
        FirecrackerDriver().restore(req)


# --- error paths ---------------------------------------------------------------------------------


def test_missing_api_socket_names_the_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "nobody.sock")
    with pytest.raises(VmmError, match=f"{sock} does not exist"):
        FirecrackerApi(sock).request("GET", "/")


def test_dead_api_socket_names_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: a Firecracker that exited
    with pytest.raises(VmmError, match=f"nobody listens on API socket {path}"):
        FirecrackerApi(path).request("PATCH", "/vm", vm_state_body("Resumed"))


def test_silent_firecracker_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)  # connects succeed (backlog) but nothing ever answers
        with pytest.raises(VmmError, match=r"PUT /snapshot/load: no answer within 0\.2s"):
            FirecrackerApi(path, timeout=0.2).request("PUT", "/snapshot/load", {})


def test_fault_message_surfaces_in_the_error(doubles: Callable[..., FcDoubleProcess]) -> None:
    fc = doubles()
    with pytest.raises(
        VmmError,
        match=r"^firecracker PATCH /vm: 400: The requested operation is not supported before "
        r"starting the microVM\.$",
    ):
        FirecrackerApi(fc.api_sock).request("PATCH", "/vm", vm_state_body("Resumed"))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}, "missing field"),
        (
            {"snapshot_path": "s", "mem_backend": {"backend_type": "Foo", "backend_path": "/u"}},
            "unknown variant `Foo`",
        ),
        ({"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd"}}, "`backend_path`"),
        ({"snapshot_path": "s", "mem_file_path": "m", "bogus": 1}, "unknown field `bogus`"),
        ({"snapshot_path": "s"}, "exactly one of"),
        ({"snapshot_path": 3, "mem_file_path": "m"}, "`snapshot_path` must be of type str"),
    ],
)
def test_double_refuses_malformed_loads_like_firecracker(
    doubles: Callable[..., FcDoubleProcess], body: dict[str, Any], message: str
) -> None:
    fc = doubles()
    with pytest.raises(VmmError, match=f"PUT /snapshot/load: 400: .*{message}"):
        FirecrackerApi(fc.api_sock).request("PUT", "/snapshot/load", body)


def test_double_refuses_a_body_that_is_not_json(
    doubles: Callable[..., FcDoubleProcess],
) -> None:
    fc = doubles()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(fc.api_sock)
    with conn:
        conn.sendall(
            b"PUT /snapshot/load HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
            b"Connection: close\r\n\r\n{oops"
        )
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert "deserializing the json body" in json.loads(body)["fault_message"]


@needs_uffd
def test_load_without_a_listening_handler_reports_the_handler_socket(
    doubles: Callable[..., FcDoubleProcess], tmp_path: Path, mem_file: Path
) -> None:
    fc = doubles()
    missing = str(tmp_path / "no-handler.sock")
    req = _request("f", missing, _snapshot(tmp_path, mem_file, None), fc.api_sock)
    with pytest.raises(VmmError, match=f"PUT /snapshot/load: 400: .*{missing}"):
        FirecrackerDriver().restore(req, timeout=10)


# --- whole forks ---------------------------------------------------------------------------


@needs_uffd
def test_restore_prefetch_resume_serves_verified_pages(
    no_leaks: None,
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    fc = doubles()
    # The guest reads 64 pages of each region; the first 32 of each are prefetched.
    touch = [(r, i * 3 * PAGE) for r in (0, 1) for i in range(64)]
    hot = [HotPage(r, off) for r, off in touch[:32] + touch[64:96]]
    snapshot = _snapshot(tmp_path, mem_file, touch)
    uffd_socket = server.register_fork("fc-1")

    handle = FirecrackerDriver().restore(_request("fc-1", uffd_socket, snapshot, fc.api_sock))
    assert handle.pid == fc.pid  # found through SO_PEERCRED
    regions = server.wait_connected("fc-1", timeout=10)
    assert [(r.size, r.offset) for r in regions] == [(8 << 20, 0), (4 << 20, 8 << 20)]
    assert fc.result(wait=0)["state"] == "not-run"  # loaded paused: resume_vm false

    prefetched = server.prefetch("fc-1", hot)
    handle.resume()
    result = fc.result(wait=30)

    assert result["state"] == "done"
    assert (result["touched"], result["bad"]) == (len(touch), 0)
    stats = server.stats("fc-1")
    assert prefetched.installed == stats.prefetched_pages == len(hot)
    assert stats.faults == stats.misses == len(touch) - len(hot)
    assert handle.wait(5)["state"] == "Running"
    assert [(r["method"], r["path"], r["body"]) for r in fc.requests()[:3]] == [
        ("GET", "/", None),  # the driver checks for a fresh process first
        ("PUT", "/snapshot/load", snapshot_load_body(snapshot, uffd_socket)),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]

    handle.stop()
    handle.stop()  # idempotent
    assert fc.wait(10) == -9  # SIGKILL through the pidfd
    assert server.wait_ended("fc-1", timeout=10).state == "ended"


@needs_uffd
def test_loading_twice_is_refused(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    fc = doubles()
    snapshot = _snapshot(tmp_path, mem_file, [])
    req = _request("fc-1", server.register_fork("fc-1"), snapshot, fc.api_sock)
    handle = FirecrackerDriver().restore(req)
    # The driver sees it is no fresh process and says so before it sends a second load...
    with pytest.raises(VmmError, match=r"is 'Paused', not 'Not started': .* start one per fork"):
        FirecrackerDriver().restore(req)
    # ...which Firecracker would refuse anyway, and stay up: a refusal by state is no failure.
    with pytest.raises(VmmError, match="400: The requested operation is not supported after"):
        fc.api.request("PUT", "/snapshot/load", snapshot_load_body(snapshot, req.uffd_socket))
    assert fc.api.request("GET", "/")["state"] == "Paused"
    handle.stop()


@needs_uffd
def test_ctrl_alt_del_stop_lets_firecracker_exit(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    fc = doubles()
    req = _request(
        "fc-1", server.register_fork("fc-1"), _snapshot(tmp_path, mem_file, []), fc.api_sock
    )
    req.options["stop"] = "ctrl-alt-del"
    handle = FirecrackerDriver().restore(req)
    handle.resume()
    handle.stop()
    assert fc.wait(10) == 0  # it shut down on SendCtrlAltDel: no SIGKILL was needed


@needs_uffd
def test_template_from_a_running_double_restores_into_a_fork(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
) -> None:
    source = doubles("source")
    source.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
    source.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
    snap, mem = str(tmp_path / "tpl.vmstate"), str(tmp_path / "tpl.mem")

    create_snapshot(source.api_sock, snap, mem)

    assert os.path.getsize(mem) == 8 << 20
    assert [(r["method"], r["path"], r["body"]) for r in source.requests()[-2:]] == [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", snapshot_create_body(snap, mem)),
    ]
    assert source.api.request("GET", "/")["state"] == "Paused"
    # A fork of the new template reads every page through the page server, byte-exact.
    server = make_server(mem_file_path=mem)
    fork = doubles("fork")
    handle = FirecrackerDriver().restore(
        _request("fork-1", server.register_fork("fork-1"), snap, fork.api_sock)
    )
    handle.resume()
    result = fork.result(wait=30)
    assert (result["touched"], result["bad"]) == ((8 << 20) // PAGE, 0)
    stats = server.stats("fork-1")
    assert stats.pages_copied + stats.zero_pages == (8 << 20) // PAGE
    assert stats.zero_pages == (8 << 20) // PAGE // 4  # every 4th page of the boot is zero
    handle.stop()


def test_snapshot_of_a_running_vm_is_refused(
    doubles: Callable[..., FcDoubleProcess], tmp_path: Path
) -> None:
    fc = doubles()
    fc.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 4})
    fc.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
    body = snapshot_create_body(str(tmp_path / "s"), str(tmp_path / "m"))
    with pytest.raises(VmmError, match=r"PUT /snapshot/create: 400: .*paused"):
        fc.api.request("PUT", "/snapshot/create", body)
    with pytest.raises(VmmError, match="not allowed after configuring boot-specific"):
        fc.api.request("PUT", "/snapshot/load", snapshot_load_body("s", "u"))


# --- driver options and failure cleanup ------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"api_timeout": "soon"}, "api_timeout"),
        ({"api_timeout": 0}, "api_timeout"),
        ({"api_timeout": True}, "api_timeout"),
        ({"stop_timeout": "soon"}, "stop_timeout"),
        ({"stop_timeout": float("nan")}, "stop_timeout"),
        ({"stop": "halt"}, "stop"),
        ({"load_fields": [1]}, "load_fields"),
        ({"load_fields": {"mem_backend": {}}}, "load_fields"),
        ({"api_socket": 5}, "api_socket"),
        ({"stop_timout": 5}, "stop_timout"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], option: str) -> None:
    with pytest.raises(FirecrackerOptionError, match=f"^option {option!r} ") as info:
        parse_options({"api_socket": "/a.sock", **options})
    assert info.value.option == option
    with pytest.raises(FirecrackerOptionError):
        FirecrackerDriver().check_options(options)


def test_options_parse_with_defaults() -> None:
    opts = parse_options({"api_socket": "/a", "stop_timeout": 2, "load_fields": {"x": 1}})
    assert (opts.api_socket, opts.api_timeout, opts.stop, opts.stop_timeout) == (
        "/a",
        None,
        "kill",
        2.0,
    )
    assert opts.load_fields == {"x": 1}
    FirecrackerDriver().check_options({})  # api_socket is restore's to require


@needs_uffd
def test_bad_option_sends_nothing_and_leaks_no_pidfd(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    fc = doubles()
    req = _request("f", server.register_fork("f"), _snapshot(tmp_path, mem_file, []), fc.api_sock)
    req.options["stop_timeout"] = "soon"  # was read only after the load had succeeded
    fds = open_fds()
    with pytest.raises(FirecrackerOptionError, match="'stop_timeout'"):
        FirecrackerDriver().restore(req)
    assert open_fds() <= fds
    assert fc.requests() == []  # nothing loaded: the VMM is as it was
    assert fc.api.request("GET", "/")["state"] == "Not started"


@needs_uffd
def test_failure_after_the_load_kills_firecracker_and_closes_the_pidfd(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = make_server()
    fc = doubles()
    req = _request("f", server.register_fork("f"), _snapshot(tmp_path, mem_file, []), fc.api_sock)

    def broken_handle(*args: object) -> None:
        raise RuntimeError("handle construction failed")

    monkeypatch.setattr(firecracker, "FirecrackerHandle", broken_handle)
    fds = open_fds()
    with pytest.raises(RuntimeError, match="handle construction failed"):
        FirecrackerDriver().restore(req)
    assert fc.wait(10) == -9  # loaded with nobody to drive it: killed, not left hanging
    # The fork's session sees its VMM die on its own thread: wait for it before counting fds.
    server.wait_ended("f", timeout=10)
    assert open_fds() <= fds


@needs_uffd
def test_failed_load_makes_firecracker_exit_by_itself_and_closes_the_pidfd(
    doubles: Callable[..., FcDoubleProcess], tmp_path: Path, mem_file: Path
) -> None:
    fc = doubles()
    missing = str(tmp_path / "no-handler.sock")
    req = _request("f", missing, _snapshot(tmp_path, mem_file, None), fc.api_sock)
    fds = open_fds()
    with pytest.raises(FirecrackerApiError, match="400") as info:
        FirecrackerDriver().restore(req, timeout=10)
    assert info.value.status == 400
    assert open_fds() <= fds
    # Firecracker exits after a failed load (status 1 here): the driver did not kill it.
    assert fc.wait(10) == EXIT_LOAD_FAILED
