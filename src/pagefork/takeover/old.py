"""The old side of a takeover: a 0600 socket that hands everything to a new process.

:class:`TakeoverListener` accepts one takeover at a time on its own thread and drives the
:class:`Source` (the running ``serve`` or daemon) through the protocol of
:mod:`pagefork.takeover.protocol`. Until the new side says ``done``, nothing is lost: if it
refuses, crashes, hangs or times out, the old side stops it (the new supervisor first, so it
cannot start another worker, then every worker it has) and re-adopts every released fork in
its own workers, which wake the forks' vCPUs. Two workers never serve one fork at once: a
fork is released before its state is sent, and the new side's processes are dead before the
old side's workers adopt it again.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pagefork
from pagefork.serving.sockets import bind_private_socket
from pagefork.takeover.protocol import PROTOCOL_VERSION, Channel, TakeoverError, check_version

log = logging.getLogger("pagefork")

_PEERCRED = struct.Struct("3i")
#: Connections that may wait for their hello at once; more wait in the listening backlog.
MAX_WAITING = 16


class Source(abc.ABC):
    """What the old side hands over (the running server); called on the listener's thread."""

    #: ``serve`` or ``daemon``: a new side of another kind is refused.
    kind: str

    @abc.abstractmethod
    def plan(self) -> dict[str, Any]:
        """What the new side must build before the handover (JSON)."""

    @abc.abstractmethod
    def quiesce(self, deadline: float) -> None:
        """Stop accepting (listening sockets stay open) and finish what is in flight."""

    @abc.abstractmethod
    def release(self, deadline: float) -> None:
        """Have every worker let its forks go (ledgers final)."""

    @abc.abstractmethod
    def export(self) -> tuple[dict[str, Any], list[int]]:
        """The full state (JSON) and its fds, once released."""

    @abc.abstractmethod
    def resume(self) -> None:
        """The takeover failed: adopt every released fork again and accept again."""

    def fd_estimate(self) -> int:
        """About how many fds the state would carry if it were taken now (0: unknown): the new
        side makes room for them before the handover, not while the forks wait."""
        return 0


