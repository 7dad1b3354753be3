"""A fork ends when its VMM exits, not when its socket closes (Firecracker 1.7-1.11).

Firecracker before 1.12 closes the uffd handler socket right after the handshake and goes on
running the guest. The session watches the VMM's pidfd: a closed socket with a live VMM keeps
being served, and the VMM's exit ends the fork. The guest side runs in a separate process
(:mod:`pagefork.testing.vmm`) that checks every byte it reads against the mem-file.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from conftest import PAGE, needs_uffd
from pagefork import libc, uffd
from pagefork.handshake import encode_mappings
from pagefork.hotpages import HotPage
from pagefork.regions import Region
from pagefork.server import PageServer
from pagefork.serving import sockets as server_sockets
from pagefork.testing.vmm import VmmProcess

PAGES = (12 << 20) // PAGE  # the 8M + 4M guest of the vmms fixture
CLOSED = "closed its socket; serving until it exits"

pytestmark = needs_uffd


class _LogEvent(logging.Handler):
    """Sets :attr:`seen` once a ``pagefork`` log record contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.fixture
def socket_closed() -> Iterator[threading.Event]:
    """Set when a session has seen its VMM close the socket and kept serving."""
    logger = logging.getLogger("pagefork")
    handler = _LogEvent(CLOSED)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler.seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_closed_socket_keeps_being_served_and_prefetched_until_the_vmm_exits(
    no_leaks: None,
    make_server: Callable[..., PageServer],
    vmms: Callable[..., VmmProcess],
    socket_closed: threading.Event,
) -> None:
    server = make_server()
    vmm = vmms(server.register_fork("old"), "--fc-version", "1.10", "--close-after-handshake")
    server.wait_connected("old", timeout=10)
    assert socket_closed.wait(10), "the session never saw the socket close"
    assert server.stats("old").state == "serving"

    hot = [HotPage(0, i * PAGE) for i in range(0, 400, 2)] + [HotPage(1, 0), HotPage(1, PAGE)]
    result = server.prefetch("old", hot)
    assert result.installed == len(hot)
    touched = vmm.send(cmd="touch", all=True)  # every byte of every page, checked in the VMM
    assert (touched["touched"], touched["bad"]) == (PAGES, 0)

    stats = server.stats("old")
    assert stats.state == "serving"
    assert stats.prefetched_pages == len(hot)
    assert stats.faults == stats.misses == PAGES - len(hot)
    assert stats.pid == vmm.pid
    assert vmm.close() == 0
    ended = server.wait_ended("old", timeout=10)
    assert (ended.state, ended.errors, ended.error) == ("ended", 0, None)


def test_vmm_killed_after_closing_its_socket_ends_its_fork(
    no_leaks: None,
    make_server: Callable[..., PageServer],
    vmms: Callable[..., VmmProcess],
    socket_closed: threading.Event,
) -> None:
    server = make_server()
    vmm = vmms(server.register_fork("old"), "--fc-version", "1.7", "--close-after-handshake")
    assert socket_closed.wait(10)
    assert vmm.send(cmd="touch", pages=[[0, 0], [1, 5 * PAGE]])["bad"] == 0
    vmm.kill()
    ended = server.wait_ended("old", timeout=10)
    assert (ended.state, ended.faults, ended.errors) == ("ended", 2, 0)


def test_a_vmm_that_keeps_its_socket_still_ends_its_fork_by_exiting(
    make_server: Callable[..., PageServer], vmms: Callable[..., VmmProcess]
) -> None:
    server = make_server()
    vmm = vmms(server.register_fork("new"), "--fc-version", "1.12")
    assert vmm.send(cmd="touch", pages=[[0, PAGE]])["bad"] == 0
    vmm.kill()
    assert server.wait_ended("new", timeout=10).state == "ended"


def test_without_a_pidfd_the_hang_up_ends_the_fork(
    make_server: Callable[..., PageServer],
    vmms: Callable[..., VmmProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    server = make_server()  # its workers are watched through pidfds of their own
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)  # but the VMM's cannot be had: neither
    monkeypatch.setattr(server_sockets, "_SO_PEERPIDFD", -1)  # opened, nor from the socket
    vmm = vmms(server.register_fork("old"), "--fc-version", "1.10", "--close-after-handshake")
    ended = server.wait_ended("old", timeout=10)
    assert ended.state == "ended"
    assert vmm.proc.poll() is None  # the VMM lives on: only its socket told the server


def test_a_peer_in_the_servers_own_process_ends_at_the_hang_up(
    no_leaks: None, make_server: Callable[..., PageServer]
) -> None:
    # Our own pid never exits while we serve: the hang-up is the only end there can be.
    server = make_server()
    path = server.register_fork("local")
    fd = uffd.open_userfaultfd()
    base = libc.mmap(
        4 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )
    try:
        uffd.uffdio_api(fd, 0)
        uffd.uffdio_register(fd, base, 4 * PAGE)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            payload = encode_mappings([Region(base, 4 * PAGE, 0)], version="1.10")
            socket.send_fds(conn, [payload], [fd])
            server.wait_connected("local", timeout=10)
        ended = server.wait_ended("local", timeout=10)
        assert (ended.state, ended.pid) == ("ended", os.getpid())
    finally:
        os.close(fd)
        libc.munmap(base, 4 * PAGE)


def test_a_vmm_that_keeps_its_socket_ends_its_fork_when_it_hangs_up_though_still_alive(
    make_server: Callable[..., PageServer], vmms: Callable[..., VmmProcess]
) -> None:
    # 1.12+ keeps the socket for the life of the VM: its hang-up is a signal of its own.
    server = make_server()
    vmm = vmms(server.register_fork("new"), "--fc-version", "1.12", "--close-after-handshake")
    ended = server.wait_ended("new", timeout=10)
    assert (ended.state, ended.errors) == ("ended", 0)
    assert vmm.proc.poll() is None  # it lives: the hang-up alone ended the fork
