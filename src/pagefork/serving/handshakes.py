"""The handshake reader: the page server's listening sockets and the connections whose
Firecracker handshake (mappings and one uffd) is not in yet.

Everything here runs on the supervisor's loop thread with the fork table's lock held. A
handshake that completes is handed back as a :class:`Handshake`; one that fails moves its fork
back to waiting (its own socket: the VMM may retry) or to failed (a shared socket).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagefork import uffd
from pagefork.errors import HandshakeError
from pagefork.handshake import (
    MAX_HANDSHAKE_BYTES,
    PayloadScanner,
    keeps_socket_open,
    parse_mappings,
)
from pagefork.regions import PAGE_SIZE, Region
from pagefork.serving.config import ServerConfig
from pagefork.serving.forks import ForkRecord, ForkTable
from pagefork.serving.sockets import SocketFiles, peer_pidfd
from pagefork.serving.state import Event, ForkState, Stage
from pagefork.stats import ForkStats

log = logging.getLogger("pagefork")

#: How long accepting pauses when the server is out of fds or memory.
ACCEPT_BACKOFF = 0.1
_PEERCRED = struct.Struct("3i")
#: Whether a fork on a shared socket records hot pages: a fixed answer or a rule by fork id.
RecordRule = bool | Callable[[str], bool] | None


class _OutOfFds(HandshakeError):
    """The server had no fd left for the uffd a VMM sent."""


@dataclass(eq=False)
class _Pending:
    """A connection whose handshake is not in yet."""

    entry: ForkRecord
    conn: socket.socket
    deadline: float
    pid: int | None
    pidfd: int = -1
    data: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    scanner: PayloadScanner = field(default_factory=PayloadScanner)


@dataclass(frozen=True)
class Handshake:
    """A completed handshake: the fork's connection, uffd (O_NONBLOCK, API done), regions and
    the VMM's pidfd (-1 when none could be had)."""

    entry: ForkRecord
    conn: socket.socket
    uffd: int
    regions: list[Region]
    pidfd: int


