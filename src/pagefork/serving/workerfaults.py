"""A worker's fault path: read a fork's uffd, decide, install the page, count it.

:class:`FaultLoop` is the part of :class:`pagefork.serving.worker.Worker` that serves faults
(the worker's loop calls :meth:`FaultLoop._on_uffd` when a uffd is readable); the kernel rules
it keeps are listed in :mod:`pagefork.serving.worker`. This is the code every demand fault
runs, so it is written for that: constants bound at import, one call per fault in the usual
case, and a fork's uffd read again at once after a fault (see ``_EAGER_READS``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import signal
import socket
import time
from typing import Any

from pagefork import uffd
from pagefork.errors import PageforkError
from pagefork.regions import PAGE_SIZE
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.policy import Action, decide
from pagefork.serving.workerforks import LazyChunks, WorkerFork, WorkerForks
from pagefork.uffd import CopyOutcome, copy_outcome

log = logging.getLogger("pagefork.worker")

#: Events read per ``read(2)`` of a uffd: one syscall drains a burst of faults.
_READ_BATCH = 64
READ_SIZE = uffd.UFFD_MSG_SIZE * _READ_BATCH
_MSG_SIZE, _PAGEFAULT = uffd.UFFD_MSG_SIZE, uffd.UFFD_EVENT_PAGEFAULT
_unpack_address = uffd.PAGEFAULT_ADDRESS.unpack_from
_preadv, _RWF_NOWAIT, _clock = os.preadv, os.RWF_NOWAIT, time.perf_counter_ns
_ioctl = fcntl.ioctl
_pack_copy, _pack_zeropage = uffd.COPY_ARG.pack_into, uffd.ZEROPAGE_ARG.pack_into
_UFFDIO_COPY, _UFFDIO_ZEROPAGE = uffd.UFFDIO_COPY, uffd.UFFDIO_ZEROPAGE
#: Faults one fork may have served in a row, each read as soon as the last is served, before
#: the loop looks at epoll again: a guest on this CPU faults again before this worker runs
#: again (its wake-up preempts us), so the read finds it and an epoll_wait is saved.
_EAGER_READS = 8
#: Faults served one epoll wake-up each after such a read found nothing (a guest on another
#: CPU, still running): the failed read cost a syscall and an exception.
_EAGER_BACKOFF = 8
_NO_ROW = (0, 0, 0, 0, -1)  # a region table's row for no region
_PAGE_SHIFT, _PAGE_MASK = PAGE_SIZE.bit_length() - 1, -PAGE_SIZE
_FAULTS, _MISSES, _PREFETCHED = L.FAULTS, L.MISSES, L.PREFETCHED
_PAGES_COPIED, _ZERO_PAGES, _LATENCY_N = L.PAGES_COPIED, L.ZERO_PAGES, L.LATENCY_N
_LATENCY_MASK = L.LATENCY_SLOTS - 1
_COPY, _ZEROPAGE, _OUTSIDE = int(Action.COPY), int(Action.ZEROPAGE), int(Action.OUTSIDE)


class ForkFatal(Exception):
    """A fork-fatal condition (never escapes the worker: the fork fails, the others go on)."""


_ZERO_SOURCES: dict[int, tuple[mmap.mmap, int]] = {}


def zero_source(size: int) -> int:
    """Address of ``size`` readable zero bytes (one mapping per size, kept for the process)."""
    found = _ZERO_SOURCES.get(size)
    if found is None:
        # Never written, so every page stays the shared zero page: no memory cost.
        view = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        found = (view, ctypes.addressof(ctypes.c_char.from_buffer(view)))
        _ZERO_SOURCES[size] = found
    return found[1]


class FaultLoop:
    """The fault path of a worker (its loop, forks and maps are the worker's)."""

    chan: socket.socket
    table: WorkerForks
    forks: dict[str, WorkerFork]
    zeros: mmap.mmap
    lazy: LazyChunks | None
    mem_address: int
    crash_at: dict[str, int]
    stop_at: set[str]
    _read_buf: bytearray
    _read_bufs: list[bytearray]
    _ioctl_arg: bytearray

    def _on_uffd(self, f: WorkerFork) -> None:
        """The fault path: read the uffd, serve what it gave (and faults deferred); while the
        guest faults again as fast as it is served, read again before going back to epoll."""
        buf, bufs, fd = self._read_buf, self._read_bufs, f.uffd
        for turn in range(_EAGER_READS):
            try:
                # RWF_NOWAIT, not O_NONBLOCK: the file flags belong to the VMM too, and a peer
                # that clears O_NONBLOCK must not be able to block this loop in read(2).
                got = _preadv(fd, bufs, -1, _RWF_NOWAIT)
            except BlockingIOError:
                if turn:  # nothing yet after a fault served: let epoll say when
                    f.eager_skip = _EAGER_BACKOFF
                    return
                got = 0
            if got != _MSG_SIZE or buf[0] != _PAGEFAULT or self.crash_at or f.deferred:
                self._serve_faults(f, self._decode(f, got) if got else [])
                return
            # The usual read: one fault, served here when it is the usual fault too (a 4 KiB
            # page of a fork that removed nothing, from a mem-file or from a lazy view's chunk
            # that is in): the rule of policy.decide for such a page, without its calls.
            # Anything else takes the full path.
            t0 = _clock()
            address = _unpack_address(buf)[0]
            if not f.plain:
                self._serve_faults(f, [address])
                return
            for row in f.table:  # regions.region_at, inline
                if row[0] <= address < row[1]:
                    break
            else:
                row = _NO_ROW
            base, _end, offset, psize, idx = row
            if psize != PAGE_SIZE:
                self._serve_faults(f, [address])  # outside every region, or a huge page
                return
            page = (address - base) & _PAGE_MASK
            file_offset = offset + page
            zero = self.zeros[file_offset >> _PAGE_SHIFT] == 1
            lazy = self.lazy
            if lazy is not None and not zero and not lazy.presence[file_offset >> lazy.chunk_shift]:
                self._serve_faults(f, [address])  # its chunk is not in (yet): it may park
                return
            if f.rec_seen is not None:
                # Recorded before the copy, as on the full path (which finds it recorded if
                # the copy below sends the fault there).
                self.table.record(f, idx, page)
            c = f.counters
            # Count before the ioctl: it wakes the guest, which may read the stats right after.
            c[_FAULTS] += 1
            prefetched = c[_PREFETCHED]
            if prefetched:
                c[_MISSES] += 1
            arg = self._ioctl_arg
            slot = _ZERO_PAGES if zero else _PAGES_COPIED
            c[slot] += 1
            try:
                if zero:
                    _pack_zeropage(arg, 0, base + page, PAGE_SIZE, 0, 0)
                    _ioctl(fd, _UFFDIO_ZEROPAGE, arg, True)
                else:
                    _pack_copy(arg, 0, base + page, self.mem_address + file_offset, PAGE_SIZE, 0, 0)
                    _ioctl(fd, _UFFDIO_COPY, arg, True)
            except OSError:
                # Rare (a prefetch put the page first, a REMOVE is unread, the VMM is exiting):
                # uncounted, the fault takes the full path, whose ioctl meets the same errno
                # and which knows what each means.
                c[slot] -= 1
                c[_FAULTS] -= 1
                if prefetched:
                    c[_MISSES] -= 1
                self._serve_faults(f, [address])
                return
            n = c[_LATENCY_N]
            f.latency_ring[n & _LATENCY_MASK] = _clock() - t0
            c[_LATENCY_N] = n + 1
            if f.eager_skip:
                f.eager_skip -= 1
                return

    def read_events(self, f: WorkerFork, *, until_empty: bool) -> list[int]:
        """Read the uffd's events: REMOVE is made durable at once; faults are returned."""
        faults: list[int] = []
        while True:
            try:
                got = _preadv(f.uffd, self._read_bufs, -1, _RWF_NOWAIT)
            except BlockingIOError:
                return faults
            faults += self._decode(f, got)
            if not until_empty or got < READ_SIZE:
                return faults

    def _decode(self, f: WorkerFork, got: int) -> list[int]:
        """The faults among the ``got`` bytes of messages just read; the other events acted on
        (a REMOVE made durable) in their order."""
        buf = self._read_buf
        faults: list[int] = []
        for offset in range(0, got, _MSG_SIZE):
            if buf[offset] == _PAGEFAULT:
                faults.append(_unpack_address(buf, offset)[0])
            else:
                removed = self.table.on_event(f, uffd.decode_msg(buf, offset))
                if removed and self.crash_at:
                    self.crash_point("remove_noted")
        if faults and self.crash_at:
            self.crash_point("fault_read")
        return faults

    def _serve_faults(self, f: WorkerFork, faults: list[int]) -> None:
        """Install the page of each faulting address (and of those deferred before)."""
        if f.deferred:
            addresses = f.deferred + faults
            f.deferred = []
        elif faults:
            addresses = faults
        else:
            return
        # The fault path: what it touches is bound to a local once per batch, the constants
        # are module globals (as cheap to read).
        c = f.counters
        ring = f.latency_ring
        table = f.table
        zeros = self.zeros
        is_zero = self._is_zero
        is_removed = f.removed.contains if f.removed else None
        src_base = self.mem_address
        prefetched = c[_PREFETCHED]
        recording = f.rec_seen is not None
        ioctls = f.ioctls
        clock = _clock
        lazy = self.lazy
        present = lazy.presence if lazy is not None else None
        shift = lazy.chunk_shift if lazy is not None else 0
        again: list[int] = []
        for address in addresses:
            t0 = clock()
            action, dst, file_offset, psize, idx = decide(
                address, table, zeros, is_removed, is_zero
            )
            if action == _OUTSIDE:
                raise ForkFatal(f"fault at {address:#x} is outside every region")
            if present is not None and action == _COPY:
                # A lazy template: copy only from a chunk that is verified and in the view. A
                # page inside one chunk that is in (the usual case) is tested here; the rest
                # (a huge page over several chunks, a page from a hot pack) by LazyChunks.
                first = file_offset >> shift
                if not present[first] or (file_offset + psize - 1) >> shift != first:
                    assert lazy is not None
                    chunk = lazy.missing_chunk(file_offset, psize)
                    if chunk is not None:
                        self._park(f, address, chunk, file_offset)
                        continue
            # Count before the ioctl: it wakes the guest, which may read the stats right after.
            c[_FAULTS] += 1
            if prefetched:
                c[_MISSES] += 1
            # Recorded before the copy: a worker killed after it would leave a page the guest
            # has out of the recording.
            if recording:
                added = self.table.record(f, idx, file_offset - f.regions[idx].offset)
                if added and self.crash_at:
                    self.crash_point("recorded")
            slot = _PAGES_COPIED if action == _COPY else _ZERO_PAGES
            c[slot] += 1
            try:
                if action == _COPY:
                    ioctls.copy(dst, src_base + file_offset, psize)
                elif action == _ZEROPAGE:
                    ioctls.zeropage(dst, psize)
                else:
                    ioctls.copy(dst, zero_source(psize), psize)  # hugetlbfs: no ZEROPAGE
            except OSError as exc:
                c[slot] -= 1
                outcome = copy_outcome(exc.errno)
                if outcome is CopyOutcome.PRESENT:
                    # Installed first (by prefetch, with DONTWAKE): wake the faulting thread.
                    c[L.ALREADY_PRESENT] += 1
                    with contextlib.suppress(OSError):
                        ioctls.wake(dst, psize)
                elif outcome is CopyOutcome.RETRY:
                    # Defer: the events are read below and the fault retried within 1 ms.
                    c[_FAULTS] -= 1
                    if prefetched:
                        c[_MISSES] -= 1
                    again.append(address)
                    continue
                elif outcome is CopyOutcome.GONE:
                    f.deferred = []
                    self.table.end(f, M.EndState.ENDED, None)
                    return
                elif outcome is CopyOutcome.UNREADABLE and action == _COPY:
                    raise ForkFatal(
                        f"page at file offset {file_offset:#x} cannot be read from the mem-file "
                        "(did it shrink?)"
                    ) from None
                else:
                    raise ForkFatal(
                        f"installing the page at {dst:#x} (region {idx}) failed: "
                        f"{os.strerror(exc.errno or 0)}"
                    ) from None
            n = c[_LATENCY_N]
            ring[n & _LATENCY_MASK] = clock() - t0
            c[_LATENCY_N] = n + 1
        if again:
            c[L.EAGAIN_RETRIES] += len(again)
            # Read the events now (faults read with them wait their turn behind these).
            f.deferred = again + self.read_events(f, until_empty=True)
            self.table.attend.add(f)

    def _park(self, f: WorkerFork, address: int, chunk: int, file_offset: int) -> None:
        """Keep a fault until its page is in the view; ask the supervisor for it once."""
        assert self.lazy is not None
        if self.lazy.park(f, address, chunk):
            ipc.send(self.chan, M.Need(chunk, file_offset))
            if self.crash_at:
                self.crash_point("parked")

    def _chunk_answered(self, chunk: int, error: str | None) -> None:
        """The supervisor's answer for ``chunk``: serve the faults parked on it, or fail
        their forks (nothing unverified is ever installed)."""
        assert self.lazy is not None
        by_fork = self.lazy.answered(chunk, self.forks)
        for f, addresses in by_fork.items():
            if error is None:
                self._guard(f, self._serve_faults, addresses)
            else:
                self.table.fail(f, error)

    def _is_zero(self, offset: int, length: int) -> bool:
        first = offset // PAGE_SIZE
        last = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        return self.zeros.find(b"\x00", first, last) < 0

    def _guard(self, f: WorkerFork, fn: Any, *args: Any) -> None:
        """Run ``fn(f, *args)``; an error fails this fork only."""
        try:
            fn(f, *args)
        except Exception as exc:
            self._crashed(f, exc)

    def _crashed(self, f: WorkerFork, exc: Exception) -> None:
        """Serving ``f`` raised ``exc``: fail that fork only."""
        if isinstance(exc, (ForkFatal, PageforkError)):
            self.table.fail(f, str(exc))
        else:  # a bug must end this fork only, never the worker
            log.error("fork %s: fault loop crashed", f.name, exc_info=exc)
            self.table.fail(f, f"internal error: {exc!r}")

    def crash_point(self, name: str) -> None:
        left = self.crash_at.get(name)
        if left is None:
            return
        if left > 1:
            self.crash_at[name] = left - 1
            return
        if name in self.stop_at:
            del self.crash_at[name]
            self.stop_at.discard(name)
            os.kill(os.getpid(), signal.SIGSTOP)  # a test holds us here, then sends SIGCONT
            return
        os.kill(os.getpid(), signal.SIGKILL)  # a test asked to die exactly here
