"""One fork's session: its handshake, its fault loop, and the target prefetch copies into.

A :class:`ForkSession` owns one accepted connection from a VMM. Its thread receives the
handshake (mappings JSON + uffd), then serves the uffd's events until the VMM exits, the
server stops it, or a fatal error applies the fork's failure policy. Every kernel rule sits
next to the ioctl it concerns.

A fork ends when its VMM *process* exits, not when its socket does: Firecracker 1.7-1.11 close
the handler socket right after the handshake and go on running the guest. The session takes
the peer's pid from ``SO_PEERCRED`` and watches a pidfd of it in the fault loop's epoll set;
a hang-up with a live VMM only stops watching the socket. Where no pidfd can be had (pid 0 from
another pid namespace, a peer in this very process, ``pidfd_open`` failing) the hang-up ends
the fork as before. ESRCH from a copy (the VMM's memory is gone) also ends it.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import logging
import math
import mmap
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pagefork import uffd
from pagefork.errors import ForkError, HandshakeError, PrefetchError
from pagefork.handshake import MAX_HANDSHAKE_BYTES, PayloadScanner, parse_mappings
from pagefork.memfile import MemFile
from pagefork.regions import PAGE_SIZE, Region, RegionMap
from pagefork.removed import RemovedRanges
from pagefork.stats import ForkStats, LatencyWindow

if TYPE_CHECKING:
    from pagefork.hotpages import HotPageRecorder

log = logging.getLogger("pagefork")

FailurePolicy = Literal["kill", "close"]

#: Events read per ``read(2)`` of the uffd: one syscall drains a burst of faults.
_READ_BATCH = 64
_MSG = struct.Struct("=B3xIQQQ")
_FAULT_ADDRESS = struct.Struct("=16xQ8x")
_PEERCRED = struct.Struct("3i")
_COPY_DONTWAKE = uffd.UFFDIO_COPY_MODE_DONTWAKE


def zero_source(size: int) -> int:
    """Address of ``size`` readable zero bytes (one mapping per size, kept for the process)."""
    found = _ZERO_SOURCES.get(size)
    if found is None:
        with _ZERO_LOCK:
            found = _ZERO_SOURCES.get(size)
            if found is None:
                # Never written, so every page stays the shared zero page: no memory cost.
                view = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                found = (view, ctypes.addressof(ctypes.c_char.from_buffer(view)))
                _ZERO_SOURCES[size] = found  # the mapping must outlive every copy from it
    return found[1]


def _watch_pid(pid: int | None) -> int:
    """A pidfd of the VMM ``pid`` (readable once it exits), or -1 where none can be had."""
    if pid is None or pid == os.getpid():
        return -1  # our own process never "exits" while we serve: keep the hang-up rule
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        log.debug("cannot watch VMM pid %d (%s): its socket's hang-up ends the fork", pid, exc)
        return -1


def _readable(fds: list[int], timeout: float) -> list[int]:
    """The fds of ``fds`` readable within ``timeout`` seconds (poll: fds may exceed 1024)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0, math.ceil(timeout * 1000)))]


_ZERO_SOURCES: dict[int, tuple[mmap.mmap, int]] = {}
_ZERO_LOCK = threading.Lock()


@dataclass(frozen=True)
class SessionOptions:
    """How a session serves: failure policy, handshake timeout, page-size default."""

    on_failure: FailurePolicy = "kill"
    handshake_timeout: float = 10.0
    page_size: int = 0


class _Fatal(Exception):
    """A fork-fatal condition inside the fault loop (never escapes the session)."""


class _PeerGone(Exception):
    """The VMM exited; its session ends as cleanly as a hang-up."""


