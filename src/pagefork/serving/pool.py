"""The supervisor's worker processes: starting them, talking to them, replacing dead ones.

A worker is ``python -m pagefork.serving.worker`` with one end of a socketpair (its channel),
the mem-file's fd and the zero-page index's memfd, so every worker maps the same file (one page
cache) and nobody scans it twice. One spare worker is kept started, so replacing a dead worker
costs a hand-over, not an interpreter start-up. Death is noticed through a pidfd, not polling;
a worker that lives but stops answering (stopped, wedged) through a heartbeat
(:data:`PING_INTERVAL`, :data:`STUCK_AFTER`), and is then killed, so its death is handled
exactly like a crash.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pagefork
from pagefork.errors import PageforkError
from pagefork.prefetch import PrefetchPlan
from pagefork.serving import ipc
from pagefork.serving import messages as M

log = logging.getLogger("pagefork")

#: A slot whose workers die this often (deaths within seconds) is not restarted again.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_SECONDS = 10.0
#: How long a slot that crash-looped stays empty before a new fork tries it again.
GIVE_UP_SECONDS = 30.0
#: A worker that has not taken a message off its channel for this long is stuck (stopped, or
#: in a kernel wait it cannot leave): it is killed and replaced like a dead one. Long enough
#: for the longest prefetch a worker runs between two looks at its channel.
SEND_TIMEOUT = 20.0
#: The supervisor pings each worker this often (seconds); the worker answers from its loop.
PING_INTERVAL = 0.2
#: A worker whose oldest unanswered ping is older than this is not placed on; it answers
#: within a few ms when its loop turns, so this is far above a busy worker's delay.
SLOW_AFTER = 0.4
#: A worker whose oldest unanswered ping is older than this is stuck: it is killed and its
#: forks adopted as a dead worker's. Detection takes at most STUCK_AFTER + PING_INTERVAL.
#: ``PAGEFORK_WORKER_STUCK_AFTER`` (seconds) sets another bound, for a debugger's pauses.
STUCK_AFTER = 1.0
#: A worker whose ping is overdue while the kernel says it is runnable (running, or waiting
#: for a CPU on an overloaded host) or in an I/O wait is slow, not stopped: it is killed only
#: after this long. Killing healthy workers of a host short of CPU would only add work.
BUSY_STUCK_AFTER = 10.0


def stuck_after() -> float:
    """The heartbeat's bound: :data:`STUCK_AFTER`, or ``PAGEFORK_WORKER_STUCK_AFTER``."""
    text = os.environ.get("PAGEFORK_WORKER_STUCK_AFTER", "")
    try:
        value = float(text)
    except ValueError:
        return STUCK_AFTER
    return value if value > SLOW_AFTER and value < 1e9 else STUCK_AFTER


