"""A streamed prefetch: the head of the hot set goes in before the guest runs, the rest while it
runs, the guest's own faults served ahead of it (real uffd, the guest in another process).

Each test holds the worker at the moment its head is in (it SIGSTOPs itself there; the test
sends SIGCONT), so what races the stream is chosen, not left to timing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import PAGE, needs_uffd
from pagefork.hotpages import HotPage, HotPageList
from pagefork.serving import pool
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd

MIB = 1 << 20
#: Every other page of region 0 (8 MiB), in a first-touch order that jumps about: no two hot
#: pages adjacent, so each is a run of its own (the tests run with bridging off).
HOT = HotPageList.from_pages([HotPage(0, (i * 7 % 1024) * 2 * PAGE) for i in range(1024)])
EVERY = [[0, p.page_offset] for p in HOT]


@pytest.fixture(autouse=True)
def _patient_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test holds a worker stopped on purpose: the heartbeat must not take it for stuck.
    monkeypatch.setenv("PAGEFORK_WORKER_STUCK_AFTER", "60")


def _blocked_in_fault(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if "userfault" in f.read():
                    return True
        except OSError:
            pass
    return False


def _while_held(worker: int, vmm: VmmProcess, **cmd: Any) -> dict[str, Any]:
    """Have the guest run ``cmd`` while the worker is held: wait until the guest sleeps in a
    fault (so the fault is queued ahead of the rest of the stream), then let the worker go."""
    replies: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: replies.append(vmm.send(**cmd)))
    t.start()
    deadline = time.monotonic() + 30
    while not _blocked_in_fault(vmm.pid):
        assert t.is_alive() and time.monotonic() < deadline, "the guest never faulted"
        time.sleep(0.001)
    _let_go(worker)
    t.join(60)
    (reply,) = replies
    return reply


def _held_at_head(server: Any, fork: str) -> int:
    return int(server._debug_crash_worker_at(fork, "stream", stop=True))


def _let_go(worker: int) -> None:
    """SIGCONT the worker once it has stopped itself: it says its head is in just before it
    stops, so a SIGCONT sent on that news alone could come first and be lost."""
    deadline = time.monotonic() + 30
    while pool.scheduler_state(worker) != "T":
        assert time.monotonic() < deadline, "the worker never stopped at its head"
        time.sleep(0.001)
    os.kill(worker, signal.SIGCONT)


def _connected(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> tuple[Any, VmmProcess]:
    """A server with fork "a" and that fork's guest connected to it."""
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    return server, vmm


def _held(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> tuple[Any, VmmProcess, int]:
    """``_connected``, with the fork's worker set to stop once its head is in; that worker."""
    server, vmm = _connected(make_server, vmms)
    return server, vmm, _held_at_head(server, "a")


def test_the_head_is_in_before_prefetch_returns_and_the_rest_streams(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> None:
    server, vmm, worker = _held(make_server, vmms)
    head = server.prefetch("a", HOT, head=300)
    # The worker is stopped right after its head: nothing past it can have been installed.
    assert head.installed == 300 and head.streamed == 0
    assert server.stats("a").prefetched_pages == 0  # counted once the whole prefetch ends
    _let_go(worker)
    whole = server.stream_result("a", timeout=30)
    assert whole is not None
    assert whole.installed == 1024 and whole.streamed == 1024 - 300 and whole.raced == 0
    assert whole.head_seconds <= whole.seconds
    assert vmm.send(cmd="touch", pages=EVERY)["bad"] == 0
    stats = server.stats("a")
    assert (stats.faults, stats.prefetched_pages) == (0, 1024)


def test_guest_faults_are_served_ahead_of_the_stream(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> None:
    server, vmm, worker = _held(make_server, vmms)
    head = server.prefetch("a", HOT, head=100)
    assert head.installed == 100
    # The guest reads the hot set backwards: its first fault is the stream's very last page.
    backwards = [[0, p.page_offset] for p in reversed(list(HOT))]
    reply = _while_held(worker, vmm, cmd="touch", pages=backwards, threads=2)
    assert reply["bad"] == 0  # every byte equals the template's
    whole = server.stream_result("a", timeout=30)
    assert whole is not None
    stats = server.stats("a")
    assert whole.raced >= 1  # the guest got there first at least once: served, not waited
    assert whole.installed + whole.already_present == 1024
    assert whole.installed + stats.pages_copied + stats.zero_pages == 1024  # each page once
    assert whole.streamed == whole.installed - head.installed


def test_a_range_removed_during_the_stream_never_gets_template_bytes(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> None:
    server, vmm, worker = _held(make_server, vmms)
    server.prefetch("a", HOT, head=100)
    # The REMOVE blocks the guest until the worker reads it: it lands in the middle of the
    # stream, whose remaining pages include the removed range.
    reply = _while_held(worker, vmm, cmd="remove", region=0, offset=6 * MIB, length=2 * MIB)
    assert reply == {"ok": True}
    whole = server.stream_result("a", timeout=30)
    assert whole is not None
    assert vmm.send(cmd="check_zero", region=0, offset=6 * MIB, length=2 * MIB)["zero"] is True
    assert vmm.send(cmd="touch", pages=[[0, o] for o in range(0, 6 * MIB, PAGE)])["bad"] == 0
    assert whole.skipped_removed + whole.already_present >= 1  # the stream met the REMOVE
    assert whole.installed + whole.already_present + whole.skipped_removed == 1024


def test_a_worker_killed_mid_stream_is_replaced_and_the_stream_finishes(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> None:
    server, vmm = _connected(make_server, vmms)
    # Killed at its 40th slice of 16 ioctls: well after a head of 100 pages, before the end.
    old = server._debug_crash_worker_at("a", "prefetch", count=40)
    head = server.prefetch("a", HOT, head=100)
    assert head.installed >= 100
    whole = server.stream_result("a", timeout=30)  # the replacement streamed it all again
    assert whole is not None and whole.installed + whole.already_present == 1024
    stats = server.stats("a")
    assert stats.worker_pid != old
    assert vmm.send(cmd="touch", pages=EVERY)["bad"] == 0
    assert server.stats("a").faults == 0


def test_an_unstreamed_prefetch_has_no_stream_result(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> None:
    server = make_server()
    vmms(server.register_fork("a"))
    whole = server.prefetch("a", HOT)
    assert whole.installed == 1024 and whole.streamed == 0
    assert whole.head_seconds == whole.seconds
    assert server.stream_result("a", timeout=1) is None
