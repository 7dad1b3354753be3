"""What a worker does if its supervisor dies: the hooks, carried out by a handler module.

A supervisor that wants its forks to outlive it sends each worker an
:class:`~pagefork.serving.messages.OrphanSetup` naming the handler module (a layer above the
page server: it speaks the takeover protocol, :mod:`pagefork.takeover.orphan`) and its
settings; an orderly stop sends :class:`~pagefork.serving.messages.Stop` first. The worker
imports the handler by that name, never by an import of its own, and calls it:

- ``prepare(worker, settings)`` when told, returning what the handler keeps;
- ``forget(kept)`` on a stop (the channel's end that follows is no death);
- ``become_orphan(worker, kept)`` when the channel ends without a stop: True when the worker
  serves on (the handler has swapped its channel), False when it exits. Before it, the worker
  claims the forks it parked for a move
  (:meth:`~pagefork.serving.workerforks.WorkerForks.claim_parked`): those no other worker
  adopted are its own again, and are handed on with the rest.

One worker per process: the link is this module's.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
from typing import Any

from pagefork.serving import messages as M

log = logging.getLogger("pagefork.worker")


class SupervisorChannel(socket.socket):
    """A worker's channel to its supervisor. A send to a supervisor that died is dropped, not
    raised: it may happen in the middle of a fault, and the loop learns of the death from the
    channel's end."""

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        try:
            return super().sendmsg(*args, **kwargs)
        except (BrokenPipeError, ConnectionResetError):
            return sum(len(b) for b in args[0])

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().sendall(*args, **kwargs)


class _Link:
    def __init__(self) -> None:
        self.handler: Any = None
        self.kept: Any = None


_LINK = _Link()


def on_message(worker: Any, message: M.Message) -> None:
    """Act on :class:`~M.OrphanSetup` or :class:`~M.Stop`; log any other message."""
    link = _LINK
    if isinstance(message, M.OrphanSetup):
        if link.handler is None:  # said twice (a spare given a slot): keep the first
            import json  # here, not at start: a worker's start-up is what its forks wait for

            link.handler = importlib.import_module(message.handler)
            link.kept = link.handler.prepare(worker, json.loads(message.settings))
    elif isinstance(message, M.Stop):
        if link.handler is not None and link.kept is not None:
            link.handler.forget(link.kept)
        link.kept = None
    else:
        log.error("unexpected message %s from the supervisor", type(message).__name__)


def channel_ended(worker: Any) -> bool:
    """The channel to the supervisor ended: True when the worker serves on as an orphan."""
    link = _LINK
    kept, link.kept = link.kept, None
    with contextlib.suppress(OSError, ValueError):
        worker.ep.unregister(worker.chan.fileno())
    if link.handler is None or kept is None:
        return False
    # A fork parked for a move the supervisor did not finish: its ledger's lock says whether
    # the other worker took it; if not, this worker serves it on with the rest.
    worker.table.claim_parked()
    return bool(link.handler.become_orphan(worker, kept))


__all__ = ["SupervisorChannel", "channel_ended", "on_message"]
