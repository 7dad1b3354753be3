"""A worker's fork table: the forks it serves, their fds in its epoll, their lifecycle.

Each :class:`WorkerFork` moves only by :data:`pagefork.serving.state.WORKER_TABLE`; this module
carries out what the table says (close the fork's fds and report its end, let it go in a
takeover, or park it for a move). The worker's loop (:mod:`pagefork.serving.worker`) serves the
faults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import select
import signal
import socket
import time

from pagefork import uffd
from pagefork.regions import PAGE_SIZE, Region, RegionMap
from pagefork.removed import RemovedRanges
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.state import WorkerCommand, WorkerEvent, WorkerStage, worker_step

log = logging.getLogger("pagefork.worker")

#: What an fd in the epoll is to its fork (PARKED: a parked fork's pidfd).
UFFD, PIDFD, CONN, PARKED = 0, 1, 2, 3


class WorkerFork:
    """One fork served by this worker."""

    __slots__ = (
        "conn",
        "counters",
        "deferred",
        "eager_skip",
        "end_reason",
        "fork_id",
        "hangup_ends",
        "ioctls",
        "latency_ring",
        "ledger",
        "name",
        "on_failure",
        "pid",
        "pidfd",
        "plain",
        "rec_deadline",
        "rec_max",
        "rec_seen",
        "rec_start",
        "regions",
        "removed",
        "spec",
        "stage",
        "table",
        "uffd",
    )

    def __init__(self, spec: M.ForkSpec, fds: dict[str, int], ledger: L.Ledger) -> None:
        self.fork_id = spec.key  # unique within the server: the channel's name for it
        self.spec = spec  # as the supervisor sent it: what an orphaned worker hands on
        self.name = spec.fork
        self.pid = spec.pid
        self.on_failure = spec.on_failure
        self.hangup_ends = spec.hangup_ends
        self.uffd = fds["uffd"]
        self.conn = fds.get("conn", -1)
        self.pidfd = fds.get("pidfd", -1)
        self.ledger = ledger
        self.counters = ledger.counters  # the fault path's: an attribute less per fault
        self.latency_ring = ledger.latency_ring
        self.ioctls = uffd.UffdIoctls(self.uffd)
        self.regions: list[Region] = list(spec.regions)
        self.table = RegionMap(self.regions).table
        self.removed = RemovedRanges()
        for start, end in ledger.removed():  # what a dead worker made durable
            self.removed.add(start, end)
        #: Nothing removed yet: the fault path's usual case (a plain attribute, read per fault).
        self.plain = not self.removed
        self.deferred: list[int] = []
        self.eager_skip = 0  # faults to serve one epoll wake-up each (see the worker's loop)
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


class WorkerForks:
    """Every fork of one worker, by channel key and by fd."""

    def __init__(self, chan: socket.socket, ep: select.epoll) -> None:
        self.chan = chan
        self.ep = ep
        self.forks: dict[str, WorkerFork] = {}
        self.by_fd: dict[int, tuple[int, WorkerFork]] = {}
        # Forks the loop must visit without an event: faults deferred on EAGAIN, or a recording
        # window with a time limit. Usually empty, so an idle loop costs nothing per fork.
        self.attend: set[WorkerFork] = set()
        self.closed_fds: set[int] = set()  # closed while the loop handles the current batch
        #: Forks let go for a move, by key, until another worker is known to serve them.
        self.parked: dict[str, WorkerFork] = {}

    def track(self, f: WorkerFork) -> None:
        """Keep :attr:`attend` in step with ``f``'s deferred faults and recording deadline."""
        if (f.deferred or f.rec_deadline != float("inf")) and f.uffd >= 0:
            self.attend.add(f)
        else:
            self.attend.discard(f)

    def record(self, f: WorkerFork, region: int, page_offset: int) -> bool:
        """Note a page the fork's guest touched first now; True when it was added."""
        seen = f.rec_seen
        if seen is None:
            return False
        key = (region, page_offset)
        if key in seen:
            return False
        now = time.monotonic_ns()
        if now >= f.rec_deadline:
            self.close_window(f)  # outside the window: not part of the hot set
            return False
        seen.add(key)
        if not f.ledger.append_record(region, page_offset, now - f.rec_start):
            self.close_window(f)
            return False
        if f.rec_max is not None and len(seen) >= f.rec_max:
            self.close_window(f)
        return True

    def close_window(self, f: WorkerFork) -> None:
        """Close the fork's recording window (its ledger then holds the hot set)."""
        if f.rec_seen is None:
            return
        f.rec_seen = None
        f.rec_deadline = float("inf")
        self.track(f)
        f.ledger.counters[L.RECORD_STATE] = L.RECORD_CLOSED
        ipc.send(self.chan, M.WindowClosed(f.fork_id))

    def on_event(self, f: WorkerFork, event: uffd.UffdEvent) -> bool:
        """Act on a uffd event other than a fault; True when it was a REMOVE (noted)."""
        if isinstance(event, uffd.Remove):
            # Balloon inflation: the template's bytes are stale here from now on. Durable
            # first, so a worker that replaces us after a crash serves zeros here too.
            f.ledger.note_removed(event.start, event.end)
            f.plain = False
            f.ledger.counters[L.REMOVED_BYTES] += f.removed.add(event.start, event.end)
            return True
        elif isinstance(event, uffd.Remap):
            for i, r in enumerate(f.regions):
                if r.base == event.old and r.size == event.length:
                    regions = list(f.regions)
                    regions[i] = Region(event.new, r.size, r.offset, r.page_size)
                    f.set_regions(regions)
                    ipc.send(self.chan, M.Remapped(f.fork_id, tuple(regions)))
                    return False
            log.warning("fork %s: mremap of %#x does not match a whole region", f.name, event.old)
        elif isinstance(event, uffd.Unmap):
            log.info("fork %s: range %#x-%#x unmapped by the VMM", f.name, event.start, event.end)
        elif isinstance(event, uffd.ForkEvent):
            os.close(event.ufd)  # we serve the VMM, not its children
        elif isinstance(event, uffd.UnknownEvent):
            log.warning("fork %s: ignoring unknown uffd event %#x", f.name, event.event)
        return False

    def hang_up(self, f: WorkerFork) -> None:
        """The VMM closed its socket but runs on: its pidfd ends the fork, not this."""
        self.unwatch(f.conn)
        os.close(f.conn)
        f.conn = -1
        ipc.send(self.chan, M.HungUp(f.fork_id))

    def add(self, spec: M.ForkSpec, fds: list[int]) -> None:
        """Serve the fork of ``spec`` with ``fds`` (an adopted one: wake its vCPUs first),
        unless another worker holds its ledger's lock: then close them and say so."""
        named = dict(zip(spec.fds, fds, strict=True))
        parked = self.parked.pop(spec.key, None)
        if parked is not None:  # moved back here: these fds are the same files
            self._close_parked(parked)
        try:
            ledger = L.Ledger.adopt(named["ledger"], spec.record_capacity)
        except Exception as exc:
            for fd in named.values():
                os.close(fd)
            ipc.send(self.chan, M.Ended(spec.key, M.EndState.FAILED, f"ledger: {exc}"))
            return
        refusal: M.Refused | M.Ended = M.Refused(spec.key)
        try:
            owned = ledger.own()
        except OSError as exc:  # out of fds, say: who serves it cannot be known here
            owned, why = False, f"cannot lock its ledger: {exc.strerror}"
            refusal = M.Ended(spec.key, M.EndState.FAILED, why)
        if not owned:
            # Another worker serves it (one a dead supervisor's move left serving it). Two
            # readers of one uffd would each miss what the other read: a REMOVE among it, and
            # a copy would put template bytes where the guest removed them.
            log.warning("fork %s: not served here (%s)", spec.fork, type(refusal).__name__)
            ledger.close()
            for name, fd in named.items():
                if name != "ledger":
                    os.close(fd)
            ipc.send(self.chan, refusal)
            return
        self._serve(WorkerFork(spec, named, ledger))

    def _serve(self, f: WorkerFork) -> None:
        """Watch ``f``'s fds and serve it (its ledger's lock held)."""
        old = self.forks.pop(f.fork_id, None)
        if old is not None:
            self.end(old, M.EndState.ENDED, None, report=False)
        self.forks[f.fork_id] = f
        self.track(f)
        self._watch(f.uffd, UFFD, f)
        if f.pidfd >= 0:
            self._watch(f.pidfd, PIDFD, f)
        if f.conn >= 0:
            self._watch(f.conn, CONN, f)
        if f.spec.adopt:
            f.ledger.counters[L.ADOPTIONS] += 1
            # The dead worker may have read faults it never served: their vCPUs sleep until
            # a wake makes them retry, which raises the faults again, to us.
            for r in f.regions:
                with contextlib.suppress(OSError):
                    f.ioctls.wake(r.base, r.size)
        ipc.send(self.chan, M.Serving(f.fork_id))

    def _watch(self, fd: int, kind: int, f: WorkerFork) -> None:
        events = select.EPOLLIN | (select.EPOLLRDHUP if kind == CONN else 0)
        self.ep.register(fd, events)
        self.by_fd[fd] = (kind, f)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (it is about to be closed)."""
        self.closed_fds.add(fd)
        self.by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)

    def fail(self, f: WorkerFork, why: str) -> None:
        """Fail the fork: apply its failure policy to the VMM, then end it."""
        f.ledger.counters[L.ERRORS] += 1
        if f.on_failure == "kill" and f.pidfd >= 0:
            # Only through the pidfd: a bare pid may be another process's by now.
            log.error("fork %s: %s; killing VMM pid %s (its guest would hang)", f.name, why, f.pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(f.pidfd, signal.SIGKILL)
        else:
            log.error("fork %s: %s; closing its connection", f.name, why)
        self.end(f, M.EndState.FAILED, why)

    def end(
        self, f: WorkerFork, state: M.EndState, error: str | None, *, report: bool = True
    ) -> None:
        """End the fork now, or once the prefetch it is in stops (the first reason is kept)."""
        if f.end_reason is None:
            f.end_reason = (state, error)
        if WorkerCommand.CLOSE in f.move(WorkerEvent.END):
            self.close(f, state, error, report=report)

    def close(
        self, f: WorkerFork, state: M.EndState, error: str | None, *, report: bool = True
    ) -> None:
        """Close the fork's fds here and tell the supervisor how it ended (unless not to)."""
        if self.forks.get(f.fork_id) is f:
            del self.forks[f.fork_id]
        self._drop(f)
        if f.rec_seen is not None:
            f.rec_seen = None
            f.ledger.counters[L.RECORD_STATE] = L.RECORD_CLOSED
        f.ledger.close()
        if report:
            ipc.send(self.chan, M.Ended(f.fork_id, state, error))

    def _drop(self, f: WorkerFork) -> None:
        """Stop watching the fork and close this worker's copies of its fds."""
        for fd in (f.uffd, f.conn, f.pidfd):
            if fd >= 0:
                self.unwatch(fd)
                os.close(fd)
        f.uffd = f.conn = f.pidfd = -1
        self.attend.discard(f)

    def release(self, keys: tuple[str, ...], *, park: bool = False) -> None:
        """Stop serving these forks without ending them (another process serves them next).
        Their ledgers are final once this answers: the recording stays open. A takeover's
        forks are let go whole; a move's are parked (:meth:`_park`)."""
        for key in keys:
            f = self.forks.get(key)
            if f is None or WorkerCommand.LET_GO not in f.move(WorkerEvent.RELEASE):
                continue
            del self.forks[key]
            # Faults deferred on EAGAIN were read but not served: the adopter's wake makes
            # their vCPUs fault again.
            f.deferred = []
            if park:
                self._park(f)
            else:
                self._drop(f)
                f.ledger.close()
        ipc.send(self.chan, M.Released(keys))

    # --- parked forks: let go for a move, kept until another worker is known to serve them ----
    # A move hands a fork from this worker to another through the supervisor: between this
    # worker's "released" and the other's adoption, the supervisor alone knows where the fork
    # goes. Should it die there, the fork would be in no worker, and its guest would hang on
    # its next fault. So a fork let go for a move keeps its fds here, unwatched (its faults
    # wait in the uffd) and without its ledger's lock, until the supervisor says another
    # worker serves it (Forget) or its VMM exits. A worker orphaned meanwhile tries each
    # parked fork's lock (claim_parked): taken, nobody else serves it, and this worker serves
    # it on; refused, the other worker does, and the copies here are closed.
    def _park(self, f: WorkerFork) -> None:
        for fd in (f.uffd, f.conn, f.pidfd):
            if fd >= 0:
                self.unwatch(fd)
        self.attend.discard(f)
        f.ledger.disown()  # from now on, the worker that adopts it takes the lock
        self.parked[f.fork_id] = f
        if f.pidfd >= 0:  # its VMM's exit ends it here too
            self._watch(f.pidfd, PARKED, f)

    def forget(self, keys: tuple[str, ...]) -> None:
        """Close the parked copies of these forks (another worker serves them, or their VMM
        exited); a fork served here is never touched."""
        for key in keys:
            f = self.parked.pop(key, None)
            if f is not None:
                self._close_parked(f)

    def _close_parked(self, f: WorkerFork) -> None:
        if f.pidfd >= 0 and self.by_fd.get(f.pidfd, (None, None))[1] is f:
            self.unwatch(f.pidfd)
        for fd in (f.uffd, f.conn, f.pidfd):
            if fd >= 0:
                os.close(fd)
        f.uffd = f.conn = f.pidfd = -1
        f.ledger.close()

    def claim_parked(self) -> None:
        """The supervisor died: serve on each parked fork whose ledger's lock is free (no
        worker adopted it, or the one that did died), close the others' copies."""
        for key in list(self.parked):
            f = self.parked.pop(key)
            if f.pidfd >= 0:
                self.unwatch(f.pidfd)
            try:
                owned = f.ledger.own()
            except OSError as exc:  # unknown: serving it beside another would be worse
                log.error("fork %s: cannot lock its ledger (%s)", f.name, exc.strerror)
                owned = False
            if not owned:
                log.info("fork %s: adopted by another worker; closing the parked copy", f.name)
                self._close_parked(f)
                continue
            log.warning("fork %s: its move died with the supervisor; serving it on", f.name)
            spec = dataclasses.replace(
                f.spec, regions=tuple(f.regions), hangup_ends=f.hangup_ends, adopt=True
            )
            # Anew from the ledger: a worker that adopted it and died may have noted more.
            fds = {"uffd": f.uffd, "conn": f.conn, "pidfd": f.pidfd}
            self._serve(WorkerFork(spec, fds, f.ledger))


