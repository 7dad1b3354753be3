"""A prefetch inside a worker: the plan installed into one fork from the worker's own loop.

It runs on the loop's thread, a slice of :data:`PREFETCH_SLICE` ioctls at a time, and between
two slices the loop serves every fork's faults, this fork's included: a guest resumed while its
prefetch streams (``head``) has its faults served ahead of the stream, and a REMOVE read between
two slices is noted before the next copy (the same thread does both).
"""

from __future__ import annotations

import logging
import socket
from typing import Protocol

from pagefork.errors import PrefetchError
from pagefork.prefetch import PrefetchPlan, PrefetchResult, execute_plan
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.state import WorkerCommand, WorkerEvent, WorkerStage
from pagefork.serving.workerforks import LazyChunks, WorkerFork, WorkerForks

log = logging.getLogger("pagefork.worker")

#: Prefetch ioctls between two looks at the forks' faults: 16 (about 100 us of copies) costs
#: a waiting fault at most one slice, and amortises the poll.
PREFETCH_SLICE = 16


class Worker(Protocol):
    """What a prefetch needs of the worker it runs in (:class:`pagefork.serving.worker.Worker`)."""

    chan: socket.socket
    table: WorkerForks
    forks: dict[str, WorkerFork]
    crash_at: dict[str, int]
    mem_address: int
    lazy: LazyChunks | None

    def poll_forks(self) -> None:
        """Serve what every fork needs now (between two slices)."""

    def crash_point(self, name: str) -> None:
        """Tests only: die (or stop) here if asked to."""

    def read_events(self, f: WorkerFork, *, until_empty: bool) -> list[int]:
        """Read ``f``'s uffd events, noting REMOVEs; the faults read are returned."""
        ...


def run_prefetch(
    worker: Worker, req: int, fork_id: str, plan: PrefetchPlan, timeout: float, head: int | None
) -> None:
    """Install ``plan`` into the worker's fork ``fork_id`` and answer the supervisor: a
    :class:`~pagefork.serving.messages.PrefetchHead` once the first ``head`` hot pages are in
    (a streamed prefetch), then :class:`~pagefork.serving.messages.Prefetched`."""
    chan = worker.chan
    f = worker.forks.get(fork_id)
    if f is None:
        name = fork_id.rpartition("#")[0]
        ipc.send(chan, M.Prefetched(req, None, f"fork {name}: session has ended", 0))
        return

    def head_in(so_far: PrefetchResult) -> None:
        c[L.PREFETCHED] = 1  # the guest may resume now: from now on a demand fault is a miss
        ipc.send(chan, M.PrefetchHead(req, so_far))
        if worker.crash_at:
            worker.crash_point("stream")

    target = _Target(worker, f)
    f.move(WorkerEvent.PREFETCH_STARTED)
    c = f.ledger.counters
    # A fault served between two slices of the install is the VMM's own (Firecracker writes
    # VMGenID while it loads), not a page the guest missed: misses count from the moment the
    # guest may resume, once the install (or its head) is in.
    try:
        result = execute_plan(
            plan, target, regions=f.regions, timeout=timeout, head=head, on_head=head_in
        )
    except PrefetchError as exc:
        c[L.PREFETCHED_PAGES] += exc.installed
        ipc.send(chan, M.Prefetched(req, None, f"fork {f.name}: {exc}", exc.installed))
    except Exception as exc:
        log.exception("fork %s: prefetch crashed", f.name)
        ipc.send(chan, M.Prefetched(req, None, f"fork {f.name}: {exc!r}", 0))
    else:
        c[L.PREFETCHED_PAGES] += result.installed
        ipc.send(chan, M.Prefetched(req, result, None, result.installed))
    finally:
        c[L.PREFETCHED] = 1  # from now on a demand fault is a miss
        if WorkerCommand.END_DEFERRED in f.move(WorkerEvent.PREFETCH_STOPPED):
            assert f.end_reason is not None
            worker.table.close(f, *f.end_reason)


class _Target:
    """Prefetch's view of one fork in this worker (a :class:`pagefork.prefetch.PrefetchTarget`).

    Every :data:`PREFETCH_SLICE` ioctls it lets the loop serve the faults of every fork, so a
    long prefetch does not stall the others.
    """

    __slots__ = ("_f", "_n", "_worker", "src_base")

    def __init__(self, worker: Worker, f: WorkerFork) -> None:
        self._worker = worker
        self._f = f
        self._n = 0
        self.src_base = worker.mem_address

    def _tick(self) -> None:
        self._n += 1
        if self._n % PREFETCH_SLICE == 0:
            self._worker.poll_forks()
            if self._worker.crash_at:
                self._worker.crash_point("prefetch")
        if self._f.stage is not WorkerStage.PREFETCHING or self._f.uffd < 0:
            raise PrefetchError("session ended during prefetch")

    def copy(self, dst: int, src: int, length: int, mode: int) -> int:
        self._tick()
        lazy = self._worker.lazy
        if lazy is not None:
            # The supervisor fetched the plan's chunks first; never copy one that is not in.
            chunk = lazy.missing_chunk(src - self.src_base, length)
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
        self._worker.table.track(self._f)
