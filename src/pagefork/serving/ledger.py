"""A fork's ledger: the state a worker must never lose, in memory shared with the supervisor.

One memfd per fork, mapped by the supervisor and by the worker serving the fork. The worker is
its only writer; the supervisor reads it for stats and hands the same memfd to a replacement
worker when the first one dies, or to a new daemon on a takeover. So whatever a worker wrote
here survives its death:

- the counters (faults, pages copied, ...) and the fault latency ring;
- every range the guest removed (``UFFD_EVENT_REMOVE``), written *before* the worker serves
  anything after reading it: a replacement worker keeps serving those ranges zero;
- the pages recorded so far by a warm-up fork, in first-touch order, with their times.

The file is sparse: its sections are sized for the worst case but only touched pages use
memory. Appends write the entry first and then bump the count (x86 keeps stores in order), so
a reader never sees a count covering an entry not yet written.

Who serves a fork is decided by a lock, never by timing: the worker that serves it holds an
exclusive open-file-description lock (``F_OFD_SETLK``) on the ledger, taken on a description of
its own (:meth:`Ledger.own` reopens the memfd through ``/proc/self/fd``; a lock on the
description passed with ``SCM_RIGHTS`` would be shared by every process holding that
description, the supervisor's included). A worker that cannot take it does not serve the fork:
another one does. The lock goes with the description: on :meth:`Ledger.disown`, on
:meth:`Ledger.close`, and when its process dies.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator

from pagefork.errors import ForkError
from pagefork.stats import LATENCY_WINDOW

_MAGIC = 0x5047464B4C444731  # "PGFKLDG1"
_HEADER_SLOTS = 512

# Header slots (int64).
MAGIC, FAULTS, PAGES_COPIED, ZERO_PAGES, ALREADY_PRESENT, REMOVED_BYTES = 0, 1, 2, 3, 4, 5
EAGAIN_RETRIES, ERRORS, PREFETCHED_PAGES, MISSES = 6, 7, 8, 9
REMOVED_COUNT, RECORD_COUNT, RECORD_STATE, RECORD_START_NS, PREFETCHED, LATENCY_N = (
    10,
    11,
    12,
    13,
    14,
    15,
)
ADOPTIONS = 16

#: ``RECORD_STATE`` values.
RECORD_OFF, RECORD_OPEN, RECORD_CLOSED = 0, 1, 2

#: Counters shown in :class:`pagefork.stats.ForkStats`, by field name.
COUNTERS = {
    "faults": FAULTS,
    "pages_copied": PAGES_COPIED,
    "zero_pages": ZERO_PAGES,
    "already_present": ALREADY_PRESENT,
    "removed_bytes": REMOVED_BYTES,
    "eagain_retries": EAGAIN_RETRIES,
    "errors": ERRORS,
    "prefetched_pages": PREFETCHED_PAGES,
    "misses": MISSES,
}

#: Removed ranges kept per fork; a balloon inflating page by page appends to the last one.
REMOVED_CAPACITY = 1 << 20
LATENCY_SLOTS = LATENCY_WINDOW

#: ``struct flock`` (Linux, 64-bit): type, whence, start, len, pid (0 for an OFD lock).
_FLOCK = struct.Struct("hhqqi4x")
#: A write lock on the whole file.
_WHOLE_FILE = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


class LedgerFull(ForkError):
    """A section of the ledger is full (the fork cannot be served safely any more)."""


class Ledger:
    """A mapped fork ledger. ``counters`` is an int64 view of the header (index with the slot
    constants above)."""

    __slots__ = (
        "_map",
        "_record",
        "_removed",
        "counters",
        "fd",
        "latency_ring",
        "owner",
        "record_capacity",
        "size",
    )

    def __init__(self, fd: int, record_capacity: int) -> None:
        self.fd = fd
        #: This process's own description of the memfd, holding the serving lock; -1 if none.
        self.owner = -1
        self.record_capacity = record_capacity
        removed_at = _HEADER_SLOTS * 8
        latency_at = removed_at + REMOVED_CAPACITY * 16
        record_at = latency_at + LATENCY_SLOTS * 8
        self.size = record_at + record_capacity * 24
        if os.fstat(fd).st_size < self.size:
            raise ForkError("fork ledger is smaller than its layout")
        # mmap keeps its own duplicate of the fd; ``fd`` stays ours to pass on and close.
        self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(self._map)
        self.counters = view[:removed_at].cast("q")
        self._removed = view[removed_at:latency_at].cast("Q")
        self.latency_ring = view[latency_at:record_at].cast("Q")
        self._record = view[record_at : self.size].cast("q")
        view.release()

    @classmethod
    def create(cls, record_capacity: int) -> Ledger:
        """A new, zeroed ledger in a fresh memfd (sparse: costs memory only as it fills)."""
        fd = os.memfd_create("pagefork-fork-ledger", os.MFD_CLOEXEC)
        try:
            size = _HEADER_SLOTS * 8 + REMOVED_CAPACITY * 16 + LATENCY_SLOTS * 8
            os.ftruncate(fd, size + record_capacity * 24)
            ledger = cls(fd, record_capacity)
        except BaseException:
            os.close(fd)
            raise
        ledger.counters[MAGIC] = _MAGIC
        return ledger

    @classmethod
    def adopt(cls, fd: int, record_capacity: int) -> Ledger:
        """Map a ledger another process created (``fd`` becomes this object's)."""
        ledger = cls(fd, record_capacity)
        if ledger.counters[MAGIC] != _MAGIC:
            ledger._unmap()  # the fd stays the caller's
            raise ForkError("not a fork ledger")
        return ledger

    # --- removed ranges --------------------------------------------------------------------
    def note_removed(self, start: int, end: int) -> None:
        """Make ``[start, end)`` durable as removed. Call before serving any later fault."""
        n = self.counters[REMOVED_COUNT]
        r = self._removed
        if n and r[2 * n - 1] == start:
            r[2 * n - 1] = max(end, start)  # one store: a balloon inflating page after page
            return
        if n >= REMOVED_CAPACITY:
            raise LedgerFull(f"more than {REMOVED_CAPACITY} separate removed ranges")
        r[2 * n] = start
        r[2 * n + 1] = end
        self.counters[REMOVED_COUNT] = n + 1

    def removed(self) -> Iterator[tuple[int, int]]:
        """Every removed range noted so far, in the order noted."""
        r = self._removed
        for i in range(self.counters[REMOVED_COUNT]):
            yield (r[2 * i], r[2 * i + 1])

    # --- recording --------------------------------------------------------------------------
    def append_record(self, region: int, page_offset: int, t_ns: int) -> bool:
        """Append a recorded page; False when the section is full (the caller closes)."""
        n = self.counters[RECORD_COUNT]
        if n >= self.record_capacity:
            return False
        rec = self._record
        rec[3 * n] = region
        rec[3 * n + 1] = page_offset
        rec[3 * n + 2] = t_ns
        self.counters[RECORD_COUNT] = n + 1
        return True

    def recorded(self) -> list[tuple[int, int, int]]:
        """``(region, page offset, ns since the recording started)`` in first-touch order."""
        rec = self._record
        return [
            (rec[3 * i], rec[3 * i + 1], rec[3 * i + 2]) for i in range(self.counters[RECORD_COUNT])
        ]

    # --- latencies --------------------------------------------------------------------------
    # The fault loop writes the latency ring itself (sample n at n % LATENCY_SLOTS, then
    # LATENCY_N = n + 1), with its slots bound once per batch.

    def latencies(self) -> list[int]:
        """The recorded fault latencies in ns (the most recent window, unordered)."""
        return list(self.latency_ring[: min(self.counters[LATENCY_N], LATENCY_SLOTS)])

    # --- who serves the fork ------------------------------------------------------------------
    def own(self) -> bool:
        """Take the serving lock (non-blocking): True once this process holds it, False when
        another process does (it serves the fork; this one must not)."""
        if self.owner >= 0:
            return True
        mine = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.fcntl(mine, fcntl.F_OFD_SETLK, _WHOLE_FILE)
        except OSError as exc:
            os.close(mine)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.owner = mine
        return True

    def disown(self) -> None:
        """Drop the serving lock (close this process's own description); idempotent."""
        if self.owner >= 0:
            os.close(self.owner)
            self.owner = -1

    def close(self) -> None:
        """Drop the serving lock, unmap and close the memfd; idempotent."""
        self.disown()
        if self.fd < 0:
            return
        self._unmap()
        os.close(self.fd)
        self.fd = -1

    def _unmap(self) -> None:
        for view in (self.counters, self._removed, self.latency_ring, self._record):
            view.release()
        self._map.close()
