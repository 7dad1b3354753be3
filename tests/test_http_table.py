"""The control server's connection table: which connections are idle, expired or may be closed
for a newcomer, and when the loop must wake. Pure bookkeeping, checked without a server loop."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from pagefork.daemon.httpconn import HttpConnection
from pagefork.daemon.httptable import ConnectionTable
from pagefork.daemon.httpwire import ServerLimits

LIMITS = ServerLimits(max_connections=3, idle_timeout=30.0, evict_after=1.0)
NOW = 1000.0

#: Makes a connection over a fresh socket pair: (deadline, busy=, received=).
Maker = Callable[..., HttpConnection]


@pytest.fixture
def conn() -> Iterator[Maker]:
    socks: list[socket.socket] = []

    def make(deadline: float, *, busy: bool = False, received: bool = False) -> HttpConnection:
        ours, theirs = socket.socketpair()
        socks.extend((ours, theirs))
        c = HttpConnection(ours, LIMITS, deadline)
        c.busy, c.received = busy, received
        return c

    yield make
    for s in socks:
        s.close()


def test_a_connection_just_opened_is_not_evicted_but_a_silent_old_one_goes_first(
    conn: Maker,
) -> None:
    table = ConnectionTable(LIMITS)
    fresh = conn(NOW + 30.0)  # opened now: inside evict_after
    talker = conn(NOW + 10.0, received=True)  # idle 20 s, has sent part of a request
    silent = conn(NOW + 20.0)  # idle 10 s, has sent nothing
    for c in (fresh, talker, silent):
        table.add(c)
    assert table.full
    assert set(table.evictable(NOW)) == {talker, silent}
    assert table.to_evict(NOW) is silent  # silent ones first, then the longest idle
    table.discard(silent)
    assert not table.full
    assert table.to_evict(NOW) is talker


def test_busy_connections_are_never_idle_expired_or_evicted(conn: Maker) -> None:
    table = ConnectionTable(LIMITS)
    busy = conn(NOW - 5.0, busy=True)  # its deadline has passed, but it is being answered
    table.add(busy)
    assert table.idle() == []
    assert table.expired(NOW) == []
    assert table.to_evict(NOW) is None
    assert table.next_deadline(NOW) is None


def test_at_the_cap_the_loop_wakes_when_a_connection_becomes_evictable(conn: Maker) -> None:
    table = ConnectionTable(LIMITS)
    conns = [conn(NOW + 30.0), conn(NOW + 29.5), conn(NOW + 29.8)]
    for c in conns:
        table.add(c)
    # At the cap, one becomes evictable at its deadline less (idle_timeout - evict_after).
    assert table.next_deadline(NOW) == pytest.approx(NOW + 0.5)
    table.discard(conns[1])
    # Below it, only expiry matters.
    assert table.next_deadline(NOW) == NOW + 29.8


def test_a_drain_closes_only_answered_connections_that_sent_nothing_since(conn: Maker) -> None:
    table = ConnectionTable(LIMITS)
    never_answered = conn(NOW + 30.0)
    quiet = conn(NOW + 30.0)
    quiet.answered = True
    midway = conn(NOW + 30.0, received=True)
    midway.answered = True
    for c in (never_answered, quiet, midway):
        table.add(c)
    assert table.quiet() == [quiet]
    assert set(table.expired(NOW + 30.0)) == {never_answered, quiet, midway}
