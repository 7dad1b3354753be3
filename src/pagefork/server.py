"""The page server: a supervisor and its worker processes, serving forks of one mem-file.

:class:`PageServer` is the supervisor. It opens the mem-file once (its zero-page index is built
here and shared with the workers through a memfd), owns every fork socket and each fork's
state, and does the handshakes in one event loop. Each fork it hands to the least-loaded worker
process (:mod:`pagefork.serving.worker`), which serves the fork's faults from one event loop
over every uffd it has. The supervisor keeps its own copy of each fork's uffd, VMM connection,
VMM pidfd and ledger (:mod:`pagefork.serving.ledger`), so when a worker dies it hands every
orphaned fork, with its full state, to a replacement, which wakes the fork's vCPUs and serves
on: nothing is lost.

Forks are registered by id (:meth:`PageServer.register_fork` gives each a 0600 Unix socket), or
arrive on a shared socket (:meth:`PageServer.listen`, what ``pagefork serve`` uses). Every
public method is safe to call from any thread while faults are served.
"""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from pagefork import uffd
from pagefork.errors import (
    ForkError,
    HandshakeError,
    PageforkError,
    PrefetchError,
    StoreError,
    TemplateError,
)
from pagefork.handshake import (
    MAX_HANDSHAKE_BYTES,
    PAGE_SIZES,
    PayloadScanner,
    keeps_socket_open,
    parse_mappings,
)
from pagefork.hotpages import HotPage, HotPageList
from pagefork.layers.source import LayeredView, removed_file_ranges
from pagefork.memfile import MemFile
from pagefork.prefetch import PrefetchPlan, PrefetchResult, plan_prefetch
from pagefork.regions import PAGE_SIZE, Region
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving.pool import (
    WorkerPool,
    WorkerProcess,
    max_workers,
    pinned_cpu,
    usable_cpus,
)
from pagefork.serving.state import FINAL, ForkState, transition
from pagefork.stats import ForkStats, percentiles_us
from pagefork.store.layout import is_s3_url
from pagefork.store.lazy import LazyTemplate, StoreOptions, open_mem_source

log = logging.getLogger("pagefork")

FailurePolicy = Literal["kill", "close"]