class HandshakeReader:
    """Listening sockets and pending handshakes of one page server (the lock is held)."""

    def __init__(
        self,
        config: ServerConfig,
        mem_size: int,
        table: ForkTable,
        epoll: select.epoll,
        closed_fds: set[int],
    ) -> None:
        self._config = config
        self._mem_size = mem_size
        self._table = table
        self._epoll = epoll
        self._closed_fds = closed_fds  # closed while the loop handles the current batch
        self.files = SocketFiles()
        #: Listener fd -> its registered fork, or None for a shared socket.
        self.listeners: dict[int, ForkRecord | None] = {}
        #: Shared sockets by fd: (socket, path, record rule).
        self.shared: dict[int, tuple[socket.socket, str, RecordRule]] = {}
        self.pending: dict[int, _Pending] = {}
        self._paused: dict[int, float] = {}  # listeners backing off (out of fds): until when

    # --- listeners -----------------------------------------------------------------------
    def add_fork_listener(self, entry: ForkRecord, sock: socket.socket) -> None:
        """Accept ``entry``'s VMM on ``sock`` (its own socket)."""
        entry.listener = sock
        if entry.socket_path is not None:
            self.files.note(entry.socket_path)
        self.listeners[sock.fileno()] = entry
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def add_shared(self, sock: socket.socket, path: str, record: RecordRule) -> None:
        """Accept any number of forks on ``sock`` (bound at ``path``)."""
        self.files.note(path)
        self.shared[sock.fileno()] = (sock, path, record)
        self.listeners[sock.fileno()] = None
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def drop_fork(self, entry: ForkRecord) -> None:
        """Close ``entry``'s listener and pending connection, remove its socket file."""
        for fd, pending in list(self.pending.items()):
            if pending.entry is entry:
                self.drop_pending(fd, None)
        sock = entry.listener
        if sock is not None:
            entry.listener = None
            self._closed_fds.add(sock.fileno())
            self.listeners.pop(sock.fileno(), None)
            self._paused.pop(sock.fileno(), None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(sock.fileno())
            sock.close()
        if entry.socket_path is not None:
            self.files.unlink(entry.socket_path)
            entry.socket_path = None

    def close_shared(self) -> None:
        """Close every shared socket and remove its file."""
        for sock, path, _ in self.shared.values():
            sock.close()
            self.files.unlink(path)
        self.shared.clear()
        self.listeners.clear()

    def stop_accepting(self) -> None:
        """Leave connections in the backlogs (a takeover's new side accepts them)."""
        for fd in self.listeners:
            self._paused.pop(fd, None)
            with contextlib.suppress(OSError):
                self._epoll.modify(fd, 0)

    def resume_accepting(self) -> None:
        """Accept again after :meth:`stop_accepting`."""
        for fd in self.listeners:
            with contextlib.suppress(OSError):
                self._epoll.modify(fd, select.EPOLLIN)

    def _pause(self, fd: int) -> None:
        self._epoll.modify(fd, 0)
        self._paused[fd] = time.monotonic() + ACCEPT_BACKOFF

    # --- timers --------------------------------------------------------------------------
    def deadlines(self) -> list[float]:
        """When a handshake times out or a paused listener resumes."""
        return [p.deadline for p in self.pending.values()] + list(self._paused.values())

    def run_timers(self, now: float) -> None:
        """Resume listeners whose back-off is over; fail handshakes that took too long."""
        for fd, until in list(self._paused.items()):
            if until <= now:
                del self._paused[fd]
                if fd in self.listeners:
                    self._epoll.modify(fd, select.EPOLLIN)
        for fd, p in list(self.pending.items()):
            if p.deadline <= now:
                why = f"timed out after {self._config.handshake_timeout:g}s waiting for mappings"
                self.drop_pending(fd, why)

    # --- accepting -----------------------------------------------------------------------
    def accept(self, fd: int) -> None:
        """Accept one connection on listener ``fd``; out of fds or memory, pause it a moment
        rather than spin on it (everything else goes on meanwhile)."""
        entry = self.listeners[fd]
        sock = entry.listener if entry is not None else self.shared[fd][0]
        assert sock is not None
        try:
            conn, _ = sock.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc.strerror or exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._pause(fd)
            return
        if len(self.pending) >= self._config.max_pending_handshakes:
            log.warning("refusing a connection: %d handshakes already pending", len(self.pending))
            conn.close()
            return
        if entry is None:
            entry = self._ephemeral(self.shared[fd][2])
        elif entry.stage is not Stage.WAITING:
            # One VMM per fork socket; a retry is allowed only after a failed handshake.
            log.warning("fork %s: refusing a second connection", entry.fork_id)
            conn.close()
            return
        pid = None
        with contextlib.suppress(OSError):
            got, _, _ = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            pid = got if got > 0 else None
        pidfd = peer_pidfd(conn, pid)
        conn.setblocking(False)
        self._table.move(entry, Event.ACCEPTED)
        if entry.handshake_failed is not None:
            entry.last_error, entry.handshake_failed = entry.handshake_failed, None
        entry.pid = pid
        self.pending[conn.fileno()] = _Pending(
            entry, conn, time.monotonic() + self._config.handshake_timeout, pid, pidfd
        )
        self._epoll.register(conn.fileno(), select.EPOLLIN)

    def _ephemeral(self, rule: RecordRule) -> ForkRecord:
        fork_id = self._table.next_ephemeral_id()
        try:
            record = rule(fork_id) if callable(rule) else rule
        except Exception:
            log.exception("fork %s: the record rule failed; not recording", fork_id)
            record = False
        entry = ForkRecord(
            fork_id,
            record=self._config.record_hot_pages if record is None else record,
            ephemeral=True,
        )
        self._table.by_id[fork_id] = entry
        return entry

    # --- reading -------------------------------------------------------------------------
    def step(self, fd: int) -> Handshake | None:
        """Read what connection ``fd`` sent; the handshake once it is complete and valid."""
        p = self.pending[fd]
        try:
            if not self._read(p):
                return None
            regions = self._check(p)
        except Exception as exc:  # a peer's bytes must never take more than its own fork
            if isinstance(exc, _OutOfFds):
                # Its uffd is gone: nobody can serve the VMM now, and its guest would hang.
                if self._config.on_failure == "kill" and p.pidfd >= 0:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(p.pidfd, signal.SIGKILL)
                for listener in list(self.listeners):  # and take no one else meanwhile
                    if listener not in self._paused:
                        self._pause(listener)
            elif not isinstance(exc, HandshakeError):
                log.exception("fork %s: handshake failed unexpectedly", p.entry.fork_id)
            self.drop_pending(fd, str(exc))
            return None
        del self.pending[fd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        return Handshake(p.entry, p.conn, p.fds[0], regions, p.pidfd)

    def _read(self, p: _Pending) -> bool:
        """Take what the peer sent; True once the payload is complete."""
        while not p.scanner.complete:
            try:
                # Room for two fds: one is right, a second is refused at once (the kernel
                # closes any that do not fit), so a peer cannot pile fds up in the server.
                msg, anc, flags, _ = p.conn.recvmsg(MAX_HANDSHAKE_BYTES, socket.CMSG_SPACE(2 * 4))
            except BlockingIOError:
                return False
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    p.fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if flags & socket.MSG_CTRUNC and len(p.fds) < 2:
                # The kernel dropped the fd because this process has no fd left for it.
                raise _OutOfFds(
                    "the uffd could not be received: the server is out of file descriptors"
                )
            if flags & socket.MSG_CTRUNC or len(p.fds) > 1:
                raise HandshakeError("expected exactly one uffd with the mappings, got more")
            if not msg:
                raise HandshakeError(
                    f"peer closed the connection after {len(p.data)} bytes, before the "
                    "mappings were complete"
                )
            p.data += msg
            if len(p.data) > MAX_HANDSHAKE_BYTES:
                raise HandshakeError(f"handshake payload exceeds {MAX_HANDSHAKE_BYTES} bytes")
            p.scanner.feed(msg)
        return True

    def _check(self, p: _Pending) -> list[Region]:
        """The regions of a complete payload, once its one fd proves a servable uffd."""
        if len(p.fds) != 1:
            raise HandshakeError(f"expected exactly one uffd with the mappings, got {len(p.fds)}")
        if not uffd.is_userfaultfd(p.fds[0]):
            raise HandshakeError("the file descriptor sent is not a userfaultfd")
        # Firecracker created the uffd O_NONBLOCK; make sure of it (never UFFDIO_API again).
        uffd_fd = p.fds[0]
        os.set_blocking(uffd_fd, False)
        if not uffd.api_done(uffd_fd):
            raise HandshakeError(
                "the uffd sent has not been through UFFDIO_API: the VMM must call it (and "
                "register its memory) before it sends the uffd"
            )
        regions = parse_mappings(bytes(p.data), self._mem_size, self._config.page_size or PAGE_SIZE)
        p.entry.hangup_ends = keeps_socket_open(bytes(p.data))
        return regions

    def drop_pending(self, fd: int, why: str | None) -> None:
        """Close connection ``fd`` and what it sent; its fork waits again, or fails."""
        p = self.pending.pop(fd)
        self._closed_fds.add(fd)
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        for got in [*p.fds, p.pidfd]:
            if got >= 0:
                os.close(got)
        p.conn.close()
        entry = p.entry
        if why is not None:
            log.warning("fork %s: bad handshake: %s", entry.fork_id, why)
        entry.error = None
        if entry.ephemeral:
            self._table.move(entry, Event.HANDSHAKE_LOST)
            entry.error = f"handshake: {why}"
            entry.final_stats = ForkStats(
                fork=entry.fork_id,
                state=ForkState.FAILED.value,
                errors=1,
                error=entry.error,
                pid=p.pid,
            )
            self._table.by_id.pop(entry.fork_id, None)
        else:
            self._table.move(entry, Event.HANDSHAKE_FAILED)
            entry.handshake_failed = why or "connection dropped"
            entry.last_error = entry.handshake_failed

    def drop_all(self) -> None:
        """Close every pending connection (the server closes)."""
        for fd in list(self.pending):
            self.drop_pending(fd, None)
