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
import logging
import mmap
import os
import select
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from pagefork import libc, uffd
from pagefork.regions import PAGE_SIZE
from pagefork.serving import ipc, orphaning
from pagefork.serving import messages as M
from pagefork.serving.workerfaults import READ_SIZE, FaultLoop
from pagefork.serving.workerforks import PARKED, PIDFD, UFFD, LazyChunks, WorkerFork, WorkerForks
from pagefork.serving.workerprefetch import run_prefetch

if TYPE_CHECKING:
    from pagefork.prefetch import PrefetchPlan

log = logging.getLogger("pagefork.worker")

_EPOLLERR = select.EPOLLERR
#: Events taken per epoll_wait: without a bound, each call allocates room for 1,023.
_POLL_EVENTS = 64
#: A recording window without a deadline (``WorkerFork.rec_deadline``).
_NEVER = float("inf")
_MADV_POPULATE_READ = 22


class Worker(FaultLoop):
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
            # Imported only here: a new worker's start-up is what its forks wait for.
            from pagefork.layers.source import map_view

            map_view(self.mem_address, layout_fds)
        npages = (mem_size + PAGE_SIZE - 1) // PAGE_SIZE
        self.zeros = mmap.mmap(zero_fd, npages, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(zero_fd)
        self.ep = select.epoll()
        self.ep.register(chan.fileno(), select.EPOLLIN)
        self.table = WorkerForks(chan, self.ep)
        self.hooks: dict[int, Any] = {}  # other fds to watch, and what each runs (an orphan's)
        self.forks = self.table.forks  # by the channel's key
        self.by_fd = self.table.by_fd  # what each watched fd is, and its fork
        self.crash_at: dict[str, int] = {}
        self.stop_at: set[str] = set()  # points where a test wants SIGSTOP, not SIGKILL
        self._read_buf = bytearray(READ_SIZE)
        self._read_bufs = [self._read_buf]  # preadv's argument, built once
        # The fault path's ioctl argument (one thread: one buffer serves every fork).
        self._ioctl_arg = bytearray(uffd.COPY_ARG.size)
        self.plans: collections.OrderedDict[int, PrefetchPlan] = collections.OrderedDict()
        # Messages read during a prefetch (to answer a ping) and kept for the loop: no
        # prefetch inside a prefetch, no fork added or released under one.
        self._backlog: collections.deque[tuple[M.Message, list[int]]] = collections.deque()
        # A lazy template (pagefork.store.lazy); None for a mem-file: the fault path skips it.
        self.lazy = LazyChunks(lazy[0], lazy[1], mem_size) if lazy is not None else None

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
    # - Faults are batched per read: one read(2) takes up to 64 uffd_msgs. One fault alone on
    #   a 4 KiB page of a fork that removed and records nothing (the usual case) is served in
    #   _on_uffd itself, one call from this loop; anything else, and any ioctl error, takes
    #   _serve_faults. The counters are bumped before each ioctl, since the ioctl wakes the
    #   guest, which may read the stats at once.
    # - Syscalls per fault are the cost that counts (each is a few us here, more than the
    #   Python around it). The copy's wake-up usually preempts us for the guest, which faults
    #   again before we run again: so after a fault the same uffd is read again at once (up to
    #   8 times) instead of going back to epoll, two syscalls a fault instead of three. A read
    #   that finds nothing (a guest running on the other CPU) backs off for 8 faults.
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
    #   hands its forks on. (A fork ends on its VMM's pidfd, not its socket: see above.)
    def run(self) -> None:
        """Serve until the channel ends (:class:`ipc.ChannelClosed`: see :func:`main`)."""
        ipc.send(self.chan, M.Ready(M.PROTOCOL_VERSION, os.getpid()))
        chan_fd = self.chan.fileno()
        # Bound once: the loop runs once per fault when faults come one at a time.
        poll, table, on_fd, on_uffd = self.ep.poll, self.table, self._on_fd, self._on_uffd
        closed, hooks, backlog, by_fd = table.closed_fds, self.hooks, self._backlog, self.by_fd
        while True:
            while backlog:
                self._on_message(*backlog.popleft())
            events = poll(self._timeout() if table.attend else -1, _POLL_EVENTS)
            closed.clear()
            for fd, ev in events:
                if closed and fd in closed:
                    continue  # closed by an earlier event of this batch: the number may be reused
                if fd == chan_fd:
                    message, fds = ipc.recv(self.chan)
                    self._on_message(message, fds)
                elif hooks and fd in hooks:
                    hooks[fd]()
                else:
                    entry = by_fd.get(fd)
                    if entry is not None and entry[0] == UFFD and not ev & _EPOLLERR:
                        # A fault: what _on_fd and _guard would do, a call or two less.
                        try:
                            on_uffd(entry[1])
                        except Exception as exc:
                            self._crashed(entry[1], exc)
                    else:
                        on_fd(fd, ev)
            if table.attend:
                self._housekeeping()

    def _timeout(self) -> float:
        if not self.table.attend:
            return -1
        if any(f.deferred for f in self.table.attend):
            return 0.001  # deferred on EAGAIN: retry soon
        deadline = min(f.rec_deadline for f in self.table.attend)
        if deadline == _NEVER:
            return -1  # nothing due (the next turn's housekeeping lets the forks go)
        return max(0.0, (deadline - time.monotonic_ns()) / 1e9)

    def _housekeeping(self) -> None:
        if not self.table.attend:
            return
        now = time.monotonic_ns()
        # Every loop turn of a recording fork comes here: one whose window is not due yet and
        # that has nothing deferred stays attended, for a few attribute reads, not a call.
        for f in list(self.table.attend):
            if f.deferred:
                self._guard(f, self._serve_faults, [])
            elif now < f.rec_deadline != _NEVER:
                continue
            if f.rec_seen is not None and now >= f.rec_deadline:
                self.table.close_window(f)
            self.table.track(f)

    def _on_fd(self, fd: int, ev: int = select.EPOLLIN) -> None:
        entry = self.by_fd.get(fd)
        if entry is None:
            return
        kind, f = entry
        if kind == UFFD:
            if ev & _EPOLLERR:
                # A uffd polls as an error once O_NONBLOCK is off its file (the handshake
                # refused one without UFFDIO_API): only the VMM, which shares that file, can
                # have cleared it. It can no longer be served safely.
                self.table.fail(
                    f, "the VMM cleared O_NONBLOCK on its uffd, which then cannot be polled"
                )
                return
            try:  # _guard, inlined: this is the fault path
                self._on_uffd(f)
            except Exception as exc:
                self._crashed(f, exc)
        elif kind == PIDFD:
            self.table.end(f, M.EndState.ENDED, None)  # the VMM exited
        elif kind == PARKED:
            self.table.forget((f.fork_id,))  # a parked fork's VMM exited
        else:
            self._on_conn(f)

    def _on_conn(self, f: WorkerFork) -> None:
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
            self.table.hang_up(f)
        else:
            self.table.end(f, M.EndState.ENDED, None)

    # --- prefetch (pagefork.serving.workerprefetch runs it) ---------------------------
    def poll_forks(self) -> None:
        """Serve what the other forks need now (called between prefetch slices)."""
        chan_fd = self.chan.fileno()
        events = self.ep.poll(0)
        closed = set(self.table.closed_fds)
        for fd, ev in events:
            if fd == chan_fd:
                self._read_during_prefetch()
            elif fd not in self.table.closed_fds - closed:
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
            self.table.add(message.spec, fds)
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
                while len(self.plans) > 2 * M.PLANS_KEPT:
                    self.plans.popitem(last=False)
            assert plan is not None
            run_prefetch(self, message.req, message.key, plan, message.timeout, message.head)
        elif isinstance(message, M.ChunkReady):
            self._chunk_answered(message.chunk, None)
        elif isinstance(message, M.ChunkFailed):
            self._chunk_answered(message.chunk, message.error)
        elif isinstance(message, M.Drop):
            f = self.forks.get(message.key)
            if f is not None:
                self.table.end(f, M.EndState.ENDED, None)
        elif isinstance(message, M.Release):
            self.table.release(message.keys, park=message.park)
        elif isinstance(message, M.Forget):
            self.table.forget(message.keys)
        elif isinstance(message, M.Hello):
            try:
                M.check_version(message.version, "the supervisor")
            except M.ProtocolError as exc:
                log.error("%s", exc)
                sys.exit(2)
        elif isinstance(message, M.CrashAt):
            self.crash_at[message.point] = message.count
            if message.stop:
                self.stop_at.add(message.point)
            ipc.send(self.chan, M.Armed(message.req))
        else:  # what to do if the supervisor dies, or a message this worker does not know
            orphaning.on_message(self, message)
            if isinstance(message, M.OrphanSetup):
                ipc.send(self.chan, M.OrphanPrepared())


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
    chan = orphaning.SupervisorChannel(fileno=chan_fd)
    worker = Worker(chan, mem_fd, mem_size, zero_fd, layout_fds, lazy)
    if worker.lazy is None:
        with contextlib.suppress(OSError):  # fill the page tables now; faults then cost less
            libc.madvise(worker.mem_address, mem_size, _MADV_POPULATE_READ)
    else:  # a lazy view: only the chunks in already (a warm host cache's), never its holes
        for offset, length in worker.lazy.present_spans(worker.zeros):
            with contextlib.suppress(OSError):
                length = min(length, mem_size - offset)
                libc.madvise(worker.mem_address + offset, length, _MADV_POPULATE_READ)
    while True:
        try:
            worker.run()
        except (ipc.ChannelClosed, ConnectionResetError):
            # The supervisor stopped us, or died: then serve on as an orphan if it said how.
            if orphaning.channel_ended(worker):
                continue
        except BrokenPipeError:
            pass
        return  # the kernel closes what we held


if __name__ == "__main__":
    main()
