"""Diff snapshots of Firecracker forks, through the driver and the Firecracker double.

The double does what Firecracker does: dirty tracking when the load asks for it, a sparse
memory file on ``PUT /snapshot/create`` with ``snapshot_type: "Diff"``, the ``mincore``
fallback of 1.13+ without tracking. Guest memory is real and served over real uffds; a fork
of the child template must hold, byte for byte, what the snapshotted fork held.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PAGE, needs_uffd
from pagefork.errors import VmmError
from pagefork.layers.capture import capture_layer
from pagefork.layers.format import LayerFile
from pagefork.server import PageServer
from pagefork.testing.fcdouble import TEST_PREFIX, DoubleSnapshot, FcDoubleProcess
from pagefork.vmm.base import RestoreRequest
from pagefork.vmm.firecracker import (
    FirecrackerDriver,
    FirecrackerHandle,
    FirecrackerOptionError,
)

pytestmark = needs_uffd

REGIONS = (8 << 20, 4 << 20)  # fits the 12 MiB mem_file fixture


@pytest.fixture
def doubles(tmp_path: Path) -> Iterator[Callable[..., FcDoubleProcess]]:
    procs: list[FcDoubleProcess] = []

    def start(version: str, name: str) -> FcDoubleProcess:
        proc = FcDoubleProcess(str(tmp_path / f"fc-{name}.sock"), "--fc-version", version)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


def _guest(fc: FcDoubleProcess, action: str, **body: Any) -> None:
    fc.api.request("PUT", TEST_PREFIX + action, body)


def _fork(
    server: PageServer, fc: FcDoubleProcess, name: str, snapshot: str, **opts: Any
) -> FirecrackerHandle:
    sock = server.register_fork(name)
    req = RestoreRequest(name, sock, snapshot, "unused", {"api_socket": fc.api_sock, **opts})
    handle = FirecrackerDriver().restore(req, timeout=10)
    server.wait_connected(name, timeout=10)
    return handle


@pytest.mark.parametrize("version", ["1.12", "1.14"])
def test_a_fork_of_a_firecracker_diff_snapshot_holds_what_the_fork_held(
    no_leaks: None,
    version: str,
    tmp_path: Path,
    mem_file: Path,
    make_server: Callable[..., PageServer],
    doubles: Callable[..., FcDoubleProcess],
) -> None:
    base_state = tmp_path / "base.json"
    DoubleSnapshot(REGIONS, str(mem_file), PAGE, ((0, 0), (1, PAGE))).write(base_state)
    server = make_server()
    fc = doubles(version, "parent")
    handle = _fork(server, fc, "parent", str(base_state), snapshots=True)
    handle.resume()
    assert fc.result()["bad"] == 0
    # The guest writes 5 pages (3 in region 0, a page and a half in region 1), then gives
    # back 8 pages, one of them written.
    _guest(fc, "write", region=0, offset=10 * PAGE, length=3 * PAGE, seed=1)
    _guest(fc, "write", region=1, offset=PAGE + 100, length=PAGE, seed=2)
    _guest(fc, "remove", region=0, offset=12 * PAGE, length=8 * PAGE)

    out = tmp_path / "snap"
    out.mkdir()
    snap = handle.snapshot(str(out), timeout=10)
    load = next(r for r in fc.requests() if r["path"] == "/snapshot/load")
    field = "track_dirty_pages" if version == "1.14" else "enable_diff_snapshots"
    assert load["body"][field] is True
    assert fc.api.request("GET", "/")["state"] == "Paused"
    parent_dump = tmp_path / "parent.dump"
    _guest(fc, "dump", path=str(parent_dump))

    layer = str(tmp_path / "child.layer")
    captured = capture_layer(
        snap.memory_diff,
        parent_chain=[str(mem_file)],
        removed=server.removed_ranges("parent"),
        out_path=layer,
    )
    # Only the 5 written pages were read. Page 12, written then removed, reads zero now, as
    # does the template there (every 4th page of the mem-file is zero): no change, no data.
    # The 7 other removed pages are zero runs.
    assert captured.dirty_pages == 5
    assert captured.changed_pages == 4
    assert captured.zero_pages == 7
    with LayerFile(layer) as f:
        assert (f.pages, f.zero_pages) == (4, 7)

    child = make_server(layers=(layer,))
    fc2 = doubles(version, "child")
    handle2 = _fork(child, fc2, "branch", snap.vmstate)
    branch_dump = tmp_path / "branch.dump"
    _guest(fc2, "dump", path=str(branch_dump))
    handle2.stop()
    handle.stop()
    assert branch_dump.read_bytes() == parent_dump.read_bytes()
    removed = parent_dump.read_bytes()[12 * PAGE : 20 * PAGE]
    assert removed == bytes(8 * PAGE) != mem_file.read_bytes()[12 * PAGE : 20 * PAGE]


def test_without_dirty_tracking_the_mincore_diff_still_makes_a_minimal_layer(
    tmp_path: Path,
    mem_file: Path,
    make_server: Callable[..., PageServer],
    doubles: Callable[..., FcDoubleProcess],
) -> None:
    touch = tuple((0, i * PAGE) for i in range(64))  # the guest reads 64 pages
    base_state = tmp_path / "base.json"
    DoubleSnapshot(REGIONS, str(mem_file), PAGE, touch).write(base_state)
    server = make_server()
    fc = doubles("1.14", "fc")
    handle = _fork(server, fc, "f", str(base_state))  # no snapshots option: no tracking
    handle.resume()
    assert fc.result()["bad"] == 0
    _guest(fc, "write", region=0, offset=5 * PAGE, length=2 * PAGE, seed=3)
    out = tmp_path / "snap"
    out.mkdir()
    snap = handle.snapshot(str(out), timeout=10)
    captured = capture_layer(
        snap.memory_diff, parent_chain=[str(mem_file)], removed=[], out_path=str(out / "l")
    )
    # mincore: every present page is in the diff, but only the 2 written ones differ.
    assert captured.dirty_pages >= 64
    assert captured.changed_pages == 2
    handle.stop()


def test_before_1_13_a_diff_snapshot_needs_tracking(
    tmp_path: Path,
    mem_file: Path,
    make_server: Callable[..., PageServer],
    doubles: Callable[..., FcDoubleProcess],
) -> None:
    base_state = tmp_path / "base.json"
    DoubleSnapshot(REGIONS, str(mem_file), PAGE, ((0, 0),)).write(base_state)
    server = make_server()
    fc = doubles("1.12", "fc")
    handle = _fork(server, fc, "f", str(base_state))
    (tmp_path / "snap").mkdir()
    with pytest.raises(VmmError, match="Diff snapshots are not enabled"):
        handle.snapshot(str(tmp_path / "snap"), timeout=10)
    assert not os.path.exists(tmp_path / "snap" / "memory.diff")
    handle.stop()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snapshots": "yes"}, "option .snapshots. must be true or false"),
        (
            {"snapshots": True, "jailer": {"binary": "/j", "exec_file": "/f", "uid": 1, "gid": 1}},
            "option .snapshots. is not supported under the jailer",
        ),
    ],
)
def test_snapshots_option_is_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FirecrackerOptionError, match=message):
        FirecrackerDriver().check_options(options)
