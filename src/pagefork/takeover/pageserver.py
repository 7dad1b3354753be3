"""A page server's part of a takeover, in the takeover protocol's terms.

The steps themselves are :class:`~pagefork.server.PageServer`'s methods
(:mod:`pagefork.serving.handover`); here they report failure as :class:`TakeoverError`, the
error the takeover's two sides send each other.

Old side, in order: :func:`quiesce`, :func:`release`, :func:`export`; then :func:`abandon`
(the new side serves the forks) or :func:`readopt` (the takeover failed). New side:
:func:`adopt`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pagefork.server import PageServer
from pagefork.serving.handover import HandoverError
from pagefork.takeover.protocol import TakeoverError


@contextmanager
def _as_takeover_error() -> Iterator[None]:
    try:
        yield
    except HandoverError as exc:
        raise TakeoverError(str(exc)) from None


def all_worker_pids(server: PageServer) -> list[int]:
    """Every worker process of ``server``, the spare included."""
    return server.all_worker_pids()


def quiesce(server: PageServer, deadline: float) -> None:
    """Stop accepting VMM connections (the listening sockets stay open: connections wait in
    their backlog for the new side), then wait for handshakes and callbacks in flight."""
    with _as_takeover_error():
        server.quiesce(deadline)


def release(server: PageServer, deadline: float) -> None:
    """Have every worker let its forks go; returns once every live fork is released."""
    with _as_takeover_error():
        server.release(deadline)


def export(server: PageServer) -> tuple[dict[str, Any], list[int]]:
    """Every fork (released) and listening socket of ``server``, as JSON and fds."""
    return server.export()


def readopt(server: PageServer) -> int:
    """The takeover failed: our workers serve every released fork again and we accept
    connections again. Returns how many forks were re-adopted."""
    return server.readopt()


def abandon(server: PageServer) -> None:
    """The new side serves everything now: forget every fork and socket without ending a fork,
    calling a callback, or removing a socket file (they are the new side's). Then close."""
    server.abandon()


def adopt(
    server: PageServer,
    state: dict[str, Any],
    fds: list[int],
    record: bool | Callable[[str], bool] | None = None,
) -> int:
    """Serve the forks and listening sockets of ``state`` (from :func:`export`) in ``server``.

    Takes ownership of every fd in ``fds``. Returns how many live forks were adopted.
    """
    with _as_takeover_error():
        return server.adopt(state, fds, record)
