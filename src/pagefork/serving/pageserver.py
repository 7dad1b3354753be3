"""The page server: a supervisor and its worker processes, serving forks of one mem-file.

:class:`PageServer` is what callers use. It opens the mem-file once (its zero-page index is
built here and shared with the workers through a memfd) and starts the supervisor
(:mod:`pagefork.serving.supervisor`), which owns every fork socket and each fork's state, does
the handshakes in one event loop, and hands each fork to the least-loaded worker process
(:mod:`pagefork.serving.worker`), which serves the fork's faults from one event loop over
every uffd it has. The supervisor keeps its own copy of each fork's uffd, VMM connection, VMM
pidfd and ledger (:mod:`pagefork.serving.ledger`), so when a worker dies, or stops answering,
it hands every orphaned fork, with its full state, to a replacement, which wakes the fork's
vCPUs and serves on: nothing is lost.

Forks are registered by id (:meth:`PageServer.register_fork` gives each a 0600 Unix socket), or
arrive on a shared socket (:meth:`PageServer.listen`, what ``pagefork serve`` uses). Every
public method is safe to call from any thread while faults are served. A live takeover moves
every fork to another process through :meth:`PageServer.export` and :meth:`PageServer.adopt`
(:mod:`pagefork.serving.handover`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from pagefork.errors import ForkError, PageforkError, TemplateError
from pagefork.hotpages import HotPage, HotPageList
from pagefork.layers.source import LayeredView, removed_file_ranges
from pagefork.memfile import MemFile
from pagefork.prefetch import PrefetchResult
from pagefork.regions import Region
from pagefork.serving import messages as M
from pagefork.serving.config import ServerConfig, check_config
from pagefork.serving.forks import Callback, ForkRecord
from pagefork.serving.handover import Handover
from pagefork.serving.handshakes import RecordRule
from pagefork.serving.pool import WorkerPool, usable_cpus
from pagefork.serving.sockets import (
    FD_SLOTS_AT_START,
    bind_private_socket,
    has_pending,
    reserve_fd_slots,
    validate_fork_id,
)
from pagefork.serving.state import Event
from pagefork.serving.supervisor import Supervisor
from pagefork.stats import ForkStats, percentiles_us
from pagefork.store.layout import is_s3_url
from pagefork.store.lazy import LazyTemplate, open_mem_source

log = logging.getLogger("pagefork")


def _open_template(config: ServerConfig) -> MemFile | LazyTemplate | LayeredView:
    # The supervisor never maps the file: only workers read it (through the kernel's copy).
    # With layers, a composite view of the chain (pagefork.layers.source) stands in for it;
    # an s3:// template is a lazy view filled chunk by chunk (pagefork.store.lazy).
    if config.layers:
        if is_s3_url(config.mem_file_path):
            raise TemplateError(
                f"{config.mem_file_path}: layers over a template in object storage are not "
                "served; flatten the chain first"
            )
        return LayeredView(config.mem_file_path, config.layers)
    return open_mem_source(config.mem_file_path, config.store)


def _start_pool(config: ServerConfig, memfile: MemFile | LazyTemplate | LayeredView) -> WorkerPool:
    lazy = memfile if isinstance(memfile, LazyTemplate) else None
    cpus = usable_cpus()
    count = len(cpus) if config.workers == "auto" else int(config.workers)
    return WorkerPool(
        count,
        memfile.fd,
        memfile.size,
        memfile.zero_index_fd(),
        spare=config.spare_worker,
        # One worker per CPU, each with that CPU as its home: a fork whose VMM is pinned is
        # served by the worker of its CPU (pinned there with pin_workers).
        cpus=cpus if count == len(cpus) else None,
        pin=config.pin_workers,
        layout_fds=memfile.layout_fds() if isinstance(memfile, LayeredView) else (),
        lazy=(lazy.presence_fd, lazy.chunk_size) if lazy is not None else None,
    )


class PageServer:
    """Serves forks of one template mem-file over Firecracker's UFFD protocol, on worker
    processes supervised by this object."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        check_config(config)
        if config.socket_dir is not None and not os.path.isdir(config.socket_dir):
            raise ForkError(f"socket directory {config.socket_dir} does not exist")
        self.memfile = _open_template(config)
        try:
            pool = _start_pool(config, self.memfile)
        except BaseException:
            self.memfile.close()
            raise
        # Before the supervisor's thread starts: with one thread, growing the fd table waits
        # for nothing, and the forks' fds (handshakes, a takeover's state) then never grow it.
        reserve_fd_slots(FD_SLOTS_AT_START)
        self._sup = Supervisor(config, self.memfile, pool)
        self._table = self._sup.table
        self._handover = Handover(self._sup)

    # --- registration ------------------------------------------------------------------------
    def register_fork(self, fork_id: str, record: bool | None = None) -> str:
        """Create the fork's socket (mode 0600 in ``socket_dir``) and return its path.

        ``record`` overrides ``ServerConfig.record_hot_pages`` for this fork.
        """
        validate_fork_id(fork_id)
        if self.config.socket_dir is None:
            raise ForkError("register_fork needs ServerConfig.socket_dir")
        path = os.path.join(self.config.socket_dir, f"{fork_id}.sock")
        with self._table.lock:
            self._check_open()
            if fork_id in self._table.by_id:
                raise ForkError(f"fork {fork_id} is already registered")
            sock = bind_private_socket(path)
            entry = ForkRecord(
                fork_id,
                record=self.config.record_hot_pages if record is None else record,
                socket_path=path,
            )
            self._table.by_id[fork_id] = entry
            self._sup.handshakes.add_fork_listener(entry, sock)
        return path

    def listen(self, path: str, record: RecordRule = None) -> None:
        """Accept any number of forks on one socket at ``path`` (ids ``fork-1``, ``fork-2``...).

        ``record`` decides per fork whether it records hot pages (default: the config's).
        """
        with self._table.lock:
            self._check_open()
            sock = bind_private_socket(path)
            self._sup.handshakes.add_shared(sock, path, record)

    def unregister_fork(self, fork_id: str) -> None:
        """Stop serving the fork, close its uffd and connection, remove its socket.

        An unknown id is a no-op.
        """
        with self._table.changed:
            entry = self._table.by_id.pop(fork_id, None)
            if entry is None:
                return
            self._sup.handshakes.drop_fork(entry)
            self._sup.prefetcher.forget(fork_id)
            commands = self._table.move(entry, Event.UNREGISTERED)
            callbacks = self._sup.carry_out(entry, commands)
            if not entry.final:  # its worker ends it; or its death does
                self._table.changed.wait_for(lambda: entry.final, 10.0)
        self._sup.callbacks.run(callbacks)

    def _check_open(self) -> None:
        if self._sup.closed:
            raise PageforkError("page server is closed")

    def _get(self, fork_id: str) -> ForkRecord:
        with self._table.lock:
            entry = self._table.by_id.get(fork_id)
        if entry is None:
            raise ForkError(f"unknown fork {fork_id!r}")
        return entry

    # --- queries -----------------------------------------------------------------------------
    def forks(self) -> list[str]:
        """Ids of the forks registered or connected now."""
        with self._table.lock:
            return list(self._table.by_id)

    def worker_pids(self) -> list[int]:
        """Process ids of the workers serving now (the spare not included)."""
        with self._table.lock:
            return [w.pid for w in self._sup.pool.live()]

    def answering_worker_pids(self) -> list[int]:
        """Process ids of the serving workers that answer their heartbeat now: the ones new
        forks may be placed on (one that stops answering is killed and replaced soon)."""
        with self._table.lock:
            return [w.pid for w in self._sup.pool.live() if w.answering]

    def spare_pid(self) -> int | None:
        """Process id of the spare worker, or None when there is none now."""
        with self._table.lock:
            spare = self._sup.pool.spare
            return spare.pid if spare is not None else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every worker (the spare too) has mapped the mem-file and serves, and
        has carried out what it was told to do should this process die (its start-up is then
        paid in full: nothing of it competes for CPU with the faults served later).

        Forks are accepted before that (their faults wait for the worker), so this is only for
        callers that want start-up fully paid before they measure or announce anything.
        """
        with self._table.changed:
            workers = self._sup.pool.all_processes()
            if not workers:
                raise PageforkError("no worker process could be started")

            def settled() -> bool:
                return all(
                    (w.ready.is_set() and w.prepared.is_set()) or not w.alive for w in workers
                )

            if not self._table.changed.wait_for(settled, timeout):
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

    def _wait_connected(self, fork_id: str, timeout: float) -> ForkRecord:
        entry = self._get(fork_id)
        deadline = time.monotonic() + timeout
        with self._table.changed:
            while True:
                if entry.connected:
                    return entry
                if entry.handshake_failed is not None and not has_pending(entry.listener):
                    # Say why now rather than at the timeout; the VMM may retry later. (A retry
                    # already waiting to be accepted is waited for instead.)
                    raise ForkError(f"fork {fork_id}: handshake: {entry.handshake_failed}")
                if entry.final:
                    raise ForkError(f"fork {fork_id}: {entry.error or 'session ended'}")
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f" (last error: {entry.last_error})" if entry.last_error else ""
                    raise ForkError(f"fork {fork_id}: no handshake within {timeout:g}s{why}")
                self._table.changed.wait(left)

    def wait_ended(self, fork_id: str, timeout: float = 10.0) -> ForkStats:
        """Wait until the fork's session has ended (VMM gone, failure, or stop); its stats."""
        entry = self._wait_connected(fork_id, timeout)
        with self._table.changed:
            if not self._table.changed.wait_for(lambda: entry.final, timeout):
                raise ForkError(f"fork {fork_id}: still serving after {timeout:g}s")
            assert entry.final_stats is not None
            return entry.final_stats

    def stats(self, fork_id: str) -> ForkStats:
        """Counters and latency percentiles of one fork."""
        entry = self._get(fork_id)
        with self._table.lock:
            stats, samples = self._table.counters_of(entry)
        if samples:  # sorting a window of 64k samples takes ms: not under the lock
            stats.latency_us = percentiles_us(samples)
        return stats

    def fault_latencies_ns(self, fork_id: str) -> list[int]:
        """The fork's recent fault-service latencies in nanoseconds (for histograms)."""
        entry = self._get(fork_id)
        with self._table.lock:
            if entry.ledger is not None:
                return entry.ledger.latencies()
            return list(entry.final_latencies)

    def removed_ranges(self, fork_id: str) -> list[tuple[int, int]]:
        """The mem-file byte ranges ``[start, end)`` the fork's guest removed (they read zero
        in the fork), merged and in order: what a snapshot of the fork marks as zero."""
        entry = self._get(fork_id)
        with self._table.lock:
            ranges = list(entry.ledger.removed()) if entry.ledger is not None else []
            regions = list(entry.regions)
        return removed_file_ranges(ranges, regions)

    def hot_pages(self, fork_id: str) -> HotPageList:
        """The pages the fork faulted on demand, in first-touch order (it must be recording)."""
        entry = self._get(fork_id)
        if not entry.record:
            raise ForkError(f"fork {fork_id} is not recording hot pages")
        with self._table.lock:
            return self._table.hot_of(entry)

    def prefetch(
        self,
        fork_id: str,
        hot_pages: HotPageList | Sequence[HotPage],
        timeout: float = 10.0,
        head: int | None = None,
    ) -> PrefetchResult:
        """Install ``hot_pages`` into the fork before its guest runs.

        Waits for the fork's handshake (up to ``timeout``), validates the whole list against
        the fork's regions (:class:`PrefetchError` naming the first bad entry, nothing
        installed), then the fork's worker copies it in coalesced runs. Safe to race the
        fork's own faults. If the worker dies meanwhile, its replacement runs the prefetch
        again (installing a page twice is harmless: the kernel says EEXIST).

        ``head`` streams it: this returns once the first ``head`` hot pages (first-touch
        order) are in, with the result so far, so the caller can resume the guest at once;
        the worker installs the rest while the guest runs, serving the guest's faults ahead
        of it. :meth:`stream_result` gives the whole result.
        """
        entry = self._wait_connected(fork_id, timeout)
        return self._sup.prefetcher.prefetch(entry, hot_pages, timeout, head)

    def prefetch_at_handshake(
        self,
        fork_id: str,
        hot_pages: HotPageList | Sequence[HotPage],
        timeout: float = 10.0,
        head: int | None = None,
    ) -> None:
        """Arm a prefetch of ``hot_pages`` for a registered fork: its worker starts installing
        the moment the fork's handshake is in (at once if it is in already), overlapping the
        VMM's restore, rather than when a caller woken by the handshake asks. Then
        :meth:`prefetch` with the same list waits for it and returns its result (a list that
        does not fit the fork's regions fails there, nothing installed)."""
        self._sup.prefetcher.arm(self._get(fork_id), hot_pages, timeout, head)

    def stream_result(self, fork_id: str, timeout: float = 10.0) -> PrefetchResult | None:
        """Wait for the streamed prefetch of ``fork_id`` to finish: the whole result
        (``streamed`` and ``raced`` say what happened after the head), or None if no
        prefetch streamed into it. :class:`PrefetchError` if it failed."""
        return self._sup.prefetcher.stream_result(fork_id, timeout)

    def plans_cached(self) -> int:
        """How many prefetch plans are cached (one per hot set and region layout)."""
        return self._sup.prefetcher.plans_cached()

    def plans_made(self) -> int:
        """How many prefetch plans this server has made (one per hot set and region layout,
        unless one was evicted from the cache and needed again)."""
        return self._sup.prefetcher.plans_made()

    def prepare_prefetch(self) -> None:
        """Get prefetch planning ready now (numpy and the host's copy costs, once per
        process): call it when a hot set is recorded or loaded, or will be, so that no fork
        waits for it."""
        self._sup.prefetcher.prepare()

    # --- a live takeover (pagefork.serving.handover) -------------------------------------------
    def all_worker_pids(self) -> list[int]:
        """Every worker process, the spare included."""
        return self._handover.worker_pids()

    def quiesce(self, deadline: float) -> None:
        """Stop accepting VMM connections; wait for handshakes and callbacks in flight."""
        self._handover.quiesce(deadline)

    def release(self, deadline: float) -> None:
        """Have every worker let its forks go (their ledgers final) by ``deadline``."""
        self._handover.release(deadline)

    def export(self) -> tuple[dict[str, Any], list[int]]:
        """Every released fork and listening socket, as JSON and fds (still ours)."""
        return self._handover.export()

    def readopt(self) -> int:
        """The takeover failed: our workers serve the released forks again; how many."""
        return self._handover.readopt()

    def abandon(self) -> None:
        """The new side serves everything now: forget every fork and socket without ending
        a fork or removing a socket file, then close."""
        self._handover.abandon()
        self.close()

    def adopt(self, state: dict[str, Any], fds: list[int], record: RecordRule = None) -> int:
        """Serve the forks and sockets another process exported; how many live forks."""
        return self._handover.adopt(state, fds, record)

    def keep_forks_if_killed(self, setup: dict[str, Any]) -> None:
        """Have every worker, now and later, serve on if this process dies, and hand its forks
        to the next supervisor as ``setup`` says: its ``handler`` names the module a worker
        imports to do so (:mod:`pagefork.takeover.orphan`), the rest is that module's."""
        message = M.OrphanSetup(str(setup["handler"]), json.dumps(setup))
        with self._table.lock:
            self._sup.pool.keep_forks_if_killed(message)

    def _debug_crash_worker_at(
        self, fork_id: str, point: str, count: int = 1, stop: bool = False
    ) -> int:
        """Tests only: make the worker serving ``fork_id`` SIGKILL itself (SIGSTOP, with
        ``stop``) when it reaches ``point`` for the ``count``-th time (``fault_read``,
        ``remove_noted``, ``recorded``, ``prefetch``, ``stream``: a streamed prefetch's head is
        in, ``parked``: a lazy template's fault waits for its chunk). Returns that worker's
        pid."""
        return self._sup.crash_worker_at(self._get(fork_id), point, count, stop)

    # --- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every fork and worker, join every thread, remove every socket; idempotent."""
        sup = self._sup
        with self._table.lock:
            if sup.closed:
                return
            sup.closed = True
        sup.wake_and_join()
        with self._table.lock:
            for entry in list(self._table.by_id.values()):
                sup.handshakes.drop_fork(entry)
            sup.handshakes.drop_all()
            sup.handshakes.close_shared()
        sup.pool.stop()  # workers exit when their channel closes; forks stop being served
        callbacks: list[Callback] = []
        with self._table.lock:
            for entry in list(self._table.by_key.values()):
                callbacks += sup.carry_out(entry, self._table.move(entry, Event.CLOSED))
            self._table.by_id.clear()
        for fn, args in callbacks:
            try:
                fn(*args)
            except Exception:
                log.exception("callback %s failed", getattr(fn, "__name__", fn))
        sup.callbacks.join()
        sup.release_fds()
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
