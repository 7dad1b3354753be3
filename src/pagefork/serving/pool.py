"""The supervisor's worker processes: starting them, talking to them, replacing dead ones.

A worker is ``python -m pagefork.serving.worker`` with one end of a socketpair (its channel),
the mem-file's fd and the zero-page index's memfd, so every worker maps the same file (one page
cache) and nobody scans it twice. One spare worker is kept started, so replacing a dead worker
costs a hand-over, not an interpreter start-up. Death is noticed through a pidfd, not polling.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pagefork
from pagefork.errors import PageforkError
from pagefork.prefetch import PrefetchPlan
from pagefork.serving import ipc

#: A slot whose workers die this often (deaths within seconds) is not restarted again.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_SECONDS = 10.0
#: Prefetch plans a worker keeps, so forks of one template send theirs once per worker.
PLANS_KEPT = 16


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (``auto`` starts one worker per CPU)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except OSError:
        return list(range(os.cpu_count() or 1))


def pinned_cpu(pid: int) -> int | None:
    """The one CPU every thread of process ``pid`` is pinned to, or None (not pinned to one
    CPU, or gone). A VMM pins its vCPU threads this way."""
    cpus: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            cpus |= os.sched_getaffinity(int(tid))
            if len(cpus) > 1:
                return None
    except OSError:
        return None
    return cpus.pop() if len(cpus) == 1 else None


class WorkerProcess:
    """One worker process, as the supervisor sees it."""

    def __init__(
        self, slot: int, mem_fd: int, mem_size: int, zero_fd: int, cpu: int | None = None
    ) -> None:
        self.slot = slot
        self.cpu = cpu
        self.forks: set[str] = set()
        self._plans: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._send_lock = threading.Lock()
        parent, child = ipc.channel_pair()
        env = dict(os.environ)
        # The worker imports pagefork from wherever this process did (a source tree too).
        root = os.path.dirname(os.path.dirname(os.path.abspath(pagefork.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pagefork.serving.worker",
                    str(child.fileno()),
                    str(mem_fd),
                    str(mem_size),
                    str(zero_fd),
                ],
                pass_fds=(child.fileno(), mem_fd, zero_fd),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            parent.close()
            raise PageforkError(f"cannot start a worker process: {exc.strerror}") from None
        finally:
            child.close()
        self.chan = parent
        self.pid = self.proc.pid
        if cpu is not None:
            with contextlib.suppress(OSError):  # a CPU taken offline meanwhile: run anywhere
                os.sched_setaffinity(self.pid, {cpu})
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.proc.kill()
            self.proc.wait()
            parent.close()
            raise
        self.alive = True
        #: Set once the worker has mapped the mem-file and serves (its "ready" message).
        self.ready = threading.Event()

    def send(self, message: Any, fds: tuple[int, ...] | list[int] = ()) -> bool:
        """Send a message; False when the worker is gone (its death is handled elsewhere)."""
        with self._send_lock:
            if not self.alive:
                return False
            try:
                ipc.send(self.chan, message, fds)
            except OSError:
                return False
        return True

    def send_prefetch(
        self, req: int, key: str, token: int | None, plan: PrefetchPlan, timeout: float
    ) -> bool:
        """Ask for a prefetch. A plan this worker already has (``token``) is not sent again:
        its copy is kept in step with this side's record, both least-recently-used."""
        with self._send_lock:
            if not self.alive:
                return False
            known = token is not None and token in self._plans
            if token is not None:
                self._plans[token] = None
                self._plans.move_to_end(token)
                while len(self._plans) > PLANS_KEPT:
                    self._plans.popitem(last=False)
            try:
                ipc.send(self.chan, ("prefetch", req, key, token, None if known else plan, timeout))
            except OSError:
                return False
        return True

    def reap(self) -> int | None:
        """Collect the dead worker's exit status and close what we held of it."""
        with self._send_lock:
            self.alive = False
        status = self.proc.wait()
        self._close()
        return status

    def stop(self, timeout: float = 5.0) -> None:
        """Close the channel (the worker exits on it) and wait; SIGKILL a worker that lingers."""
        with self._send_lock:
            self.alive = False
            with contextlib.suppress(OSError):
                self.chan.shutdown(2)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        self.chan.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class WorkerPool:
    """``count`` worker slots and one spare; the caller (the supervisor loop) owns it."""

    def __init__(
        self,
        count: int,
        mem_fd: int,
        mem_size: int,
        zero_fd: int,
        spare: bool,
        cpus: list[int] | None = None,
    ) -> None:
        self._mem = (mem_fd, mem_size, zero_fd)
        self._want_spare = spare
        #: Slot i's CPU when workers are pinned (one per CPU), else None.
        self._cpus: list[int | None] = list(cpus) if cpus else [None] * count
        self.workers: list[WorkerProcess | None] = []
        self.spare: WorkerProcess | None = None
        self._deaths: list[collections.deque[float]] = [
            collections.deque(maxlen=CRASH_LOOP_DEATHS) for _ in range(count)
        ]
        try:
            for slot in range(count):
                self.workers.append(WorkerProcess(slot, *self._mem, cpu=self._cpus[slot]))
            if spare:
                self.spare = WorkerProcess(-1, *self._mem)
        except BaseException:
            self.stop()
            raise

    def live(self) -> list[WorkerProcess]:
        """The workers serving a slot now."""
        return [w for w in self.workers if w is not None]

    def place(self, vmm_cpu: int | None) -> WorkerProcess | None:
        """The worker for a new fork: the one pinned to the CPU its VMM is pinned to (a wake-up
        within one core costs a fraction of one across cores), else the least loaded. None when
        every slot has failed."""
        live = self.live()
        if vmm_cpu is not None:
            for w in live:
                if w.cpu == vmm_cpu:
                    return w
        return min(live, key=lambda w: len(w.forks), default=None)

    def by_pidfd(self, fd: int) -> WorkerProcess | None:
        """The worker (or spare) whose pidfd is ``fd``."""
        for w in [*self.live(), self.spare]:
            if w is not None and w.pidfd == fd:
                return w
        return None

    def replace(self, dead: WorkerProcess) -> tuple[WorkerProcess | None, str | None]:
        """Put a worker in the dead one's slot: ``(worker, None)``, or ``(None, reason)`` when
        the slot crash-loops and is given up."""
        if dead is self.spare:
            self.spare = WorkerProcess(-1, *self._mem) if self._want_spare else None
            return None, None
        slot = dead.slot
        deaths = self._deaths[slot]
        now = time.monotonic()
        deaths.append(now)
        if len(deaths) == CRASH_LOOP_DEATHS and now - deaths[0] < CRASH_LOOP_SECONDS:
            self.workers[slot] = None
            return None, (
                f"worker slot {slot} died {CRASH_LOOP_DEATHS} times in "
                f"{now - deaths[0]:.1f}s; not restarting it"
            )
        new, self.spare = self.spare, None
        cpu = self._cpus[slot]
        if new is None:
            new = WorkerProcess(slot, *self._mem, cpu=cpu)
        else:
            new.slot, new.cpu = slot, cpu
            if cpu is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(new.pid, {cpu})
            if self._want_spare:
                self.spare = WorkerProcess(-1, *self._mem)
        self.workers[slot] = new
        return new, None

    def all_processes(self) -> list[WorkerProcess]:
        """Every worker, spare included."""
        return [*self.live(), *([self.spare] if self.spare is not None else [])]

    def stop(self) -> None:
        """Stop every worker and the spare."""
        for w in self.all_processes():
            w.stop()
        self.workers = [None] * len(self.workers)
        self.spare = None
