"""The new side of a takeover: connect to the old process, build, receive, adopt.

:func:`take_over` runs the protocol of :mod:`pagefork.takeover.protocol` against the old side's
socket and drives a :class:`Target` (the ``serve`` or daemon being started). Any failure raises
:class:`~pagefork.takeover.protocol.TakeoverError` with a one-line reason, after telling the
old side (``abort``) where the connection still works; the old side then serves on. Except one:
when ``done`` cannot reach an old side that has died after sending the state, this side is the
only one left that can serve the forks, so it keeps them and the takeover succeeds.

``PAGEFORK_TAKEOVER_STOP_AT`` (tests only) stops this side at a step and blocks there, after
printing ``takeover: stopped at STEP`` on stderr, so a test can SIGKILL it at that very point:
``hello`` (connected, nothing sent), ``built`` (built, ``ready`` not sent), ``state`` (state
received, nothing adopted), ``adopted`` (its workers serve every fork, ``done`` not sent).
``PAGEFORK_TAKEOVER_PAUSE_AT`` waits there for a line on stdin instead, so a test can start a
fault storm right before the handover.
"""

from __future__ import annotations

import abc
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import pagefork
from pagefork.serving.sockets import FD_SLOTS_AT_START, reserve_fd_slots
from pagefork.takeover.protocol import (
    PROTOCOL_VERSION,
    Channel,
    NoPeerError,
    TakeoverError,
    check_version,
    close_all,
)

#: The steps ``PAGEFORK_TAKEOVER_STOP_AT`` can name.
STOP_POINTS = ("hello", "built", "state", "adopted")


class Target(abc.ABC):
    """What the new side builds and adopts into."""

    #: ``serve`` or ``daemon``: the old side refuses another kind.
    kind: str

    @abc.abstractmethod
    def build(self, plan: dict[str, Any]) -> list[int]:
        """Open and start everything ``plan`` names, serving nothing yet; the pids of every
        process that may serve a fork (the workers)."""

    @abc.abstractmethod
    def adopt(self, state: dict[str, Any], fds: list[int]) -> int:
        """Serve every fork of ``state`` (owning ``fds``); how many live forks it adopted."""


@dataclass(frozen=True)
class TakeoverResult:
    """A takeover that succeeded."""

    from_pid: int
    forks: int
    seconds: float
    #: The old side's takeover listening socket, for this side to listen on in its turn.
    listener: socket.socket | None = None


def _stop_point(step: str) -> None:
    if os.environ.get("PAGEFORK_TAKEOVER_STOP_AT") == step:
        print(f"takeover: stopped at {step}", file=sys.stderr, flush=True)
        threading.Event().wait()  # until a test kills us
    if os.environ.get("PAGEFORK_TAKEOVER_PAUSE_AT") == step:
        print(f"takeover: paused at {step}", file=sys.stderr, flush=True)
        sys.stdin.readline()  # a test goes on when it is ready: one line on our stdin


def _fds_expected(estimate: object) -> int:
    """Room to make for the state's fds: the old side's estimate (forks may connect until it
    quiesces, hence the margin), or :data:`FD_SLOTS_AT_START` from an old side that gives none."""
    if isinstance(estimate, int) and not isinstance(estimate, bool) and estimate >= 0:
        return min(estimate, 1 << 20) + 64
    return FD_SLOTS_AT_START


def _peer_pidfd(sock: socket.socket) -> int:
    """A pidfd of the process at the other end of ``sock`` (-1 if it cannot be had)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return os.pidfd_open(struct.unpack("3i", creds)[0])
    except OSError:
        return -1


def _died(pidfd: int, timeout: float) -> bool:
    """True once the process behind ``pidfd`` has exited (waiting up to ``timeout``: its
    socket closes before it is a zombie)."""
    if pidfd < 0:
        return False
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def take_over(
    path: str,
    target: Target,
    *,
    ready_timeout: float = 120.0,
    step_timeout: float = 30.0,
    cancel_fd: int = -1,
) -> TakeoverResult:
    """Take over from the process listening on ``path``. A stop signal that arrives meanwhile
    (``cancel_fd``, a signal inbox's pipe, turns readable) fails the takeover at its next
    step: the old side serves on."""
    t0 = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(step_timeout)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise NoPeerError(
            f"cannot reach the running process at {path}: {exc.strerror or exc}"
        ) from None
    ch = Channel(sock, cancel_fd)
    listener: socket.socket | None = None
    old = _peer_pidfd(sock)
    try:
        _stop_point("hello")
        ch.send(
            {
                "type": "hello",
                "protocol": list(PROTOCOL_VERSION),
                "pid": os.getpid(),
                "version": pagefork.__version__,
                "kind": target.kind,
            }
        )
        plan, fds = ch.recv(time.monotonic() + step_timeout, ["plan"])
        close_all(fds)
        from_pid = int(plan["pid"])
        try:
            why = check_version(plan.get("protocol"))
            if why is not None:  # the old side is the one with another major version
                raise TakeoverError(f"the running process: {why}")
            workers = target.build(dict(plan.get("plan") or {}))
            # Room for the state's fds now, not while the forks wait for it to be received.
            reserve_fd_slots(_fds_expected(plan.get("fds")))
            _stop_point("built")
            ch.send({"type": "ready", "worker_pids": workers})
            # The old side quiesces and releases before it sends the state.
            state, fds = ch.recv(time.monotonic() + ready_timeout + step_timeout, ["state"])
            _stop_point("state")
            index = state.pop("takeover", None)
            if isinstance(index, int) and 0 <= index < len(fds):
                listener = socket.socket(fileno=os.dup(fds[index]))
            forks = target.adopt(state, fds)
            _stop_point("adopted")
            try:
                ch.send({"type": "done", "forks": forks})
            except TakeoverError:
                # The old side is gone after handing everything over: this side is the only
                # one left to serve the forks, so it keeps them. (An old side that gave up on
                # purpose kills this one first, and is still alive here.)
                if not _died(old, step_timeout):
                    raise
        except Exception as exc:
            why = str(exc) if isinstance(exc, TakeoverError) else f"{type(exc).__name__}: {exc}"
            try:
                ch.send({"type": "abort", "error": why})
            except TakeoverError:
                pass
            if listener is not None:
                listener.close()
            if isinstance(exc, TakeoverError):
                raise
            raise TakeoverError(why) from exc
    finally:
        ch.close()
        if old >= 0:
            os.close(old)
    return TakeoverResult(from_pid, forks, time.monotonic() - t0, listener)


__all__ = ["STOP_POINTS", "TakeoverResult", "Target", "take_over"]
