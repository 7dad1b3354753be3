"""A page server's half of a live takeover: its forks out of this process, or into it.

Old side, in order: :meth:`Handover.quiesce` (stop accepting VMM connections, let handshakes
and callbacks in flight finish), :meth:`Handover.release` (every worker lets its forks go,
ledgers final), :meth:`Handover.export` (each fork's state and fds). Then either
:meth:`Handover.abandon` (the new side serves them: drop our copies without ending any fork or
removing any socket) or :meth:`Handover.readopt` (the takeover failed: our workers adopt the
forks again and we accept again). New side: :meth:`Handover.adopt` takes the exported forks and
listeners; its workers wake each fork's vCPUs (``UFFDIO_WAKE``) and serve on.

The state is plain JSON with fds named by index (the takeover protocol carries both).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from pagefork.errors import PageforkError
from pagefork.regions import Region
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.forks import ForkRecord
from pagefork.serving.handshakes import RecordRule
from pagefork.serving.pool import WorkerProcess
from pagefork.serving.state import Command, Event, Stage
from pagefork.serving.supervisor import Supervisor

#: What a fork's state carries, by field; fds are named in ``fds`` (indexes into the batch).
_FD_NAMES = ("uffd", "conn", "pidfd", "ledger")


class HandoverError(PageforkError):
    """A takeover step of the page server could not be done (what, and why)."""


class Handover:
    """The takeover steps of one page server (see the module's docstring for the order)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def worker_pids(self) -> list[int]:
        """Every worker process, the spare included."""
        with self._sup.lock:
            return [w.pid for w in self._sup.pool.all_processes()]

    def quiesce(self, deadline: float) -> None:
        """Stop accepting VMM connections (they wait in the backlogs for the new side), then
        wait for handshakes and callbacks in flight."""
        sup = self._sup
        with sup.changed:
            sup.handshakes.stop_accepting()
            left = max(0.0, deadline - time.monotonic())
            if not sup.changed.wait_for(lambda: not sup.handshakes.pending, left):
                raise HandoverError("VMM handshakes in flight did not finish in time")
        # A fork's on_connect may still be prefetching, a closed window still saving: both
        # belong to this side, and must be done before the state is taken.
        for t in sup.callbacks.running():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise HandoverError(f"callback {t.name} did not finish in time")

    def release(self, deadline: float) -> None:
        """Have every worker let its forks go; returns once every live fork is released."""
        sup = self._sup
        asked: dict[str, WorkerProcess] = {}
        with sup.changed:
            while True:
                held = [e for e in sup.table.by_key.values() if e.worker is not None]
                held = [e for e in held if not e.final]
                if not held:
                    return
                # One Release per worker, naming all its forks: the forks wait for this, and
                # one message per fork would be as many round trips and wake-ups here.
                batches: dict[WorkerProcess, list[str]] = {}
                for entry in held:
                    worker = entry.worker
                    assert worker is not None
                    if entry.stage is not Stage.RELEASING:
                        commands = sup.table.move(entry, Event.RELEASE_ASKED)
                        if Command.SEND_RELEASE in commands:
                            batches.setdefault(worker, []).append(entry.key)
                        sup.carry_out(
                            entry, tuple(c for c in commands if c is not Command.SEND_RELEASE)
                        )
                    elif asked.get(entry.key) is not worker:
                        # Adopted by a replacement after a worker death: ask that one.
                        batches.setdefault(worker, []).append(entry.key)
                    asked[entry.key] = worker
                for worker, keys in batches.items():
                    worker.send(M.Release(tuple(keys)))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HandoverError("the workers did not release their forks in time")
                sup.changed.wait(min(left, 0.5))

    def export(self) -> tuple[dict[str, Any], list[int]]:
        """Every released fork and every listening socket, as JSON and fds."""
        sup = self._sup
        fds: list[int] = []

        def add(fd: int) -> int:
            fds.append(fd)
            return len(fds) - 1

        with sup.lock:
            forks = [
                _fork_state(entry, add)
                for entry in sup.table.by_key.values()
                if entry.stage is Stage.RELEASED
            ]
            waiting = [
                {"fork": e.fork_id, "record": e.record, "socket": e.socket_path,
                 "fd": add(e.listener.fileno())}
                for e in sup.table.by_id.values()
                if e.stage is Stage.WAITING and e.listener is not None
            ]  # fmt: skip
            shared = [
                {"path": path, "fd": add(sock.fileno())}
                for sock, path, _ in sup.handshakes.shared.values()
            ]
            state = {
                "forks": forks,
                "waiting": waiting,
                "shared": shared,
                "next_conn": sup.table.next_conn,
            }
        return state, fds

    def readopt(self) -> int:
        """The takeover failed: hand every released fork to our own workers again (they wake
        its vCPUs) and accept connections again. Returns how many forks were re-adopted."""
        sup = self._sup
        n = 0
        with sup.changed:
            for entry in list(sup.table.by_key.values()):
                if entry.stage not in (Stage.RELEASING, Stage.RELEASED):
                    continue
                # Asked to release it but not answered: it will, then take it again from this
                # message, which comes after on the same channel.
                worker = entry.worker or sup.place(entry)
                if worker is None:
                    # Nobody could serve it here: the policy a dead worker's forks get.
                    entry.apply_failure_policy(
                        sup.config.on_failure, "no worker is left to serve it"
                    )
                    continue
                sup.carry_out(entry, sup.table.move(entry, Event.READOPTED), worker=worker)
                n += 1
            sup.handshakes.resume_accepting()
            sup.changed.notify_all()
        return n

    def abandon(self) -> None:
        """The new side serves everything now: forget every fork and socket without ending a
        fork, calling a callback, or removing a socket file (they are the new side's)."""
        sup = self._sup
        with sup.lock:
            for entry in list(sup.table.by_key.values()):
                entry.close_session()
                entry.connected = False  # no fork_end for it here
            sup.table.by_key.clear()
            for entry in sup.table.by_id.values():
                entry.socket_path = None  # its socket file is the new side's now
            sup.handshakes.files.forget_all()

    def adopt(self, state: dict[str, Any], fds: list[int], record: RecordRule = None) -> int:
        """Serve the forks and listening sockets of ``state`` (from :meth:`export`).

        Takes ownership of every fd in ``fds``. Returns how many live forks were adopted.
        """
        sup = self._sup
        taken: set[int] = set()

        def fd_at(index: object) -> int:
            if not isinstance(index, int) or not 0 <= index < len(fds) or index in taken:
                raise HandoverError(f"bad fd index {index!r} in the state")
            taken.add(index)
            return fds[index]

        placed: list[tuple[ForkRecord, WorkerProcess]] = []
        try:
            with sup.changed:
                # Every fork is made ready first, and only then are they handed to the workers,
                # one message after another: the first fork handed resumes its guest, which
                # competes for the CPU with the preparation of the forks still waiting.
                for spec in state["forks"]:
                    got = {n: fd_at(i) for n, i in spec["fds"].items() if n in _FD_NAMES}
                    entry = _adopted_fork(spec, got)
                    sup.table.new_key(entry)
                    if entry.socket_path is not None:
                        sup.handshakes.files.note(entry.socket_path)
                    worker = sup.place(entry)
                    if worker is None:
                        entry.close_session()
                        raise HandoverError("no worker process is left to serve the forks")
                    sup.table.by_id[entry.fork_id] = entry
                    sup.table.by_key[entry.key] = entry
                    worker.forks.add(entry.key)  # counted now: the next fork goes round
                    placed.append((entry, worker))
                for entry, worker in placed:
                    sup.hand_to(entry, worker, adopt=True)
                for spec in state["waiting"]:
                    sock = socket.socket(fileno=fd_at(spec["fd"]))
                    entry = ForkRecord(str(spec["fork"]), record=bool(spec["record"]))
                    entry.socket_path = spec["socket"]
                    sup.table.by_id[entry.fork_id] = entry
                    sup.handshakes.add_fork_listener(entry, sock)
                for spec in state["shared"]:
                    sock = socket.socket(fileno=fd_at(spec["fd"]))
                    sup.handshakes.add_shared(sock, spec["path"], record)
                sup.table.next_conn = max(sup.table.next_conn, int(state["next_conn"]))
                sup.changed.notify_all()
        finally:
            for i, fd in enumerate(fds):
                if i not in taken:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        return len(placed)


def _fork_state(entry: ForkRecord, add: Callable[[int], int]) -> dict[str, Any]:
    """One released fork as JSON, its fds added to the batch."""
    assert entry.ledger is not None and entry.worker is None
    named = {
        "uffd": entry.uffd,
        "conn": entry.conn.fileno() if entry.conn is not None else -1,
        "pidfd": entry.pidfd,
        "ledger": entry.ledger.fd,
    }
    return {
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


def _adopted_fork(spec: dict[str, Any], got: dict[str, int]) -> ForkRecord:
    """A fork record from its exported state and its fds (it adopts them)."""
    entry = ForkRecord(
        str(spec["fork"]),
        record=bool(spec["record"]),
        stage=Stage.ADOPTING,
        ephemeral=bool(spec["ephemeral"]),
    )
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
        entry.close_session()
        raise HandoverError(f"fork {entry.fork_id}: its ledger: {exc}") from None
    return entry
