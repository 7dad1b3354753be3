"""The supervisor's fork table: one record per fork, moved only by the lifecycle table.

:class:`ForkTable` holds every :class:`ForkRecord` (by id, what callers name; by key, what the
worker channel names) under the supervisor's one lock. :meth:`ForkTable.move` applies an event
through :data:`pagefork.serving.state.SUPERVISOR_TABLE` and returns the commands the supervisor
must carry out: the table decides, the supervisor does the I/O. What a fork reports (its
counters, hot pages, final figures) is read here too. :class:`Callbacks` runs user callbacks
off the loop's thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagefork.hotpages import HotPageList
from pagefork.regions import Region
from pagefork.serving import ledger as L
from pagefork.serving.pool import WorkerProcess
from pagefork.serving.state import (
    FINAL_STAGES,
    SHOWN,
    Command,
    Event,
    ForkState,
    Stage,
    step,
)
from pagefork.stats import ForkStats, percentiles_us

log = logging.getLogger("pagefork")

#: A user callback and its arguments.
Callback = tuple[Callable[..., None], tuple[Any, ...]]


@dataclass(eq=False)
class ForkRecord:
    """Everything the supervisor knows of one fork; ``stage`` moves only by
    :meth:`ForkTable.move`."""

    fork_id: str
    record: bool
    key: str = ""
    stage: Stage = Stage.WAITING
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
    #: Times it moved to the worker next to its VMM (pagefork.serving.following).
    moves: int = 0
    #: Its handshake once completed (its end is then reported to ``on_fork_end``).
    connected: bool = False
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

    @property
    def state(self) -> ForkState:
        """What the API shows of its stage."""
        return SHOWN[self.stage]

    @property
    def final(self) -> bool:
        """True once it is never served again."""
        return self.stage in FINAL_STAGES

    def apply_failure_policy(self, on_failure: str, why: str) -> None:
        """Kill the fork's VMM (``on_failure="kill"``): a guest nobody serves would hang
        forever. Or only say why it is left."""
        if on_failure == "kill" and self.pidfd >= 0:
            # Only through the pidfd taken at accept: a bare pid may be another process's now.
            log.error("fork %s: %s; killing VMM pid %s", self.fork_id, why, self.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        else:
            log.error("fork %s: %s; closing its connection", self.fork_id, why)

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


class ForkTable:
    """Every fork of one page server, under its lock (``changed`` is notified on each move)."""

    def __init__(self, on_fork_end: Callable[[str, ForkStats], None] | None) -> None:
        self.lock = threading.Lock()
        #: Notified whenever a fork moves or a prefetch answer arrives.
        self.changed = threading.Condition(self.lock)
        self.by_id: dict[str, ForkRecord] = {}  # what callers can name
        self.by_key: dict[str, ForkRecord] = {}  # forks a worker holds or held: the channel's
        self.serial = itertools.count(1)
        self.next_conn = 0
        self._on_fork_end = on_fork_end

    def move(self, entry: ForkRecord, event: Event) -> tuple[Command, ...]:
        """Apply ``event`` to ``entry`` (lock held); the commands to carry out."""
        entry.stage, commands = step(entry.fork_id, entry.stage, event)
        self.changed.notify_all()
        return commands

    def new_key(self, entry: ForkRecord) -> None:
        """A fresh channel name for ``entry``'s session (one per connection)."""
        entry.key = f"{entry.fork_id}#{next(self.serial)}"

    def next_ephemeral_id(self) -> str:
        """An id for a fork on a shared socket, never one a registered fork has."""
        while True:
            self.next_conn += 1
            fork_id = f"fork-{self.next_conn}"
            if fork_id not in self.by_id:
                return fork_id

    def held_by(self, worker: WorkerProcess) -> list[ForkRecord]:
        """The forks ``worker`` holds (lock held)."""
        return [e for e in self.by_key.values() if e.worker is worker and not e.final]

    # --- what a fork reports (lock held) ------------------------------------------------
    def counters_of(self, entry: ForkRecord) -> tuple[ForkStats, list[int]]:
        """The fork's counters and its latency samples (the ledger may close otherwise)."""
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
            moves=entry.moves,
            **{name: int(c[slot]) for name, slot in L.COUNTERS.items()},
        )
        return stats, ledger.latencies()

    def hot_of(self, entry: ForkRecord) -> HotPageList:
        """The pages the fork recorded, in first-touch order."""
        if entry.final_hot is not None:
            return entry.final_hot
        if entry.ledger is None:
            return HotPageList()
        rec = entry.ledger.recorded()
        return HotPageList.from_pages([(r, o) for r, o, _ in rec], [t / 1e9 for _, _, t in rec])

    def report_window(
        self, entry: ForkRecord, cb: Callable[[str, HotPageList], None] | None
    ) -> list[Callback]:
        """The recording window closed: hand its list to ``cb`` once."""
        if entry.window_reported or not entry.record:
            return []
        entry.window_reported = True
        hot = self.hot_of(entry)
        return [(cb, (entry.fork_id, hot))] if cb is not None else []

    def finish(
        self,
        entry: ForkRecord,
        error: str | None,
        on_window: Callable[[str, HotPageList], None] | None,
    ) -> list[Callback]:
        """The fork has ended: keep its final figures, close what it held."""
        if entry.ledger is not None and entry.record:
            entry.final_hot = self.hot_of(entry)  # read once, for the window and for later
        callbacks = self.report_window(entry, on_window) if entry.ledger is not None else []
        entry.error = error
        if error is not None:
            entry.last_error = error
        stats, samples = self.counters_of(entry)
        if samples:
            stats.latency_us = percentiles_us(samples)
        entry.final_latencies = samples
        entry.final_stats = stats
        entry.close_session()
        self.by_key.pop(entry.key, None)
        if entry.ephemeral and self.by_id.get(entry.fork_id) is entry:
            del self.by_id[entry.fork_id]
        if self._on_fork_end is not None and entry.connected:
            callbacks.append((self._on_fork_end, (entry.fork_id, stats)))
        self.changed.notify_all()
        return callbacks


class Callbacks:
    """Runs user callbacks one after another on a thread of their own (off the loop, and in
    order: a fork's window is reported before its end); :meth:`join` waits for them all."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def run(self, callbacks: list[Callback]) -> None:
        """Start a thread that runs ``callbacks`` in order (nothing for an empty list)."""
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
        with self._lock:
            self._threads = [c for c in self._threads if c.is_alive()]
            self._threads.append(t)
        t.start()

    def running(self) -> list[threading.Thread]:
        """The callback threads still running."""
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def join(self) -> None:
        """Wait for every callback thread."""
        with self._lock:
            threads, self._threads = self._threads, []
        for t in threads:
            t.join()