_FORK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: How long accepting pauses when the server is out of fds or memory.
_ACCEPT_BACKOFF = 0.1
#: Prefetch plans kept (one per hot set and region layout; a template usually needs one).
_PLAN_CACHE_SIZE = 16
#: sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
#: How much longer than its own timeout a prefetch caller waits for a worker's answer.
_PREFETCH_GRACE = 60.0
_PEERCRED = struct.Struct("3i")
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one :class:`PageServer`.

    ``page_size`` 0 takes each region's page size from the handshake (4 KiB when absent).
    ``on_failure`` is what a fork-fatal error does to the VMM: ``kill`` (SIGKILL its pid, as
    Firecracker's docs advise: a guest whose handler is gone hangs forever) or ``close``.
    ``record_hot_pages`` records every fork; ``record_max_pages`` / ``record_max_seconds``
    bound the recording window. At most ``max_pending_handshakes`` connections may wait for
    their handshake at once; more are refused. ``workers`` is the number of worker processes
    (``"auto"``: one per usable CPU); ``spare_worker`` keeps one more started, so a dead
    worker is replaced at once. With ``pin_workers`` and one worker per CPU, each worker is
    pinned to its CPU and a fork whose VMM is pinned to one CPU goes to that CPU's worker.
    ``on_connect`` / ``on_fork_end`` / ``on_window_closed`` are called with the fork's id;
    ``on_worker_restarted`` with (old pid, new pid, forks adopted). ``layers`` are layer
    files over the mem-file, bottom first: forks then read the layered template
    (:mod:`pagefork.layers`). ``mem_file_path`` may be an ``s3://BUCKET/PREFIX`` URL: the
    template is then served lazily from object storage (:mod:`pagefork.store.lazy`), reached
    as ``store`` says.
    """

    mem_file_path: str
    socket_dir: str | None = None
    page_size: int = 0
    on_failure: FailurePolicy = "kill"
    handshake_timeout: float = 10.0
    record_hot_pages: bool = False
    record_max_pages: int | None = None
    record_max_seconds: float | None = None
    max_pending_handshakes: int = 64
    workers: int | Literal["auto"] = "auto"
    spare_worker: bool = True
    pin_workers: bool = True
    on_connect: Callable[[str], None] | None = None
    on_fork_end: Callable[[str, ForkStats], None] | None = None
    on_window_closed: Callable[[str, HotPageList], None] | None = None
    on_worker_restarted: Callable[[int, int, int], None] | None = None
    layers: tuple[str, ...] = ()
    store: StoreOptions | None = None


@dataclass(eq=False)
class _Fork:
    """Everything the supervisor knows of one fork; its ``state`` moves only by
    :func:`pagefork.serving.state.transition`."""

    fork_id: str
    record: bool
    key: str = ""
    state: ForkState = ForkState.WAITING
    listener: socket.socket | None = None
    socket_path: str | None = None
    ephemeral: bool = False
    # The connection and what the handshake gave.
    conn: socket.socket | None = None
    uffd: int = -1
    pidfd: int = -1
    pid: int | None = None
    regions: list[Region] = field(default_factory=list)
    ledger: L.Ledger | None = None
    record_capacity: int = 0
    worker: WorkerProcess | None = None
    connected: bool = False
    dropping: bool = False  # unregistered: being stopped, never to be adopted again
    handover: bool = False  # a takeover asked its worker to release it
    # The VMM keeps its socket open while it runs (Firecracker 1.12+): a hang-up ends the fork
    # even while its pid lives. An older one closes it after the handshake and runs on.
    hangup_ends: bool = False
    window_reported: bool = False
    error: str | None = None
    last_error: str | None = None
    handshake_failed: str | None = None
    # What stays once the fork has ended and its ledger is closed.
    final_stats: ForkStats | None = None
    final_latencies: list[int] = field(default_factory=list)
    final_hot: HotPageList | None = None

    def close_session(self) -> None:
        """Close this process's copies of the session: ledger, uffd, pidfd, connection."""
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        for fd in (self.uffd, self.pidfd):
            if fd >= 0:
                os.close(fd)
        self.uffd = self.pidfd = -1
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass(eq=False)
class _Pending:
    """A connection whose handshake is not in yet (read by the supervisor's loop)."""

    entry: _Fork
    conn: socket.socket
    deadline: float
    pid: int | None
    pidfd: int = -1
    data: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    scanner: PayloadScanner = field(default_factory=PayloadScanner)


@dataclass(eq=False)
class _Request:
    """A prefetch a caller waits for; re-sent to the new worker if the first one dies."""

    req: int
    key: str
    plan: PrefetchPlan
    timeout: float
    token: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: PrefetchResult | None = None
    error: str | None = None
    installed: int = 0


#: The longest handshake_timeout accepted: a VMM that takes longer than an hour is hung.
MAX_HANDSHAKE_TIMEOUT = 3600.0


def _check_config(config: ServerConfig) -> None:
    """Refuse settings that would only fail later, on some fork's thread."""

    def positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
        if value is None and allow_none:
            return
        if value is None or not math.isfinite(value) or value <= 0:
            raise PageforkError(f"{name} must be a positive number, not {value!r}")

    page_size = config.page_size
    if page_size and page_size not in PAGE_SIZES:
        raise PageforkError(f"page size {page_size} is neither 4 KiB nor 2 MiB")
    if config.on_failure not in ("kill", "close"):
        raise PageforkError(f"on_failure must be 'kill' or 'close', not {config.on_failure!r}")
    positive("handshake_timeout", config.handshake_timeout, allow_none=False)
    if config.handshake_timeout > MAX_HANDSHAKE_TIMEOUT:
        # A timer past about 24 days overflows; a VMM that takes over an hour is hung anyway.
        raise PageforkError(
            f"handshake_timeout must be at most {MAX_HANDSHAKE_TIMEOUT:g} seconds, "
            f"not {config.handshake_timeout!r}"
        )
    positive("record_max_pages", config.record_max_pages)
    positive("record_max_seconds", config.record_max_seconds)
    positive("max_pending_handshakes", config.max_pending_handshakes, allow_none=False)
    workers = config.workers
    if workers != "auto" and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise PageforkError(f"workers must be 'auto' or a whole number >= 1, not {workers!r}")
    most = max_workers()
    if workers != "auto" and workers > most:
        # More workers than cores only adds interpreters (about 30 MiB each) and wake-ups.
        raise PageforkError(
            f"workers must be at most {most} here (4 per usable CPU), not {workers}"
        )


class _OutOfFds(HandshakeError):
    """The server had no fd left for the uffd a VMM sent."""


def _has_pending(listener: socket.socket | None) -> bool:
    """True when a connection waits in ``listener``'s backlog."""
    if listener is None:
        return False
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _peer_pidfd(conn: socket.socket, pid: int | None) -> int:
    """A pidfd of the process at the other end of ``conn``, or -1.

    The VMM's exit ends its fork (not its socket's EOF), and the failure policy kills it only
    through this pidfd, so it must name the very process that connected: SO_PEERPIDFD (Linux
    6.5+) takes it from the socket; older kernels open it from the SO_PEERCRED pid at once.
    A peer in this very process is never watched that way: its socket's EOF ends the fork.
    """
    if pid is None or pid == os.getpid():
        return -1
    try:
        return int(conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1  # gone already, or not visible here: the socket's EOF ends the fork


def validate_fork_id(fork_id: str) -> str:
    """Return ``fork_id`` if it is safe as a file name (no separators, no traversal)."""
    if not isinstance(fork_id, str) or not _FORK_ID.fullmatch(fork_id):
        raise ForkError(
            f"invalid fork id {fork_id!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return fork_id


def bind_private_socket(path: str) -> socket.socket:
    """Create a listening Unix socket at ``path`` with mode 0600, without a umask race.

    The socket is bound in a fresh 0700 directory, chmod-ed, then renamed into place, so it is
    never reachable by others with looser permissions. A stale socket at ``path`` is replaced;
    one a live server still listens on is refused.
    """
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ForkError(f"socket path too long ({len(path)} > {_MAX_SOCKET_PATH} bytes): {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ForkError(f"socket directory {parent} does not exist")
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ForkError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise ForkError(f"{path} is in use by a live server")
        finally:
            probe.close()
    try:
        tmpdir = tempfile.mkdtemp(prefix=".pagefork-", dir=parent)
    except OSError as exc:
        raise ForkError(f"cannot create a socket in {parent}: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    dirfd = -1
    try:
        tmp = os.path.join(tmpdir, "s")
        # Bound through the directory's fd: the temporary path may be longer than sun_path
        # allows even when the final one fits.
        dirfd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        sock.bind(f"/proc/self/fd/{dirfd}/s")
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ForkError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        if dirfd >= 0:
            os.close(dirfd)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return sock


class PageServer:
    """Serves forks of one template mem-file over Firecracker's UFFD protocol, on worker
    processes supervised by this object."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        _check_config(config)
        if config.socket_dir is not None and not os.path.isdir(config.socket_dir):
            raise ForkError(f"socket directory {config.socket_dir} does not exist")
        # The supervisor never maps the file: only workers read it (through the kernel's copy).
        # With layers, a composite view of the chain (pagefork.layers.source) stands in for it;
        # an s3:// template is a lazy view filled chunk by chunk (pagefork.store.lazy).
        if config.layers:
            if is_s3_url(config.mem_file_path):
                raise TemplateError(
                    f"{config.mem_file_path}: layers over a template in object storage are not "
                    "served; flatten the chain first"
                )
            self.memfile: MemFile | LazyTemplate | LayeredView = LayeredView(
                config.mem_file_path, config.layers
            )
        else:
            self.memfile = open_mem_source(config.mem_file_path, config.store)
        lazy = self.memfile if isinstance(self.memfile, LazyTemplate) else None
        self._lazy = lazy
        cpus = usable_cpus()
        count = len(cpus) if config.workers == "auto" else int(config.workers)
        try:
            self._pool = WorkerPool(
                count,
                self.memfile.fd,
                self.memfile.size,
                self.memfile.zero_index_fd(),
                spare=config.spare_worker,
                # One worker per CPU, each pinned there: a fork whose VMM is pinned is then
                # served on its own core.
                cpus=cpus if config.pin_workers and count == len(cpus) else None,
                layout_fds=(
                    self.memfile.layout_fds() if isinstance(self.memfile, LayeredView) else ()
                ),
                lazy=(lazy.presence_fd, lazy.chunk_size) if lazy is not None else None,
            )
        except BaseException:
            self.memfile.close()
            raise
        self._lock = threading.Lock()
        # Notified whenever a fork's state moves or a prefetch answer arrives.
        self._changed = threading.Condition(self._lock)
        self._forks: dict[str, _Fork] = {}  # by fork id: what callers can name
        self._serving: dict[str, _Fork] = {}  # by key: forks a worker has
        self._listeners: dict[int, _Fork | None] = {}
        self._shared: dict[int, tuple[socket.socket, str, bool | Callable[[str], bool] | None]] = {}
        self._pending: dict[int, _Pending] = {}
        self._bound: dict[str, tuple[int, int]] = {}  # socket paths we bound: their inodes
        self._paused: dict[int, float] = {}  # listeners backing off (out of fds): until when
        self._closed_fds: set[int] = set()  # closed while handling the current batch
        self._requests: dict[int, _Request] = {}
        self._acks: dict[int, threading.Event] = {}  # tests' crash points, once armed
        self._serial = itertools.count(1)
        self._next_conn = 0
        self._plans: OrderedDict[tuple[object, ...], tuple[HotPageList, PrefetchPlan, int]] = (
            OrderedDict()
        )
        self._plans_lock = threading.Lock()
        self._callbacks: list[threading.Thread] = []
        self._callbacks_lock = threading.Lock()
        self._closed = False
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._workers_by_fd: dict[int, WorkerProcess] = {}
        for w in self._pool.all_processes():
            self._watch_worker(w)
        self._loop_thread = threading.Thread(
            target=self._loop, name="pagefork-supervisor", daemon=True
        )
        self._loop_thread.start()

    # --- registration ------------------------------------------------------------------------
    def register_fork(self, fork_id: str, record: bool | None = None) -> str:
        """Create the fork's socket (mode 0600 in ``socket_dir``) and return its path.

        ``record`` overrides ``ServerConfig.record_hot_pages`` for this fork.
        """
        validate_fork_id(fork_id)
        if self.config.socket_dir is None:
            raise ForkError("register_fork needs ServerConfig.socket_dir")
        path = os.path.join(self.config.socket_dir, f"{fork_id}.sock")
        with self._lock:
            self._check_open()
            if fork_id in self._forks:
                raise ForkError(f"fork {fork_id} is already registered")
            sock = bind_private_socket(path)
            self._note_ours(path)
            entry = _Fork(
                fork_id,
                record=self.config.record_hot_pages if record is None else record,
                listener=sock,
                socket_path=path,
            )
            self._forks[fork_id] = entry
            self._listeners[sock.fileno()] = entry
            self._epoll.register(sock.fileno(), select.EPOLLIN)
        return path

    def listen(self, path: str, record: bool | Callable[[str], bool] | None = None) -> None:
        """Accept any number of forks on one socket at ``path`` (ids ``fork-1``, ``fork-2``...).

        ``record`` decides per fork whether it records hot pages (default: the config's).
        """
        with self._lock:
            self._check_open()
            sock = bind_private_socket(path)
            self._note_ours(path)
            self._shared[sock.fileno()] = (sock, path, record)
            self._listeners[sock.fileno()] = None
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def unregister_fork(self, fork_id: str) -> None:
        """Stop serving the fork, close its uffd and connection, remove its socket.

        An unknown id is a no-op.
        """
        with self._lock:
            entry = self._forks.pop(fork_id, None)
            if entry is None:
                return
            self._drop_listener(entry)
            for fd, pending in list(self._pending.items()):
                if pending.entry is entry:
                    self._drop_pending(fd, None)
            worker = entry.worker if entry.state not in FINAL else None
            entry.dropping = True
        if worker is not None and worker.send(("drop", entry.key)):
            with self._changed:
                self._changed.wait_for(lambda: entry.state in FINAL, 10.0)

    def _drop_listener(self, entry: _Fork) -> None:
        sock = entry.listener
        if sock is not None:
            entry.listener = None
            self._closed_fds.add(sock.fileno())
            self._listeners.pop(sock.fileno(), None)
            self._paused.pop(sock.fileno(), None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(sock.fileno())
            sock.close()
        if entry.socket_path is not None:
            self._unlink_ours(entry.socket_path)
            entry.socket_path = None

    def _note_ours(self, path: str) -> None:
        """Remember which file the socket we bound at ``path`` is (by inode)."""
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            self._bound[path] = (st.st_dev, st.st_ino)

    def _unlink_ours(self, path: str) -> None:
        """Remove ``path`` only if it is still the socket we bound there: another server may
        have put its own at that path since (ours removed by hand, say)."""
        ident = self._bound.pop(path, None)
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if ident == (st.st_dev, st.st_ino) and stat.S_ISSOCK(st.st_mode):
                os.unlink(path)

    def _check_open(self) -> None:
        if self._closed:
            raise PageforkError("page server is closed")

    def _get(self, fork_id: str) -> _Fork:
        with self._lock:
            entry = self._forks.get(fork_id)
        if entry is None:
            raise ForkError(f"unknown fork {fork_id!r}")
        return entry

    # --- queries -----------------------------------------------------------------------------
    def forks(self) -> list[str]:
        """Ids of the forks registered or connected now."""
        with self._lock:
            return list(self._forks)

    def worker_pids(self) -> list[int]:
        """Process ids of the workers serving now (the spare not included)."""
        with self._lock:
            return [w.pid for w in self._pool.live()]

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every worker (the spare too) has mapped the mem-file and serves.

        Forks are accepted before that (their faults wait for the worker), so this is only for
        callers that want start-up fully paid before they measure or announce anything.
        """
        with self._changed:
            workers = self._pool.all_processes()
            if not workers:
                raise PageforkError("no worker process could be started")

            def settled() -> bool:
                return all(w.ready.is_set() or not w.alive for w in workers)

            if not self._changed.wait_for(settled, timeout):
                raise PageforkError(f"the workers did not start within {timeout:g}s")
        dead = [w for w in workers if not w.ready.is_set()]
        if dead:
            raise PageforkError(
                f"worker {dead[0].pid} exited before it could serve (exit status "
                f"{dead[0].proc.returncode}); see its message above"
            )

    def wait_connected(self, fork_id: str, timeout: float = 10.0) -> list[Region]:
        """Wait for the fork's handshake and return its regions.

        Raises :class:`ForkError` on timeout (naming the last handshake error, if any) or when
        the fork's handshake failed.
        """
        return list(self._wait_connected(fork_id, timeout).regions)

    def _wait_connected(self, fork_id: str, timeout: float) -> _Fork:
        entry = self._get(fork_id)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if entry.connected:
                    return entry
                if entry.handshake_failed is not None and not _has_pending(entry.listener):
                    # Say why now rather than at the timeout; the VMM may retry later. (A retry
                    # already waiting to be accepted is waited for instead.)
                    raise ForkError(f"fork {fork_id}: handshake: {entry.handshake_failed}")
                if entry.state in FINAL:
                    raise ForkError(f"fork {fork_id}: {entry.error or 'session ended'}")
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f" (last error: {entry.last_error})" if entry.last_error else ""
                    raise ForkError(f"fork {fork_id}: no handshake within {timeout:g}s{why}")
                self._changed.wait(left)

    def wait_ended(self, fork_id: str, timeout: float = 10.0) -> ForkStats:
        """Wait until the fork's session has ended (VMM gone, failure, or stop); its stats."""
        entry = self._wait_connected(fork_id, timeout)
        with self._changed:
            if not self._changed.wait_for(lambda: entry.state in FINAL, timeout):
                raise ForkError(f"fork {fork_id}: still serving after {timeout:g}s")
            assert entry.final_stats is not None
            return entry.final_stats

    def stats(self, fork_id: str) -> ForkStats:
        """Counters and latency percentiles of one fork."""
        entry = self._get(fork_id)
        with self._lock:
            stats, samples = self._counters_of(entry)
        if samples:  # sorting a window of 64k samples takes ms: not under the lock
            stats.latency_us = percentiles_us(samples)
        return stats

    def _counters_of(self, entry: _Fork) -> tuple[ForkStats, list[int]]:
        """The fork's counters and its latency samples (lock held: the ledger may close
        otherwise)."""
        if entry.final_stats is not None:
            return entry.final_stats, []
        ledger = entry.ledger
        if ledger is None:
            if entry.handshake_failed is not None:
                # Shown as failed until the VMM connects again (the fork itself may retry).
                failed = ForkStats(
                    fork=entry.fork_id,
                    state=ForkState.FAILED.value,
                    pid=entry.pid,
                    errors=1,
                    error=f"handshake: {entry.handshake_failed}",
                )
                return failed, []
            waiting = ForkStats(fork=entry.fork_id, state=entry.state.value, error=entry.last_error)
            return waiting, []
        c = ledger.counters
        stats = ForkStats(
            fork=entry.fork_id,
            state=entry.state.value,
            pid=entry.pid,
            error=entry.error,
            latency_us={},
            worker_pid=entry.worker.pid if entry.worker is not None else None,
            **{name: int(c[slot]) for name, slot in L.COUNTERS.items()},
        )
        return stats, ledger.latencies()

    def fault_latencies_ns(self, fork_id: str) -> list[int]:
        """The fork's recent fault-service latencies in nanoseconds (for histograms)."""
        entry = self._get(fork_id)
        with self._lock:
            if entry.ledger is not None:
                return entry.ledger.latencies()
            return list(entry.final_latencies)

    def removed_ranges(self, fork_id: str) -> list[tuple[int, int]]:
        """The mem-file byte ranges ``[start, end)`` the fork's guest removed (they read zero
        in the fork), merged and in order: what a snapshot of the fork marks as zero."""
        entry = self._get(fork_id)
        with self._lock:
            ranges = list(entry.ledger.removed()) if entry.ledger is not None else []
            regions = list(entry.regions)
        return removed_file_ranges(ranges, regions)

    def hot_pages(self, fork_id: str) -> HotPageList:
        """The pages the fork faulted on demand, in first-touch order (it must be recording)."""
        entry = self._get(fork_id)
        if not entry.record:
            raise ForkError(f"fork {fork_id} is not recording hot pages")
        with self._lock:
            return self._hot_of(entry)

    def _hot_of(self, entry: _Fork) -> HotPageList:
        if entry.final_hot is not None:
            return entry.final_hot
        if entry.ledger is None:
            return HotPageList()
        rec = entry.ledger.recorded()
        return HotPageList.from_pages([(r, o) for r, o, _ in rec], [t / 1e9 for _, _, t in rec])

    # --- prefetch ----------------------------------------------------------------------------
    def prefetch(
        self, fork_id: str, hot_pages: HotPageList | Sequence[HotPage], timeout: float = 10.0
    ) -> PrefetchResult:
        """Install ``hot_pages`` into the fork before its guest runs.

        Waits for the fork's handshake (up to ``timeout``), validates the whole list against
        the fork's regions (:class:`PrefetchError` naming the first bad entry, nothing
        installed), then the fork's worker copies it in coalesced runs. Safe to race the
        fork's own faults. If the worker dies meanwhile, its replacement runs the prefetch
        again (installing a page twice is harmless: the kernel says EEXIST).
        """
        entry = self._wait_connected(fork_id, timeout)
        token, plan = self._plan(hot_pages, list(entry.regions))
        fetched = self._fetch_for(fork_id, plan, timeout)
        request = _Request(next(self._serial), "", plan, timeout, token)
        with self._lock:
            if entry.state in FINAL or entry.worker is None:
                raise PrefetchError(f"fork {fork_id}: session has ended")
            request.key = entry.key
            self._requests[request.req] = request
            worker = entry.worker
        try:
            worker.send_prefetch(request.req, entry.key, token, plan, timeout)
            if not request.done.wait(timeout + _PREFETCH_GRACE + plan.pages / 10_000):
                raise PrefetchError(f"fork {fork_id}: its worker did not finish the prefetch")
        finally:
            with self._lock:
                self._requests.pop(request.req, None)
        if request.error is not None:
            exc = PrefetchError(request.error)
            exc.installed = request.installed
            raise exc
        assert request.result is not None
        if fetched is not None:
            return dataclasses.replace(
                request.result, fetched_bytes=fetched[0], fetch_seconds=fetched[1]
            )
        return request.result

    def _fetch_for(
        self, fork_id: str, plan: PrefetchPlan, timeout: float
    ) -> tuple[int, float] | None:
        """A lazy template: fetch the plan's chunks in parallel before the worker installs
        them; (bytes fetched, seconds). None for a mem-file."""
        if self._lazy is None:
            return None
        chunks = self._lazy.chunks_of((r.file_offset, r.length) for r in plan.runs if not r.zero)
        try:
            return self._lazy.ensure(chunks, timeout)
        except StoreError as exc:
            raise PrefetchError(f"fork {fork_id}: {exc}") from None

    def _on_need(self, chunk: int) -> None:
        """A worker has faults parked on ``chunk``: fetch it (once, however many ask), then
        tell every worker it is in or that it failed."""
        assert self._lazy is not None
        try:
            fut = self._lazy.request(chunk)
        except StoreError as exc:
            self._tell_workers(("chunk_failed", chunk, str(exc)))
            return

        def done(fut: concurrent.futures.Future[int]) -> None:
            if fut.cancelled():
                return  # closing
            exc = fut.exception()
            if exc is None:
                self._tell_workers(("chunk_ready", chunk))
            else:
                self._tell_workers(("chunk_failed", chunk, str(exc)))

        fut.add_done_callback(done)

    def _tell_workers(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            workers = self._pool.all_processes()
        for w in workers:
            w.send(message)

    def _plan(
        self, hot_pages: HotPageList | Sequence[HotPage], regions: list[Region]
    ) -> tuple[int | None, PrefetchPlan]:
        """``(token, plan)`` for ``hot_pages`` on this layout, made once per hot set and layout.

        Every fork of a template has the same region sizes and offsets, so a plan is reused
        across forks, relocated by region base; its token lets a worker that has it already
        be sent the token alone. A :class:`HotPageList` only grows, so its identity and length
        name its content (the cache holds it, so the id stays unique).
        """
        if not isinstance(hot_pages, HotPageList):
            return None, plan_prefetch(list(hot_pages), regions, self.memfile.is_zero)
        layout = tuple((r.size, r.offset, r.page_size) for r in regions)
        key = (id(hot_pages), len(hot_pages), layout)
        with self._plans_lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit[2], hit[1]
        plan = plan_prefetch(hot_pages.in_order(), regions, self.memfile.is_zero)
        token = next(self._serial)
        with self._plans_lock:
            self._plans[key] = (hot_pages, plan, token)
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return token, plan

    # --- the supervisor's loop ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            timeout = self._next_deadline()
            try:
                events = self._epoll.poll(timeout)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return
            self._closed_fds.clear()
            for fd, _ in events:
                if fd == self._wake_fd:
                    return
                if fd in self._closed_fds:
                    continue  # closed by an earlier event of this batch: the number may be reused
                try:
                    self._on_fd(fd)
                except Exception:  # the supervisor must outlive any one connection or worker
                    log.exception("supervisor: handling fd %d failed", fd)
            self._run_timers()

    def _next_deadline(self) -> float:
        with self._lock:
            deadlines = [p.deadline for p in self._pending.values()]
            deadlines += self._paused.values()
        if not deadlines:
            return -1
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_fd(self, fd: int) -> None:
        worker = self._workers_by_fd.get(fd)
        if worker is not None:
            if fd == worker.pidfd:
                self._worker_died(worker)
            else:
                self._worker_message(worker)
            return
        with self._lock:
            if self._closed:
                return
            if fd in self._listeners:
                if self._accept(fd):
                    # Out of fds or memory: stop watching this listener for a moment rather
                    # than spin on it; everything else goes on meanwhile.
                    self._epoll.modify(fd, 0)
                    self._paused[fd] = time.monotonic() + _ACCEPT_BACKOFF
            elif fd in self._pending:
                self._handshake_step(fd)

    # --- accepting and handshakes (the lock is held) -------------------------------------------
    def _accept(self, fd: int) -> bool:
        """Accept one connection on listener ``fd``; True when out of resources (back off)."""
        entry = self._listeners[fd]
        sock = entry.listener if entry is not None else self._shared[fd][0]
        assert sock is not None
        try:
            conn, _ = sock.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc.strerror or exc)
            return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
        if len(self._pending) >= self.config.max_pending_handshakes:
            log.warning("refusing a connection: %d handshakes already pending", len(self._pending))
            conn.close()
            return False
        if entry is None:
            fork_id = self._next_ephemeral_id()
            rule = self._shared[fd][2]
            try:
                record = rule(fork_id) if callable(rule) else rule
            except Exception:
                log.exception("fork %s: the record rule failed; not recording", fork_id)
                record = False
            entry = _Fork(
                fork_id,
                record=self.config.record_hot_pages if record is None else record,
                ephemeral=True,
            )
            self._forks[fork_id] = entry
        elif entry.state is not ForkState.WAITING:
            # One VMM per fork socket; a retry is allowed only after a failed handshake.
            log.warning("fork %s: refusing a second connection", entry.fork_id)
            conn.close()
            return False
        pid = None
        with contextlib.suppress(OSError):
            got, _, _ = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            pid = got if got > 0 else None
        pidfd = _peer_pidfd(conn, pid)
        conn.setblocking(False)
        entry.state = transition(entry.fork_id, entry.state, ForkState.HANDSHAKE)
        if entry.handshake_failed is not None:
            entry.last_error, entry.handshake_failed = entry.handshake_failed, None
        entry.pid = pid
        self._pending[conn.fileno()] = _Pending(
            entry, conn, time.monotonic() + self.config.handshake_timeout, pid, pidfd
        )
        self._epoll.register(conn.fileno(), select.EPOLLIN)
        self._changed.notify_all()
        return False

    def _next_ephemeral_id(self) -> str:
        # Skip ids a registered fork already has: never replace another fork's entry.
        while True:
            self._next_conn += 1
            fork_id = f"fork-{self._next_conn}"
            if fork_id not in self._forks:
                return fork_id

    def _handshake_step(self, fd: int) -> None:
        p = self._pending[fd]
        try:
            while not p.scanner.complete:
                try:
                    # Room for two fds: one is right, a second is refused at once (the kernel
                    # closes any that do not fit), so a peer cannot pile fds up in the server.
                    msg, anc, flags, _ = p.conn.recvmsg(
                        MAX_HANDSHAKE_BYTES, socket.CMSG_SPACE(2 * 4)
                    )
                except BlockingIOError:
                    return
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        p.fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                if flags & socket.MSG_CTRUNC and len(p.fds) < 2:
                    # The kernel dropped the fd because this process has no fd left for it.
                    raise _OutOfFds(
                        "the uffd could not be received: the server is out of file descriptors"
                    )
                if flags & socket.MSG_CTRUNC or len(p.fds) > 1:
                    raise HandshakeError("expected exactly one uffd with the mappings, got more")
                if not msg:
                    raise HandshakeError(
                        f"peer closed the connection after {len(p.data)} bytes, before the "
                        "mappings were complete"
                    )
                p.data += msg
                if len(p.data) > MAX_HANDSHAKE_BYTES:
                    raise HandshakeError(f"handshake payload exceeds {MAX_HANDSHAKE_BYTES} bytes")
                p.scanner.feed(msg)
            if len(p.fds) != 1:
                raise HandshakeError(
                    f"expected exactly one uffd with the mappings, got {len(p.fds)}"
                )
            if not uffd.is_userfaultfd(p.fds[0]):
                raise HandshakeError("the file descriptor sent is not a userfaultfd")
            regions = parse_mappings(
                bytes(p.data), self.memfile.size, self.config.page_size or PAGE_SIZE
            )
            p.entry.hangup_ends = keeps_socket_open(bytes(p.data))
        except Exception as exc:  # a peer's bytes must never take more than its own fork
            if isinstance(exc, _OutOfFds):
                # Its uffd is gone: nobody can serve the VMM now, and its guest would hang.
                if self.config.on_failure == "kill" and p.pidfd >= 0:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(p.pidfd, signal.SIGKILL)
                for listener in list(self._listeners):  # and take no one else meanwhile
                    if listener not in self._paused:
                        self._epoll.modify(listener, 0)
                        self._paused[listener] = time.monotonic() + _ACCEPT_BACKOFF
            elif not isinstance(exc, HandshakeError):
                log.exception("fork %s: handshake failed unexpectedly", p.entry.fork_id)
            self._drop_pending(fd, str(exc))
            return
        del self._pending[fd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        uffd_fd = p.fds[0]
        # Firecracker created the uffd O_NONBLOCK; make sure of it (never UFFDIO_API again).
        os.set_blocking(uffd_fd, False)
        self._start_serving(p.entry, p.conn, uffd_fd, regions, p.pidfd)

    def _drop_pending(self, fd: int, why: str | None) -> None:
        p = self._pending.pop(fd)
        self._closed_fds.add(fd)
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        for got in [*p.fds, p.pidfd]:
            if got >= 0:
                os.close(got)
        p.conn.close()
        entry = p.entry
        if why is not None:
            log.warning("fork %s: bad handshake: %s", entry.fork_id, why)
        entry.error = None
        if entry.ephemeral:
            entry.state = transition(entry.fork_id, entry.state, ForkState.FAILED)
            entry.error = f"handshake: {why}"
            entry.final_stats = ForkStats(
                fork=entry.fork_id,
                state=ForkState.FAILED.value,
                errors=1,
                error=entry.error,
                pid=p.pid,
            )
            self._forks.pop(entry.fork_id, None)
        else:
            entry.state = transition(entry.fork_id, entry.state, ForkState.WAITING)
            entry.handshake_failed = why or "connection dropped"
            entry.last_error = entry.handshake_failed
        self._changed.notify_all()

    def _run_timers(self) -> None:
        """Resume listeners whose back-off is over; fail handshakes that took too long."""
        now = time.monotonic()
        with self._lock:
            for fd, until in list(self._paused.items()):
                if until <= now:
                    del self._paused[fd]
                    if fd in self._listeners:
                        self._epoll.modify(fd, select.EPOLLIN)
            for fd, p in list(self._pending.items()):
                if p.deadline <= now:
                    self._drop_pending(
                        fd,
                        f"timed out after {self.config.handshake_timeout:g}s waiting for mappings",
                    )

    def _start_serving(
        self,
        entry: _Fork,
        conn: socket.socket,
        uffd_fd: int,
        regions: list[Region],
        pidfd: int,
    ) -> None:
        """Hand a fork whose handshake is in to the least-loaded worker (lock held)."""
        entry.key = f"{entry.fork_id}#{next(self._serial)}"
        entry.conn, entry.uffd, entry.pidfd, entry.regions = conn, uffd_fd, pidfd, regions
        entry.window_reported = False
        self._serving[entry.key] = entry
        pages = sum(r.size // r.page_size for r in regions)
        limit = self.config.record_max_pages
        capacity = min(pages, limit) if entry.record and limit is not None else pages
        entry.record_capacity = capacity if entry.record else 0
        if len(self._pool.live()) < len(self._pool.workers):
            # Slots left empty (no worker could start, or given up a while ago): try again.
            for started in self._pool.refill():
                self._watch_worker(started)
            self._pool.start_spare()  # the spare may have gone into a slot
            if self._pool.spare is not None:
                self._watch_worker(self._pool.spare)
        worker = self._pool.place(pinned_cpu(entry.pid) if entry.pid else None)
        why = None if worker is not None else "no worker is left to serve it"
        if why is None:
            try:
                entry.ledger = L.Ledger.create(entry.record_capacity)
            except OSError as exc:
                why = f"cannot create the fork's ledger: {exc.strerror}"
        if worker is None or entry.ledger is None:
            # Nobody will serve this uffd: a guest left like that would hang forever.
            entry.state = transition(entry.fork_id, entry.state, ForkState.FAILED)
            self._apply_failure_policy(entry, why or "")
            self._finish(entry, why)
            return
        if entry.record:
            entry.ledger.counters[L.RECORD_STATE] = L.RECORD_OPEN
            entry.ledger.counters[L.RECORD_START_NS] = time.monotonic_ns()
        entry.state = transition(entry.fork_id, entry.state, ForkState.SERVING)
        entry.connected = True
        self._hand_to(entry, worker, adopt=False)
        self._changed.notify_all()
        if self.config.on_connect is not None:
            # Off the loop's thread: the callback may prefetch while the worker serves.
            self._spawn(self.config.on_connect, entry.fork_id)

    def _hand_to(self, entry: _Fork, worker: WorkerProcess, *, adopt: bool) -> None:
        assert entry.ledger is not None
        entry.worker = worker
        worker.forks.add(entry.key)
        named = {"uffd": entry.uffd, "ledger": entry.ledger.fd, "pidfd": entry.pidfd}
        if entry.conn is not None:  # None once a VMM that outlives its socket closed it
            named["conn"] = entry.conn.fileno()
        names = [name for name, fd in named.items() if fd >= 0]
        fds = [named[name] for name in names]
        spec = {
            "key": entry.key,
            "fork": entry.fork_id,
            "pid": entry.pid,
            "on_failure": self.config.on_failure,
            "regions": [(r.base, r.size, r.offset, r.page_size) for r in entry.regions],
            "record_capacity": entry.record_capacity,
            "record_max_pages": self.config.record_max_pages,
            "record_max_seconds": self.config.record_max_seconds,
            "fds": names,
            "adopt": adopt,
            "hangup_ends": entry.hangup_ends,
        }
        worker.send(("serve", spec), fds)  # a worker that is gone re-adopts on its death

    def _apply_failure_policy(self, entry: _Fork, why: str) -> None:
        if self.config.on_failure == "kill" and entry.pidfd >= 0:
            # Only through the pidfd taken at accept: a bare pid may be another process's now.
            log.error("fork %s: %s; killing VMM pid %s", entry.fork_id, why, entry.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(entry.pidfd, signal.SIGKILL)
        else:
            log.error("fork %s: %s; closing its connection", entry.fork_id, why)

    # --- workers -------------------------------------------------------------------------------
    def _watch_worker(self, worker: WorkerProcess) -> None:
        if self._workers_by_fd.get(worker.pidfd) is worker:
            return  # the spare, watched since it started
        for fd in (worker.chan.fileno(), worker.pidfd):
            self._workers_by_fd[fd] = worker
            self._epoll.register(fd, select.EPOLLIN)

    def _unwatch_worker(self, worker: WorkerProcess) -> None:
        self._closed_fds.update((worker.chan.fileno(), worker.pidfd))
        for fd in (worker.chan.fileno(), worker.pidfd):
            if self._workers_by_fd.get(fd) is worker:
                del self._workers_by_fd[fd]
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)

    def _worker_message(self, worker: WorkerProcess) -> bool:
        """Read and act on one message of ``worker``; False at the channel's end."""
        try:
            message, fds = ipc.recv(worker.chan)
        except (ipc.ChannelClosed, OSError):
            # Its pidfd says it died; stop reading a channel that stays readable at EOF.
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(worker.chan.fileno())
            return False
        for fd in fds:
            os.close(fd)  # workers send no fds
        self._on_worker_message(worker, message)
        return True

    def _on_worker_message(self, worker: WorkerProcess, message: tuple[Any, ...]) -> None:
        op = message[0]
        if op == "need" and self._lazy is not None:
            self._on_need(message[1])
            return
        callbacks: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        with self._lock:
            entry = (
                self._serving.get(message[1])
                if op in ("ended", "window_closed", "remapped", "serving", "hung_up")
                else None
            )
            if op == "ended" and entry is not None:
                _, _, state, error = message
                worker.forks.discard(entry.key)
                if entry.state not in FINAL:
                    entry.state = transition(entry.fork_id, entry.state, ForkState(state))
                callbacks += self._finish(entry, error)
            elif op == "window_closed" and entry is not None:
                callbacks += self._report_window(entry)
            elif op == "hung_up" and entry is not None:
                log.debug("fork %s: VMM closed its socket; serving until it exits", entry.fork_id)
                if entry.conn is not None:
                    entry.conn.close()
                    entry.conn = None
            elif op == "remapped" and entry is not None:
                entry.regions = [Region(*r) for r in message[2]]
            elif op == "serving" and entry is not None and entry.state is ForkState.ADOPTING:
                entry.state = transition(entry.fork_id, entry.state, ForkState.SERVING)
            elif op == "released":  # a takeover: the worker has let these forks go
                for key in message[1]:
                    worker.forks.discard(key)
                    released = self._serving.get(key)
                    if released is not None and released.worker is worker and released.handover:
                        released.worker = None
            elif op == "ready":
                worker.ready.set()
            elif op == "armed" and message[1] in self._acks:
                self._acks[message[1]].set()
            elif op == "prefetched":
                _, req, result, error, installed = message
                request = self._requests.get(req)
                if request is not None:
                    request.result, request.error, request.installed = result, error, installed
                    request.done.set()
            self._changed.notify_all()
        self._run_callbacks(callbacks)

    def _report_window(self, entry: _Fork) -> list[tuple[Callable[..., None], tuple[Any, ...]]]:
        """The recording window closed: hand its list to the callback once (lock held)."""
        if entry.window_reported or not entry.record:
            return []
        entry.window_reported = True
        hot = self._hot_of(entry)
        cb = self.config.on_window_closed
        return [(cb, (entry.fork_id, hot))] if cb is not None else []

    def _finish(
        self, entry: _Fork, error: str | None
    ) -> list[tuple[Callable[..., None], tuple[Any, ...]]]:
        """The fork has ended: keep its final figures, close what it held (lock held)."""
        if entry.ledger is not None and entry.record:
            entry.final_hot = self._hot_of(entry)  # read once, for the window and for later
        callbacks = self._report_window(entry) if entry.ledger is not None else []
        entry.error = error
        if error is not None:
            entry.last_error = error
        stats, samples = self._counters_of(entry)
        if samples:
            stats.latency_us = percentiles_us(samples)
        entry.final_latencies = samples
        entry.final_stats = stats
        entry.close_session()
        self._serving.pop(entry.key, None)
        for request in self._requests.values():
            if request.key == entry.key and not request.done.is_set():
                request.error = f"fork {entry.fork_id}: session has ended"
                request.done.set()
        if entry.ephemeral and self._forks.get(entry.fork_id) is entry:
            del self._forks[entry.fork_id]
        if self.config.on_fork_end is not None and entry.connected:
            callbacks.append((self.config.on_fork_end, (entry.fork_id, stats)))
        return callbacks

    def _worker_died(self, worker: WorkerProcess) -> None:
        # What it said before it died (a fork that ended, a window that closed) still counts.
        poller = select.poll()
        poller.register(worker.chan.fileno(), select.POLLIN)
        while poller.poll(0) and self._worker_message(worker):
            pass
        self._unwatch_worker(worker)
        status = worker.reap()
        with self._lock:
            if self._closed:
                return
            orphans = [e for e in self._serving.values() if e.worker is worker]
            callbacks: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
            for entry in [e for e in orphans if e.dropping]:
                # Unregistered while its worker died: its "drop" died too. Done with it.
                orphans.remove(entry)
                entry.state = transition(entry.fork_id, entry.state, ForkState.ENDED)
                callbacks += self._finish(entry, None)
            new, given_up = self._pool.replace(worker)
            if new is None and worker.slot >= 0 and worker.slot not in self._pool.given_up:
                # No worker could start in its slot (out of fds, say): another one takes the
                # forks. A slot that crash-loops does not pass its forks on: they may be why.
                new = self._pool.place(None)
            if self._pool.spare is not None:
                self._watch_worker(self._pool.spare)
            if worker.slot < 0:  # the spare: nobody to adopt
                log.warning("spare worker %d exited (status %s)", worker.pid, status)
                self._changed.notify_all()
                return
            log.error(
                "worker %d died (status %s) serving %d forks", worker.pid, status, len(orphans)
            )
            if new is None:
                why = given_up or "its worker died"
                for entry in orphans:
                    entry.state = transition(entry.fork_id, entry.state, ForkState.FAILED)
                    self._apply_failure_policy(entry, why)
                    callbacks += self._finish(entry, why)
            else:
                self._watch_worker(new)  # a no-op for a worker that was already serving
                for entry in orphans:
                    entry.state = transition(entry.fork_id, entry.state, ForkState.ADOPTING)
                    # A window the dead worker closed but could not report: report it now.
                    if (
                        entry.ledger is not None
                        and entry.ledger.counters[L.RECORD_STATE] == L.RECORD_CLOSED
                    ):
                        callbacks += self._report_window(entry)
                    self._hand_to(entry, new, adopt=True)
                for request in self._requests.values():
                    owner = self._serving.get(request.key)
                    if owner is not None and owner.worker is new and not request.done.is_set():
                        # Installing again is harmless (EEXIST): finish what the dead one began.
                        new.send_prefetch(
                            request.req, request.key, request.token, request.plan, request.timeout
                        )
                if self.config.on_worker_restarted is not None:
                    callbacks.append(
                        (self.config.on_worker_restarted, (worker.pid, new.pid, len(orphans)))
                    )
            self._changed.notify_all()
        self._run_callbacks(callbacks)

    def _debug_crash_worker_at(self, fork_id: str, point: str, count: int = 1) -> int:
        """Tests only: make the worker serving ``fork_id`` SIGKILL itself when it reaches
        ``point`` for the ``count``-th time (``fault_read``, ``remove_noted``, ``recorded``,
        ``prefetch``, ``parked``: a lazy template's fault waits for its chunk). Returns that
        worker's pid."""
        entry = self._get(fork_id)
        worker = entry.worker
        if worker is None:
            raise ForkError(f"fork {fork_id} has no worker")
        armed = threading.Event()
        req = next(self._serial)
        with self._lock:
            self._acks[req] = armed
        try:
            # Armed before this returns: the test's next step then meets the crash point.
            if not (worker.send(("crash_at", point, count, req)) and armed.wait(10)):
                raise ForkError(f"fork {fork_id}: its worker did not arm {point!r}")
        finally:
            with self._lock:
                self._acks.pop(req, None)
        return worker.pid

    def _spawn(self, cb: Callable[..., None], fork_id: Any, *args: object) -> None:
        """Run a user callback on its own thread (joined by :meth:`close`)."""
        self._run_callbacks([(cb, (fork_id, *args))])

    def _run_callbacks(self, callbacks: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
        """Run user callbacks one after another on a thread of their own (off the loop, and
        in order: a fork's window is reported before its end)."""
        if not callbacks:
            return

        def run() -> None:
            for cb, args in callbacks:
                try:
                    cb(*args)
                except Exception:
                    name = getattr(cb, "__name__", cb)
                    log.exception("fork %s: callback %s failed", args[0] if args else "?", name)

        first = callbacks[0][1][0] if callbacks[0][1] else ""
        t = threading.Thread(target=run, name=f"pagefork-callback-{first}", daemon=True)
        with self._callbacks_lock:
            self._callbacks = [c for c in self._callbacks if c.is_alive()]
            self._callbacks.append(t)
        t.start()

    # --- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every fork and worker, join every thread, remove every socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.eventfd_write(self._wake_fd, 1)
        self._loop_thread.join()
        with self._lock:
            for entry in list(self._forks.values()):
                self._drop_listener(entry)
            for fd in list(self._pending):
                self._drop_pending(fd, None)
            for sock, path, _ in self._shared.values():
                sock.close()
                self._unlink_ours(path)
            self._shared.clear()
            self._listeners.clear()
        self._pool.stop()  # workers exit when their channel closes; forks stop being served
        callbacks: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        with self._lock:
            for entry in list(self._serving.values()):
                if entry.state not in FINAL:
                    entry.state = transition(entry.fork_id, entry.state, ForkState.ENDED)
                callbacks += self._finish(entry, None)
            self._forks.clear()
            self._changed.notify_all()
        for fn, args in callbacks:
            try:
                fn(*args)
            except Exception:
                log.exception("callback %s failed", getattr(fn, "__name__", fn))
        with self._callbacks_lock:
            threads, self._callbacks = self._callbacks, []
        for t in threads:
            t.join()
        self._epoll.close()
        os.close(self._wake_fd)
        self.memfile.close()

    def __enter__(self) -> PageServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
