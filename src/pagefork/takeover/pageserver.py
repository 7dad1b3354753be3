"""Handing one :class:`~pagefork.server.PageServer`'s forks to another process, and back.

This module is the page server's part of a takeover, kept out of ``server.py``; it works on
the server's own tables, under its lock, as a friend of the class.

Old side, in order: :func:`quiesce` (stop accepting VMM connections, let handshakes and
callbacks in flight finish), :func:`release` (every worker lets its forks go, ledgers final),
:func:`export` (each fork's state and fds). Then either :func:`abandon` (the new side serves
them: drop our copies without ending any fork or removing any socket) or :func:`readopt` (the
takeover failed: our workers adopt the forks again and we accept again).

New side: :func:`adopt` takes the exported forks and listeners into a started server; its
workers wake each fork's vCPUs (``UFFDIO_WAKE``) and serve on.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from pagefork.regions import Region
from pagefork.server import PageServer, _Fork
from pagefork.serving import ledger as L
from pagefork.serving.pool import pinned_cpu
from pagefork.serving.state import FINAL, ForkState
from pagefork.takeover.protocol import TakeoverError, close_all

#: What a fork's state carries, by field; fds are named in ``fds`` (indexes into the batch).
_FD_NAMES = ("uffd", "conn", "pidfd", "ledger")


def all_worker_pids(server: PageServer) -> list[int]:
    """Every worker process of ``server``, the spare included."""
    with server._lock:
        return [w.pid for w in server._pool.all_processes()]


def quiesce(server: PageServer, deadline: float) -> None:
    """Stop accepting VMM connections (the listening sockets stay open: connections wait in
    their backlog for the new side), then wait for handshakes and callbacks in flight."""
    with server._changed:
        for fd in server._listeners:
            server._paused.pop(fd, None)
            with contextlib.suppress(OSError):
                server._epoll.modify(fd, 0)
        if not server._changed.wait_for(
            lambda: not server._pending, max(0.0, deadline - time.monotonic())
        ):
            raise TakeoverError("VMM handshakes in flight did not finish in time")
    _join_callbacks(server, deadline)


def _join_callbacks(server: PageServer, deadline: float) -> None:
    # A fork's on_connect may still be prefetching, a closed window still saving: both belong
    # to this side, and must be done before the state is taken.
    with server._callbacks_lock:
        threads = [t for t in server._callbacks if t.is_alive()]
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise TakeoverError(f"callback {t.name} did not finish in time")


def release(server: PageServer, deadline: float) -> None:
    """Have every worker let its forks go; returns once every live fork is released."""
    sent: dict[int, set[str]] = {}
    with server._changed:
        while True:
            held: dict[Any, list[str]] = {}
            for entry in server._serving.values():
                if entry.state not in FINAL and entry.worker is not None:
                    held.setdefault(entry.worker, []).append(entry.key)
            if not held:
                return
            for worker, keys in held.items():
                for key in keys:
                    server._serving[key].handover = True
                new = [k for k in keys if k not in sent.get(worker.pid, set())]
                if new:  # a replacement after a worker death is asked again
                    sent.setdefault(worker.pid, set()).update(new)
                    worker.send(("release", new))
            left = deadline - time.monotonic()
            if left <= 0:
                raise TakeoverError("the workers did not release their forks in time")
            server._changed.wait(min(left, 0.5))


def export(server: PageServer) -> tuple[dict[str, Any], list[int]]:
    """Every fork (released) and listening socket of ``server``, as JSON and fds."""
    fds: list[int] = []

    def add(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    forks: list[dict[str, Any]] = []
    with server._lock:
        for entry in server._serving.values():
            if entry.state in FINAL:
                continue
            assert entry.ledger is not None and entry.worker is None
            named = {
                "uffd": entry.uffd,
                "conn": entry.conn.fileno() if entry.conn is not None else -1,
                "pidfd": entry.pidfd,
                "ledger": entry.ledger.fd,
            }
            forks.append(
                {
                    "fork": entry.fork_id,
                    "record": entry.record,
                    "ephemeral": entry.ephemeral,
                    "pid": entry.pid,
                    "regions": [[r.base, r.size, r.offset, r.page_size] for r in entry.regions],
                    "record_capacity": entry.record_capacity,
                    "hangup_ends": entry.hangup_ends,
                    "window_reported": entry.window_reported,
                    "socket": entry.socket_path,
                    "fds": {k: add(fd) for k, fd in named.items() if fd >= 0},
                }
            )
        waiting = [
            {"fork": e.fork_id, "record": e.record, "socket": e.socket_path,
             "fd": add(e.listener.fileno())}
            for e in server._forks.values()
            if e.state is ForkState.WAITING and e.listener is not None
        ]  # fmt: skip
        shared = [
            {"path": path, "fd": add(sock.fileno())} for sock, path, _ in server._shared.values()
        ]
        state = {
            "forks": forks,
            "waiting": waiting,
            "shared": shared,
            "next_conn": server._next_conn,
        }
    return state, fds


def readopt(server: PageServer) -> int:
    """The takeover failed: hand every released fork to our own workers again (they wake its
    vCPUs) and accept connections again. Returns how many forks were re-adopted."""
    n = 0
    with server._changed:
        for entry in server._serving.values():
            if entry.state in FINAL:
                continue
            entry.handover = False  # a "released" that comes late changes nothing now
            worker = entry.worker
            if worker is not None:
                # Asked to release it but has not answered: it will, and then take it again
                # from this message, which comes after on the same channel.
                server._hand_to(entry, worker, adopt=True)
                n += 1
                continue
            worker = server._pool.place(pinned_cpu(entry.pid) if entry.pid else None)
            if worker is None:
                # Nobody could serve it here: the policy a dead worker's forks get.
                server._apply_failure_policy(entry, "no worker is left to serve it")
                continue
            server._watch_worker(worker)
            server._hand_to(entry, worker, adopt=True)
            n += 1
        for fd in server._listeners:
            with contextlib.suppress(OSError):
                server._epoll.modify(fd, select.EPOLLIN)
        server._changed.notify_all()
    return n


def abandon(server: PageServer) -> None:
    """The new side serves everything now: forget every fork and socket without ending a fork,
    calling a callback, or removing a socket file (they are the new side's). Then close."""
    with server._lock:
        for entry in list(server._serving.values()):
            entry.close_session()
            entry.connected = False  # no fork_end for it here
        server._serving.clear()
        for entry in server._forks.values():
            entry.socket_path = None  # its socket file is the new side's now
        server._bound.clear()
    server.close()


def adopt(
    server: PageServer,
    state: dict[str, Any],
    fds: list[int],
    record: bool | Callable[[str], bool] | None = None,
) -> int:
    """Serve the forks and listening sockets of ``state`` (from :func:`export`) in ``server``.

    Takes ownership of every fd in ``fds``. Returns how many live forks were adopted.
    """
    taken: set[int] = set()

    def fd_at(index: object) -> int:
        if not isinstance(index, int) or not 0 <= index < len(fds) or index in taken:
            raise TakeoverError(f"bad fd index {index!r} in the state")
        taken.add(index)
        return fds[index]

    adopted = 0
    try:
        with server._changed:
            for spec in state["forks"]:
                got = {name: fd_at(i) for name, i in spec["fds"].items() if name in _FD_NAMES}
                entry = _Fork(
                    str(spec["fork"]),
                    record=bool(spec["record"]),
                    state=ForkState.ADOPTING,
                    ephemeral=bool(spec["ephemeral"]),
                )
                entry.key = f"{entry.fork_id}#{next(server._serial)}"
                entry.uffd = got["uffd"]
                entry.pidfd = got.get("pidfd", -1)
                if "conn" in got:
                    entry.conn = socket.socket(fileno=got["conn"])
                entry.pid = spec["pid"]
                entry.regions = [Region(*r) for r in spec["regions"]]
                entry.record_capacity = int(spec["record_capacity"])
                entry.hangup_ends = bool(spec["hangup_ends"])
                entry.window_reported = bool(spec["window_reported"])
                entry.connected = True
                entry.socket_path = spec.get("socket")
                try:
                    entry.ledger = L.Ledger.adopt(got["ledger"], entry.record_capacity)
                except Exception as exc:
                    raise TakeoverError(f"fork {entry.fork_id}: its ledger: {exc}") from None
                if entry.socket_path is not None:
                    server._note_ours(entry.socket_path)
                worker = server._pool.place(pinned_cpu(entry.pid) if entry.pid else None)
                if worker is None:
                    raise TakeoverError("no worker process is left to serve the forks")
                server._forks[entry.fork_id] = entry
                server._serving[entry.key] = entry
                server._watch_worker(worker)
                server._hand_to(entry, worker, adopt=True)
                adopted += 1
            for spec in state["waiting"]:
                sock = socket.socket(fileno=fd_at(spec["fd"]))
                entry = _Fork(str(spec["fork"]), record=bool(spec["record"]), listener=sock)
                entry.socket_path = spec["socket"]
                server._note_ours(spec["socket"])
                server._forks[entry.fork_id] = entry
                server._listeners[sock.fileno()] = entry
                server._epoll.register(sock.fileno(), select.EPOLLIN)
            for spec in state["shared"]:
                sock = socket.socket(fileno=fd_at(spec["fd"]))
                server._note_ours(spec["path"])
                server._shared[sock.fileno()] = (sock, spec["path"], record)
                server._listeners[sock.fileno()] = None
                server._epoll.register(sock.fileno(), select.EPOLLIN)
            server._next_conn = max(server._next_conn, int(state["next_conn"]))
            server._changed.notify_all()
    finally:
        close_all([fd for i, fd in enumerate(fds) if i not in taken])
    return adopted