def scheduler_state(pid: int) -> str | None:
    """The kernel's one-letter state of process ``pid`` (``R``, ``S``, ``D``, ``T``...), or
    None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (in parentheses) may hold any byte: the state follows its last ')'.
    rest = stat[stat.rfind(b")") + 1 :].split()
    return rest[0].decode("ascii", "replace") if rest else None


def stuck_bound(state: str | None) -> float:
    """How long an unanswered ping may wait before a worker in ``state`` is stuck: stopped
    (``T``, ``t``) or asleep elsewhere than its loop, :func:`stuck_after`; runnable or in an
    I/O wait (``R``, ``D``), at least :data:`BUSY_STUCK_AFTER`."""
    base = stuck_after()
    return max(base, BUSY_STUCK_AFTER) if state in ("R", "D") else base


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (``auto`` starts one worker per CPU)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except OSError:
        return list(range(os.cpu_count() or 1))


def max_workers() -> int:
    """The most workers one page server may have: 4 per usable CPU."""
    return 4 * len(usable_cpus())


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
        self,
        slot: int,
        mem_fd: int,
        mem_size: int,
        zero_fd: int,
        cpu: int | None = None,
        layout_fds: tuple[int, ...] = (),
        lazy: tuple[int, int] | None = None,
        pin: bool = True,
    ) -> None:
        self.slot = slot
        #: Its home CPU (None: it has none): forks whose VMM is pinned there come to it. With
        #: ``pin`` it runs there only; else wherever the scheduler puts it.
        self.cpu = cpu
        self.forks: set[str] = set()
        self._plans: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._send_lock = threading.Lock()
        self.pidfd = -1
        try:
            parent, child = ipc.channel_pair()
        except OSError as exc:
            raise PageforkError(f"cannot start a worker process: {exc.strerror}") from None
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
                    # A layered template: the view's segments and its layer files.
                    *([f"layout={','.join(map(str, layout_fds))}"] if layout_fds else []),
                    # A lazy template (pagefork.store.lazy): its presence map and chunk size.
                    *([f"lazy={lazy[0]},{lazy[1]}"] if lazy else []),
                ],
                pass_fds=(
                    child.fileno(),
                    mem_fd,
                    zero_fd,
                    *layout_fds,
                    *(lazy[:1] if lazy else ()),
                ),
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
        except OSError as exc:
            self.proc.kill()
            self.proc.wait()
            parent.close()
            raise PageforkError(f"cannot watch a worker process: {exc.strerror}") from None
        parent.settimeout(SEND_TIMEOUT)
        if cpu is not None and pin:
            with contextlib.suppress(OSError):  # a CPU taken offline meanwhile: run anywhere
                os.sched_setaffinity(self.pid, {cpu})
        self.alive = True
        #: Set once it was SIGKILLed from here (its death is then on its way).
        self.killed = False
        #: Set once the worker has mapped the mem-file and serves (its "ready" message).
        self.ready = threading.Event()
        #: Set while no :class:`~M.OrphanSetup` sent to it is unanswered: its start-up is only
        #: paid once that is done too (the handler's import costs CPU that serving forks need).
        self.prepared = threading.Event()
        self.prepared.set()
        self._setups = 0
        # The heartbeat: pings sent and not yet answered, by sequence number, with when.
        self._pings: dict[int, float] = {}
        self._ping_seq = 0
        self._last_ping = time.monotonic()
        self.send(M.Hello(M.PROTOCOL_VERSION))

    def send_orphan_setup(self, setup: M.OrphanSetup) -> None:
        """Send ``setup``; :attr:`prepared` is clear until the worker answers it."""
        self._setups += 1
        self.prepared.clear()
        self.send(setup)

    def answered(self, message: M.Pong | M.OrphanPrepared) -> None:
        """The worker answered a ping (:class:`~M.Pong`) or an :class:`~M.OrphanSetup`."""
        if isinstance(message, M.Pong):
            self.pong(message.seq)
            return
        self._setups = max(0, self._setups - 1)
        if not self._setups:
            self.prepared.set()

    def send(self, message: M.ToWorker, fds: tuple[int, ...] | list[int] = ()) -> bool:
        """Send a message; False when the worker is gone (its death is handled elsewhere)."""
        with self._send_lock:
            return self._send(message, fds)

    def _send(self, message: M.ToWorker, fds: tuple[int, ...] | list[int] = ()) -> bool:
        if not self.alive:
            return False
        try:
            ipc.send(self.chan, message, fds)
        except TimeoutError:
            log.error(
                "worker %d took no message for %gs: killing it (its forks move on)",
                self.pid,
                SEND_TIMEOUT,
            )
            self.kill()
            return False
        except OSError:
            return False
        return True

    def send_prefetch(
        self,
        req: int,
        key: str,
        token: int | None,
        plan: PrefetchPlan,
        timeout: float,
        head: int | None = None,
    ) -> bool:
        """Ask for a prefetch (streamed after ``head`` hot pages, if given). A plan this
        worker already has (``token``) is not sent again: its copy is kept in step with this
        side's record, both least-recently-used."""
        with self._send_lock:
            known = token is not None and token in self._plans
            if token is not None:
                self._plans[token] = None
                self._plans.move_to_end(token)
                while len(self._plans) > M.PLANS_KEPT:
                    self._plans.popitem(last=False)
            return self._send(M.Prefetch(req, key, token, None if known else plan, timeout, head))

    # --- the heartbeat (called from the supervisor's loop only) --------------------------
    def ping_due(self, now: float) -> float:
        """When this worker's next heartbeat step is due (a ping, or a verdict)."""
        due = self._last_ping + PING_INTERVAL
        if self._pings:
            verdict = min(self._pings.values()) + stuck_after()
            if verdict > now:  # past it, a busy worker's verdict is looked at every ping
                due = min(due, verdict)
        return due

    def heartbeat(self, now: float) -> bool:
        """Ping if one is due; False when the worker is stuck: it has not answered for
        :func:`stuck_bound` of its scheduler state (1 s stopped, 10 s runnable but slow).

        Never waits: a send already in progress (to a worker that is not reading) skips the
        ping, and the unanswered ones still count.
        """
        if self._pings:
            waited = now - min(self._pings.values())
            if waited >= stuck_after() and waited >= stuck_bound(scheduler_state(self.pid)):
                return False
        if now - self._last_ping >= PING_INTERVAL and self._send_lock.acquire(blocking=False):
            try:
                self._ping_seq += 1
                self._pings[self._ping_seq] = now
                self._last_ping = now
                self.chan.settimeout(0)
                try:
                    ipc.send(self.chan, M.Ping(self._ping_seq))
                except OSError:
                    # A channel too full for a ping is a worker that does not read (and a
                    # frame cut short cannot be finished later): it is stuck.
                    return False
                finally:
                    self.chan.settimeout(SEND_TIMEOUT)
            finally:
                self._send_lock.release()
        return True

    def unanswered_since(self, now: float) -> float:
        """When the oldest ping still unanswered was sent (``now`` when none is)."""
        return min(self._pings.values(), default=now)

    def pong(self, seq: int) -> None:
        """The worker answered ping ``seq`` (and so every ping before it)."""
        for n in [n for n in self._pings if n <= seq]:
            del self._pings[n]

    @property
    def answering(self) -> bool:
        """False while a ping has waited longer than :data:`SLOW_AFTER` for its answer."""
        return not self._pings or time.monotonic() - min(self._pings.values()) < SLOW_AFTER

    @property
    def failed_to_start(self) -> bool:
        """After its death: it never got ready, and exited by itself or was refused here (a
        protocol mismatch), rather than being killed from outside while it started."""
        if self.ready.is_set():
            return False
        status = self.proc.returncode
        return self.killed or (status is not None and status >= 0)

    def kill(self) -> None:
        """SIGKILL the worker (its death is then handled as any other)."""
        self.killed = True
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> int | None:
        """Collect the dead worker's exit status and close what we held of it (its pidfd
        said it exited)."""
        self.alive = False
        status = self.proc.wait()
        self._close()
        return status

    def stop(self, timeout: float = 5.0) -> None:
        """Close the channel (the worker exits on it) and wait; SIGKILL a worker that lingers.
        Never waits for a sender: shutting the channel down fails any send in progress."""
        self.alive = False
        if self._send_lock.acquire(blocking=False):  # never wait for a sender
            try:
                # Tell it this is a stop, not our death (it would serve on as an orphan).
                self.chan.setblocking(False)
                with contextlib.suppress(OSError):
                    ipc.send(self.chan, M.Stop())
            finally:
                self._send_lock.release()
        with contextlib.suppress(OSError):
            self.chan.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        with self._send_lock:
            self.chan.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class WorkerPool:
    """``count`` worker slots and one spare; the caller (the supervisor loop) owns it.

    With ``cpus`` (one per slot), slot i's worker has CPU i as its home: a fork whose VMM is
    pinned to a CPU goes to that CPU's worker (:meth:`place`). ``pin`` also pins each worker
    to its home CPU; without it the scheduler may run a worker on any CPU.
    """

    def __init__(
        self,
        count: int,
        mem_fd: int,
        mem_size: int,
        zero_fd: int,
        spare: bool,
        cpus: list[int] | None = None,
        layout_fds: tuple[int, ...] = (),
        lazy: tuple[int, int] | None = None,
        pin: bool = True,
    ) -> None:
        self._mem = (mem_fd, mem_size, zero_fd)
        self._layout = layout_fds
        self._lazy = lazy
        #: What each worker is told to do if the supervisor dies (None: nothing, it exits).
        self.orphan_setup: M.OrphanSetup | None = None
        self._want_spare = spare
        #: Slot i's home CPU (one per CPU), else None; workers run only there with ``pin``.
        self._cpus: list[int | None] = list(cpus) if cpus else [None] * count
        self._pin = pin
        self.workers: list[WorkerProcess | None] = []
        self.spare: WorkerProcess | None = None
        #: Slots whose workers crash-looped, and when: not restarted for :data:`GIVE_UP_SECONDS`.
        self.given_up: dict[int, float] = {}
        # Deaths per slot, and the spare's (index -1): a slot that crash-loops is given up.
        self._deaths: dict[int, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=CRASH_LOOP_DEATHS)
        )
        try:
            for slot in range(count):
                self.workers.append(self._spawn(slot, self._cpus[slot]))
        except BaseException:
            self.stop()
            raise
        self.start_spare()

    def _spawn(self, slot: int, cpu: int | None) -> WorkerProcess:
        w = WorkerProcess(
            slot, *self._mem, cpu=cpu, layout_fds=self._layout, lazy=self._lazy, pin=self._pin
        )
        if self.orphan_setup is not None:
            w.send_orphan_setup(self.orphan_setup)
        return w

    def _seat(self, w: WorkerProcess, slot: int) -> None:
        """Put ``w`` (the spare) in ``slot``, with the slot's home CPU (pinned there if the
        pool pins)."""
        w.slot, w.cpu = slot, self._cpus[slot]
        self.workers[slot] = w
        if w.cpu is not None and self._pin:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(w.pid, {w.cpu})

    def keep_forks_if_killed(self, setup: M.OrphanSetup) -> None:
        """Tell every worker, and each one started later, to serve on if the supervisor dies
        (pagefork.serving.orphaning); the caller holds the supervisor's lock."""
        self.orphan_setup = setup
        for w in self.all_processes():
            w.send_orphan_setup(setup)

    def start_spare(self) -> None:
        """Start a spare if one is wanted; a failure only costs the spare (logged)."""
        if not self._want_spare or self.spare is not None:
            return
        try:
            self.spare = self._spawn(-1, None)
        except PageforkError as exc:
            log.warning("no spare worker: %s", exc)

    @property
    def pins_one_per_cpu(self) -> bool:
        """True when each slot has a home CPU and its worker is pinned there."""
        return self._pin and all(cpu is not None for cpu in self._cpus)

    def live(self) -> list[WorkerProcess]:
        """The workers serving a slot now."""
        return [w for w in self.workers if w is not None]

    def place(self, vmm_cpu: int | None) -> WorkerProcess | None:
        """The worker for a new fork: the one whose home is the CPU its VMM is pinned to, else
        the least loaded (forks arriving together go round the workers). Never a worker that
        is not answering its heartbeat. None when no worker can take it.

        Chosen by measurement (bench_fanout, 2 CPUs, a shared host; per-round ratios to a C
        handler with a process per fork; the range of three runs' medians, 3-4 rounds each;
        crossed VMMs in two runs, placing by last CPU in one): a fault and its answer are two
        wake-ups, and across cores each costs an IPI. Serving a pinned VMM from the other
        core's worker made a burst 6-11x slower at 1 fork and 1.6-3.6x at 4 to 32, so a
        pinned VMM goes to its CPU's worker. Pinning the workers (``pin_workers``, the
        default) measured 1.07-1.75x at 1 pinned fork against 1.10-2.49x unpinned, and
        the same within the noise at 4 to 32 forks (0.99-1.63x against 0.92-2.03x); with
        free VMMs neither was better (0.87-2.51x against 1.51-2.29x). Placing a free VMM by
        the CPU it ran on at its handshake was no better than the least loaded worker
        (1.56-2.73x against 0.87-1.91x): the scheduler moves it soon after. So a free VMM's
        fork follows it later instead, once the VMM has settled on a CPU
        (:mod:`pagefork.serving.following`). Paired in the same runs (four quick runs on a
        host with a load average of 6-17), free VMMs measured 1.00-1.13x at 16 forks and
        0.82-0.94x at 32 following, against 1.34-1.48x and 1.05-1.12x staying where placed;
        at 1 and 4 forks a quick run's two rounds swing either way (1 fork: 0.65-1.97x
        against 1.19-3.30x; 4: 0.95-2.57x against 0.93-1.94x), and ten rounds gave 1.02x
        against 1.19x at 1 fork and 1.12x against 1.62x at 4.
        """
        live = [w for w in self.live() if w.answering]
        if vmm_cpu is not None:
            for w in live:
                if w.cpu == vmm_cpu:
                    return w
        return min(live, key=lambda w: len(w.forks), default=None)

    def _crash_looping(self, slot: int, counts: bool = True) -> float | None:
        """Note a death in ``slot``; the seconds its last deaths took when it crash-loops.

        Only deaths that count do: one with forks, or of a worker that could not start. A
        worker killed with nothing to serve was killed from outside (an operator, the OOM
        killer), and no fork of ours can be why.
        """
        if not counts:
            return None
        deaths = self._deaths[slot]
        now = time.monotonic()
        deaths.append(now)
        if len(deaths) == CRASH_LOOP_DEATHS and now - deaths[0] < CRASH_LOOP_SECONDS:
            return now - deaths[0]
        return None

    def replace(self, dead: WorkerProcess) -> tuple[WorkerProcess | None, str | None]:
        """Take ``dead`` out and put a worker in its slot: ``(worker, None)``, or ``(None,
        reason)`` when none can be put there: the slot crash-loops (it is given up for good,
        see :attr:`given_up`), or no worker can start now (the slot stays empty until
        :meth:`refill` manages to)."""
        if dead is self.spare:
            self.spare = None
            # A spare killed from outside is no reason to stop keeping one; a spare that
            # cannot start may loop.
            span = self._crash_looping(-1, dead.failed_to_start)
            if span is None:
                self.start_spare()
            else:
                log.error(
                    "the spare worker died %d times in %.1fs; running without one",
                    CRASH_LOOP_DEATHS,
                    span,
                )
                self._want_spare = False
            return None, None
        slot = dead.slot
        if 0 <= slot < len(self.workers) and self.workers[slot] is dead:
            self.workers[slot] = None
        # A worker that could not start loops whatever it served.
        span = self._crash_looping(slot, bool(dead.forks) or dead.failed_to_start)
        if span is not None:
            self.given_up[slot] = time.monotonic()
            return None, (
                f"worker slot {slot} died {CRASH_LOOP_DEATHS} times in {span:.1f}s; "
                "not restarting it"
            )
        new = None
        # A spare that does not answer its heartbeat is about to be killed: never give it forks.
        if self.spare is not None and self.spare.answering:
            new, self.spare = self.spare, None
        cpu = self._cpus[slot]
        if new is None:
            try:
                new = self._spawn(slot, cpu)
            except PageforkError as exc:
                return None, str(exc)
        else:
            self._seat(new, slot)
        self.workers[slot] = new
        self.start_spare()  # after the slot is filled: a spare that cannot start costs nothing
        return new, None

    def refill(self) -> list[WorkerProcess]:
        """Fill empty slots: those where no worker could start (out of fds, say), and those
        given up more than :data:`GIVE_UP_SECONDS` ago. The spare goes first. Returns the
        workers started (not the spare: it is watched already). Failures leave a slot empty."""
        started = []
        now = time.monotonic()
        for slot, w in enumerate(self.workers):
            if w is not None:
                continue
            since = self.given_up.get(slot)
            if since is not None:
                if now - since < GIVE_UP_SECONDS:
                    continue
                del self.given_up[slot]
                self._deaths[slot].clear()
            if self.spare is not None and self.spare.answering:
                self._seat(self.spare, slot)
                self.spare = None
                continue
            try:
                w = self._spawn(slot, self._cpus[slot])
            except PageforkError:
                continue
            self.workers[slot] = w
            started.append(w)
        return started

    def top_up(self) -> list[WorkerProcess]:
        """When a slot is empty: :meth:`refill`, then start a spare if one is wanted (it may
        have gone into a slot). Returns every process started (the spare too)."""
        if len(self.live()) == len(self.workers):
            return []
        started = self.refill()
        had = self.spare
        self.start_spare()
        return started + ([self.spare] if self.spare is not None and self.spare is not had else [])

    def all_processes(self) -> list[WorkerProcess]:
        """Every worker, spare included."""
        return [*self.live(), *([self.spare] if self.spare is not None else [])]

    def stop(self) -> None:
        """Stop every worker and the spare."""
        for w in self.all_processes():
            w.stop()
        self.workers = [None] * len(self.workers)
        self.spare = None