class TakeoverListener:
    """Listens on ``path`` (0600) for a new process that takes over from ``source``.

    ``on_done(new_pid, forks)`` is called once a takeover succeeded; the caller then drops
    its copies (without ending a fork) and exits. ``sock`` is the listening socket a
    predecessor handed over (the state carries it, so ``path`` is never missing or rebound).
    Timeouts: ``ready_timeout`` for the new side to build (it opens templates and starts
    workers), ``step_timeout`` for every other step.
    """

    def __init__(
        self,
        path: str,
        source: Source,
        on_done: Callable[[int, int], None],
        *,
        ready_timeout: float = 120.0,
        step_timeout: float = 30.0,
        sock: socket.socket | None = None,
    ) -> None:
        self.path = path
        self.source = source
        self.on_done = on_done
        self.ready_timeout = ready_timeout
        self.step_timeout = step_timeout
        # A successor goes on listening on the socket its predecessor handed over.
        self._sock = sock if sock is not None else bind_private_socket(path)
        st = os.lstat(path)
        self._ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._done = False
        # Every connection open (waiting for its hello, or a takeover in flight): close()
        # cuts them all, so a stop never waits for a successor that builds slowly or hangs.
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        # One takeover at a time; a connection that says nothing holds only its own thread.
        self._turn = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pagefork-takeover", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and remove the socket, if it is still the one we bound. A takeover
        in flight that has not reached ``done`` fails at once, as any failed takeover does: the
        new side is stopped and every released fork is adopted again here."""
        os.eventfd_write(self._wake, 1)
        with self._conn_lock:
            self._closing = True
            conns = dict(self._conns)
            for conn in conns:
                # Reading only: the handler's wait ends, and its "abort" still reaches the
                # new side, which then knows this side gave up and did not die.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
        for thread in [self._thread, *conns.values()]:
            if thread is not threading.current_thread():
                thread.join()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if self._ident is not None and (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        self._sock.close()
        os.close(self._wake)

    def _run(self) -> None:
        # Accepts every connection at once and gives each its own thread to wait for its
        # hello in: a peer that connects and says nothing (or says it slowly) holds only its
        # own thread until its step times out, never the takeover of a genuine successor.
        # Past the hello, takeovers take turns (_turn). The backlog holds the rest while
        # MAX_WAITING connections wait for their hello.
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        poller.register(self._sock.fileno(), select.POLLIN)
        while not self._done:
            with self._conn_lock:
                full = len(self._conns) >= MAX_WAITING
            if full:
                poller.unregister(self._sock.fileno())
            ready = {fd for fd, _ in poller.poll(100 if full else None)}
            if full:
                poller.register(self._sock.fileno(), select.POLLIN)
            if self._wake in ready:
                return
            if self._sock.fileno() not in ready:
                continue
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with self._conn_lock:
                if self._closing:
                    conn.close()
                    return
                thread = threading.Thread(
                    target=self._serve_one, args=(conn,), name="pagefork-takeover-conn",
                    daemon=True,
                )  # fmt: skip
                self._conns[conn] = thread
                thread.start()  # under the lock: close() never joins one not started

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except Exception:  # the old side serves on whatever happens here
            log.exception("takeover: handling a takeover failed")
        finally:
            with self._conn_lock:
                self._conns.pop(conn, None)
            conn.close()

    def _handle(self, conn: socket.socket) -> None:
        pid, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid not in (0, os.geteuid()):
            log.warning("takeover: refusing uid %d (pid %d)", uid, pid)
            return
        ch = Channel(conn)
        try:
            hello, fds = ch.recv(time.monotonic() + self.step_timeout, ["hello"])
        except TakeoverError as exc:
            if not self._closing:  # cut by close(): no news
                log.warning("takeover by pid %d: %s", pid, exc)
            return
        for fd in fds:
            os.close(fd)
        with self._turn:
            if self._done or self._closing:
                return  # another one took over meanwhile, or this side stops
            self._take_turn(conn, ch, pid, hello)

    def _take_turn(self, conn: socket.socket, ch: Channel, pid: int, hello: dict[str, Any]) -> None:
        why = check_version(hello.get("protocol"))
        if why is None and hello.get("kind") != self.source.kind:
            why = f"this is a {self.source.kind}, not a {hello.get('kind')!r}"
        if why is not None:
            log.warning("takeover by pid %d refused: %s", pid, why)
            with contextlib.suppress(TakeoverError):
                ch.send({"type": "refused", "error": why})
            return
        log.warning("takeover: pid %d (pagefork %s) is taking over", pid, hello.get("version", "?"))
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone already
        watched: list[int] = []
        sent = False
        quiesced = False
        try:
            ch.send(
                {
                    "type": "plan",
                    "protocol": list(PROTOCOL_VERSION),
                    "pid": os.getpid(),
                    "version": pagefork.__version__,
                    "plan": self.source.plan(),
                    "fds": self.source.fd_estimate(),
                }
            )
            ready, fds = ch.recv(time.monotonic() + self.ready_timeout, ["ready"])
            for fd in fds:
                os.close(fd)
            for worker in _worker_pids(ready.get("worker_pids", [])):
                # Only its own children: a failed takeover kills these, and a peer must not
                # be able to name any other process.
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(worker)
                    if _parent_of(int(worker)) == pid:
                        watched.append(fd)
                    else:
                        os.close(fd)
            deadline = time.monotonic() + self.step_timeout
            quiesced = True
            self.source.quiesce(deadline)
            self.source.release(deadline)
            state, fds = self.source.export()
            state["takeover"] = len(fds)  # the successor listens on this very socket
            fds = [*fds, self._sock.fileno()]
            sent = True
            ch.send({"type": "state", "from_pid": os.getpid(), **state}, fds)
            done, fds = ch.recv(time.monotonic() + self.step_timeout, ["done"])
            for fd in fds:
                os.close(fd)
        except Exception as exc:
            why = str(exc) if isinstance(exc, TakeoverError) else repr(exc)
            with contextlib.suppress(TakeoverError):  # the new side says why it exits
                ch.send({"type": "abort", "error": f"the running process gave up: {why}"})
            if sent:
                # It may serve some forks already: stop it for good before ours adopt them.
                _stop_all(pidfd, pid, watched)
            if quiesced:
                self.source.resume()
            log.warning("takeover by pid %d failed: %s; serving on", pid, why)
            return
        finally:
            for fd in [pidfd, *watched]:
                os.close(fd)
        self._done = True
        self._ident = None  # the socket file is the successor's now
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)  # the accept loop ends
        self.on_done(pid, int(done.get("forks", 0)))


#: The largest pid Linux gives (``PID_MAX_LIMIT`` on 64-bit, 2**22).
_PID_MAX = 1 << 22


def _worker_pids(value: object) -> list[int]:
    """The ``worker_pids`` of a ``ready`` message: a list of pids (whole numbers in
    1..2**22); :class:`TakeoverError` naming the bad entry otherwise."""
    if not isinstance(value, list):
        raise TakeoverError(f"ready: worker_pids must be a list, not {type(value).__name__}")
    for i, pid in enumerate(value):
        if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= _PID_MAX:
            shown = repr(pid) if len(repr(pid)) <= 40 else repr(pid)[:40] + "..."
            raise TakeoverError(f"ready: worker_pids[{i}] {shown} is not a pid")
    return value


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def _stop_all(pidfd: int, pid: int, workers: list[int]) -> None:
    """SIGKILL the new supervisor and every worker of it, and wait until all are gone.

    The supervisor is stopped (SIGSTOP) first and its children are read while it cannot start
    another, so a worker it started after saying ``ready`` is killed too.
    """
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    children: list[int] = list(workers)
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    with contextlib.suppress(OSError):
                        children.append(os.pidfd_open(int(child)))
    for fd in [pidfd, *children]:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    for fd in [pidfd, *children]:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(10_000):
            log.error("takeover: process behind pidfd %d did not die after SIGKILL", fd)
    for fd in children[len(workers) :]:
        os.close(fd)
