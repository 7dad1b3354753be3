"""The page server: one template mem-file, many fork sessions, one socket per fork.

:class:`PageServer` maps the mem-file once and serves every fork's uffd from it. Forks are
registered by id (:meth:`PageServer.register_fork` gives each a 0600 Unix socket), or arrive on a
shared socket (:meth:`PageServer.listen`, what ``pagefork serve`` uses). One acceptor thread
watches the listening sockets; each accepted connection gets a :class:`ForkSession` thread.
Every public method is safe to call from any thread while faults are served.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import select
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from pagefork.errors import ForkError, PageforkError, PrefetchError
from pagefork.hotpages import HotPage, HotPageList, HotPageRecorder
from pagefork.memfile import MemFile
from pagefork.prefetch import PrefetchPlan, PrefetchResult, execute_plan, plan_prefetch
from pagefork.regions import Region
from pagefork.session import FailurePolicy, ForkSession, PrefetchPort, SessionOptions
from pagefork.stats import ForkStats

log = logging.getLogger("pagefork")

_FORK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: How long accepting pauses when the server is out of fds or memory.
_ACCEPT_BACKOFF = 0.1
#: Prefetch plans kept (one per hot set and region layout; a template usually needs one).
_PLAN_CACHE_SIZE = 16
#: sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one :class:`PageServer`.

    ``page_size`` 0 takes each region's page size from the handshake (4 KiB when absent).
    ``on_failure`` is what a fork-fatal error does to the VMM: ``kill`` (SIGKILL its pid, as
    Firecracker's docs advise: a guest whose handler is gone hangs forever) or ``close``.
    ``record_hot_pages`` records every fork; ``record_max_pages`` / ``record_max_seconds``
    bound the recording window. At most ``max_pending_handshakes`` connections may wait for
    their handshake at once; more are refused. ``on_fork_end`` / ``on_connect`` are called
    with the fork's id.
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
    on_connect: Callable[[str], None] | None = None
    on_fork_end: Callable[[str, ForkStats], None] | None = None
    on_window_closed: Callable[[str, HotPageList], None] | None = None


@dataclass
class _Fork:
    fork_id: str
    record: bool
    listener: socket.socket | None = None
    socket_path: str | None = None
    session: ForkSession | None = None
    ephemeral: bool = False
    last_error: str | None = None


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
    if page_size and (page_size < 4096 or page_size & (page_size - 1)):
        raise PageforkError(f"page size {page_size} is not a power of two >= 4096")
    if config.on_failure not in ("kill", "close"):
        raise PageforkError(f"on_failure must be 'kill' or 'close', not {config.on_failure!r}")
    positive("handshake_timeout", config.handshake_timeout, allow_none=False)
    if config.handshake_timeout > MAX_HANDSHAKE_TIMEOUT:
        # poll() takes int milliseconds; past about 24 days it overflows on every handshake.
        raise PageforkError(
            f"handshake_timeout must be at most {MAX_HANDSHAKE_TIMEOUT:g} seconds, "
            f"not {config.handshake_timeout!r}"
        )
    positive("record_max_pages", config.record_max_pages)
    positive("record_max_seconds", config.record_max_seconds)
    positive("max_pending_handshakes", config.max_pending_handshakes, allow_none=False)


def _readable_within(fd: int, timeout: float) -> bool:
    """True when ``fd`` becomes readable within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


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
    """Serves forks of one template mem-file over Firecracker's UFFD protocol."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._options = SessionOptions(
            on_failure=config.on_failure,
            handshake_timeout=config.handshake_timeout,
            page_size=config.page_size,
        )
        _check_config(config)
        if config.socket_dir is not None and not os.path.isdir(config.socket_dir):
            raise ForkError(f"socket directory {config.socket_dir} does not exist")
        self.memfile = MemFile(config.mem_file_path)
        self._lock = threading.Lock()
        # Notified whenever a fork's session is accepted, connects or ends.
        self._changed = threading.Condition(self._lock)
        self._forks: dict[str, _Fork] = {}
        self._listeners: dict[int, _Fork | None] = {}
        self._shared: dict[int, tuple[socket.socket, str, bool | Callable[[str], bool] | None]] = {}
        self._next_conn = 0
        self._pending: set[ForkSession] = set()  # accepted, handshake not in yet
        self._plans: OrderedDict[tuple[object, ...], tuple[HotPageList, PrefetchPlan]] = (
            OrderedDict()
        )
        self._plans_lock = threading.Lock()
        self._callbacks: list[threading.Thread] = []
        self._callbacks_lock = threading.Lock()
        self._closed = False
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="pagefork-accept", daemon=True
        )
        self._acceptor.start()

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
            session = entry.session
        if session is not None:
            session.stop()

    def _drop_listener(self, entry: _Fork) -> None:
        sock = entry.listener
        if sock is not None:
            entry.listener = None
            self._listeners.pop(sock.fileno(), None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(sock.fileno())
            sock.close()
        if entry.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(entry.socket_path)
            entry.socket_path = None

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

    def wait_connected(self, fork_id: str, timeout: float = 10.0) -> list[Region]:
        """Wait for the fork's handshake and return its regions.

        Raises :class:`ForkError` on timeout (naming the last handshake error, if any) or when
        the fork's session ended.
        """
        session = self._wait_session(fork_id, timeout)
        return list(session.regions)

    def _wait_session(self, fork_id: str, timeout: float) -> ForkSession:
        entry = self._get(fork_id)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                session = entry.session
                if session is not None and session.connected.is_set():
                    return session
                if session is not None and session.ended.is_set():
                    # Say why now rather than at the timeout; the VMM may retry later.
                    raise ForkError(f"fork {fork_id}: {session.stats.error or 'session ended'}")
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f" (last error: {entry.last_error})" if entry.last_error else ""
                    raise ForkError(f"fork {fork_id}: no handshake within {timeout:g}s{why}")
                self._changed.wait(left)

    def wait_ended(self, fork_id: str, timeout: float = 10.0) -> ForkStats:
        """Wait until the fork's session has ended (VMM gone, failure, or stop); its stats."""
        session = self._wait_session(fork_id, timeout)
        if not session.ended.wait(timeout):
            raise ForkError(f"fork {fork_id}: still serving after {timeout:g}s")
        return session.snapshot_stats()

    def stats(self, fork_id: str) -> ForkStats:
        """Counters and latency percentiles of one fork."""
        entry = self._get(fork_id)
        if entry.session is None:
            return ForkStats(fork=fork_id, state="waiting", error=entry.last_error)
        return entry.session.snapshot_stats()

    def fault_latencies_ns(self, fork_id: str) -> list[int]:
        """The fork's recent fault-service latencies in nanoseconds (for histograms)."""
        session = self._get(fork_id).session
        return session.latency.values() if session is not None else []

    def hot_pages(self, fork_id: str) -> HotPageList:
        """The pages the fork faulted on demand, in first-touch order (it must be recording)."""
        entry = self._get(fork_id)
        session = entry.session
        if not entry.record:
            raise ForkError(f"fork {fork_id} is not recording hot pages")
        if session is None or session.recorder is None:
            return HotPageList()
        return session.recorder.hot_pages

    # --- prefetch ----------------------------------------------------------------------------
    def prefetch(
        self, fork_id: str, hot_pages: HotPageList | Sequence[HotPage], timeout: float = 10.0
    ) -> PrefetchResult:
        """Install ``hot_pages`` into the fork before its guest runs.

        Waits for the fork's handshake (up to ``timeout``), validates the whole list against
        the fork's regions (:class:`PrefetchError` naming the first bad entry, nothing
        installed), then copies it in coalesced runs. Safe to race the fork's own faults.
        """
        session = self._wait_session(fork_id, timeout)
        regions = list(session.regions)
        plan = self._plan(hot_pages, regions)

        def run(port: PrefetchPort) -> PrefetchResult:
            # Counted under the fork's prefetch lock, including what a failed one installed.
            try:
                result = execute_plan(plan, port, regions=regions, timeout=timeout)
            except PrefetchError as exc:
                session.stats.prefetched_pages += exc.installed
                raise
            session.stats.prefetched_pages += result.installed
            return result

        result = session.run_prefetch(run)
        assert isinstance(result, PrefetchResult)
        return result

    def _plan(
        self, hot_pages: HotPageList | Sequence[HotPage], regions: list[Region]
    ) -> PrefetchPlan:
        """The plan for ``hot_pages`` on this layout, made once per hot set and layout.

        Every fork of a template has the same region sizes and offsets, so a plan is reused
        across forks, relocated by region base. A :class:`HotPageList` only grows, so its
        identity and length name its content (the cache holds it, so the id stays unique).
        """
        if not isinstance(hot_pages, HotPageList):
            return plan_prefetch(list(hot_pages), regions, self.memfile.is_zero)
        layout = tuple((r.size, r.offset, r.page_size) for r in regions)
        key = (id(hot_pages), len(hot_pages), layout)
        with self._plans_lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit[1]
        plan = plan_prefetch(hot_pages.in_order(), regions, self.memfile.is_zero)
        with self._plans_lock:
            self._plans[key] = (hot_pages, plan)
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    # --- accepting ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return
            for fd, _ in events:
                if fd == self._wake_fd:
                    return
                with self._lock:
                    if self._closed or fd not in self._listeners:
                        continue
                    try:
                        backoff = self._accept(fd)
                    except Exception:  # the acceptor must outlive any one connection
                        log.exception("accepting a connection failed")
                        backoff = True
                if backoff and _readable_within(self._wake_fd, _ACCEPT_BACKOFF):
                    return

    def _accept(self, fd: int) -> bool:
        """Accept one connection on listener ``fd`` (called with the lock held).

        Returns True when the server is out of resources (fds, memory) and accepting should
        pause briefly rather than spin on a listener that stays readable.
        """
        entry = self._listeners[fd]
        sock = entry.listener if entry is not None else self._shared[fd][0]
        assert sock is not None
        try:
            conn, _ = sock.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc.strerror or exc)
            return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
        if len(self._pending) >= self.config.max_pending_handshakes:
            # Each connection holds a thread until its handshake is in: bound them.
            log.warning("refusing a connection: %d handshakes already pending", len(self._pending))
            conn.close()
            return False
        ephemeral = entry is None
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
        elif entry.session is not None and not (
            entry.session.ended.is_set() and not entry.session.connected.is_set()
        ):
            # One VMM per fork socket; a retry is allowed only after a failed handshake.
            log.warning("fork %s: refusing a second connection", entry.fork_id)
            conn.close()
            return False
        session: ForkSession | None = None
        try:
            session = ForkSession(
                entry.fork_id,
                conn,
                self.memfile,
                self._options,
                self._make_recorder(entry.fork_id) if entry.record else None,
                on_connect=self._session_connected,
                on_end=self._session_ended,
            )
            self._pending.add(session)
            session.start()
        except Exception as exc:
            if session is not None:
                self._pending.discard(session)
                session.discard()
            conn.close()
            log.error("fork %s: cannot start a session: %s", entry.fork_id, exc)
            return isinstance(exc, OSError)
        if entry.session is not None:
            entry.last_error = entry.session.stats.error
        if ephemeral:
            self._forks[entry.fork_id] = entry
        entry.session = session
        self._changed.notify_all()
        return False

    def _next_ephemeral_id(self) -> str:
        # Skip ids a registered fork already has: never replace another fork's entry.
        while True:
            self._next_conn += 1
            fork_id = f"fork-{self._next_conn}"
            if fork_id not in self._forks:
                return fork_id

    def _make_recorder(self, fork_id: str) -> HotPageRecorder:
        cb = self.config.on_window_closed

        def closed(pages: HotPageList) -> None:
            # Called on the fault loop's thread; saving a file there would stall faults.
            if cb is not None:
                self._spawn(cb, fork_id, pages)

        return HotPageRecorder(
            max_pages=self.config.record_max_pages,
            max_seconds=self.config.record_max_seconds,
            on_close=closed,
        )

    def _spawn(self, cb: Callable[..., None], fork_id: str, *args: object) -> None:
        """Run a user callback on its own thread (joined by :meth:`close`)."""

        def run() -> None:
            try:
                cb(fork_id, *args)
            except Exception:
                log.exception("fork %s: callback %s failed", fork_id, getattr(cb, "__name__", cb))

        t = threading.Thread(target=run, name=f"pagefork-callback-{fork_id}", daemon=True)
        with self._callbacks_lock:
            self._callbacks = [c for c in self._callbacks if c.is_alive()]
            self._callbacks.append(t)
        t.start()

    def _session_connected(self, session: ForkSession) -> None:
        with self._changed:
            self._pending.discard(session)
            self._changed.notify_all()
        if self.config.on_connect is not None:
            # Off the fork's thread: the callback may prefetch while the fault loop serves.
            self._spawn(self.config.on_connect, session.fork_id)

    def _session_ended(self, session: ForkSession) -> None:
        with self._lock:
            self._pending.discard(session)
            entry = self._forks.get(session.fork_id)
            if entry is not None and entry.session is session:
                if session.stats.error:
                    entry.last_error = session.stats.error
                self._changed.notify_all()
                if entry.ephemeral:
                    del self._forks[session.fork_id]
        if self.config.on_fork_end is not None and session.connected.is_set():
            self.config.on_fork_end(session.fork_id, session.snapshot_stats())

    # --- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every fork, join every thread, remove every socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            entries = list(self._forks.values())
            self._forks.clear()
            for entry in entries:
                self._drop_listener(entry)
            for sock, path, _ in self._shared.values():
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._shared.clear()
            self._listeners.clear()
        os.eventfd_write(self._wake_fd, 1)
        self._acceptor.join()
        for entry in entries:
            if entry.session is not None:
                entry.session.stop()
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, []
        for t in callbacks:
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