class PrefetchPort:
    """Prefetch's way into a fork's uffd (a :class:`pagefork.prefetch.PrefetchTarget`).

    It has its own ioctl buffers and a lock that the fault loop also takes around reading
    events and noting REMOVE ranges, so a prefetch copy never lands between the read of a
    REMOVE and its noting.
    """

    __slots__ = ("_gen_before", "_ioctls", "_session", "lock", "src_base")

    def __init__(self, session: ForkSession, uffd_fd: int) -> None:
        self._session = session
        self._ioctls = uffd.UffdIoctls(uffd_fd)
        self.lock = threading.Lock()
        self.src_base = session.src_base
        self._gen_before = 0

    def copy(self, dst: int, src: int, length: int, mode: int) -> int:
        """``UFFDIO_COPY`` for prefetch (same errno contract as :class:`uffd.UffdIoctls`)."""
        with self.lock:
            self._check_not_removed(dst, length)
            return self._ioctls.copy(dst, src, length, mode)

    def zeropage(self, dst: int, length: int, mode: int) -> int:
        """``UFFDIO_ZEROPAGE`` for prefetch."""
        with self.lock:
            self._check_not_removed(dst, length)
            return self._ioctls.zeropage(dst, length, mode)

    def _check_not_removed(self, dst: int, length: int) -> None:
        s = self._session
        self._gen_before = s._events_gen
        # A REMOVE noted since the caller looked at removed_ranges(): answer as the kernel
        # does for an unread one, so the caller re-reads the ranges and retries.
        if s.removed and s.removed.overlaps(dst, dst + length):
            raise OSError(errno.EAGAIN, "range removed by the guest meanwhile")

    def wake(self, start: int, length: int) -> None:
        """``UFFDIO_WAKE`` over a range prefetch filled with DONTWAKE."""
        self._ioctls.wake(start, length)

    def removed_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Parts of ``[start, end)`` the guest removed (prefetch must skip them)."""
        return self._session.removed.overlaps(start, end)

    def await_events(self, timeout: float) -> None:
        """Wait until the fault loop has read the events that made a copy fail with EAGAIN."""
        self._session._await_events(self._gen_before, timeout)


class ForkSession:
    """Serves one fork's uffd from the shared mem-file, on its own thread."""

    def __init__(
        self,
        fork_id: str,
        conn: socket.socket,
        memfile: MemFile,
        options: SessionOptions,
        recorder: HotPageRecorder | None = None,
        on_connect: Callable[[ForkSession], None] | None = None,
        on_end: Callable[[ForkSession], None] | None = None,
    ) -> None:
        self.fork_id = fork_id
        self._conn = conn
        self._mem = memfile
        self._zeros = memfile.zero_pages
        self._opts = options
        self.recorder = recorder
        self._on_connect = on_connect
        self._on_end = on_end
        self.pid: int | None = None
        self._pidfd = -1  # the VMM's pidfd: its exit is the fork's end (see _watch_pid)
        self.regions: list[Region] = []
        self._scan_regions: list[tuple[int, int, int, int, int]] = []
        self._uffd = -1
        self.removed = RemovedRanges()
        self.stats = ForkStats(fork=fork_id, state="handshake")
        self.latency = LatencyWindow()
        self.connected = threading.Event()
        self.ended = threading.Event()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_lock = threading.Lock()
        # Prefetch copies from other threads; it waits on this condition for the fault loop to
        # read pending events (a copy gets EAGAIN while a REMOVE event is unread).
        self._events_cond = threading.Condition()
        self._events_gen = 0
        self._waiters = 0
        self._prefetch_lock = threading.Lock()
        self._port: PrefetchPort | None = None
        self._prefetched = False
        self._loop_done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"pagefork-fork-{fork_id}", daemon=True
        )

    @property
    def src_base(self) -> int:
        """Address of the mem-file mapping: the source of every copy."""
        return self._mem.address

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the session's thread (handshake, then fault loop)."""
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop serving and wait for the thread to finish; idempotent."""
        if self._thread.is_alive():
            with self._stop_lock:  # never write to the fd number after the thread closed it
                if self._stop_fd >= 0:
                    os.eventfd_write(self._stop_fd, 1)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)

    def discard(self) -> None:
        """Release what a session that never started holds (its connection is the caller's)."""
        if self._thread.ident is None:
            with self._stop_lock:
                if self._stop_fd >= 0:
                    os.close(self._stop_fd)
                    self._stop_fd = -1

    def _run(self) -> None:
        try:
            self._handshake()
        except Exception as exc:  # a peer's bytes must never take more than its own fork
            if not isinstance(exc, HandshakeError):
                log.exception("fork %s: handshake failed unexpectedly", self.fork_id)
            log.warning("fork %s: bad handshake: %s", self.fork_id, exc)
            self.stats.state = "failed"
            self.stats.errors += 1
            self.stats.error = f"handshake: {exc}"
        else:
            self.stats.state = "serving"
            self.connected.set()
            try:
                if self._on_connect is not None:
                    self._on_connect(self)
                self._serve()
            except _PeerGone:
                self.stats.state = "ended"
            except _Fatal as exc:
                self.stats.errors += 1
                self.stats.error = str(exc)
                self.stats.state = "failed"
                self._apply_failure_policy(str(exc))
            except Exception as exc:  # a bug must end this fork only, never the server
                log.exception("fork %s: fault loop crashed", self.fork_id)
                self.stats.errors += 1
                self.stats.error = f"internal error: {exc!r}"
                self.stats.state = "failed"
                self._apply_failure_policy(self.stats.error)
            else:
                if self.stats.state == "serving":
                    self.stats.state = "ended"
        finally:
            self._loop_done.set()
            self._close_fds()
            if self.recorder is not None:
                self.recorder.close()
            self.ended.set()
            if self._on_end is not None:
                try:
                    self._on_end(self)
                except Exception:
                    log.exception("fork %s: end callback failed", self.fork_id)

    def _close_fds(self) -> None:
        with self._prefetch_lock:
            if self._uffd >= 0:
                os.close(self._uffd)
                self._uffd = -1
        try:
            self._conn.close()
        except OSError:
            pass
        with self._stop_lock:
            os.close(self._stop_fd)
            self._stop_fd = -1
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _apply_failure_policy(self, why: str) -> None:
        pid = self.pid
        if self._opts.on_failure == "kill" and pid is not None and pid > 1 and pid != os.getpid():
            log.error(
                "fork %s: %s; killing VMM pid %d (its guest would hang)", self.fork_id, why, pid
            )
            try:
                if self._pidfd >= 0:  # the pidfd cannot hit a reused pid
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            log.error("fork %s: %s; closing its connection", self.fork_id, why)

    # --- handshake ---------------------------------------------------------------------------
    def _handshake(self) -> None:
        conn = self._conn
        try:
            pid, _, _ = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            self.pid = pid if pid > 0 else None
            self.stats.pid = self.pid
        except OSError:
            pass
        # Right away: the earlier the pidfd, the smaller the window for a reused pid.
        self._pidfd = _watch_pid(self.pid)
        deadline = time.monotonic() + self._opts.handshake_timeout
        data = bytearray()
        fds: list[int] = []
        scanner = PayloadScanner()
        try:
            while not scanner.complete:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HandshakeError(
                        f"timed out after {self._opts.handshake_timeout:g}s waiting for mappings"
                    )
                ready = _readable([conn.fileno(), self._stop_fd], left)
                if self._stop_fd in ready:
                    raise HandshakeError("server stopped before the handshake completed")
                if not ready:
                    continue
                # Room for two fds: one is right, a second is refused at once (the kernel
                # closes any that do not fit), so a peer cannot pile fds up in the server.
                msg, anc, flags, _ = conn.recvmsg(MAX_HANDSHAKE_BYTES, socket.CMSG_SPACE(2 * 4))
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                if flags & socket.MSG_CTRUNC or len(fds) > 1:
                    raise HandshakeError("expected exactly one uffd with the mappings, got more")
                if not msg:
                    raise HandshakeError(
                        f"peer closed the connection after {len(data)} bytes, before the "
                        "mappings were complete"
                    )
                data += msg
                if len(data) > MAX_HANDSHAKE_BYTES:
                    raise HandshakeError(f"handshake payload exceeds {MAX_HANDSHAKE_BYTES} bytes")
                scanner.feed(msg)
            if len(fds) != 1:
                raise HandshakeError(f"expected exactly one uffd with the mappings, got {len(fds)}")
            if not uffd.is_userfaultfd(fds[0]):
                raise HandshakeError("the file descriptor sent is not a userfaultfd")
            regions = parse_mappings(bytes(data), self._mem.size, self._opts.page_size or PAGE_SIZE)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # Firecracker created the uffd O_NONBLOCK; make sure of it (never UFFDIO_API again).
        flags = fcntl.fcntl(fds[0], fcntl.F_GETFL)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fds[0], fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._uffd = fds[0]
        self._set_regions(regions)
        self._port = PrefetchPort(self, fds[0])
        if self.recorder is not None:
            self.recorder.start()

    # --- fault loop --------------------------------------------------------------------------
    def _serve(self) -> None:
        fd = self._uffd
        ep = select.epoll(4)
        try:
            ep.register(fd, select.EPOLLIN)
            ep.register(self._conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            ep.register(self._stop_fd, select.EPOLLIN)
            if self._pidfd >= 0:
                ep.register(self._pidfd, select.EPOLLIN)  # readable once the VMM has exited
            self._loop(ep, fd, self._conn.fileno())
        finally:
            ep.close()

    def _loop(self, ep: select.epoll, fd: int, conn_fd: int) -> None:
        ioctls = uffd.UffdIoctls(fd)
        stop_fd = self._stop_fd
        pid_fd = self._pidfd
        read_size = uffd.UFFD_MSG_SIZE * _READ_BATCH
        assert self._port is not None
        port_lock = self._port.lock
        deferred: list[int] = []
        rec = self.recorder
        poll = ep.poll
        read = os.read
        decode = self._decode
        only_uffd = [(fd, select.EPOLLIN)]
        pagefault = uffd.UFFD_EVENT_PAGEFAULT
        while True:
            # With faults deferred on EAGAIN, don't sleep: poll briefly and retry them. While
            # a recording window is open, wake now and then so a time limit can close it.
            timeout = 0.001 if deferred else (0.25 if rec is not None and not rec.closed else -1)
            ready = poll(timeout)
            if ready != only_uffd:
                for rfd, _ev in ready:
                    if rfd == stop_fd:
                        return
                    if rfd == pid_fd:  # the VMM exited: the fork's end
                        self.stats.state = "ended"
                        return
                    if rfd == conn_fd and self._peer_gone():
                        if pid_fd < 0:  # no pidfd: the hang-up is all we can go by
                            self.stats.state = "ended"
                            return
                        # Firecracker < 1.12 closes the socket after the handshake and runs
                        # on: keep serving until its pidfd says it exited.
                        ep.unregister(conn_fd)
                        log.debug(
                            "fork %s: VMM pid %s closed its socket; serving until it exits",
                            self.fork_id,
                            self.pid,
                        )
                if not ready and rec is not None:
                    rec.poll()
            # Reading and noting REMOVE ranges happen under the prefetch port's lock: a
            # prefetch copy can never land between the read of a REMOVE and its noting.
            with port_lock:
                try:
                    data = read(fd, read_size)
                except BlockingIOError:
                    data = b""
                if len(data) == uffd.UFFD_MSG_SIZE and data[0] == pagefault:
                    # The usual read: one page fault (uffd_msg.arg.pagefault.address at 16).
                    self._events_gen += 1
                    faults = [_FAULT_ADDRESS.unpack(data)[0]]
                else:
                    faults = decode(data) if data else []
            if faults:
                deferred = self._serve_batch(ioctls, deferred + faults if deferred else faults)
            elif deferred:
                deferred = self._serve_batch(ioctls, deferred)

    def _peer_gone(self) -> bool:
        try:
            chunk = self._conn.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        # Firecracker sends nothing after the handshake; extra bytes are ignored.
        return chunk == b""

    def _decode(self, data: bytes) -> list[int]:
        """Split a read into fault addresses and act on the other events at once."""
        faults: list[int] = []
        for event, _, a, b, c in _MSG.iter_unpack(data):
            if event == uffd.UFFD_EVENT_PAGEFAULT:
                faults.append(b)
            else:
                self._handle_other(event, a, b, c)
        self._events_gen += 1
        if self._waiters:  # only a prefetch that got EAGAIN waits for this
            with self._events_cond:
                self._events_cond.notify_all()
        return faults

    def _handle_other(self, event: int, a: int, b: int, c: int) -> None:
        if event == uffd.UFFD_EVENT_REMOVE:
            # Balloon inflation: template bytes are stale here from now on; serve zeros.
            self.stats.removed_bytes += self.removed.add(a, b)
        elif event == uffd.UFFD_EVENT_REMAP:
            self._remap(a, b, c)
        elif event == uffd.UFFD_EVENT_UNMAP:
            log.info("fork %s: range %#x-%#x unmapped by the VMM", self.fork_id, a, b)
        elif event == uffd.UFFD_EVENT_FORK:
            # We serve the VMM, not its children: drop the child's uffd.
            os.close(a & 0xFFFFFFFF)
        else:
            log.warning("fork %s: ignoring unknown uffd event %#x", self.fork_id, event)

    def _remap(self, old: int, new: int, length: int) -> None:
        for i, r in enumerate(self.regions):
            if r.base == old and r.size == length:
                regions = list(self.regions)
                regions[i] = Region(new, r.size, r.offset, r.page_size)
                self._set_regions(regions)
                return
        log.warning("fork %s: mremap of %#x does not match a whole region", self.fork_id, old)

    def _serve_batch(self, ioctls: uffd.UffdIoctls, addresses: list[int]) -> list[int]:
        """Install the page of each faulting address; return those the kernel said EAGAIN to.

        This is the fault path: what it needs is bound to locals once per batch, and the
        region lookup is :class:`RegionMap`'s table, scanned inline.
        """
        again: list[int] = []
        stats = self.stats
        regions = self._scan_regions
        zeros = self._zeros
        src_base = self._mem.address
        removed = self.removed if self.removed else None
        rec = self.recorder
        prefetched = self._prefetched
        latency = self.latency
        clock = time.perf_counter_ns
        copy = ioctls.copy
        zeropage = ioctls.zeropage
        for address in addresses:
            t0 = clock()
            for base, end, offset, psize, idx in regions:  # noqa: B007 (used after break)
                if base <= address < end:
                    break
            else:
                raise _Fatal(f"fault at {address:#x} is outside every region")
            page_offset = (address - base) & -psize
            dst = base + page_offset
            file_offset = offset + page_offset
            if psize == PAGE_SIZE:
                zero = zeros[file_offset >> 12] == 1
            else:
                zero = self._mem.is_zero(file_offset, psize)
            if removed is not None and removed.contains(dst):
                zero = True  # balloon: the template's bytes are stale here; serve zeros
            # Count before the ioctl: it wakes the guest, which may read our stats right after.
            stats.faults += 1
            if prefetched:
                stats.misses += 1
            try:
                if not zero:
                    stats.pages_copied += 1
                    copy(dst, src_base + file_offset, psize)
                else:
                    stats.zero_pages += 1
                    if psize == PAGE_SIZE:
                        zeropage(dst, psize)
                    else:
                        # hugetlbfs has no UFFDIO_ZEROPAGE (EINVAL): copy from a zero page.
                        copy(dst, zero_source(psize), psize)
            except OSError as exc:
                if zero:
                    stats.zero_pages -= 1
                else:
                    stats.pages_copied -= 1
                if exc.errno == errno.EEXIST:
                    # Prefetch or another vCPU installed it first: the page is there. Prefetch
                    # copies with DONTWAKE, so the faulting thread may still sleep: wake it.
                    stats.already_present += 1
                    with contextlib.suppress(OSError):
                        ioctls.wake(dst, psize)
                elif exc.errno == errno.EAGAIN:
                    # An unread non-cooperative event (REMOVE) blocks copies: defer, read
                    # the events, retry.
                    stats.faults -= 1
                    if prefetched:
                        stats.misses -= 1
                    again.append(address)
                    continue
                elif exc.errno == errno.ESRCH:
                    raise _PeerGone from None  # the VMM's address space is gone: it exited
                else:
                    raise _Fatal(
                        f"installing the page at {dst:#x} (region {idx}) failed: "
                        f"{os.strerror(exc.errno or 0)}"
                    ) from None
            if rec is not None:
                rec.record(idx, page_offset)
            latency.add(clock() - t0)
        if again:
            stats.eagain_retries += len(again)
        return again

    def _set_regions(self, regions: list[Region]) -> None:
        self.regions = regions
        self._scan_regions = RegionMap(regions).table

    # --- prefetch -----------------------------------------------------------------------------
    def run_prefetch(self, fn: Callable[[PrefetchPort], object]) -> object:
        """Run ``fn`` with this fork's prefetch port; prefetches of one fork run one at a time."""
        if not self.connected.is_set():
            raise ForkError(f"fork {self.fork_id}: not connected")
        with self._prefetch_lock:
            if self._uffd < 0 or self._port is None:
                raise PrefetchError(f"fork {self.fork_id}: session has ended")
            self._prefetched = True
            return fn(self._port)

    def _await_events(self, seen: int, timeout: float) -> None:
        """Wait until the fault loop has read events since generation ``seen`` (EAGAIN)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._events_cond:
                self._waiters += 1
                try:
                    if self._events_gen == seen:
                        self._events_cond.wait(0.002)
                finally:
                    self._waiters -= 1
                if self._events_gen != seen:
                    return
            if self._loop_done.is_set():
                raise PrefetchError(f"fork {self.fork_id}: session ended during prefetch")
            # Nothing unread: the kernel was finishing the remove itself; just retry.
            if self._uffd >= 0 and not _readable([self._uffd], 0):
                return
            if time.monotonic() > deadline:
                raise PrefetchError(
                    f"fork {self.fork_id}: uffd events stayed unread for {timeout:g}s"
                )

    def snapshot_stats(self) -> ForkStats:
        """A copy of the fork's stats with current latency percentiles."""
        s = ForkStats(**{**self.stats.to_dict(), "latency_us": self.latency.percentiles_us()})
        return s
