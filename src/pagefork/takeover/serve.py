"""``pagefork serve --takeover``: one page server hands its socket and forks to a new one.

The old ``serve`` listens for a takeover on ``SOCKET.takeover`` (mode 0600, next to its
socket). A new ``serve --takeover`` with the same ``--socket`` and ``--mem-file`` starts its
workers, takes the listening socket, every fork and the hot-page loop (which fork records,
the hot set) over, prints ``took_over`` and serves on; the old one prints ``handed_over`` and
exits 0 without ending any fork.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pagefork.errors import PageforkError
from pagefork.hotloop import HotSetLoop
from pagefork.server import PageServer
from pagefork.store.layout import is_s3_url
from pagefork.takeover import pageserver
from pagefork.takeover.new import Target
from pagefork.takeover.old import Source, TakeoverListener
from pagefork.takeover.protocol import TakeoverError

log = logging.getLogger("pagefork")

#: Appended to ``--socket``: where a running ``serve`` listens for its successor.
SUFFIX = ".takeover"


def takeover_path(socket_path: str) -> str:
    """The takeover socket of the ``serve`` listening on ``socket_path``."""
    return socket_path + SUFFIX


def _identity(server: PageServer, record: str | None) -> dict[str, Any]:
    """What a successor must serve exactly as this server does: the very mem-file (or the
    object-storage template), the same layers, and the same recording."""
    config = server.config
    mem_file = config.mem_file_path
    if is_s3_url(mem_file):
        ident: dict[str, Any] = {"mem_file": mem_file, "dev": None, "ino": None, "size": None}
    else:
        st = os.stat(mem_file)
        ident = {"mem_file": os.path.abspath(mem_file), "dev": st.st_dev, "ino": st.st_ino,
                 "size": st.st_size}  # fmt: skip
    ident["layers"] = [os.path.abspath(p) for p in config.layers]
    ident["record"] = os.path.abspath(record) if record is not None else None
    return ident


class ServeSource(Source):
    """A running ``serve``, as the old side of a takeover."""

    kind = "serve"

    def __init__(
        self,
        server: PageServer,
        loop: HotSetLoop,
        socket_path: str,
        record: str | None = None,
        lock_fd: int = -1,
        pause: Callable[[bool], None] | None = None,
    ) -> None:
        self.server = server
        self.loop = loop
        self.socket_path = os.path.abspath(socket_path)
        self.record_path = record
        #: The socket's lock (``SOCKET.lock``): handed on, so the socket never has no owner.
        self.lock_fd = lock_fd
        #: Called with True when the handover starts, False if it fails: background work
        #: (the VMMs' memory samples) waits meanwhile, as the forks do.
        self.pause = pause

    def plan(self) -> dict[str, Any]:
        return {**_identity(self.server, self.record_path), "socket": self.socket_path}

    def quiesce(self, deadline: float) -> None:
        if self.pause is not None:
            self.pause(True)
        pageserver.quiesce(self.server, deadline)

    def release(self, deadline: float) -> None:
        pageserver.release(self.server, deadline)

    def export(self) -> tuple[dict[str, Any], list[int]]:
        state, fds = pageserver.export(self.server)
        state = {**state, "hotloop": self.loop.snapshot()}
        if self.lock_fd >= 0:
            state["lock"] = len(fds)
            fds = [*fds, self.lock_fd]
        return state, fds

    def resume(self) -> None:
        pageserver.readopt(self.server)
        if self.pause is not None:
            self.pause(False)

    def fd_estimate(self) -> int:
        # Four per fork (uffd, connection, pidfd, ledger), and the listening sockets.
        return 4 * len(self.server.forks()) + 8


class ServeTarget(Target):
    """A new ``serve --takeover`` whose page server is started and serves nothing yet."""

    kind = "serve"

    def __init__(
        self,
        server: PageServer,
        loop: HotSetLoop,
        socket_path: str,
        record: Callable[[str], bool],
        record_path: str | None = None,
    ) -> None:
        self.server = server
        self.loop = loop
        self.socket_path = os.path.abspath(socket_path)
        self.record = record
        self.record_path = record_path
        #: The socket's lock, as the old side handed it over (-1: none came).
        self.lock_fd = -1

    def build(self, plan: dict[str, Any]) -> list[int]:
        mine = _identity(self.server, self.record_path)
        if any(plan.get(k) != mine[k] for k in ("mem_file", "dev", "ino", "size")):
            raise TakeoverError(
                f"--mem-file {mine['mem_file']} is not the running server's mem-file "
                f"({plan.get('mem_file')})"
            )
        if plan.get("layers", []) != mine["layers"]:
            raise TakeoverError(
                f"--layer {' '.join(mine['layers']) or '(none)'} is not the running server's "
                f"({' '.join(plan.get('layers') or []) or 'none'})"
            )
        if plan.get("record") != mine["record"]:
            raise TakeoverError(
                f"--record {mine['record'] or '(none)'} is not the running server's "
                f"({plan.get('record') or 'none'}): its warm-up's hot set would be lost"
            )
        if plan.get("socket") != self.socket_path:
            raise TakeoverError(
                f"--socket {self.socket_path} is not the running server's socket "
                f"({plan.get('socket')})"
            )
        self.server.wait_ready()
        return pageserver.all_worker_pids(self.server)

    def adopt(self, state: dict[str, Any], fds: list[int]) -> int:
        index = state.pop("lock", None)
        if isinstance(index, int) and 0 <= index < len(fds):
            self.lock_fd = os.dup(fds[index])
        if "hotloop" in state:
            self.loop.restore(dict(state["hotloop"]))
        else:
            # An orphaned worker's forks: the loop that knew them died with their server. A
            # fork still recording is a warm-up, whose window this side saves.
            snap = self.loop.snapshot()
            for spec in state["forks"]:
                if spec.get("record") and not spec.get("window_reported"):
                    snap["roles"][str(spec["fork"])] = "warmup"
                    snap["warmup"] = snap["warmup"] or str(spec["fork"])
            self.loop.restore(snap)
        return pageserver.adopt(self.server, state, fds, record=self.record)


class ServeHandover:
    """The old side's listener for a running ``serve``; ``handed`` once it succeeded."""

    def __init__(
        self,
        server: PageServer,
        loop: HotSetLoop,
        socket_path: str,
        on_done: Callable[[int, int], None],
        sock: Any = None,
        record: str | None = None,
        lock_fd: int = -1,
        pause: Callable[[bool], None] | None = None,
    ) -> None:
        self.server = server
        self.handed = False

        def done(pid: int, forks: int) -> None:
            self.handed = True
            on_done(pid, forks)

        self.listener: TakeoverListener | None = None
        try:
            self.listener = TakeoverListener(
                takeover_path(socket_path),
                ServeSource(server, loop, socket_path, record, lock_fd, pause),
                done,
                sock=sock,
            )
        except PageforkError as exc:
            # Serving matters more than a later upgrade: say so, and serve.
            log.warning("cannot listen for a takeover (serving without): %s", exc)

    def close(self) -> None:
        """Stop listening; after a takeover, drop every fork without ending it, else stop
        the server as usual."""
        if self.listener is not None:
            self.listener.close()
        if self.handed:
            pageserver.abandon(self.server)
        else:
            self.server.close()
