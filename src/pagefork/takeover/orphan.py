"""A worker whose supervisor died: it serves on, and hands its forks to the next supervisor.

Crash-only: a supervisor that was killed is recovered the way a running one is taken over.
A supervisor that asks for it (``serve``, the daemon) gives each worker its takeover socket's
path; the worker binds its own rendezvous socket next to it, ``TAKEOVER.orphan.PID`` (mode
0600), and accepts nothing on it while the supervisor lives. When the worker's channel ends
without a ``stop`` (the supervisor died, SIGKILL included), the worker:

1. serves every fault of its forks on, from the same loop (a lazy template's fault on a chunk
   not fetched yet waits: only a supervisor fetches, and the one that adopts the fork does);
2. accepts takeovers on its rendezvous socket: a new supervisor runs the takeover protocol
   (:mod:`pagefork.takeover.protocol`) against it as against a running supervisor, and is
   given the dead supervisor's plan, so one of another template or socket is refused;
3. once no supervisor has adopted its forks within :func:`orphan_deadline` seconds of the
   death, applies the dead supervisor's failure policy to each fork (``kill``: SIGKILL the VMM
   through its pidfd; ``close``: close the connection), one log line each, and exits. It exits
   too once its last fork has ended, or right away if it had none.

Everything here that touches the worker's forks runs on the worker's loop thread (through
:meth:`OrphanedWorker.call_soon`); the takeover listener's thread only waits for it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pagefork.errors import PageforkError
from pagefork.serving import ipc
from pagefork.serving import messages as M
from pagefork.serving.sockets import bind_private_socket
from pagefork.takeover.old import Source, TakeoverListener
from pagefork.takeover.protocol import TakeoverError

if TYPE_CHECKING:
    from pagefork.serving.worker import Worker

log = logging.getLogger("pagefork.worker")

#: Seconds an orphaned worker waits for a new supervisor before it applies the failure policy.
DEADLINE_ENV = "PAGEFORK_ORPHAN_DEADLINE"
#: Long enough for a service manager to restart the supervisor (systemd's ``Restart=`` waits
#: 100 ms, then the start-up opens the template and starts workers), short enough that a
#: guest whose lazy template waits on a fetch is not left hanging for long.
DEFAULT_DEADLINE = 60.0
_INFIX = ".orphan."


def orphan_deadline() -> float:
    """The deadline in seconds, from ``PAGEFORK_ORPHAN_DEADLINE`` (default 60)."""
    text = os.environ.get(DEADLINE_ENV, "")
    if not text:
        return DEFAULT_DEADLINE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise PageforkError(f"{DEADLINE_ENV}={text!r}: expected a number of seconds >= 0")
    return value


def rendezvous_path(takeover_path: str, pid: int) -> str:
    """Where worker ``pid`` of the supervisor listening on ``takeover_path`` waits if orphaned."""
    return f"{takeover_path}{_INFIX}{pid}"


def rendezvous_paths(takeover_path: str) -> list[str]:
    """The rendezvous sockets (live or stale) next to ``takeover_path``."""
    parent = os.path.dirname(os.path.abspath(takeover_path))
    prefix = os.path.basename(takeover_path) + _INFIX
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return sorted(
        os.path.join(parent, n)
        for n in names
        if n.startswith(prefix) and n[len(prefix) :].isdigit()
    )


def setup(takeover_path: str, kind: str, plan: dict[str, Any]) -> dict[str, Any]:
    """What a supervisor sends its workers: where to wait, and what to tell an adopter."""
    return {
        "handler": __name__,  # what the worker imports to carry this out
        "takeover": os.path.abspath(takeover_path),
        "kind": kind,
        "plan": plan,
        "deadline": orphan_deadline(),
    }


class Rendezvous:
    """A worker's bound rendezvous socket (nothing accepts on it until it is orphaned)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.path = rendezvous_path(settings["takeover"], os.getpid())
        self.sock: socket.socket | None = bind_private_socket(self.path)
        st = os.lstat(self.path)
        self._ident = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Close the socket and remove its file, if it is still the one bound here."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)


def prepare(worker: Worker, settings: dict[str, Any]) -> Rendezvous | None:
    """The supervisor said where to wait if it dies: bind there (pagefork.serving.orphaning
    keeps what this returns)."""
    try:
        return Rendezvous(settings)
    except (PageforkError, OSError) as exc:
        # Serving matters more: this worker exits with its supervisor, as it always did.
        log.warning("cannot bind a rendezvous socket for a new supervisor: %s", exc)
        return None


def forget(rv: Rendezvous) -> None:
    """An orderly stop: the channel's end is no death; remove the rendezvous socket."""
    rv.close()


def become_orphan(worker: Worker, rv: Rendezvous) -> bool:
    """The supervisor died: serve on and wait for a new one (True), or, with no fork to hand
    on, remove the rendezvous socket and let the worker exit (False)."""
    if not worker.forks:
        rv.close()
        return False
    OrphanedWorker(worker, rv)
    return True


