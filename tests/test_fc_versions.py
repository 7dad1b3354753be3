"""Firecracker 1.7 to 1.16: the version model, the double as a version matrix, and whole forks
(driver + page server + real uffds) against each release's behaviour.

The double (:mod:`pagefork.testing.fcdouble`) runs in its own process and reproduces, per
``--fc-version``: the handler socket closed after the handshake before 1.12, the VMGenID write
during the load from 1.8 (and the VMClock write from 1.14), the exit after a failed load, and
which load fields are accepted.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_fc_session import socket_closed  # noqa: F401 (a fixture)

from conftest import PAGE, needs_uffd
from pagefork.errors import VmmError
from pagefork.hotpages import HotPage
from pagefork.server import PageServer
from pagefork.testing.fcdouble import (
    EXIT_LOAD_FAILED,
    VMCLOCK_COUNTER,
    VMCLOCK_OFFSET,
    VMGENID_OFFSET,
    DoubleSnapshot,
    FcDoubleProcess,
)
from pagefork.vmm.base import RestoreRequest
from pagefork.vmm.firecracker import (
    FirecrackerDriver,
    FirecrackerVersion,
    snapshot_load_body,
)

REGIONS = (8 << 20, 4 << 20)  # fits the 12 MiB mem_file fixture
#: The releases the matrix runs whole forks against.
MATRIX = ("1.7", "1.10", "1.12", "1.14", "1.16")
VMGENID_PAGE = (0, VMGENID_OFFSET & -PAGE)
VMCLOCK_PAGE = (0, VMCLOCK_OFFSET)


@pytest.fixture
def doubles(tmp_path: Path) -> Iterator[Callable[..., FcDoubleProcess]]:
    """Start Firecracker doubles of a given release; all are reaped at the end."""
    procs: list[FcDoubleProcess] = []

    def start(version: str, name: str = "fc", *extra: str) -> FcDoubleProcess:
        proc = FcDoubleProcess(str(tmp_path / f"{name}.sock"), "--fc-version", version, *extra)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


def _snapshot(tmp_path: Path, mem_file: Path, touch: list[tuple[int, int]], **kw: Any) -> str:
    path = tmp_path / "vmstate.json"
    DoubleSnapshot(REGIONS, str(mem_file), PAGE, tuple(touch), **kw).write(path)
    return str(path)


def _request(fork: str, uffd_socket: str, snapshot: str, api: str, **opts: Any) -> RestoreRequest:
    return RestoreRequest(fork, uffd_socket, snapshot, "unused", {"api_socket": api, **opts})


# --- the version model (pure) ---------------------------------------------------------------

ALL_FIELDS = (
    "network_overrides",
    "track_dirty_pages",
    "clock_realtime",
    "vsock_override",
    "huge_pages",
)


@pytest.mark.parametrize(
    ("text", "keeps_socket", "writes_memory", "fields"),
    [
        ("1.7", False, False, set()),
        ("v1.7.1", False, False, set()),
        ("1.8.0", False, True, set()),
        ("1.10", False, True, set()),
        ("1.11.0", False, True, set()),
        ("1.12", True, True, {"network_overrides"}),
        ("1.13.1", True, True, {"network_overrides", "track_dirty_pages"}),
        ("1.14.3", True, True, {"network_overrides", "track_dirty_pages"}),
        ("1.14.4", True, True, {"network_overrides", "track_dirty_pages", "clock_realtime"}),
        ("1.15.0", True, True, {"network_overrides", "track_dirty_pages"}),
        ("1.15.1", True, True, {"network_overrides", "track_dirty_pages", "clock_realtime"}),
        (
            "1.16",
            True,
            True,
            {"network_overrides", "track_dirty_pages", "clock_realtime", "vsock_override"},
        ),
        ("main", True, True, set(ALL_FIELDS)),
        ("1.17.0-dev", True, True, set(ALL_FIELDS)),
    ],
)
def test_each_release_keeps_its_socket_writes_memory_and_accepts_fields_as_it_does(
    text: str, keeps_socket: bool, writes_memory: bool, fields: set[str]
) -> None:
    v = FirecrackerVersion.parse(text)
    assert (v.keeps_uffd_socket, v.writes_memory_on_load, v.supported) == (
        keeps_socket,
        writes_memory,
        True,
    )
    assert {f for f in ALL_FIELDS if v.accepts_load_field(f)} == fields
    # Every release takes the basic fields.
    base = ["snapshot_path", "mem_file_path", "mem_backend", "enable_diff_snapshots", "resume_vm"]
    assert all(v.accepts_load_field(f) for f in base)
    assert not v.accepts_load_field("bogus")


def test_versions_compare_and_old_ones_are_unsupported() -> None:
    assert not FirecrackerVersion.parse("1.6.0").supported
    assert FirecrackerVersion.parse("1.10.1").key > FirecrackerVersion.parse("1.7").key
    assert str(FirecrackerVersion.parse("v1.10.1")) == "1.10.1"
    assert FirecrackerVersion.parse("1.12").handshake_version == "1.12"


@pytest.mark.parametrize("text", ["", "1", "one.two", "1.x", "1.2.3.4"])
def test_a_bad_version_is_a_clear_error(text: str) -> None:
    with pytest.raises(VmmError, match=r"is not a Firecracker version \(like 1\.10"):
        FirecrackerVersion.parse(text)


# --- the double's per-release load fields ------------------------------------------------------

FIELD_VALUES: dict[str, Any] = {
    "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
    "track_dirty_pages": True,
    "clock_realtime": True,
    "vsock_override": {"uds_path": "/v.sock"},
    "huge_pages": "None",
}


@pytest.mark.parametrize(
    "version", ["1.7", "1.12", "1.13", "1.14", "1.14.4", "1.15", "1.16", "main"]
)
def test_double_accepts_exactly_the_load_fields_of_its_release(
    doubles: Callable[..., FcDoubleProcess], version: str
) -> None:
    fc = doubles(version)
    v = FirecrackerVersion.parse(version)
    # Configured for a boot, a load is refused after its body is parsed: a body the release
    # accepts then fails on the state, one it does not fails on the field. Neither exits.
    fc.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
    for name, value in FIELD_VALUES.items():
        body = {**snapshot_load_body("/s", "/u"), name: value}
        if v.accepts_load_field(name):
            expect = "not allowed after configuring boot-specific resources"
        else:
            expect = f"unknown field `{name}`"
        with pytest.raises(VmmError, match=f"400: .*{expect}"):
            fc.api.request("PUT", "/snapshot/load", body)
    assert fc.proc.poll() is None
    info = fc.api.request("GET", "/")
    assert FirecrackerVersion.parse(info["vmm_version"]).key == v.key


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "network_overrides",
            [{"iface_id": "eth0"}],
            r"network_overrides\[0\]: missing field `host_dev_name`",
        ),
        (
            "network_overrides",
            [{"host_dev_name": "t"}],
            r"network_overrides\[0\]: missing field `iface_id`",
        ),
        ("network_overrides", ["eth0"], r"network_overrides\[0\]: must be an object"),
        (
            "network_overrides",
            [{"iface_id": 1, "host_dev_name": "t"}],
            r"network_overrides\[0\]: field `iface_id` must be of type str",
        ),
        ("vsock_override", {}, "vsock_override: missing field `uds_path`"),
        ("huge_pages", "bogus", "huge_pages: unknown variant `bogus`, expected `None` or `2M`"),
    ],
)
def test_double_checks_the_shape_of_override_items(
    doubles: Callable[..., FcDoubleProcess], field: str, value: Any, message: str
) -> None:
    fc = doubles("main" if field == "huge_pages" else "1.16")
    body = {**snapshot_load_body("/s", "/u"), field: value}
    with pytest.raises(VmmError, match=f"400: .*{message}"):
        fc.api.request("PUT", "/snapshot/load", body)
    assert fc.api.request("GET", "/")["state"] == "Not started"  # a body error: no exit


@needs_uffd
@pytest.mark.parametrize("version", ["1.7", "1.16"])
def test_double_exits_after_a_failed_load_but_not_after_a_refused_body(
    doubles: Callable[..., FcDoubleProcess], tmp_path: Path, version: str
) -> None:
    fc = doubles(version)
    with pytest.raises(VmmError, match="unknown field `bogus`"):
        fc.api.request("PUT", "/snapshot/load", {**snapshot_load_body("/s", "/u"), "bogus": 1})
    missing = str(tmp_path / "no-vmstate")
    with pytest.raises(
        VmmError, match=f"400: Load snapshot error: cannot open snapshot file {missing}"
    ):
        fc.api.request("PUT", "/snapshot/load", snapshot_load_body(missing, "/u"))
    assert fc.wait(10) == EXIT_LOAD_FAILED


# --- whole forks against each release ---------------------------------------------------------


@needs_uffd
@pytest.mark.parametrize("version", MATRIX)
def test_fork_of_each_release_is_served_prefetched_and_ends_with_its_vmm(
    no_leaks: None,
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
    socket_closed: threading.Event,  # noqa: F811
    version: str,
) -> None:
    v = FirecrackerVersion.parse(version)
    server = make_server()
    fc = doubles(version)
    touch = [(r, i * 3 * PAGE) for r in (0, 1) for i in range(64)] + [VMCLOCK_PAGE]
    assert VMGENID_PAGE in touch  # the guest reads the pages the load rewrote
    hot = [HotPage(r, off) for r, off in touch[:32] + touch[64:96]]
    snapshot = _snapshot(
        tmp_path, mem_file, touch, vmgenid=VMGENID_OFFSET, vmclock=VMCLOCK_OFFSET + VMCLOCK_COUNTER
    )
    uffd_socket = server.register_fork("f")

    handle = FirecrackerDriver().restore(_request("f", uffd_socket, snapshot, fc.api_sock))
    load_faults = (1 if v.writes_memory_on_load else 0) + (1 if v.key >= (1, 14, 0) else 0)
    # 1.8+: the VMGenID write was a fault, served before the load's answer came; from 1.14
    # the VMClock write too.
    assert server.stats("f").faults == load_faults
    if not v.keeps_uffd_socket:
        assert socket_closed.wait(10), "a release before 1.12 closes its socket"
    assert server.stats("f").state == "serving"

    prefetched = server.prefetch("f", hot)
    assert prefetched.installed == len(hot)
    handle.resume()
    result = fc.result(wait=30)
    assert (result["state"], result["touched"], result["bad"]) == ("done", len(touch), 0)
    stats = server.stats("f")
    assert stats.prefetched_pages == len(hot)
    # The VMGenID page is present before the guest reads it: no fault then.
    assert stats.misses == len(touch) - len(hot) - load_faults
    assert stats.faults == stats.misses + load_faults
    assert stats.state == "serving"

    handle.stop()
    assert fc.wait(10) == -9
    ended = server.wait_ended("f", timeout=10)
    assert (ended.state, ended.errors) == ("ended", 0)


class _SilentHandler:
    """A uffd handler that takes the handshake and never serves a fault."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.fds: list[int] = []
        self.got = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            self.fds = list(fds)
            self.got.set()

    def close(self) -> None:
        self.thread.join(10)
        for fd in self.fds:
            os.close(fd)
        self.listener.close()


@needs_uffd
@pytest.mark.parametrize(("version", "answered"), [("1.7", True), ("1.8", False)])
def test_from_1_8_the_load_waits_for_a_fault_to_be_served(
    doubles: Callable[..., FcDoubleProcess],
    tmp_path: Path,
    mem_file: Path,
    version: str,
    answered: bool,
) -> None:
    fc = doubles(version)
    handler = _SilentHandler(str(tmp_path / "silent.sock"))
    try:
        snapshot = _snapshot(tmp_path, mem_file, [], vmgenid=VMGENID_OFFSET)
        req = _request("f", str(tmp_path / "silent.sock"), snapshot, fc.api_sock)
        if answered:
            FirecrackerDriver().restore(req, timeout=10).stop()
            assert handler.got.is_set()
        else:
            # Nobody serves the VMGenID fault: no answer, so the driver kills the VMM.
            with pytest.raises(VmmError, match=r"PUT /snapshot/load: no answer within 1s"):
                FirecrackerDriver().restore(req, timeout=1)
        assert fc.wait(10) == -9
    finally:
        handler.close()
