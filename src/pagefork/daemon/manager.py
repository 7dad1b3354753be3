"""The fork lifecycle: one page server per template, and the hot-page loop around it.

A fork goes register → (driver) restore → prefetch → resume → ... → release. The template's
:class:`~pagefork.server.PageServer` starts with its first fork and stops after its last.
:class:`ForkManager` is the one door the API, the CLI and a takeover use; behind it, each part
does one thing over the tables they share (:class:`~pagefork.daemon.holdings.Holdings`):

- :mod:`~pagefork.daemon.creating`: a fork's id, its driver's options, and its VMM's start;
- :mod:`~pagefork.daemon.servers`: each template's page server, and a fork's registration;
- :mod:`~pagefork.daemon.hotsets`: the hot-page loop (warm-up, prefetch, demand) and prefetch;
- :mod:`~pagefork.daemon.releasing`: a VMM's exit, watched through its pidfd, and release;
- :mod:`~pagefork.daemon.fork_snapshots`: a fork's snapshots, a diff chain of child templates;
- :mod:`~pagefork.daemon.handover`: what a live takeover exports and adopts.

A fork's record moves only through the daemon's lifecycle table
(:mod:`~pagefork.daemon.lifecycle`). :meth:`ForkManager.rerecord` makes the next fork a warm-up
again; until its hot set is saved, other forks keep prefetching the old one.

Slow work never holds the manager's lock: a template's page server (which maps and scans the
whole mem-file) starts outside it, so other templates and other requests go on meanwhile; a
second fork of the same template waits for that start only. A template's live forks are the
forks held here (:meth:`ForkManager.live_forks_of`), never a stored count.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from pagefork.daemon.config import ManagerConfig, PrefetchPolicy
from pagefork.daemon.creating import (
    MAX_FORK_ID,
    MAX_SOCKET_PATH,
    ForkCreator,
    check_socket_dir,
    fork_id_room,
)
from pagefork.daemon.fork import (
    DriverOptionsError,
    Fork,
    ForkConflictError,
    ForkRole,
    TemplateKey,
    UnknownForkError,
    journal_record,
)
from pagefork.daemon.fork_snapshots import ForkSnapshots
from pagefork.daemon.handover import ManagerHandover
from pagefork.daemon.holdings import Holdings, Hooks
from pagefork.daemon.hotsets import HotSets
from pagefork.daemon.journal import ForkJournal, SocketJournal
from pagefork.daemon.lifecycle import (
    FORK_STATES,
    DaemonEvent,
    ForkPhase,
    ForkStateWord,
)
from pagefork.daemon.releasing import ForkReleaser, new_latency_samples
from pagefork.daemon.servers import TemplateServers
from pagefork.daemon.snapshot import SnapshotResult
from pagefork.errors import ForkError, PageforkError, StoreError, TemplateError
from pagefork.hotpages import HotPageList
from pagefork.server import PageServer
from pagefork.stats import ForkStats
from pagefork.store.template import fetch_pushed
from pagefork.templates import (
    TemplateFieldError,
    TemplateRecord,
    TemplateRegistry,
    validate_template_id,
)
from pagefork.vmm.base import VmmDriver

log = logging.getLogger("pagefork")

#: Drivers the daemon offers by name, loaded when their module is importable.
DRIVER_CLASSES = {
    "firecracker": ("pagefork.vmm.firecracker", "FirecrackerDriver"),
    "kvm": ("pagefork.vmm.kvm.driver", "KvmDriver"),
}


def load_drivers() -> dict[str, VmmDriver]:
    """An instance of every known driver whose module imports (a missing one is skipped)."""
    drivers: dict[str, VmmDriver] = {}
    for name, (module_name, class_name) in DRIVER_CLASSES.items():
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
            driver = cls()
        except (ImportError, AttributeError, TypeError, PageforkError) as exc:
            log.info("VMM driver %s unavailable: %s", name, exc)
            continue
        if isinstance(driver, VmmDriver):
            drivers[name] = driver
    return drivers


class ForkManager:
    """Creates and releases forks of the registry's templates; safe from any thread.

    The parts it is made of are public (:attr:`holdings`, :attr:`creator`, :attr:`servers`,
    :attr:`hot_sets`, :attr:`releaser`, :attr:`snapshots`, :attr:`handover`); callers use its
    methods.
    """

    def __init__(
        self,
        registry: TemplateRegistry,
        config: ManagerConfig,
        drivers: Mapping[str, VmmDriver] | None = None,
        on_fork_end: Callable[[str, ForkStats], None] | None = None,
        on_fault_latencies: Callable[[str, list[int]], None] | None = None,
        socket_journal: SocketJournal | None = None,
        on_worker_restarted: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.drivers: dict[str, VmmDriver] = dict(drivers) if drivers is not None else {}
        id_room = check_socket_dir(config.socket_dir)
        try:
            os.makedirs(config.socket_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PageforkError(
                f"cannot create socket dir {config.socket_dir}: {exc.strerror}"
            ) from None
        #: Who is told what happens (metrics), and where forks are noted (journals).
        self.hooks = Hooks(on_fork_end, on_fault_latencies, on_worker_restarted, socket_journal)
        self.holdings = Holdings()
        self.hot_sets = HotSets(self.holdings, registry, config)
        self.servers = TemplateServers(
            self.holdings, self.hooks, registry, config, self.hot_sets.adopt_hot_set
        )
        self.releaser = ForkReleaser(self.holdings, self.hooks, self.hot_sets, config)
        self.snapshots = ForkSnapshots(self.holdings, registry, self.releaser, config)
        self.handover = ManagerHandover(self.holdings, self.releaser)
        self.creator = ForkCreator(
            self.holdings,
            self.hooks,
            (self.servers, self.hot_sets, self.releaser),
            registry,
            config,
            self.drivers,
            lambda fork_id: self.prefetch(fork_id),  # looked up at each call
            id_room,
        )
        registry.live_forks = self.live_forks_of

    @property
    def fork_journal(self) -> ForkJournal | None:
        """Set by a daemon whose workers outlive it (pagefork.takeover.orphan): each fork's
        record is kept there."""
        return self.hooks.fork_journal

    @fork_journal.setter
    def fork_journal(self, journal: ForkJournal | None) -> None:
        self.hooks.fork_journal = journal

    @property
    def orphan_setup(self) -> Callable[[TemplateRecord], dict[str, Any]] | None:
        """What each new page server's workers are told, so that they outlive the daemon."""
        return self.hooks.orphan_setup

    @orphan_setup.setter
    def orphan_setup(self, setup: Callable[[TemplateRecord], dict[str, Any]] | None) -> None:
        self.hooks.orphan_setup = setup

    # --- queries -----------------------------------------------------------------------------
    def has_fork(self, fork_id: str) -> bool:
        """True if ``fork_id`` is live."""
        with self.holdings.lock:
            return fork_id in self.holdings.forks

    def fork(self, fork_id: str) -> Fork:
        """The live fork ``fork_id``; :class:`UnknownForkError` if unknown."""
        return self.holdings.fork(fork_id)

    def forks(self) -> list[Fork]:
        """Every live fork, oldest first."""
        with self.holdings.lock:
            return sorted(self.holdings.forks.values(), key=lambda f: f.created)

    def live_forks_of(self, template_id: str, created: float) -> int:
        """How many forks of the template (id, ``created``) the manager holds now.

        Takes no lock (the registry calls it with its own lock held, sometimes from a thread
        that holds ours): ``list()`` copies the table in one step under the GIL.
        """
        key = (template_id, created)
        return sum(1 for f in list(self.holdings.forks.values()) if f.template_key == key)

    def fork_counts(self) -> dict[TemplateKey, dict[ForkStateWord, int]]:
        """Per template identity, how many of its held forks are in each
        :data:`ForkStateWord` (templates with no fork are absent)."""
        out: dict[TemplateKey, dict[ForkStateWord, int]] = {}
        for fork in self.forks():
            counts = out.setdefault(fork.template_key, dict.fromkeys(FORK_STATES, 0))
            counts[fork.state] += 1
        return out

    def stats(self, fork_id: str) -> ForkStats:
        """The fork's counters from its page server."""
        fork = self.fork(fork_id)
        state = self.holdings.state_of(fork)
        try:
            return state.server.stats(fork_id)
        except ForkError:
            if fork.final_stats is not None:
                return fork.final_stats
            raise

    def live_stats(self) -> dict[str, list[ForkStats]]:
        """Per template, the current stats of every live fork whose session has not ended.

        This is a metrics scrape: every held fork's fault latencies since the last one are
        fed to ``on_fault_latencies`` first, so the histogram moves while forks are live.
        """
        out: dict[str, list[ForkStats]] = {}
        for fork in self.forks():
            try:
                server = self.holdings.state_of(fork).server
                stats = server.stats(fork.fork_id)
            except ForkError:
                continue  # released meanwhile
            self.releaser.feed_latencies(server, fork, stats)
            if fork.final_stats is None:  # else counted as ended already
                out.setdefault(fork.template_id, []).append(stats)
        return out

    def hot_set(self, template_id: str) -> HotPageList | None:
        """The template's hot set (loaded from its file once), or None if it has none."""
        return self.hot_sets.hot_set_of(self.registry.get(template_id))

    # --- creating ----------------------------------------------------------------------------
    def check_options(
        self, driver: str, options: Mapping[str, Any], fork_id: str | None = None
    ) -> None:
        """Validate ``options`` for ``driver`` (and what they make of ``fork_id``) without
        side effects; :class:`DriverOptionsError` naming the option if they are invalid."""
        self.creator.check_options(driver, options, fork_id)

    def new_fork_id(self, template_id: str) -> str:
        """A fresh fork id for ``template_id`` whose socket path fits the socket dir."""
        return self.creator.new_fork_id(template_id)

    def create_fork(
        self,
        template_id: str,
        fork_id: str | None = None,
        driver: str | None = None,
        options: Mapping[str, Any] | None = None,
        policy: PrefetchPolicy | None = None,
    ) -> Fork:
        """Register a fork of ``template_id`` and return it (its uffd socket path in it).

        With ``driver``, the manager also restores the VMM, prefetches the hot set once the
        VMM's handshake arrives, and resumes it; on any failure the fork is released again
        (its VMM stopped) and the original error raised. A release that arrives meanwhile is
        carried out by this call once the VMM's start ends; this call then raises
        :class:`ForkError`. Without a driver, the caller's VMM connects to the socket, then the
        caller asks for :meth:`prefetch` and resumes its VMM itself.

        The template's first fork starts its page server, outside the manager's lock: other
        requests proceed meanwhile, and other forks of the template wait for that start.
        ``policy`` overrides the template's prefetch policy for this fork.
        """
        return self.creator.create_fork(template_id, fork_id, driver, options, policy)

    def create_template_from(
        self, template_id: str, source: str, name: str | None = None
    ) -> TemplateRecord:
        """Register the template pushed at ``source`` (``s3://BUCKET/PREFIX``)."""
        validate_template_id(template_id)
        try:
            pushed = fetch_pushed(source, self.servers.store_options())
        except StoreError as exc:
            raise TemplateFieldError("source", str(exc)) from None
        return self.registry.create_from_store(
            template_id, pushed.url, pushed.size, pushed.vmstate, pushed.hot_pages, name=name
        )

    # --- serving -----------------------------------------------------------------------------
    def prefetch(self, fork_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Install the template's hot set into the fork (waits for its handshake).

        A warm-up or demand fork has nothing to prefetch: the result says so, installs nothing.
        A hot set that does not fit the fork's memory installs nothing either: the fork is
        served on demand, the result's ``note`` says why, and the next fork re-records.
        """
        fork = self.fork(fork_id)
        return self.hot_sets.prefetch(fork, self.holdings.state_of(fork), timeout)

    def wait(self, fork_id: str, timeout: float) -> dict[str, Any]:
        """Wait until the fork's guest has done its work (when its driver can tell) and its
        session has ended; the driver's summary (``vmm``), the final ``stats``, and the
        ``prefetch`` report (final: a hot set streamed into it is in, or its stream ended)."""
        h = self.holdings
        fork = self.fork(fork_id)
        state = h.state_of(fork)
        summary = fork.handle.wait(timeout) if fork.handle is not None else None
        deadline = time.monotonic() + timeout
        if fork.handle is not None and fork.handle.stays_after_run:
            # Kept for snapshots: its VMM stays, stopped, so its session goes on.
            stats = state.server.stats(fork_id)
        else:
            stats = state.server.wait_ended(fork_id, timeout=timeout)
            if stats.state in ("ended", "failed"):
                # Its state says so from now on, whenever the final stats arrive.
                h.move(fork, DaemonEvent.SESSION_ENDED)
            # The page server reports a fork's end, and a warm-up's hot set before it, on a
            # thread of its own: wait for that too, so a fork created once this returns is
            # prefetched from the set the warm-up just recorded.
            with h.final:
                h.final.wait_for(
                    lambda: fork.final_stats is not None, max(0.0, deadline - time.monotonic())
                )
        prefetch = self.hot_sets.wait_streamed(fork, max(0.0, deadline - time.monotonic()))
        return {"vmm": summary, "stats": stats.to_dict(), "prefetch": prefetch}

    def rerecord(self, template_id: str) -> None:
        """Make the template's next fork a recording warm-up again."""
        self.hot_sets.loop_of(self.registry.get(template_id)).rerecord()

    def snapshot(
        self, fork_id: str, template_id: str, *, release: bool = False
    ) -> tuple[SnapshotResult, ForkStats | None]:
        """Pause the fork, register its memory as child template ``template_id``
        (:mod:`pagefork.daemon.snapshot`), then resume the fork, or release it (``release``:
        its final stats are returned too). The fork resumes on failure as well.

        A fork's first snapshot is a layer over its template; each later one a layer over the
        one before (the VMM's diff holds only what changed since): a diff chain. Snapshots of
        one fork run one at a time, in the order they arrive. Refused once that chain is
        broken: the previous child was deleted, or a snapshot failed after the VMM wrote its
        diff (those writes are in no template, and the next diff will not hold them)."""
        return self.snapshots.snapshot(fork_id, template_id, release=release)

    # --- releasing ---------------------------------------------------------------------------
    def release(self, fork_id: str) -> ForkStats:
        """Stop the fork's VMM (if the manager started it), stop serving it, forget it.

        The first release of a fork claims it; a concurrent second one gets
        :class:`UnknownForkError`. A fork whose VMM the manager is still starting is released
        by its creator as soon as that start ends; this call waits for it (bounded by the
        restore and prefetch timeouts). A warm-up fork's hot set is saved before this returns.
        The template's page server stops with its last fork. Returns the fork's final stats.
        Nothing here writes to the state directory but that hot set, so a full disk cannot
        keep a fork (and its template) held.
        """
        return self.releaser.release(fork_id)

    # --- templates -----------------------------------------------------------------------------
    def in_use(self, template_id: str) -> tuple[int, bool]:
        """How many forks of ``template_id`` the manager holds, and whether a page server of
        it runs or starts (forks being released included)."""
        with self.holdings.lock:
            return self._in_use(template_id)

    def _in_use(self, template_id: str) -> tuple[int, bool]:
        h = self.holdings
        forks = sum(1 for f in h.forks.values() if f.template_id == template_id)
        serving = any(k[0] == template_id for k in (*h.templates, *h.starting))
        return forks, serving

    def delete_template(self, template_id: str) -> None:
        """Delete the template; :class:`TemplateError` while the manager holds forks or a page
        server of it, :class:`UnknownTemplateError` if it does not exist. No fork of it can be
        created meanwhile."""
        h = self.holdings
        with h.hot_lock, h.lock:
            forks, serving = self._in_use(template_id)
            if forks:
                held = [f for f in h.forks.values() if f.template_id == template_id]
                counts = {w: sum(1 for f in held if f.state == w) for w in FORK_STATES}
                which = " and ".join(f"{n} {w}" for w, n in counts.items() if n)
                raise TemplateError(
                    f"template {template_id!r} is in use by {which} "
                    f"fork{'s' if forks != 1 else ''} ({held[0].fork_id!r}"
                    f"{', ...' if forks > 1 else ''}); release "
                    f"{'them' if forks > 1 else 'it'} first: 'pagefork forks release FORK' "
                    "(DELETE /forks/FORK)"
                )
            if serving:
                raise TemplateError(
                    f"template {template_id!r} is in use: its page server is starting or stopping"
                )
            doomed = self.registry.detach(template_id)
            self.hot_sets.forget(template_id)
        self.registry.purge(doomed)

    def forget_hot_set(self, template_id: str) -> None:
        """Drop the cached hot set and a pending re-record (the template was deleted)."""
        with self.holdings.lock:
            self.hot_sets.forget(template_id)

    # --- live takeover (see ManagerHandover) -------------------------------------------------
    def template_servers(self) -> list[tuple[TemplateRecord, PageServer]]:
        """Every template whose page server runs, with that server."""
        return self.handover.template_servers()

    def open_server(self, record: TemplateRecord) -> PageServer:
        """Start ``record``'s page server (it maps and scans the mem-file) without giving it
        forks: a takeover's new side builds the old side's servers before it adopts them."""
        return self.servers.open_server(record)

    def export_state(
        self,
    ) -> tuple[list[Fork], list[tuple[TemplateKey, dict[str, Any]]], dict[str, int]]:
        """For a takeover's old side: see :meth:`ManagerHandover.export_state`."""
        return self.handover.export_state()

    def adopt_template(self, record: TemplateRecord, server: PageServer) -> None:
        """Serve ``record``'s forks from ``server``, which a takeover handed them to."""
        self.handover.adopt_template(record, server)

    def adopt_loop(self, key: TemplateKey, snapshot: dict[str, Any]) -> None:
        """Continue a template's hot-page loop from another daemon's :meth:`export_state`."""
        self.handover.adopt_loop(key, snapshot)

    def adopt_fork(self, fork: Fork, latencies_fed: int) -> None:
        """Hold ``fork``, which another daemon handed over (its template adopted first)."""
        self.handover.adopt_fork(fork, latencies_fed)

    def abandon(self) -> list[PageServer]:
        """Let go of every template and fork without releasing one or stopping a VMM; the
        page servers, which the caller abandons (see :meth:`ManagerHandover.abandon`)."""
        return self.handover.abandon()

    def close(self) -> None:
        """Release every fork (stopping the VMMs the manager started) and stop all servers."""
        h = self.holdings
        with h.lock:
            h.closed = True
            ids = list(h.forks)
            starts = list(h.starting.values())
        for start in starts:
            start.ready.wait(self.config.restore_timeout)  # its forks are refused once up
        for fork_id in ids:
            with contextlib.suppress(ForkError):
                self.release(fork_id)
        with h.lock:
            states = list(h.templates.values())
            h.templates.clear()
        for state in states:
            state.server.close()
        self.releaser.exits.close()
        for vmm in self.drivers.values():
            vmm.close()


__all__ = [
    "DRIVER_CLASSES",
    "FORK_STATES",
    "MAX_FORK_ID",
    "MAX_SOCKET_PATH",
    "DriverOptionsError",
    "Fork",
    "ForkConflictError",
    "ForkManager",
    "ForkPhase",
    "ForkRole",
    "ForkStateWord",
    "ManagerConfig",
    "TemplateKey",
    "UnknownForkError",
    "fork_id_room",
    "journal_record",
    "load_drivers",
    "new_latency_samples",
]
