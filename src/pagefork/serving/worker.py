"""A worker process: serves the uffds of many forks from one event loop.

The supervisor (:class:`pagefork.server.PageServer`) starts workers with
``python -m pagefork.serving.worker`` and hands each fork to one of them over the worker's
channel: the fork's uffd, its VMM connection, a pidfd of the VMM, and its ledger (the shared
memory where the worker writes what must survive it). One ``epoll`` watches every uffd, pidfd
and connection; there is no thread per fork.

Each kernel rule sits at the ioctl it concerns:

- EEXIST from a copy is success (prefetch or another vCPU installed the page first); the
  faulting thread may still sleep (prefetch copies with DONTWAKE), so wake it.
- EAGAIN means a non-cooperative event (REMOVE) is unread: defer the fault, read the events,
  retry.
- A REMOVE is written to the ledger before anything after it is served, so a replacement
  worker keeps serving that range zero.
- Prefetch runs in this same loop, a slice at a time: a prefetch copy can never land between
  the read of a REMOVE and its noting, because both happen on this one thread.
- A fork ends when its VMM exits (the pidfd), not when its socket closes: Firecracker before
  1.12 closes the socket right after the handshake and keeps running.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import mmap
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from pagefork import libc, uffd
from pagefork.errors import PageforkError, PrefetchError
from pagefork.layers.source import map_view
from pagefork.prefetch import PrefetchPlan, execute_plan
from pagefork.regions import PAGE_SIZE, Region, RegionMap
from pagefork.removed import RemovedRanges
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.policy import Action, decide
from pagefork.serving.pool import PLANS_KEPT
from pagefork.serving.state import WorkerCommand, WorkerEvent, WorkerStage, worker_step
from pagefork.uffd import CopyOutcome, copy_outcome

log = logging.getLogger("pagefork.worker")

#: Events read per ``read(2)`` of a uffd: one syscall drains a burst of faults.
_READ_BATCH = 64
#: Prefetch ioctls between two looks at the other forks' faults.
_PREFETCH_SLICE = 16
_MADV_POPULATE_READ = 22
_UFFD, _PIDFD, _CONN = 0, 1, 2
_COPY, _ZEROPAGE, _OUTSIDE = int(Action.COPY), int(Action.ZEROPAGE), int(Action.OUTSIDE)


class _Fatal(Exception):
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


class _Fork:
    """One fork served by this worker."""

    __slots__ = (
        "conn",
        "deferred",
        "end_reason",
        "fork_id",
        "hangup_ends",
        "ioctls",
        "ledger",
        "name",
        "on_failure",
        "pid",
        "pidfd",
        "rec_deadline",
        "rec_max",
        "rec_seen",
        "rec_start",
        "regions",
        "removed",
        "stage",
        "table",
        "uffd",
    )

    def __init__(self, spec: M.ForkSpec, fds: dict[str, int], ledger: L.Ledger) -> None:
        self.fork_id = spec.key  # unique within the server: the channel's name for it
        self.name = spec.fork
        self.pid = spec.pid
        self.on_failure = spec.on_failure
        self.hangup_ends = spec.hangup_ends
        self.uffd = fds["uffd"]
        self.conn = fds.get("conn", -1)
        self.pidfd = fds.get("pidfd", -1)
        self.ledger = ledger
        self.ioctls = uffd.UffdIoctls(self.uffd)
        self.regions: list[Region] = list(spec.regions)
        self.table = RegionMap(self.regions).table
        self.removed = RemovedRanges()
        for start, end in ledger.removed():  # what a dead worker made durable
            self.removed.add(start, end)
        self.deferred: list[int] = []
        self.stage = WorkerStage.SERVING
        #: Why it ends, kept while a prefetch it is in finishes (stage ENDING).
        self.end_reason: tuple[M.EndState, str | None] | None = None
        c = ledger.counters
        self.rec_seen: set[tuple[int, int]] | None = None
        self.rec_start = c[L.RECORD_START_NS]
        self.rec_max = spec.record_max_pages
        self.rec_deadline = float("inf")
        if c[L.RECORD_STATE] == L.RECORD_OPEN:
            self.rec_seen = {(r, o) for r, o, _ in ledger.recorded()}
            seconds = spec.record_max_seconds
            if seconds is not None:
                self.rec_deadline = self.rec_start + seconds * 1e9

    def move(self, event: WorkerEvent) -> tuple[WorkerCommand, ...]:
        """Move by :data:`pagefork.serving.state.WORKER_TABLE`; the commands to carry out."""
        self.stage, commands = worker_step(self.fork_id, self.stage, event)
        return commands

    def set_regions(self, regions: list[Region]) -> None:
        self.regions = regions
        self.table = RegionMap(regions).table


class Worker:
    """The event loop of one worker process."""

    def __init__(
        self,
        chan: socket.socket,
        mem_fd: int,
        mem_size: int,
        zero_fd: int,
        layout_fds: tuple[int, ...] = (),
        lazy: tuple[int, int] | None = None,
    ) -> None:
        self.chan = chan
        self.mem_size = mem_size
        self.mem_address = libc.mmap(mem_size, mmap.PROT_READ, mmap.MAP_SHARED, mem_fd)
        os.close(mem_fd)
        if layout_fds:  # a layered template: its layers' pages mapped over the base
            map_view(self.mem_address, layout_fds)
        npages = (mem_size + PAGE_SIZE - 1) // PAGE_SIZE
        self.zeros = mmap.mmap(zero_fd, npages, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(zero_fd)
        self.ep = select.epoll()
        self.ep.register(chan.fileno(), select.EPOLLIN)
        self.forks: dict[str, _Fork] = {}
        # Forks the loop must visit without an event: faults deferred on EAGAIN, or a recording
        # window with a time limit. Usually empty, so an idle loop costs nothing per fork.
        self.attend: set[_Fork] = set()
        self.by_fd: dict[int, tuple[int, _Fork]] = {}
        self.crash_at: dict[str, int] = {}
        self._read_buf = bytearray(uffd.UFFD_MSG_SIZE * _READ_BATCH)
        self._closed_fds: set[int] = set()  # closed while handling the current batch
        self.plans: collections.OrderedDict[int, PrefetchPlan] = collections.OrderedDict()
        # Messages read during a prefetch (to answer a ping) and kept for the loop: no
        # prefetch inside a prefetch, no fork added or released under one.
        self._backlog: collections.deque[tuple[M.Message, list[int]]] = collections.deque()
        # A lazy template (pagefork.store.lazy): one byte per chunk, 1 once the supervisor has
        # put the verified chunk in the view. None for a mem-file: the fault path skips it.
        self.presence: mmap.mmap | None = None
        self.chunk_shift = 0
        self.parked: dict[int, list[tuple[_Fork, int]]] = {}  # chunk -> faults waiting on it
        self.asked: set[int] = set()  # chunks asked for and not yet answered
        if lazy is not None:
            presence_fd, chunk_size = lazy
            nchunks = (mem_size + chunk_size - 1) // chunk_size
            self.presence = mmap.mmap(presence_fd, nchunks, mmap.MAP_SHARED, mmap.PROT_READ)
            os.close(presence_fd)
            self.chunk_shift = chunk_size.bit_length() - 1

    # --- the loop ------------------------------------------------------------------------
    # Theory of operation.
    #
    # One thread, one epoll over every fork's uffd, VMM pidfd and VMM socket, plus the channel
    # to the supervisor. Each turn serves what is ready, in the order epoll gives it, then does
    # the housekeeping of forks that need a visit without an event. Why it is built so:
    #
    # - One thread per worker, not per fork: a REMOVE read from a fork's uffd is noted (in the
    #   ledger, durably) before any copy into that fork can run, because nothing else runs. A
    #   copy can then never install a template page over a range the guest removed.
    # - Faults are batched per read: one read(2) takes up to 64 uffd_msgs, and one fault alone
    #   (the usual case) is decoded in place. The counters are bumped before each ioctl, since
    #   the ioctl wakes the guest, which may read the stats at once.
    # - EAGAIN from a copy means an event (REMOVE) is unread: the fault is deferred, the events
    #   read, and the deferred faults retried on the next turn, which comes after at most 1 ms
    #   (the poll timeout while any fault is deferred): short against a fault's cost to the
    #   guest, long enough that a burst of removals is read whole before the retry.
    # - A prefetch runs inside a turn, a slice at a time: every 16 ioctls (about 100 us of
    #   copies) it polls the other forks' fds and serves their faults, so a long prefetch costs
    #   the other forks at most one slice of latency, while 16 ioctls amortise the poll. The
    #   channel is read then too, but only a Ping is answered there; everything else waits in
    #   the backlog for the loop, so nothing changes the fork table under a prefetch.
    # - Pings are answered from this loop (never from another thread), so an answer proves the
    #   loop turns: a worker that is stopped or wedged stops answering, and the supervisor
    #   hands its forks on.
    # - A fork ends when its VMM's pidfd fires, not when its socket closes (Firecracker before
    #   1.12 closes it after the handshake and runs on).
    def run(self) -> None:
        """Serve until the supervisor closes the channel."""
        ipc.send(self.chan, M.Ready(M.PROTOCOL_VERSION, os.getpid()))
        chan_fd = self.chan.fileno()
        while True:
            while self._backlog:
                self._on_message(*self._backlog.popleft())
            events = self.ep.poll(self._timeout())
            self._closed_fds.clear()
            for fd, ev in events:
                if fd in self._closed_fds:
                    continue  # closed by an earlier event of this batch: the number may be reused
                if fd == chan_fd:
                    try:
                        message, fds = ipc.recv(self.chan)
                    except ipc.ChannelClosed:
                        return
                    self._on_message(message, fds)
                else:
                    self._on_fd(fd, ev)
            self._housekeeping()

    def _timeout(self) -> float:
        if not self.attend:
            return -1
        if any(f.deferred for f in self.attend):
            return 0.001  # deferred on EAGAIN: retry soon
        deadline = min(f.rec_deadline for f in self.attend)
        return max(0.0, (deadline - time.monotonic_ns()) / 1e9)

    def _housekeeping(self) -> None:
        if not self.attend:
            return
        now = time.monotonic_ns()
        for f in list(self.attend):
            if f.deferred:
                self._guard(f, self._serve_faults, [])
            if f.rec_seen is not None and now >= f.rec_deadline:
                self._close_window(f)
            self.track(f)

    def track(self, f: _Fork) -> None:
        """Keep :attr:`attend` in step with ``f``'s deferred faults and recording deadline."""
        if (f.deferred or f.rec_deadline != float("inf")) and f.uffd >= 0:
            self.attend.add(f)
        else:
            self.attend.discard(f)

    def _on_fd(self, fd: int, ev: int = select.EPOLLIN) -> None:
        entry = self.by_fd.get(fd)
        if entry is None:
            return
        kind, f = entry
        if kind == _UFFD:
            if ev & select.EPOLLERR:
                # A uffd polls as an error once O_NONBLOCK is off its file (the handshake
                # refused one without UFFDIO_API): only the VMM, which shares that file, can
                # have cleared it. It can no longer be served safely.
                self._fail(f, "the VMM cleared O_NONBLOCK on its uffd, which then cannot be polled")
                return
            self._guard(f, self._on_uffd)
        elif kind == _PIDFD:
            self._end(f, M.EndState.ENDED, None)  # the VMM exited
        else:
            self._on_conn(f)

    def _guard(self, f: _Fork, fn: Any, *args: Any) -> None:
        """Run ``fn(f, *args)``; an error fails this fork only."""
        try:
            fn(f, *args)
        except _Fatal as exc:
            self._fail(f, str(exc))
        except PageforkError as exc:
            self._fail(f, str(exc))
        except Exception as exc:  # a bug must end this fork only, never the worker
            log.exception("fork %s: fault loop crashed", f.name)
            self._fail(f, f"internal error: {exc!r}")

    def _on_conn(self, f: _Fork) -> None:
        try:
            chunk = os.read(f.conn, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            return  # Firecracker sends nothing after the handshake: ignore extra bytes
        if f.pidfd >= 0 and not f.hangup_ends:
            # Firecracker before 1.12 closes the socket after the handshake and runs on: its
            # exit (the pidfd) ends the fork, not this.
            self._unwatch(f.conn)
            os.close(f.conn)
            f.conn = -1
            ipc.send(self.chan, M.HungUp(f.fork_id))
        else:
            self._end(f, M.EndState.ENDED, None)

    # --- faults --------------------------------------------------------------------------
    def _on_uffd(self, f: _Fork) -> None:
        faults = self.read_events(f, until_empty=False)
        self._serve_faults(f, faults)

    def read_events(self, f: _Fork, *, until_empty: bool) -> list[int]:
        """Read the uffd's events: REMOVE is made durable at once; faults are returned."""
        faults: list[int] = []
        size = uffd.UFFD_MSG_SIZE * _READ_BATCH
        buf = self._read_buf
        while True:
            try:
                # RWF_NOWAIT, not O_NONBLOCK: the file flags belong to the VMM too, and a peer
                # that clears O_NONBLOCK must not be able to block this loop in read(2).
                got = os.preadv(f.uffd, [buf], -1, os.RWF_NOWAIT)
            except BlockingIOError:
                return faults
            for offset in range(0, got, uffd.UFFD_MSG_SIZE):
                if buf[offset] == uffd.UFFD_EVENT_PAGEFAULT:
                    # The usual message: a fault's address, read in place.
                    faults.append(uffd.PAGEFAULT_ADDRESS.unpack_from(buf, offset)[0])
                else:
                    self._other_event(f, uffd.decode_msg(buf, offset))
            if faults and self.crash_at:
                self.crash_point("fault_read")
            if not until_empty or got < size:
                return faults

    def _other_event(self, f: _Fork, event: uffd.UffdEvent) -> None:
        if isinstance(event, uffd.Remove):
            # Balloon inflation: the template's bytes are stale here from now on. Durable
            # first, so a worker that replaces us after a crash serves zeros here too.
            f.ledger.note_removed(event.start, event.end)
            f.ledger.counters[L.REMOVED_BYTES] += f.removed.add(event.start, event.end)
            if self.crash_at:
                self.crash_point("remove_noted")
        elif isinstance(event, uffd.Remap):
            for i, r in enumerate(f.regions):
                if r.base == event.old and r.size == event.length:
                    regions = list(f.regions)
                    regions[i] = Region(event.new, r.size, r.offset, r.page_size)
                    f.set_regions(regions)
                    ipc.send(self.chan, M.Remapped(f.fork_id, tuple(regions)))
                    return
            log.warning("fork %s: mremap of %#x does not match a whole region", f.name, event.old)
        elif isinstance(event, uffd.Unmap):
            log.info("fork %s: range %#x-%#x unmapped by the VMM", f.name, event.start, event.end)
        elif isinstance(event, uffd.ForkEvent):
            os.close(event.ufd)  # we serve the VMM, not its children
        elif isinstance(event, uffd.UnknownEvent):
            log.warning("fork %s: ignoring unknown uffd event %#x", f.name, event.event)

    def _serve_faults(self, f: _Fork, faults: list[int]) -> None:
        """Install the page of each faulting address (and of those deferred before)."""
        addresses = f.deferred + faults if f.deferred else faults
        if not addresses:
            return
        f.deferred = []
        c = f.ledger.counters
        table = f.table
        zeros = self.zeros
        is_zero = self._is_zero
        is_removed = f.removed.contains if f.removed else None
        src_base = self.mem_address
        prefetched = c[L.PREFETCHED]
        recording = f.rec_seen is not None
        ioctls = f.ioctls
        clock = time.perf_counter_ns
        ring = f.ledger.latency_ring
        missing_chunk = self.missing_chunk if self.presence is not None else None
        # The fault path: everything it touches is bound to a local once per batch.
        copy_, zeropage_, outside = _COPY, _ZEROPAGE, _OUTSIDE
        faults_, misses_, copied_, zeroed_, lat_n = (
            L.FAULTS,
            L.MISSES,
            L.PAGES_COPIED,
            L.ZERO_PAGES,
            L.LATENCY_N,
        )
        mask = L.LATENCY_SLOTS - 1
        again: list[int] = []
        for address in addresses:
            t0 = clock()
            action, dst, file_offset, psize, idx = decide(
                address, table, zeros, is_removed, is_zero
            )
            if action == outside:
                raise _Fatal(f"fault at {address:#x} is outside every region")
            if missing_chunk is not None and action == copy_:
                # A lazy template: copy only from a chunk that is verified and in the view.
                chunk = missing_chunk(file_offset, psize)
                if chunk is not None:
                    self._park(f, address, chunk)
                    continue
            # Count before the ioctl: it wakes the guest, which may read the stats right after.
            c[faults_] += 1
            if prefetched:
                c[misses_] += 1
            if recording:
                # Before the copy: a worker killed after it would leave a page the guest has
                # out of the recording.
                self._record(f, idx, file_offset - f.regions[idx].offset)
            slot = copied_ if action == copy_ else zeroed_
            c[slot] += 1
            try:
                if action == copy_:
                    ioctls.copy(dst, src_base + file_offset, psize)
                elif action == zeropage_:
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
                    c[L.FAULTS] -= 1
                    if prefetched:
                        c[L.MISSES] -= 1
                    again.append(address)
                    continue
                elif outcome is CopyOutcome.GONE:
                    f.deferred = []
                    self._end(f, M.EndState.ENDED, None)
                    return
                elif outcome is CopyOutcome.UNREADABLE and action == copy_:
                    raise _Fatal(
                        f"page at file offset {file_offset:#x} cannot be read from the mem-file "
                        "(did it shrink?)"
                    ) from None
                else:
                    raise _Fatal(
                        f"installing the page at {dst:#x} (region {idx}) failed: "
                        f"{os.strerror(exc.errno or 0)}"
                    ) from None
            n = c[lat_n]
            ring[n & mask] = clock() - t0
            c[lat_n] = n + 1
        if again:
            c[L.EAGAIN_RETRIES] += len(again)
            # Read the events now (faults read with them wait their turn behind these).
            f.deferred = again + self.read_events(f, until_empty=True)
            self.attend.add(f)

    def missing_chunk(self, offset: int, length: int) -> int | None:
        """A lazy template: the first chunk of ``[offset, offset+length)`` not yet verified and
        in the view (a huge page may span several chunks), or None when all are in."""
        present = self.presence
        assert present is not None
        first = offset >> self.chunk_shift
        if present[first]:
            last = (offset + length - 1) >> self.chunk_shift
            if last == first or 0 not in present[first : last + 1]:
                return None
            return first + present[first : last + 1].index(0)
        return first

    def _park(self, f: _Fork, address: int, chunk: int) -> None:
        """Keep a fault until its chunk is in the view; ask the supervisor for it once."""
        self.parked.setdefault(chunk, []).append((f, address))
        if chunk not in self.asked:
            self.asked.add(chunk)
            ipc.send(self.chan, M.Need(chunk))
            if self.crash_at:
                self.crash_point("parked")

    def _chunk_answered(self, chunk: int, error: str | None) -> None:
        """The supervisor's answer for ``chunk``: serve the faults parked on it, or fail
        their forks (nothing unverified is ever installed)."""
        self.asked.discard(chunk)
        by_fork: dict[_Fork, list[int]] = {}
        for f, address in self.parked.pop(chunk, []):
            if f.uffd >= 0 and self.forks.get(f.fork_id) is f:
                by_fork.setdefault(f, []).append(address)
        for f, addresses in by_fork.items():
            if error is None:
                self._guard(f, self._serve_faults, addresses)
            else:
                self._fail(f, error)

    def _is_zero(self, offset: int, length: int) -> bool:
        first = offset // PAGE_SIZE
        last = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        return self.zeros.find(b"\x00", first, last) < 0

    # --- recording -----------------------------------------------------------------------
    def _record(self, f: _Fork, region: int, page_offset: int) -> None:
        seen = f.rec_seen
        if seen is None:
            return
        key = (region, page_offset)
        if key in seen:
            return
        now = time.monotonic_ns()
        if now >= f.rec_deadline:
            self._close_window(f)  # outside the window: not part of the hot set
            return
        seen.add(key)
        if not f.ledger.append_record(region, page_offset, now - f.rec_start):
            self._close_window(f)
            return
        if self.crash_at:
            self.crash_point("recorded")
        if f.rec_max is not None and len(seen) >= f.rec_max:
            self._close_window(f)

    def _close_window(self, f: _Fork) -> None:
        if f.rec_seen is None:
            return
        f.rec_seen = None
        f.rec_deadline = float("inf")
        self.track(f)
        f.ledger.counters[L.RECORD_STATE] = L.RECORD_CLOSED
        ipc.send(self.chan, M.WindowClosed(f.fork_id))

    # --- prefetch ------------------------------------------------------------------------
    def _prefetch(self, req: int, fork_id: str, plan: PrefetchPlan, timeout: float) -> None:
        f = self.forks.get(fork_id)
        if f is None:
            name = fork_id.rpartition("#")[0]
            ipc.send(self.chan, M.Prefetched(req, None, f"fork {name}: session has ended", 0))
            return
        target = _Target(self, f)
        f.move(WorkerEvent.PREFETCH_STARTED)
        c = f.ledger.counters
        c[L.PREFETCHED] = 1  # from now on a demand fault is a miss
        try:
            result = execute_plan(plan, target, regions=f.regions, timeout=timeout)
        except PrefetchError as exc:
            c[L.PREFETCHED_PAGES] += exc.installed
            ipc.send(self.chan, M.Prefetched(req, None, f"fork {f.name}: {exc}", exc.installed))
        except Exception as exc:
            log.exception("fork %s: prefetch crashed", f.name)
            ipc.send(self.chan, M.Prefetched(req, None, f"fork {f.name}: {exc!r}", 0))
        else:
            c[L.PREFETCHED_PAGES] += result.installed
            ipc.send(self.chan, M.Prefetched(req, result, None, result.installed))
        finally:
            if WorkerCommand.END_DEFERRED in f.move(WorkerEvent.PREFETCH_STOPPED):
                assert f.end_reason is not None
                self._close(f, *f.end_reason)

    def poll_forks(self) -> None:
        """Serve what the other forks need now (called between prefetch slices)."""
        chan_fd = self.chan.fileno()
        events = self.ep.poll(0)
        closed = set(self._closed_fds)
        for fd, ev in events:
            if fd == chan_fd:
                self._read_during_prefetch()
            elif fd not in self._closed_fds - closed:
                self._on_fd(fd, ev)

    def _read_during_prefetch(self) -> None:
        """Answer a ping now; keep any other message for the loop (no prefetch inside a
        prefetch, and the fork table stays as the prefetch found it)."""
        message, fds = ipc.recv(self.chan)
        if isinstance(message, M.Ping):
            ipc.send(self.chan, M.Pong(message.seq))
        else:
            self._backlog.append((message, fds))

    # --- fork lifecycle ------------------------------------------------------------------
    def _on_message(self, message: M.Message, fds: list[int]) -> None:
        if isinstance(message, M.Serve):
            self._add(message.spec, fds)
            return
        for fd in fds:
            os.close(fd)  # only a fork comes with fds
        if isinstance(message, M.Ping):
            ipc.send(self.chan, M.Pong(message.seq))
        elif isinstance(message, M.Prefetch):
            plan = message.plan
            token = message.token
            if token is not None:
                # The supervisor sends a plan once and then names it: keep it (in step with
                # its record of what we have, and a little longer).
                if plan is None:
                    plan = self.plans[token]
                self.plans[token] = plan
                self.plans.move_to_end(token)
                while len(self.plans) > 2 * PLANS_KEPT:
                    self.plans.popitem(last=False)
            assert plan is not None
            self._prefetch(message.req, message.key, plan, message.timeout)
        elif isinstance(message, M.ChunkReady):
            self._chunk_answered(message.chunk, None)
        elif isinstance(message, M.ChunkFailed):
            self._chunk_answered(message.chunk, message.error)
        elif isinstance(message, M.Drop):
            f = self.forks.get(message.key)
            if f is not None:
                self._end(f, M.EndState.ENDED, None)
        elif isinstance(message, M.Release):
            self._release(message.keys)
        elif isinstance(message, M.Hello):
            try:
                M.check_version(message.version, "the supervisor")
            except M.ProtocolError as exc:
                log.error("%s", exc)
                sys.exit(2)
        elif isinstance(message, M.CrashAt):
            self.crash_at[message.point] = message.count
            ipc.send(self.chan, M.Armed(message.req))
        else:
            log.error("unexpected message %s from the supervisor", type(message).__name__)

    def _add(self, spec: M.ForkSpec, fds: list[int]) -> None:
        named = dict(zip(spec.fds, fds, strict=True))
        try:
            ledger = L.Ledger.adopt(named["ledger"], spec.record_capacity)
        except Exception as exc:
            for fd in named.values():
                os.close(fd)
            ipc.send(self.chan, M.Ended(spec.key, M.EndState.FAILED, f"ledger: {exc}"))
            return
        f = _Fork(spec, named, ledger)
        old = self.forks.pop(f.fork_id, None)
        if old is not None:
            self._end(old, M.EndState.ENDED, None, report=False)
        self.forks[f.fork_id] = f
        self.track(f)
        self._watch(f.uffd, _UFFD, f)
        if f.pidfd >= 0:
            self._watch(f.pidfd, _PIDFD, f)
        if f.conn >= 0:
            self._watch(f.conn, _CONN, f)
        if spec.adopt:
            ledger.counters[L.ADOPTIONS] += 1
            # The dead worker may have read faults it never served: their vCPUs sleep until
            # a wake makes them retry, which raises the faults again, to us.
            for r in f.regions:
                with contextlib.suppress(OSError):
                    f.ioctls.wake(r.base, r.size)
        ipc.send(self.chan, M.Serving(f.fork_id))

    def _watch(self, fd: int, kind: int, f: _Fork) -> None:
        events = select.EPOLLIN | (select.EPOLLRDHUP if kind == _CONN else 0)
        self.ep.register(fd, events)
        self.by_fd[fd] = (kind, f)

    def _unwatch(self, fd: int) -> None:
        self._closed_fds.add(fd)
        self.by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)

    def _fail(self, f: _Fork, why: str) -> None:
        f.ledger.counters[L.ERRORS] += 1
        if f.on_failure == "kill" and f.pidfd >= 0:
            # Only through the pidfd: a bare pid may be another process's by now.
            log.error("fork %s: %s; killing VMM pid %s (its guest would hang)", f.name, why, f.pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(f.pidfd, signal.SIGKILL)
        else:
            log.error("fork %s: %s; closing its connection", f.name, why)
        self._end(f, M.EndState.FAILED, why)

    def _end(self, f: _Fork, state: M.EndState, error: str | None, *, report: bool = True) -> None:
        """End the fork now, or once the prefetch it is in stops (the first reason is kept)."""
        if f.end_reason is None:
            f.end_reason = (state, error)
        if WorkerCommand.CLOSE in f.move(WorkerEvent.END):
            self._close(f, state, error, report=report)

    def _close(
        self, f: _Fork, state: M.EndState, error: str | None, *, report: bool = True
    ) -> None:
        if self.forks.get(f.fork_id) is f:
            del self.forks[f.fork_id]
        self._drop(f)
        if f.rec_seen is not None:
            f.rec_seen = None
            f.ledger.counters[L.RECORD_STATE] = L.RECORD_CLOSED
        f.ledger.close()
        if report:
            ipc.send(self.chan, M.Ended(f.fork_id, state, error))

    def _drop(self, f: _Fork) -> None:
        """Stop watching the fork and close this worker's copies of its fds."""
        for fd in (f.uffd, f.conn, f.pidfd):
            if fd >= 0:
                self._unwatch(fd)
                os.close(fd)
        f.uffd = f.conn = f.pidfd = -1
        self.attend.discard(f)

    def _release(self, keys: tuple[str, ...]) -> None:
        """A takeover: stop serving these forks without ending them (another process serves
        them next). Their ledgers are final once this answers: the recording stays open."""
        for key in keys:
            f = self.forks.get(key)
            if f is None or WorkerCommand.LET_GO not in f.move(WorkerEvent.RELEASE):
                continue
            del self.forks[key]
            self._drop(f)
            # Faults deferred on EAGAIN were read but not served: the adopter's wake makes
            # their vCPUs fault again.
            f.deferred = []
            f.ledger.close()
        ipc.send(self.chan, M.Released(keys))

    def crash_point(self, name: str) -> None:
        left = self.crash_at.get(name)
        if left is None:
            return
        if left > 1:
            self.crash_at[name] = left - 1
            return
        os.kill(os.getpid(), signal.SIGKILL)  # a test asked to die exactly here


class _Target:
    """Prefetch's view of one fork in this worker (a :class:`pagefork.prefetch.PrefetchTarget`).

    Every :data:`_PREFETCH_SLICE` ioctls it lets the loop serve the faults of every fork, so a
    long prefetch does not stall the others.
    """

    __slots__ = ("_f", "_n", "_worker", "src_base")

    def __init__(self, worker: Worker, f: _Fork) -> None:
        self._worker = worker
        self._f = f
        self._n = 0
        self.src_base = worker.mem_address

    def _tick(self) -> None:
        self._n += 1
        if self._n % _PREFETCH_SLICE == 0:
            self._worker.poll_forks()
            if self._worker.crash_at:
                self._worker.crash_point("prefetch")
        if self._f.stage is not WorkerStage.PREFETCHING or self._f.uffd < 0:
            raise PrefetchError("session ended during prefetch")

    def copy(self, dst: int, src: int, length: int, mode: int) -> int:
        self._tick()
        if self._worker.presence is not None:
            # The supervisor fetched the plan's chunks first; never copy one that is not in.
            chunk = self._worker.missing_chunk(src - self.src_base, length)
            if chunk is not None:
                raise PrefetchError(f"chunk {chunk} of the template is not fetched")
        return self._f.ioctls.copy(dst, src, length, mode)

    def zeropage(self, dst: int, length: int, mode: int) -> int:
        self._tick()
        return self._f.ioctls.zeropage(dst, length, mode)

    def wake(self, start: int, length: int) -> None:
        if self._f.uffd >= 0:
            self._f.ioctls.wake(start, length)

    def removed_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        return self._f.removed.overlaps(start, end)

    def await_events(self, timeout: float) -> None:
        # EAGAIN with nothing done: an event (REMOVE) is unread. Read it now, on this thread:
        # the caller then re-reads the removed ranges. Faults read meanwhile wait their turn.
        self._f.deferred.extend(self._worker.read_events(self._f, until_empty=True))
        self._worker.track(self._f)


def main() -> None:
    """Entry point: ``python -m pagefork.serving.worker CHAN_FD MEM_FD MEM_SIZE ZERO_FD
    [lazy=PRESENCE_FD,CHUNK_SIZE] [layout=VIEW_FD,LAYER_FD,...]``: the options for a lazy
    template (pagefork.store.lazy) and a layered one (pagefork.layers)."""
    # PAGEFORK_WORKER_LOG=10 logs each fork's lifecycle in the workers, for debugging.
    level_text = os.environ.get("PAGEFORK_WORKER_LOG", "")
    level = int(level_text) if level_text.isdigit() else logging.WARNING
    logging.basicConfig(level=level, format=f"pagefork worker {os.getpid()}: %(message)s")
    # The supervisor decides when we stop: a stop sent to the whole process group (Ctrl-C,
    # ``kill -TERM -PGID``, a terminal's hang-up) reaches it too, and it stops us in order.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    chan_fd, mem_fd, mem_size, zero_fd = (int(a) for a in sys.argv[1:5])
    options = dict(a.split("=", 1) for a in sys.argv[5:])
    lazy_args = [int(v) for v in options["lazy"].split(",")] if "lazy" in options else None
    lazy = (lazy_args[0], lazy_args[1]) if lazy_args else None
    layout_fds = tuple(int(v) for v in options["layout"].split(",")) if "layout" in options else ()
    chan = socket.socket(fileno=chan_fd)
    worker = Worker(chan, mem_fd, mem_size, zero_fd, layout_fds, lazy)
    if lazy is None:  # a lazy view fills later: populating it now would only map holes
        with contextlib.suppress(OSError):  # fill the page tables now; faults then cost less
            libc.madvise(worker.mem_address, mem_size, _MADV_POPULATE_READ)
    try:
        worker.run()
    except (ipc.ChannelClosed, BrokenPipeError, ConnectionResetError):
        pass  # the supervisor is gone: so are we (the kernel closes what we held)


if __name__ == "__main__":
    main()
