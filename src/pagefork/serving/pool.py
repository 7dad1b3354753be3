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
from pagefork.serving import ipc

#: A slot whose workers die this often (deaths within seconds) is not restarted again.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_SECONDS = 10.0


def usable_cpus() -> int:
    """How many CPUs this process may run on (the ``auto`` worker count)."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


class WorkerProcess:
    """One worker process, as the supervisor sees it."""

    def __init__(self, slot: int, mem_fd: int, mem_size: int, zero_fd: int) -> None:
        self.slot = slot
        self.forks: set[str] = set()
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
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.proc.kill()
            self.proc.wait()
            parent.close()
            raise
        self.alive = True

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

    def __init__(self, count: int, mem_fd: int, mem_size: int, zero_fd: int, spare: bool) -> None:
        self._mem = (mem_fd, mem_size, zero_fd)
        self._want_spare = spare
        self.workers: list[WorkerProcess | None] = []
        self.spare: WorkerProcess | None = None
        self._deaths: list[collections.deque[float]] = [
            collections.deque(maxlen=CRASH_LOOP_DEATHS) for _ in range(count)
        ]
        try:
            for slot in range(count):
                self.workers.append(WorkerProcess(slot, *self._mem))
            if spare:
                self.spare = WorkerProcess(-1, *self._mem)
        except BaseException:
            self.stop()
            raise

    def live(self) -> list[WorkerProcess]:
        """The workers serving a slot now."""
        return [w for w in self.workers if w is not None]

    def least_loaded(self) -> WorkerProcess | None:
        """The live worker with the fewest forks (None when every slot has failed)."""
        return min(self.live(), key=lambda w: len(w.forks), default=None)

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
        if new is None:
            new = WorkerProcess(slot, *self._mem)
        else:
            new.slot = slot
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
