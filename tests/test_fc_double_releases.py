"""The Firecracker double against what real releases do, where the difference would hide
behaviour from the other tests: devices restored after the uffd handshake (a failure then is
seen by the page server too), the optional fields Firecracker takes as ``null``, and the
request fields it refuses."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PAGE, needs_uffd
from pagefork.errors import VmmError
from pagefork.server import PageServer
from pagefork.testing.fcdouble import EXIT_LOAD_FAILED, DoubleSnapshot, FcDoubleProcess
from pagefork.vmm.firecracker import snapshot_load_body

REGIONS = (8 << 20, 4 << 20)


@pytest.fixture
def doubles(tmp_path: Path) -> Iterator[Callable[..., FcDoubleProcess]]:
    procs: list[FcDoubleProcess] = []

    def start(version: str, name: str = "fc") -> FcDoubleProcess:
        proc = FcDoubleProcess(str(tmp_path / f"{name}.api"), "--fc-version", version)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


def _snapshot(tmp_path: Path, mem_file: Path, **devices: Any) -> str:
    path = tmp_path / "vmstate.json"
    DoubleSnapshot(REGIONS, str(mem_file), PAGE, ((0, 0),), **devices).write(path)
    return str(path)


def _held_tap(name: str) -> socket.socket:
    """Hold the tap ``name`` as another VMM would (see the double's docstring)."""
    tap = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tap.bind(f"\0pagefork-fcdouble/tap/{name}")
    return tap


@needs_uffd
@pytest.mark.parametrize("device", ["busy tap", "vsock path", "no vsock device"])
def test_a_device_that_fails_to_restore_fails_the_load_after_the_handshake_and_exits_1(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
    device: str,
) -> None:
    server = make_server()
    fc = doubles("1.16")
    body = snapshot_load_body("", server.register_fork("f"))
    held = None
    if device == "busy tap":
        name = f"pf{os.getpid() % 100000}held"
        held = _held_tap(name)
        body["snapshot_path"] = _snapshot(tmp_path, mem_file, network_interfaces=(("eth0", name),))
        message = "Open tap device .* Resource busy"
    elif device == "vsock path":
        body["snapshot_path"] = _snapshot(tmp_path, mem_file, vsock_uds=str(tmp_path / "nodir/v"))
        message = "Cannot create vsock backend"
    else:
        body["snapshot_path"] = _snapshot(tmp_path, mem_file)
        body["vsock_override"] = {"uds_path": str(tmp_path / "v.sock")}
        message = "UnknownVsockDevice"
    try:
        with pytest.raises(VmmError, match=f"400: Load snapshot error: .*{message}"):
            fc.api.request("PUT", "/snapshot/load", body)
        assert fc.wait(10) == EXIT_LOAD_FAILED
        # The handler had its handshake first (the regions it was told), then lost the VMM.
        ended = server.wait_ended("f", timeout=10)
        assert ended.state == "ended", ended
        assert server.wait_connected("f", timeout=1)
    finally:
        if held is not None:
            held.close()


@pytest.mark.parametrize(
    ("version", "field", "value"),
    [
        ("1.7", "mem_file_path", None),
        ("1.12", "mem_file_path", None),
        ("1.16", "mem_file_path", None),
        ("1.16", "vsock_override", None),
        ("1.16", "vsock_override", {"uds_path": "/v.sock", "cid": 3}),
        ("main", "huge_pages", "2M"),
    ],
)
def test_fields_firecracker_takes_as_optional_or_open_are_accepted(
    doubles: Callable[..., FcDoubleProcess], version: str, field: str, value: Any
) -> None:
    fc = doubles(version)
    # Configured for a boot: a load whose body parses is refused on the state, not a field.
    fc.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
    body = {**snapshot_load_body("/s", "/u"), field: value}
    with pytest.raises(VmmError, match=r"400: .*not allowed after configuring boot-specific"):
        fc.api.request("PUT", "/snapshot/load", body)
    assert fc.proc.poll() is None


@pytest.mark.parametrize(
    ("version", "field", "value", "message"),
    [
        ("1.12", "vsock_override", None, "unknown field `vsock_override`"),
        ("main", "huge_pages", "bogus", "huge_pages: unknown variant `bogus`"),
    ],
)
def test_fields_firecracker_refuses_are_refused(
    doubles: Callable[..., FcDoubleProcess], version: str, field: str, value: Any, message: str
) -> None:
    fc = doubles(version)
    body = {**snapshot_load_body("/s", "/u"), field: value}
    with pytest.raises(VmmError, match=f"400: .*{message}"):
        fc.api.request("PUT", "/snapshot/load", body)
    assert fc.api.request("GET", "/")["state"] == "Not started"


def test_snapshot_create_refuses_a_version_field(
    doubles: Callable[..., FcDoubleProcess], tmp_path: Path
) -> None:
    fc = doubles("1.16")
    fc.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
    fc.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.api.request("PATCH", "/vm", {"state": "Paused"})
    body = {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}
    with pytest.raises(VmmError, match="400: snapshot/create: unknown field `version`"):
        fc.api.request("PUT", "/snapshot/create", {**body, "version": "1.16.0"})
    fc.api.request("PUT", "/snapshot/create", body)
    assert (tmp_path / "m").stat().st_size == 8 << 20
