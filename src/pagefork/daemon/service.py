"""The daemon: one process serving every template's forks, driven over its control socket.

:class:`Daemon` wires the registry, the fork manager, the metrics and the control API together.
State that must survive a restart (templates, their hot sets) lives in the state directory;
forks do not survive (their page server is this process), so a starting daemon zeroes the live
fork counts and removes stale fork sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from pagefork.daemon.api import ControlApi, ControlServer
from pagefork.daemon.manager import ForkManager, ManagerConfig, load_drivers
from pagefork.daemon.metrics import DaemonMetrics
from pagefork.templates import TemplateRegistry
from pagefork.vmm.base import VmmDriver

log = logging.getLogger("pagefork")


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
    ) -> None:
        self.registry = TemplateRegistry(state_dir)
        self.registry.reset_live_forks()
        forks_dir = Path(socket_dir) if socket_dir else self.registry.state_dir / "forks"
        forks_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in forks_dir.glob("*.sock"):  # forks of a previous daemon are gone
            with contextlib.suppress(OSError):
                stale.unlink()
        self.metrics = DaemonMetrics()
        self.manager = ForkManager(
            self.registry,
            ManagerConfig(
                socket_dir=str(forks_dir),
                record_max_seconds=record_max_seconds,
                record_max_share=record_max_share,
            ),
            drivers if drivers is not None else load_drivers(),
            on_fork_end=self.metrics.fork_ended,
            on_fault_latencies=self.metrics.observe_fault_latencies,
        )
        self.control_path = control_path
        try:
            self.server = ControlServer(
                control_path, ControlApi(self.registry, self.manager, self.metrics)
            )
        except BaseException:
            self.manager.close()
            raise
        self._thread: threading.Thread | None = None
        self._closed = False

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
        self.manager.close()

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
