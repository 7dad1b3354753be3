"""The built-in microVM through the VmmDriver interface, served by a real PageServer."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import KVM_MISSING as ENV_MISSING
from conftest import needs_kvm
from pagefork.errors import VmmError
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.base import RestoreRequest
from pagefork.vmm.kvm.driver import KvmDriver
from pagefork.vmm.kvm.template import MEM_FILE, Template, TemplateSpec, build_template
from pagefork.vmm.kvm.trace import TraceSpec

SMALL = TemplateSpec(mem_size=16 << 20, variants=2, trace=TraceSpec(working_set=0.10, seed=5))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    if ENV_MISSING is not None:
        pytest.skip(ENV_MISSING)
    tpl = build_template(tmp_path_factory.mktemp("kvm-driver") / "template", SMALL)
    yield tpl
    tpl.close()


@pytest.fixture
def server(template: Template, tmp_path: Path) -> Iterator[PageServer]:
    config = ServerConfig(mem_file_path=str(template.path / MEM_FILE), socket_dir=str(tmp_path))
    with PageServer(config) as srv:
        yield srv


def _request(server: PageServer, template: Template, fork_id: str, index: int) -> RestoreRequest:
    return RestoreRequest(
        fork_id=fork_id,
        uffd_socket=server.register_fork(fork_id, record=index == 0),
        snapshot_path=str(template.path),
        mem_file=str(template.path / MEM_FILE),
        options={"fork_index": index},
    )


@needs_kvm
def test_fork_through_the_driver_reaches_ready_with_the_right_checksum(
    template: Template, server: PageServer
) -> None:
    handle = KvmDriver().restore(_request(server, template, "kvm-1", 1), timeout=60)
    try:
        assert handle.pid is not None
        server.wait_connected("kvm-1", timeout=10)
        handle.resume()
        summary = handle.wait(timeout=60)
    finally:
        handle.stop()
    handle.stop()  # idempotent
    assert summary["checksum_ok"] is True and summary["pages_ok"] is True
    assert summary["fork_id"] == "kvm-1" and summary["pid"] == handle.pid
    assert summary["variant"] == template.variant_of(1)  # fork_index 1 walked its own trace
    # Ready covers the restore and the run: the clock stamps come from one monotonic clock.
    assert summary["ready_seconds"] >= summary["restore_seconds"] + summary["run_seconds"]
    stats = server.wait_ended("kvm-1", timeout=10)
    assert stats.faults == len(template.touched_pages(summary["variant"]))


@needs_kvm
def test_warm_up_then_prefetched_fork_through_the_driver(
    template: Template, server: PageServer
) -> None:
    driver = KvmDriver()
    warm = driver.restore(_request(server, template, "warm", 0), timeout=60)
    warm.resume()
    assert warm.wait(timeout=60)["checksum_ok"]
    warm.stop()
    hot = server.hot_pages("warm")

    fork = driver.restore(_request(server, template, "fork", 1), timeout=60)
    try:
        server.prefetch("fork", hot)
        fork.resume()
        summary = fork.wait(timeout=60)
    finally:
        fork.stop()
    assert summary["checksum_ok"]
    stats = server.wait_ended("fork", timeout=10)
    assert stats.prefetched_pages == len(hot)
    # Only the pages this variant has and the warm-up's had not fault on demand.
    specific = template.touched_pages(summary["variant"]) - template.touched_pages(
        template.variant_of(0)
    )
    assert stats.misses == len(specific)


@needs_kvm
def test_restore_of_a_missing_template_raises_vmm_error(server: PageServer, tmp_path: Path) -> None:
    req = RestoreRequest(
        "bad",
        server.register_fork("bad"),
        str(tmp_path / "no-template"),
        "m",
        options={"fork_index": 0},
    )
    with pytest.raises(VmmError, match="fork 0"):
        KvmDriver().restore(req, timeout=30)


def test_fork_index_must_be_a_natural_number() -> None:
    req = RestoreRequest("f", "/u.sock", "/t", "/m", options={"fork_index": -1})
    with pytest.raises(VmmError, match="fork_index"):
        KvmDriver().restore(req)


@needs_kvm
def test_a_finished_fork_process_is_seen_through_its_pidfd_and_reaped(
    template: Template, server: PageServer
) -> None:
    handle = KvmDriver().restore(_request(server, template, "done", 1), timeout=60)
    try:
        pidfd = handle.pidfd
        assert pidfd is not None and handle.exit_status() is None  # restored, waiting for go
        handle.resume()
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        assert poller.poll(60_000)  # readable once the process has exited: no polling loop
        assert handle.exit_status() == 0
        with pytest.raises(ChildProcessError):  # reaped: no zombie left
            os.waitid(os.P_PID, handle.pid or -1, os.WEXITED | os.WNOHANG)
        assert handle.wait(timeout=30)["checksum_ok"] is True  # its result is still there
    finally:
        handle.stop()
    assert handle.pidfd is None
