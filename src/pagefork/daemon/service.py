"""The daemon: one process serving every template's forks, driven over its control socket.

:class:`Daemon` wires the registry, the fork manager, the metrics and the control API together.
State that must survive a restart (templates, their hot sets) lives in the state directory;
forks do not survive (their page server is this process), so a starting daemon removes the fork
sockets its previous run left and the leftovers of a crashed template creation, deletion or
save. It removes only what it made itself: the fork sockets noted in ``STATE_DIR/fork-sockets``
(still the very files it bound), never other files in a socket directory it shares. Live fork
counts are not stored (the fork manager derives them), so there are none to reset.

Only one daemon may own a state directory: it holds an exclusive ``flock`` on
``STATE_DIR/daemon.lock`` for its whole life, and binds its control socket, before any of those
recovery steps. A second daemon on the same state directory (or the same control socket) is
refused before it touches anything the running one uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

from pagefork.daemon.api import ControlApi, ControlServer
from pagefork.daemon.journal import SocketJournal
from pagefork.daemon.manager import ForkManager, ManagerConfig, load_drivers
from pagefork.daemon.metrics import DaemonMetrics
from pagefork.errors import PageforkError
from pagefork.server import PageServer
from pagefork.store.lazy import StoreOptions
from pagefork.templates import TemplateRegistry
from pagefork.vmm.base import VmmDriver

log = logging.getLogger("pagefork")

LOCK_FILE = "daemon.lock"
#: Under the state directory: one entry per fork socket the daemon has bound.
SOCKET_JOURNAL_DIR = "fork-sockets"


def lock_state_dir(state_dir: Path) -> int:
    """An fd holding an exclusive ``flock`` on ``state_dir/daemon.lock`` (the directory is
    created if needed); :class:`PageforkError` if another daemon holds it."""
    path = state_dir / LOCK_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise PageforkError(f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = b""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).strip()
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            pid = f" pid {holder.decode()}" if holder.isdigit() else ""
            raise PageforkError(
                f"state directory {state_dir} is in use by another daemon{pid} (it holds {path})"
            ) from None
        raise PageforkError(f"cannot lock {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):  # for a human wondering who holds it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Daemon:
    """The page-server daemon for ``state_dir``, controlled over ``control_path``.

    ``socket_dir`` (default ``STATE_DIR/forks``) holds the forks' uffd sockets; ``drivers``
    defaults to every VMM driver that can be loaded.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        control_path: str,
        *,
        socket_dir: str | None = None,
        drivers: Mapping[str, VmmDriver] | None = None,
        record_max_seconds: float = 30.0,
        record_max_share: float = 0.25,
        workers: int | Literal["auto"] = "auto",
        max_layer_depth: int | None = None,
        store: StoreOptions | None = None,
    ) -> None:
        lock_fd = lock_state_dir(Path(state_dir).absolute())
        self._lock_fd: int | None = lock_fd
        try:
            self._setup(
                state_dir,
                control_path,
                socket_dir,
                drivers,
                ManagerConfig(
                    socket_dir="",  # set by _setup
                    record_max_seconds=record_max_seconds,
                    record_max_share=record_max_share,
                    workers=workers,
                    max_layer_depth=max_layer_depth,
                    store=store,
                ),
            )
        except BaseException:
            os.close(lock_fd)
            self._lock_fd = None
            raise
        self._thread: threading.Thread | None = None
        self._closed = False

    def _setup(
        self,
        state_dir: str | os.PathLike[str],
        control_path: str,
        socket_dir: str | None,
        drivers: Mapping[str, VmmDriver] | None,
        settings: ManagerConfig,
    ) -> None:
        # Nothing here may change what another daemon uses until this one owns the state
        # directory (the lock, taken by the caller) and the control socket (bound below).
        journal = self._build(state_dir, control_path, socket_dir, drivers, settings)
        try:
            self.server = ControlServer(
                control_path, ControlApi(self.registry, self.manager, self.metrics)
            )
        except BaseException:
            self.manager.close()
            raise
        try:  # recovery: the previous daemon's forks died with it
            self.registry.clean_leftovers()
            journal.clean()
        except BaseException:
            self.server.server_close()
            with contextlib.suppress(OSError):
                os.unlink(control_path)
            self.manager.close()
            raise

    def _build(
        self,
        state_dir: str | os.PathLike[str],
        control_path: str,
        socket_dir: str | None,
        drivers: Mapping[str, VmmDriver] | None,
        settings: ManagerConfig,
    ) -> SocketJournal:
        """The registry, metrics and fork manager; touches nothing another daemon uses."""
        self.registry = TemplateRegistry(state_dir)
        forks_dir = Path(socket_dir) if socket_dir else self.registry.state_dir / "forks"
        self.metrics = DaemonMetrics()
        journal = SocketJournal(self.registry.state_dir / SOCKET_JOURNAL_DIR)
        self.manager = ForkManager(
            self.registry,
            dataclasses.replace(settings, socket_dir=str(forks_dir)),
            drivers if drivers is not None else load_drivers(),
            on_fork_end=self.metrics.fork_ended,
            on_fault_latencies=self.metrics.observe_fault_latencies,
            socket_journal=journal,
            on_worker_restarted=self.metrics.worker_restarted,
        )
        self.control_path = control_path
        return journal

    @classmethod
    def for_takeover(
        cls,
        state_dir: str | os.PathLike[str],
        control_path: str,
        settings: ManagerConfig,
        *,
        socket_dir: str | None = None,
        drivers: Mapping[str, VmmDriver] | None = None,
    ) -> Daemon:
        """A daemon that takes over from the one running on ``state_dir``: built without the
        state directory's lock, a control socket or any clean-up (the running one owns them
        all); :mod:`pagefork.takeover.daemon` hands them over, then :meth:`start`."""
        daemon = cls.__new__(cls)
        daemon._lock_fd = None
        daemon._thread = None
        daemon._closed = False
        daemon._build(state_dir, control_path, socket_dir, drivers, settings)
        return daemon

    def start(self) -> None:
        """Serve control requests on a background thread."""
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="pagefork-control", daemon=True
        )
        self._thread.start()
        log.info("daemon: control socket %s", self.control_path)

    def close(self) -> None:
        """Stop answering, release every fork, stop every page server; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(self.control_path)
        try:
            self.manager.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # the next daemon may take the state directory
                self._lock_fd = None

    @property
    def lock_fd(self) -> int | None:
        """The open file whose ``flock`` owns the state directory (a takeover hands it on)."""
        return self._lock_fd

    def adopt_lock(self, fd: int) -> None:
        """Own the state directory through ``fd``, a copy of the running daemon's lock file
        (an ``flock`` belongs to the open file: the directory is never unowned)."""
        self._lock_fd = fd

    def abandon(self) -> list[PageServer]:
        """Let go of everything without releasing a fork, removing a socket or unlocking the
        state directory through another copy: after a takeover they are the new daemon's (or,
        on a failed one's new side, still the old daemon's). Returns the page servers, which
        the caller abandons; idempotent."""
        if self._closed:
            return []
        self._closed = True
        control = getattr(self, "server", None)  # a new side's, before it adopted one: none
        if control is not None:
            if self._thread is not None:
                control.shutdown()  # drained already: returns at once
                self._thread.join()
            control.server_close()  # this process's copy of the listening socket only
        servers = self.manager.abandon()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return servers

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["Daemon"]