class LazyChunks:
    """A lazy template's chunks as a worker sees them (:mod:`pagefork.store.lazy`): one byte
    per chunk, 1 once the supervisor has put the verified chunk in the view, and the faults
    parked until theirs is in."""

    def __init__(self, presence_fd: int, chunk_size: int, mem_size: int) -> None:
        nchunks = (mem_size + chunk_size - 1) // chunk_size
        # A byte per chunk, then a byte per page (pages the supervisor put in from a hot pack).
        npages = (mem_size + PAGE_SIZE - 1) // PAGE_SIZE
        self.presence = mmap.mmap(presence_fd, nchunks + npages, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(presence_fd)
        self.nchunks = nchunks
        self.chunk_shift = chunk_size.bit_length() - 1
        self.parked: dict[int, list[tuple[WorkerFork, int]]] = {}  # chunk -> faults on it
        self.asked: set[int] = set()  # chunks asked for and not yet answered

    def missing_chunk(self, offset: int, length: int) -> int | None:
        """The first chunk of ``[offset, offset+length)`` not yet in the view (a huge page may
        span several chunks), or None when all are in. The fault loop tests the usual case
        itself (a page inside one chunk that is in) and asks this for every other."""
        present = self.presence
        first = offset >> self.chunk_shift
        last = (offset + length - 1) >> self.chunk_shift
        if present[first] and (last == first or 0 not in present[first : last + 1]):
            return None
        # Pages that came from the hot pack are in though their chunk is not.
        pages = self.nchunks + offset // PAGE_SIZE
        if 0 not in present[pages : pages + (length + PAGE_SIZE - 1) // PAGE_SIZE]:
            return None
        return first + present[first : last + 1].index(0)

    def present_spans(self, zeros: mmap.mmap) -> list[tuple[int, int]]:
        """(file offset, length) of the runs of chunks in the view now (a warm host cache put
        them in at open), all-zero chunks left out: holes, which must stay unallocated."""
        per = (1 << self.chunk_shift) // PAGE_SIZE
        spans: list[tuple[int, int]] = []
        for c in range(self.nchunks):
            if not self.presence[c] or zeros.find(b"\x00", c * per, (c + 1) * per) < 0:
                continue
            if spans and spans[-1][0] + spans[-1][1] == c << self.chunk_shift:
                spans[-1] = (spans[-1][0], spans[-1][1] + (1 << self.chunk_shift))
            else:
                spans.append((c << self.chunk_shift, 1 << self.chunk_shift))
        return spans

    def park(self, f: WorkerFork, address: int, chunk: int) -> bool:
        """Keep a fault until ``chunk`` is in; True when the chunk must be asked for."""
        self.parked.setdefault(chunk, []).append((f, address))
        if chunk in self.asked:
            return False
        self.asked.add(chunk)
        return True

    def answered(self, chunk: int, forks: dict[str, WorkerFork]) -> dict[WorkerFork, list[int]]:
        """The faults parked on ``chunk`` by fork, of the forks still served."""
        self.asked.discard(chunk)
        by_fork: dict[WorkerFork, list[int]] = {}
        for f, address in self.parked.pop(chunk, []):
            if f.uffd >= 0 and forks.get(f.fork_id) is f:
                by_fork.setdefault(f, []).append(address)
        return by_fork
