"""A prefetch armed before its fork connects starts the moment the handshake is in, without a
caller asking (real uffd, the guest in another process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import PAGE, needs_uffd
from pagefork.errors import PrefetchError
from pagefork.hotpages import HotPage, HotPageList
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd

#: Every other page of region 0 in a jumping first-touch order (runs of one page each).
HOT = HotPageList.from_pages([HotPage(0, (i * 7 % 512) * 2 * PAGE) for i in range(512)])
EVERY = [[0, p.page_offset] for p in HOT]


def _wait_prefetched(server: Any, fork: str, pages: int, timeout: float = 30.0) -> None:
    """Wait until the fork's worker says ``pages`` pages were prefetched into it."""
    deadline = time.monotonic() + timeout
    while server.stats(fork).prefetched_pages < pages:
        assert time.monotonic() < deadline, "the armed prefetch never ran"
        time.sleep(0.002)


@pytest.mark.parametrize("head", [None, 100])
def test_an_armed_prefetch_runs_at_the_handshake_and_prefetch_returns_its_result(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess], head: int | None
) -> None:
    server = make_server()
    socket_path = server.register_fork("a")
    server.prefetch_at_handshake("a", HOT, head=head)
    vmm = vmms(socket_path)
    # Nobody asks for it: the handshake alone starts it (and a stream runs to its end).
    _wait_prefetched(server, "a", len(HOT))
    result = server.prefetch("a", HOT)  # the armed one's result, not a second install
    assert result.already_present == 0
    # The stream has ended by now: its whole result, or its head's and then the whole.
    whole = server.stream_result("a", timeout=30) or result
    assert whole.installed == len(HOT) and whole.already_present == 0
    assert whole.streamed == (len(HOT) - head if head is not None else 0)
    assert vmm.send(cmd="touch", pages=EVERY)["bad"] == 0
    stats = server.stats("a")
    assert (stats.faults, stats.prefetched_pages) == (0, len(HOT))


def test_an_armed_list_that_does_not_fit_the_fork_fails_at_prefetch_with_nothing_installed(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> None:
    server = make_server()
    socket_path = server.register_fork("a")
    bad = HotPageList.from_pages([HotPage(0, 0), HotPage(7, 0)])
    server.prefetch_at_handshake("a", bad)
    vmms(socket_path)
    with pytest.raises(PrefetchError, match=r"entry 1: \(region 7, offset 0x0\): no region 7"):
        server.prefetch("a", bad)
    assert server.stats("a").prefetched_pages == 0


def test_an_armed_prefetch_is_armed_once_and_for_its_own_list(
    make_server: Callable[..., Any], vmms: Callable[..., VmmProcess]
) -> None:
    server = make_server()
    socket_path = server.register_fork("a")
    server.prefetch_at_handshake("a", HOT)
    with pytest.raises(PrefetchError, match="fork a: a prefetch is armed for it already"):
        server.prefetch_at_handshake("a", HOT)
    vmm = vmms(socket_path)
    server.wait_connected("a")
    other = HotPageList.from_pages(HOT.in_order())
    with pytest.raises(PrefetchError, match="fork a: another hot set was armed for it"):
        server.prefetch("a", other)
    _wait_prefetched(server, "a", len(HOT))  # it ran all the same
    assert vmm.send(cmd="touch", pages=EVERY)["bad"] == 0
    assert server.stats("a").faults == 0