class OrphanedWorker(Source):
    """The old side of a takeover, played by an orphaned worker for its own forks."""

    def __init__(self, worker: Worker, rv: Rendezvous) -> None:
        self.worker = worker
        self.rv = rv
        self.kind = str(rv.settings["kind"])
        self.deadline = float(rv.settings["deadline"])
        self._lock = threading.Lock()
        self._handing = False  # a takeover has the forks released, or is about to
        self._expired = False
        self._finished = False
        # Released forks: (the worker's spec to serve it again, the state's spec, our fds).
        self._released: list[tuple[M.ForkSpec, dict[str, Any], dict[str, int]]] = []
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        worker.ep.register(self._wake, 1)  # EPOLLIN
        worker.hooks[self._wake] = self._run_calls
        # What the worker tells its supervisor now reaches this object: a fork that ends.
        # What the worker tells its supervisor comes here now (the loop reads no channel).
        old = worker.chan
        chan, inbox = ipc.channel_pair()
        worker.chan = worker.table.chan = chan
        old.close()
        threading.Thread(target=self._read, args=(inbox,), name="orphan-inbox", daemon=True).start()
        self._timer = threading.Timer(self.deadline, self.call_soon, (self._expire,))
        self._timer.daemon = True
        self._timer.start()
        assert rv.sock is not None
        self.listener = TakeoverListener(rv.path, self, self._handed, sock=rv.sock, step_timeout=10)
        rv.sock = None  # the listener's now
        log.warning(
            "supervisor gone: serving %d forks on; a new supervisor has %gs to adopt them "
            "(at %s), or their failure policy applies",
            len(worker.forks),
            self.deadline,
            rv.path,
        )

    # --- the loop's side -------------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker's loop thread (from any thread)."""
        self._calls.append(fn)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def _run_calls(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._wake)
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("orphaned worker: %s failed", getattr(fn, "__name__", fn))

    def _read(self, inbox: socket.socket) -> None:
        """The worker's messages to its (dead) supervisor: a fork that ended may be the last."""
        with inbox:
            while True:
                try:
                    message, fds = ipc.recv(inbox)
                except (ipc.ChannelClosed, OSError):
                    return
                for fd in fds:
                    os.close(fd)
                if isinstance(message, M.Ended):
                    self.call_soon(self._check_empty)

    def _check_empty(self) -> None:
        with self._lock:
            if self._handing or self._finished or self.worker.forks:
                return
        log.warning("orphaned worker: every fork has ended; exiting")
        self._finish()

    def _release_all(self, done: threading.Event) -> None:
        w = self.worker
        released = []
        for f in list(w.forks.values()):
            named = {"uffd": f.uffd, "conn": f.conn, "pidfd": f.pidfd, "ledger": f.ledger.fd}
            fds = {name: os.dup(fd) for name, fd in named.items() if fd >= 0}
            spec = f.spec
            mine = dataclasses.replace(
                spec, regions=tuple(f.regions), fds=tuple(fds), adopt=True,
                hangup_ends=f.hangup_ends,
            )  # fmt: skip
            theirs = {
                "fork": f.name,
                "record": spec.record,
                "ephemeral": spec.ephemeral,
                "pid": f.pid,
                "regions": [[r.base, r.size, r.offset, r.page_size] for r in f.regions],
                "record_capacity": spec.record_capacity,
                "hangup_ends": f.hangup_ends,
                "window_reported": spec.window_reported,
                "socket": spec.socket,
            }
            released.append((mine, theirs, fds))
        w.table.release(tuple(mine.key for mine, _, _ in released))
        self._released = released
        done.set()

    def _readopt(self) -> None:
        released, self._released = self._released, []
        for mine, _, fds in released:
            self.worker.table.add(mine, [fds[name] for name in mine.fds])
        with self._lock:
            self._handing = False
            expired = self._expired
        if expired:
            self._expire()
        else:
            self._check_empty()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            if self._handing or self._finished:
                return  # a takeover decides first; a failed one comes back here
        why = f"no supervisor adopted it within {self.deadline:g}s of its supervisor's death"
        for f in list(self.worker.forks.values()):
            self.worker.table.fail(f, why)
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._timer.cancel()
        self.listener.close()
        self.rv.close()
        raise SystemExit(0)  # out of the worker's loop (it runs this): the worker exits

    # --- the takeover listener's side (its thread) -----------------------------------------
    def plan(self) -> dict[str, Any]:
        return dict(self.rv.settings["plan"])

    def quiesce(self, deadline: float) -> None:
        with self._lock:
            if self._expired or self._finished:
                raise TakeoverError(
                    "too late: the orphaned forks' deadline has passed (their failure policy "
                    "was applied)"
                )
            self._handing = True

    def release(self, deadline: float) -> None:
        done = threading.Event()
        self.call_soon(lambda: self._release_all(done))
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise TakeoverError("the orphaned worker did not release its forks in time")

    def export(self) -> tuple[dict[str, Any], list[int]]:
        fds: list[int] = []
        forks = []
        for _, theirs, named in self._released:
            indexes = {}
            for name, fd in named.items():
                indexes[name] = len(fds)
                fds.append(fd)
            forks.append({**theirs, "fds": indexes})
        next_conn = max((m.next_conn for m, _, _ in self._released), default=0)
        state = {"forks": forks, "waiting": [], "shared": [], "next_conn": next_conn}
        return state, fds

    def resume(self) -> None:
        # The new supervisor and its workers are dead: serve the forks here again.
        self.call_soon(self._readopt)

    def _handed(self, pid: int, forks: int) -> None:
        log.warning("orphaned worker: supervisor pid %d adopted its %d forks; exiting", pid, forks)
        released, self._released = self._released, []
        for _, _, fds in released:
            for fd in fds.values():
                os.close(fd)
        self.call_soon(self._finish)


__all__ = [
    "DEADLINE_ENV",
    "DEFAULT_DEADLINE",
    "OrphanedWorker",
    "Rendezvous",
    "become_orphan",
    "forget",
    "orphan_deadline",
    "prepare",
    "rendezvous_path",
    "rendezvous_paths",
    "setup",
]
