"""The supervisor's loop: one epoll over listeners, pending handshakes and worker channels.

:class:`Supervisor` wires the parts of a page server together and runs its loop thread:
handshakes come from :class:`~pagefork.serving.handshakes.HandshakeReader`, every fork moves
by :class:`~pagefork.serving.forks.ForkTable` (which answers with commands, carried out here),
prefetches and lazy fetches are :class:`~pagefork.serving.prefetching.PrefetchService`'s, and
the worker processes are :class:`~pagefork.serving.pool.WorkerPool`'s. A worker that dies, or
stops answering its heartbeat and is killed for it, has its forks adopted by another, which
wakes their vCPUs and serves on: one path for every way a worker goes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time

from pagefork.errors import ForkError
from pagefork.layers.source import LayeredView
from pagefork.memfile import MemFile
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.config import ServerConfig
from pagefork.serving.following import ForkFollower
from pagefork.serving.forks import Callback, Callbacks, ForkRecord, ForkTable
from pagefork.serving.handshakes import Handshake, HandshakeReader
from pagefork.serving.pool import WorkerPool, WorkerProcess, pinned_cpu
from pagefork.serving.prefetching import PrefetchService
from pagefork.serving.state import Command, Event, Stage
from pagefork.store.lazy import LazyTemplate

log = logging.getLogger("pagefork")

_WORKER_EVENTS = {M.EndState.ENDED: Event.WORKER_ENDED, M.EndState.FAILED: Event.WORKER_FAILED}


class Supervisor:
    """The loop and the worker side of one page server (its parts are public to the
    :mod:`pagefork.serving` package; callers use :class:`~pagefork.server.PageServer`)."""

    def __init__(
        self, config: ServerConfig, memfile: MemFile | LazyTemplate | LayeredView, pool: WorkerPool
    ) -> None:
        self.config = config
        self.memfile = memfile
        self.pool = pool
        self.table = ForkTable(config.on_fork_end)
        self.lock = self.table.lock
        self.changed = self.table.changed
        self.callbacks = Callbacks()
        self.closed = False
        self.closed_fds: set[int] = set()  # closed while handling the current batch
        self.epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.epoll.register(self._wake_fd, select.EPOLLIN)
        self.handshakes = HandshakeReader(
            config, memfile.size, self.table, self.epoll, self.closed_fds
        )
        lazy = memfile if isinstance(memfile, LazyTemplate) else None
        self.prefetcher = PrefetchService(self.table, memfile.is_zero, lazy, self.tell_workers)
        self.follower = ForkFollower(config, self.table, pool, self.prefetcher, self.carry_out)
        self._workers_by_fd: dict[int, WorkerProcess] = {}
        self._acks: dict[int, threading.Event] = {}  # tests' crash points, once armed
        for w in pool.all_processes():
            self.watch_worker(w)
        self._thread = threading.Thread(target=self._loop, name="pagefork-supervisor", daemon=True)
        self._thread.start()

    # --- the loop ------------------------------------------------------------------------
    # Theory of operation.
    #
    # The loop owns every fd the page server watches: listening sockets, connections whose
    # handshake is not in, and each worker's channel and pidfd. Each turn it handles the batch
    # epoll gave, then its timers. Why it is built so:
    #
    # - Faults never come here: each worker serves its forks' uffds itself. The loop carries
    #   fork lifecycles only (handshakes, hand-overs, ends), so it may take the lock and
    #   call user-visible state changes without slowing a guest.
    # - Worker messages are read before the timers run, so a heartbeat answer that arrived
    #   while the loop was busy counts before the heartbeat verdict: a slow supervisor never
    #   condemns a worker that did answer.
    # - A worker's death (its pidfd) is handled after whatever it said before dying: the
    #   channel is drained first, so a fork it ended or a window it closed still counts.
    # - The timeout is the nearest of: a handshake deadline, a paused listener's resumption
    #   (out of fds), and each worker's next ping or heartbeat verdict. A worker is pinged
    #   every PING_INTERVAL and killed when a ping waits STUCK_AFTER for its answer; its
    #   death then takes the crash path, so a stopped worker costs its forks about a second.
    # - An fd closed by an earlier event of a batch is skipped (its number may be reused).
    def _loop(self) -> None:
        while True:
            try:
                events = self.epoll.poll(self._timeout())
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return
            self.closed_fds.clear()
            for fd, _ in events:
                if fd == self._wake_fd:
                    return
                if fd in self.closed_fds:
                    continue
                try:
                    self._on_fd(fd)
                except Exception:  # the supervisor must outlive any one connection or worker
                    log.exception("supervisor: handling fd %d failed", fd)
            self._run_timers()

    def _timeout(self) -> float:
        now = time.monotonic()
        with self.lock:
            deadlines = self.handshakes.deadlines()
            deadlines += [w.ping_due(now) for w in self._pinged()] + self.follower.due()
        if not deadlines:
            return -1
        return max(0.0, min(deadlines) - now)

    def _on_fd(self, fd: int) -> None:
        worker = self._workers_by_fd.get(fd)
        if worker is not None:
            if fd == worker.pidfd:
                self._worker_died(worker)
            else:
                self._worker_message(worker)
            return
        with self.lock:
            if self.closed:
                return
            if fd in self.handshakes.listeners:
                self.handshakes.accept(fd)
            elif fd in self.handshakes.pending:
                done = self.handshakes.step(fd)
                if done is not None:
                    self._start_serving(done)

    def _run_timers(self) -> None:
        now = time.monotonic()
        with self.lock:
            self.handshakes.run_timers(now)
            suspects = [w for w in self._pinged() if not w.heartbeat(now)]
            self.follower.run(now)  # forks to the workers next to their VMMs
        for w in suspects:
            self._drain(w)  # an answer that came while this turn ran still counts
            now = time.monotonic()
            with self.lock:
                if w in self._pinged() and not w.heartbeat(now):
                    log.error(
                        "worker %d has not answered for %.1fs: killing it (its forks move on)",
                        w.pid,
                        now - w.unanswered_since(now),
                    )
                    w.kill()

    def _pinged(self) -> list[WorkerProcess]:
        """The workers the heartbeat watches (lock held): started, and not being killed."""
        return [w for w in self.pool.all_processes() if w.ready.is_set() and not w.killed]

    def _drain(self, worker: WorkerProcess) -> None:
        """Act on every message ``worker`` has sent so far (never waits for more)."""
        poller = select.poll()
        poller.register(worker.chan.fileno(), select.POLLIN)
        while poller.poll(0) and self._worker_message(worker):
            pass

    def wake_and_join(self) -> None:
        """Stop the loop (the caller has set :attr:`closed`) and wait for it."""
        os.eventfd_write(self._wake_fd, 1)
        self._thread.join()

    def release_fds(self) -> None:
        """Close the loop's own fds (after :meth:`wake_and_join`)."""
        self.epoll.close()
        os.close(self._wake_fd)

    # --- forks ---------------------------------------------------------------------------
    def carry_out(
        self,
        entry: ForkRecord,
        commands: tuple[Command, ...],
        *,
        worker: WorkerProcess | None = None,
        why: str | None = None,
    ) -> list[Callback]:
        """Do what the fork table said after a move (lock held); the callbacks to run."""
        callbacks: list[Callback] = []
        for command in commands:
            if command is Command.HAND_TO_WORKER or command is Command.ADOPT_ON_WORKER:
                assert worker is not None
                self.hand_to(entry, worker, adopt=command is Command.ADOPT_ON_WORKER)
            elif command is Command.SEND_DROP and entry.worker is not None:
                entry.worker.send(M.Drop(entry.key))  # one that is gone ends it by dying
            elif command is Command.SEND_RELEASE and entry.worker is not None:
                # A move's fork is parked by its worker until another is known to serve it.
                entry.worker.send(M.Release((entry.key,), park=entry.stage is Stage.MOVING))
            elif command is Command.FORGET_WORKER:
                entry.worker = None
            elif command is Command.APPLY_POLICY:
                entry.apply_failure_policy(self.config.on_failure, why or "")
            elif command is Command.FINISH:
                error = why if entry.stage is Stage.FAILED else None
                callbacks += self.table.finish(entry, error, self.config.on_window_closed)
                self.prefetcher.fork_ended(entry)
        return callbacks

    def _start_serving(self, done: Handshake) -> None:
        """Hand a fork whose handshake is in to the least-loaded worker (lock held)."""
        entry = done.entry
        self.table.new_key(entry)
        entry.conn, entry.uffd, entry.pidfd = done.conn, done.uffd, done.pidfd
        entry.regions, entry.window_reported = done.regions, False
        self.table.by_key[entry.key] = entry
        pages = sum(r.size // r.page_size for r in done.regions)
        limit = self.config.record_max_pages
        capacity = min(pages, limit) if entry.record and limit is not None else pages
        entry.record_capacity = capacity if entry.record else 0
        for started in self.pool.top_up():  # slots left empty: try them again
            self.watch_worker(started)
        worker = self.place(entry)
        why = None if worker is not None else "no worker is left to serve it"
        if worker is not None:
            try:
                entry.ledger = L.Ledger.create(entry.record_capacity)
            except OSError as exc:
                why = f"cannot create the fork's ledger: {exc.strerror}"
        if worker is None or entry.ledger is None:
            # Nobody will serve this uffd: a guest left like that would hang forever.
            self.carry_out(entry, self.table.move(entry, Event.UNSERVABLE), why=why)
            return
        if entry.record:
            entry.ledger.counters[L.RECORD_STATE] = L.RECORD_OPEN
            entry.ledger.counters[L.RECORD_START_NS] = time.monotonic_ns()
        entry.connected = True
        self.carry_out(entry, self.table.move(entry, Event.PLACED), worker=worker)
        self.prefetcher.connected(entry)  # a prefetch armed for it starts now, with the fork
        if self.config.on_connect is not None:
            # Off the loop's thread: the callback may prefetch while the worker serves.
            self.callbacks.run([(self.config.on_connect, (entry.fork_id,))])

    def place(self, entry: ForkRecord) -> WorkerProcess | None:
        """The worker for ``entry`` (lock held), watched from now on; None if none is left."""
        worker = self.pool.place(pinned_cpu(entry.pid) if entry.pid else None)
        if worker is not None:
            self.watch_worker(worker)
        return worker

    def hand_to(self, entry: ForkRecord, worker: WorkerProcess, *, adopt: bool) -> None:
        """Send ``entry`` with its fds to ``worker`` (lock held)."""
        assert entry.ledger is not None
        entry.worker = worker
        worker.forks.add(entry.key)
        named = {"uffd": entry.uffd, "ledger": entry.ledger.fd, "pidfd": entry.pidfd}
        if entry.conn is not None:  # None once a VMM that outlives its socket closed it
            named["conn"] = entry.conn.fileno()
        names = tuple(name for name, fd in named.items() if fd >= 0)
        spec = M.ForkSpec(
            key=entry.key,
            fork=entry.fork_id,
            pid=entry.pid,
            on_failure=self.config.on_failure,
            regions=tuple(entry.regions),
            record_capacity=entry.record_capacity,
            record_max_pages=self.config.record_max_pages,
            record_max_seconds=self.config.record_max_seconds,
            fds=names,
            adopt=adopt,
            hangup_ends=entry.hangup_ends,
            record=entry.record,
            ephemeral=entry.ephemeral,
            socket=entry.socket_path,
            window_reported=entry.window_reported,
            next_conn=self.table.next_conn,
        )
        worker.send(M.Serve(spec), [named[n] for n in names])  # a gone one re-adopts on death

    # --- workers -------------------------------------------------------------------------
    def watch_worker(self, worker: WorkerProcess) -> None:
        """Watch ``worker``'s channel and pidfd (a no-op for one watched already)."""
        if self._workers_by_fd.get(worker.pidfd) is worker:
            return
        for fd in (worker.chan.fileno(), worker.pidfd):
            self._workers_by_fd[fd] = worker
            self.epoll.register(fd, select.EPOLLIN)

    def _unwatch_worker(self, worker: WorkerProcess) -> None:
        self.closed_fds.update((worker.chan.fileno(), worker.pidfd))
        for fd in (worker.chan.fileno(), worker.pidfd):
            if self._workers_by_fd.get(fd) is worker:
                del self._workers_by_fd[fd]
                with contextlib.suppress(OSError, ValueError):
                    self.epoll.unregister(fd)

    def tell_workers(self, message: M.ToWorker) -> None:
        """Send ``message`` to every worker, the spare too."""
        with self.lock:
            workers = self.pool.all_processes()
        for w in workers:
            w.send(message)

    def _worker_message(self, worker: WorkerProcess) -> bool:
        """Read and act on one message of ``worker``; False at the channel's end."""
        try:
            message, fds = ipc.recv(worker.chan)
        except (ipc.ChannelClosed, OSError):
            # Its pidfd says it died; stop reading a channel that stays readable at EOF.
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(worker.chan.fileno())
            return False
        except M.ProtocolError as exc:
            log.error("worker %d: %s; killing it", worker.pid, exc)
            worker.kill()
            return False
        for fd in fds:
            os.close(fd)  # workers send no fds
        if isinstance(message, M.Need):
            self.prefetcher.need(message.chunk, message.offset)
            return True
        with self.lock:
            callbacks = self._on_worker_message(worker, message)
        self.callbacks.run(callbacks)
        return True

    def _on_worker_message(self, worker: WorkerProcess, message: M.Message) -> list[Callback]:
        by_key = self.table.by_key
        if isinstance(message, (M.Pong, M.OrphanPrepared)):
            worker.answered(message)
        elif isinstance(message, M.Ended):
            worker.forks.discard(message.key)
            entry = by_key.get(message.key)
            if entry is not None:
                commands = self.table.move(entry, _WORKER_EVENTS[message.state])
                return self.carry_out(entry, commands, why=message.error)
        elif isinstance(message, M.Serving):
            entry = by_key.get(message.key)
            if entry is not None:
                self.table.move(entry, Event.WORKER_SERVING)
                self.follower.adopted(entry, worker)  # a moved fork's parked copy is closed
        elif isinstance(message, M.WindowClosed):
            entry = by_key.get(message.key)
            if entry is not None:
                return self.table.report_window(entry, self.config.on_window_closed)
        elif isinstance(message, M.HungUp):
            entry = by_key.get(message.key)
            if entry is not None and entry.conn is not None:
                log.debug("fork %s: VMM closed its socket; serving until it exits", entry.fork_id)
                entry.conn.close()
                entry.conn = None
        elif isinstance(message, M.Remapped):
            entry = by_key.get(message.key)
            if entry is not None:
                entry.regions = list(message.regions)
        elif isinstance(message, (M.Released, M.Refused)):  # let go, or not taken
            self.follower.let_go(worker, message)  # a move's target adopts a released fork
        elif isinstance(message, M.Ready):
            try:
                M.check_version(message.version, f"worker {worker.pid}")
            except M.ProtocolError as exc:
                log.error("%s; killing it", exc)
                worker.kill()
                return []
            worker.ready.set()
        elif isinstance(message, M.Armed) and message.req in self._acks:
            self._acks[message.req].set()
        elif isinstance(message, (M.Prefetched, M.PrefetchHead)):
            self.prefetcher.answered(message)
        self.changed.notify_all()
        return []

    def _worker_died(self, worker: WorkerProcess) -> None:
        # What it said before it died (a fork that ended, a window that closed) still counts.
        self._drain(worker)
        self._unwatch_worker(worker)
        status = worker.reap()
        with self.lock:
            if self.closed:
                return
            callbacks = self._adopt_orphans(worker, status)
            self.changed.notify_all()
        self.callbacks.run(callbacks)

    def _adopt_orphans(self, worker: WorkerProcess, status: int | None) -> list[Callback]:
        """Give the forks of dead ``worker`` to another (lock held): the crash path."""
        orphans = self.table.held_by(worker)
        new, given_up = self.pool.replace(worker)
        if new is None and worker.slot >= 0 and worker.slot not in self.pool.given_up:
            # No worker could start in its slot (out of fds, say): another one takes the
            # forks. A slot that crash-loops does not pass its forks on: they may be why.
            new = self.pool.place(None)
        if self.pool.spare is not None:
            self.watch_worker(self.pool.spare)
        if worker.slot < 0:  # the spare: nobody to adopt
            log.warning("spare worker %d exited (status %s)", worker.pid, status)
            return []
        # Unregistered forks whose drop died with the worker are finished, not adopted.
        adopted = sum(1 for e in orphans if e.stage is not Stage.DROPPING)
        log.error("worker %d died (status %s) serving %d forks", worker.pid, status, adopted)
        callbacks: list[Callback] = []
        if new is not None:
            self.watch_worker(new)  # a no-op for a worker that was already serving
        why = given_up or "its worker died"
        for entry in orphans:
            if new is None:
                commands = self.table.move(entry, Event.WORKER_LOST)
                callbacks += self.carry_out(entry, commands, why=why)
                continue
            # A window the dead worker closed but could not report: report it now.
            ledger = entry.ledger
            if ledger is not None and ledger.counters[L.RECORD_STATE] == L.RECORD_CLOSED:
                callbacks += self.table.report_window(entry, self.config.on_window_closed)
            commands = self.table.move(entry, Event.WORKER_DIED)
            callbacks += self.carry_out(entry, commands, worker=new)
        if new is not None:
            self.prefetcher.resend_to(new)
            if self.config.on_worker_restarted is not None:
                restarted = (self.config.on_worker_restarted, (worker.pid, new.pid, adopted))
                callbacks.append(restarted)
        return callbacks

    def crash_worker_at(self, entry: ForkRecord, point: str, count: int, stop: bool = False) -> int:
        """Tests only: make ``entry``'s worker SIGKILL (or SIGSTOP) itself at ``point``; its pid."""
        worker = entry.worker
        if worker is None:
            raise ForkError(f"fork {entry.fork_id} has no worker")
        armed = threading.Event()
        req = next(self.table.serial)
        with self.lock:
            self._acks[req] = armed
        try:
            # Armed before this returns: the test's next step then meets the crash point.
            if not (worker.send(M.CrashAt(point, count, req, stop)) and armed.wait(10)):
                raise ForkError(f"fork {entry.fork_id}: its worker did not arm {point!r}")
        finally:
            with self.lock:
                self._acks.pop(req, None)
        return worker.pid
