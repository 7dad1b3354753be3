"""The control server's open connections and the rules on them: which are idle, which have
waited too long, which may be closed to make room for a newcomer, and when the loop must next
wake up. Pure bookkeeping: no I/O, no lock (the server holds its own around every call)."""

from __future__ import annotations

from collections.abc import Iterator

from pagefork.daemon.httpconn import HttpConnection
from pagefork.daemon.httpwire import ServerLimits


class ConnectionTable:
    """Every open connection of a server; a connection ``busy`` being answered is never idle.

    At most ``max_connections`` are open at once. When that many are open and a newcomer
    waits, the connection idle the longest (silent ones first) is the one to close, but only
    one idle for at least ``evict_after`` seconds (it has just connected and may be about to
    send its request).
    """

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._conns: set[HttpConnection] = set()

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[HttpConnection]:
        return iter(list(self._conns))

    def add(self, conn: HttpConnection) -> None:
        """Count a newly accepted connection."""
        self._conns.add(conn)

    def discard(self, conn: HttpConnection) -> None:
        """Stop counting a closed connection (if it was counted)."""
        self._conns.discard(conn)

    @property
    def full(self) -> bool:
        """True when ``max_connections`` are open."""
        return len(self._conns) >= self.limits.max_connections

    def idle(self) -> list[HttpConnection]:
        """The connections no request of which is being answered."""
        return [c for c in self._conns if not c.busy]

    def evictable(self, now: float) -> list[HttpConnection]:
        """The connections that may be closed to make room: idle for at least
        ``evict_after`` seconds."""
        since = now + self.limits.idle_timeout - self.limits.evict_after
        return [c for c in self._conns if not c.busy and c.deadline <= since]

    def to_evict(self, now: float) -> HttpConnection | None:
        """The evictable connection idle the longest, silent ones first; None if none is."""
        idle = self.evictable(now)
        if not idle:
            return None
        return min(idle, key=lambda c: (c.received, c.deadline))

    def expired(self, now: float) -> list[HttpConnection]:
        """The idle connections whose ``idle_timeout`` has passed."""
        return [c for c in self._conns if not c.busy and c.deadline <= now]

    def quiet(self) -> list[HttpConnection]:
        """The idle connections that have sent nothing since their answer (a drain closes
        them; one never answered was opened to ask something, and is waited for)."""
        return [c for c in self._conns if not c.busy and c.answered and not c.received]

    def next_deadline(self, now: float) -> float | None:
        """When the loop must next look at the connections: an idle one expires, or (at the
        cap) one becomes evictable; None if never."""
        deadlines = [c.deadline for c in self._conns if not c.busy]
        if self.full:
            # When one becomes evictable (listening resumes then); one that is already
            # evictable needs no wake-up: the listening socket wakes the loop.
            wait = self.limits.idle_timeout - self.limits.evict_after
            deadlines += [d - wait for d in deadlines if d - wait > now]
        return min(deadlines) if deadlines else None


__all__ = ["ConnectionTable"]
