"""A fork follows its VMM: the worker whose home is the CPU the VMM runs on serves its faults.

A fault and its answer are two wake-ups: the guest's thread wakes the worker, the worker's copy
wakes the guest's thread. Between two cores each is an inter-processor interrupt, which costs
more than the rest of the fault (about 100 us on a nested-virtualisation host, against 15-25
us served on the same core). A VMM pinned to one CPU is placed on that CPU's worker at its
handshake (:meth:`~pagefork.serving.pool.WorkerPool.place`); one the scheduler moves about
lands anywhere, and the scheduler cannot bring a pinned worker to it. So the supervisor looks,
every :data:`SAMPLE_INTERVAL`, at where the VMM of each fork that faulted since the last look
ran, and moves the fork to the worker of that CPU once the VMM has settled there.

Where a VMM runs: each of its threads' last CPU (``/proc/PID/task/TID/stat``, field 39),
weighted by the CPU time the thread took since the last look (``schedstat``), so the vCPU
threads that fault count and idle threads do not. A VMM whose threads ran mostly (more than
half of that time) on one CPU other than its worker's home, at :data:`SETTLE_LOOKS` looks in a
row, has settled there. Forks that fault seldom are not looked at: a fork whose fault count did
not move since the last look costs one read of its ledger. Nor are, for :data:`PINNED_RECHECK`,
VMMs pinned to their worker's CPU (placed there at their handshake). Looks take at most
:data:`LOOK_SHARE` of the supervisor's time.

A move is the release and adoption a takeover uses (:mod:`pagefork.serving.state`): the fork
goes ``MOVING`` and its worker is asked to let it go (it finishes what it read, stops watching
the fork's fds, drops the lock on its ledger, and answers); faults raised meanwhile wait in the
uffd. On that answer the target worker takes the ledger's lock, adopts the fork and wakes its
vCPUs, so a fault read and not served is raised again, to it: nothing is lost, and never are
two workers serving one fork (the lock decides, never timing: see
:mod:`pagefork.serving.ledger`). A worker that dies before it answers has the fork adopted by
its replacement, as any orphan. A fork with a prefetch running or streaming into it is not
moved (a prefetch waits for a move). Nor is one moved to a worker late with its heartbeat.

The first worker keeps its copies of the fork's fds, parked, until the target says it serves
the fork; then it is told to forget them (:class:`~pagefork.serving.messages.Forget`). So a
supervisor killed in between loses nothing: orphaned, the first worker tries the ledger's lock
and serves the fork on if nobody took it, or closes its copies if the target did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.config import ServerConfig
from pagefork.serving.forks import ForkRecord, ForkTable
from pagefork.serving.pool import WorkerPool, WorkerProcess, pinned_cpu
from pagefork.serving.prefetching import PrefetchService
from pagefork.serving.state import Event, Stage

log = logging.getLogger("pagefork")

#: Seconds between two looks at where the VMMs of faulting forks run. A look costs a few
#: small /proc reads per faulting fork (about 10 us each).
SAMPLE_INTERVAL = 0.025
#: Looks in a row a VMM must be seen on another worker's CPU before its fork moves: one look
#: may catch a thread the scheduler is about to move back.
SETTLE_LOOKS = 2
#: Seconds a VMM found pinned to its worker's CPU is not looked at again (it stays there
#: unless someone pins it elsewhere): a look at its pinning costs a fifth of a look at its
#: threads' times.
PINNED_RECHECK = 1.0
#: A look may take at most this share of the supervisor's time: with many faulting forks on
#: a slow host, looks come less often than every SAMPLE_INTERVAL.
LOOK_SHARE = 0.05

#: A thread's last CPU and its CPU time so far (ns), by thread id.
ThreadTimes = dict[int, tuple[int, int]]


def thread_times(pid: int) -> ThreadTimes:
    """Each thread of process ``pid``: the CPU it last ran on and its CPU time (ns); empty
    when the process is gone."""
    found: ThreadTimes = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for name in tids:
        try:
            stat = _read(f"/proc/{pid}/task/{name}/stat")
            sched = _read(f"/proc/{pid}/task/{name}/schedstat")
        except OSError:
            continue  # a thread that exited meanwhile
        # The command name (in parentheses) may hold any byte: fields follow its last ')'.
        # After it come the fields from 3 (state) on: 39 (processor) is the 37th.
        fields = stat[stat.rfind(b")") + 1 :].split()
        with contextlib.suppress(IndexError, ValueError):
            found[int(name)] = (int(fields[36]), int(sched.split()[0]))
    return found


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1024)
    finally:
        os.close(fd)


def busiest_cpu(before: ThreadTimes, now: ThreadTimes) -> int | None:
    """The CPU where the threads ran more than half the CPU time they took between two
    looks (each thread counted on the CPU it last ran on), or None (no time taken, or spread
    over CPUs)."""
    by_cpu: dict[int, int] = {}
    for tid, (cpu, ran) in now.items():
        took = ran - before[tid][1] if tid in before else 0
        if took > 0:
            by_cpu[cpu] = by_cpu.get(cpu, 0) + took
    total = sum(by_cpu.values())
    if not total:
        return None
    cpu, took = max(by_cpu.items(), key=lambda item: item[1])
    return cpu if 2 * took > total else None


@dataclass
class _Watch:
    """What the follower remembers of one fork between looks."""

    faults: int = -1
    times: ThreadTimes = field(default_factory=dict)
    #: The other worker's CPU its VMM was seen on, and at how many looks in a row.
    cpu: int | None = None
    looks: int = 0
    #: While it moves: the worker that takes it.
    target: WorkerProcess | None = None
    #: Until when its VMM counts as pinned to its worker's CPU (not looked at).
    pinned_until: float = 0.0
    #: After a move: the worker that parked its fds, until another one serves it.
    parked: WorkerProcess | None = None


class ForkFollower:
    """Moves each fork to the worker next to its VMM (the supervisor's loop calls it, with
    the lock held). It follows only with ``ServerConfig.follow_vmms`` and a worker pinned to
    each CPU (:attr:`~pagefork.serving.pool.WorkerPool.pins_one_per_cpu`)."""

    def __init__(
        self,
        config: ServerConfig,
        table: ForkTable,
        pool: WorkerPool,
        prefetcher: PrefetchService,
        carry_out: Callable[..., object],
    ) -> None:
        self._table = table
        self._pool = pool
        self._prefetcher = prefetcher
        self._carry_out = carry_out
        #: Following now (tests and benchmarks may turn it off and on).
        self.enabled = config.follow_vmms and pool.pins_one_per_cpu
        #: Seconds between looks (:data:`SAMPLE_INTERVAL` when it was made).
        self.interval = SAMPLE_INTERVAL
        self._watches: dict[str, _Watch] = {}
        self._next = 0.0

    def due(self) -> list[float]:
        """When the next look is due (lock held): none while following is off or no fork is
        served (an idle server is not woken for it)."""
        if not self.enabled or not any(
            e.stage is Stage.SERVING for e in self._table.by_key.values()
        ):
            return []
        return [self._next]

    def homes(self) -> dict[int, WorkerProcess]:
        """The workers a fork may move to, by home CPU: live, started and answering."""
        return {
            w.cpu: w
            for w in self._pool.live()
            if w.cpu is not None and w.alive and w.ready.is_set() and w.answering
        }

    def run(self, now: float) -> None:
        """Look where the VMMs of faulting forks run, and move the settled ones; have the
        parked copies of forks that ended closed (lock held)."""
        if now < self._next:
            return
        watches = self._watches
        # Even with following turned off: a fork that ended mid-move (its target died before
        # it served it) has its parked copy closed only here.
        for key in [k for k in watches if k not in self._table.by_key]:
            self._forget(key, watches.pop(key))
        if not self.enabled:
            return
        homes = self.homes()
        if len(homes) < 2:
            return
        for key, entry in self._table.by_key.items():
            if entry.stage is not Stage.SERVING or entry.worker is None or entry.pid is None:
                continue
            watch = watches.get(key)
            if watch is None:
                watch = watches[key] = _Watch()
            self._look(entry, watch, homes, now)
        spent = time.monotonic() - now
        self._next = now + max(self.interval, spent / LOOK_SHARE)

    def _look(
        self, entry: ForkRecord, watch: _Watch, homes: dict[int, WorkerProcess], now: float
    ) -> None:
        assert entry.ledger is not None and entry.worker is not None and entry.pid is not None
        faults = int(entry.ledger.counters[L.FAULTS])
        if faults == watch.faults or now < watch.pinned_until:
            # Idle (start afresh when it faults again), or pinned where it is served.
            watch.faults, watch.times, watch.cpu, watch.looks = faults, {}, None, 0
            return
        watch.faults = faults
        if pinned_cpu(entry.pid) == entry.worker.cpu:
            watch.pinned_until = now + PINNED_RECHECK
            watch.times, watch.cpu, watch.looks = {}, None, 0
            return
        times = thread_times(entry.pid)
        cpu = busiest_cpu(watch.times, times)
        watch.times = times
        if cpu is None or cpu == entry.worker.cpu or cpu not in homes:
            watch.cpu, watch.looks = None, 0
            return
        watch.looks = watch.looks + 1 if cpu == watch.cpu else 1
        watch.cpu = cpu
        if watch.looks >= SETTLE_LOOKS and not self._prefetcher.in_flight(entry):
            self.move(entry, homes[cpu])

    def move(self, entry: ForkRecord, target: WorkerProcess) -> bool:
        """Ask ``entry``'s worker to let it go for ``target`` to serve it (lock held); False
        when it is not served now, is served by ``target`` already, or ``target`` is late
        with its heartbeat."""
        if entry.stage is not Stage.SERVING or entry.worker in (None, target):
            return False
        if not target.answering:
            return False  # late with its heartbeat: perhaps stopped, to be killed soon
        watch = self._watches.setdefault(entry.key, _Watch())
        watch.target, watch.cpu, watch.looks = target, None, 0
        self._carry_out(entry, self._table.move(entry, Event.MOVE_ASKED))
        return True

    def let_go(self, worker: WorkerProcess, message: M.Released | M.Refused) -> None:
        """``worker`` let these forks go (:class:`~M.Released`), or did not take one because
        another process holds its ledger's lock (:class:`~M.Refused`: that one serves it)."""
        if isinstance(message, M.Refused):
            log.error("worker %d: fork %s is served by another process", worker.pid, message.key)
        keys = message.keys if isinstance(message, M.Released) else (message.key,)
        for key in keys:
            worker.forks.discard(key)
            entry = self._table.by_key.get(key)
            if isinstance(message, M.Released) and entry is not None and entry.worker is worker:
                self.released(entry, worker)

    def adopted(self, entry: ForkRecord, worker: WorkerProcess) -> None:
        """``worker`` serves ``entry`` now (lock held): the worker it moved from, if any, may
        close its parked copies, and a prefetch armed while it moved starts, on ``worker``."""
        watch = self._watches.get(entry.key)
        if watch is not None:
            self._forget(entry.key, watch, worker)
        self._prefetcher.connected(entry)

    @staticmethod
    def _forget(key: str, watch: _Watch, serving: WorkerProcess | None = None) -> None:
        """Tell the worker that parked the fork to close its copies, unless it is ``serving``
        it now (it closed them itself as it took the fork back)."""
        parked, watch.parked = watch.parked, None
        if parked is not None and parked is not serving:
            parked.send(M.Forget((key,)))  # one that is gone forgets by dying

    def released(self, entry: ForkRecord, worker: WorkerProcess) -> None:
        """``worker`` let ``entry`` go (lock held): a move's target adopts it now (another
        worker if that one is gone, else ``worker`` again); a takeover's fork waits for the
        takeover's new side. A move's fork stays parked in ``worker`` until another serves
        it."""
        watch = self._watches.get(entry.key)
        target = None
        if watch is not None:
            target, watch.target = watch.target, None
            self._forget(entry.key, watch, worker)  # an earlier move's parked copy, if kept
        if entry.stage is not Stage.MOVING:
            target = None  # a takeover's release (it may have cut a move short), or a stop
            if watch is not None:  # asked to park it, perhaps: it is let go whole instead
                worker.send(M.Forget((entry.key,)))
        else:
            if target is None or target not in self._pool.live() or not target.answering:
                target = self._pool.place(None) or worker
            if target is not worker:
                entry.moves += 1
                self._watches.setdefault(entry.key, _Watch()).parked = worker
        commands = self._table.move(entry, Event.WORKER_RELEASED)
        self._carry_out(entry, commands, worker=target)
