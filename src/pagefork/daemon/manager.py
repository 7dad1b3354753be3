"""The fork lifecycle: one page server per template, and the hot-page loop around it.

A fork goes register → (driver) restore → prefetch → resume → ... → release. The template's
:class:`~pagefork.server.PageServer` starts with its first fork and stops after its last.

The hot-page loop, per template:

- *warm-up*: the first fork while the template has no hot set records the pages it faults, in
  a bounded window (``record_max_seconds``, ``record_max_share`` of guest memory: a hot set that
  grows into all of memory makes restores slower). When the window closes, or the fork ends or
  is released, the hot set is saved to the template's hot-pages file (the producer).
- *prefetch*: every later fork gets that hot set installed before its vCPUs resume (the
  consumer). A hot set that does not fit the fork's memory (the snapshot was taken again with
  another layout) is not an error: the fork is served on demand, its prefetch result says
  why, and the template's next fork records a new hot set.
- *demand*: a fork that arrives while the warm-up still records, before any hot set exists, is
  served on demand only (two recordings would race for one file).

:meth:`ForkManager.rerecord` makes the next fork a warm-up again; until its hot set is saved,
other forks keep prefetching the old one. Who records and who is prefetched is decided by the
template's :class:`~pagefork.hotloop.HotSetLoop`, the same policy ``pagefork serve`` follows;
the manager saves what it records into the template.

Slow work never holds the manager's lock: a template's page server (which maps and scans the
whole mem-file) starts outside it, so other templates and other requests go on meanwhile; a
second fork of the same template waits for that start only. A template's live forks are the
forks held here (:meth:`ForkManager.live_forks_of`), never a stored count.

A VMM whose handle gives a pidfd (the built-in microVM, Firecracker) is watched through it on
one thread, with no polling: when it exits, its fork says so (phase ``exited`` with the
``exit_status``, when the daemon is its parent) and the process is reaped at once. The fork
stays until it is released.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pagefork.daemon.exits import ExitWatcher
from pagefork.daemon.journal import ForkJournal, SocketJournal
from pagefork.daemon.snapshot import SnapshotResult, snapshot_fork
from pagefork.errors import (
    ForkError,
    HotPageFileError,
    PageforkError,
    PrefetchError,
    StoreError,
    TemplateError,
    VmmError,
)
from pagefork.hotloop import HotSetLoop, Role
from pagefork.hotpages import HotPageList
from pagefork.hotpages import load as load_hot_pages
from pagefork.layers.hotset import InheritedHotSet, inherited_hot_set
from pagefork.memstats import try_measure
from pagefork.prefetch import prepare_planner
from pagefork.regions import Region
from pagefork.server import PageServer, ServerConfig, validate_fork_id
from pagefork.serving.state import ForkPhase, transition
from pagefork.stats import LATENCY_WINDOW, ForkStats
from pagefork.store.cache import ChunkCache
from pagefork.store.layout import is_s3_url
from pagefork.store.lazy import StoreOptions
from pagefork.store.template import fetch_pushed
from pagefork.templates import (
    TemplateFieldError,
    TemplateRecord,
    TemplateRegistry,
    UnknownTemplateError,
    validate_template_id,
)
from pagefork.vmm.base import RestoreRequest, VmmDriver, VmmHandle

log = logging.getLogger("pagefork")

ForkRole = Role  # the fork's part in its template's hot-page loop

#: What a held fork is, in the words the API, the CLI and the metrics share (see
#: :attr:`Fork.state`). A fork that is gone was *released*; a template that is gone *deleted*.
ForkStateWord = Literal["live", "exited"]
#: Every :data:`ForkStateWord`, in the order they are shown.
FORK_STATES: tuple[ForkStateWord, ...] = ("live", "exited")

#: A template's identity: its id and its record's ``created`` stamp. A template deleted and
#: created again under the same id is another template: it never shares a page server, a
#: cached hot set or a re-record request with the old one.
TemplateKey = tuple[str, float]

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: The longest fork id :func:`~pagefork.server.validate_fork_id` accepts.
MAX_FORK_ID = 64
#: A generated fork id is ``<template id, cut>-<8 hex digits>``.
_GENERATED_SUFFIX = 9
_GENERATED_TEMPLATE_PART = 40

#: Drivers the daemon offers by name, loaded when their module is importable.
DRIVER_CLASSES = {
    "firecracker": ("pagefork.vmm.firecracker", "FirecrackerDriver"),
    "kvm": ("pagefork.vmm.kvm.driver", "KvmDriver"),
}


class UnknownForkError(ForkError):
    """No live fork has this id, or another release has claimed it (the API answers 404)."""


class ForkConflictError(ForkError):
    """The fork is in no state for this request (the API answers 409)."""


class DriverOptionsError(PageforkError):
    """A fork's driver ``options`` are invalid (the API answers 400); nothing was started."""


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


def fork_id_room(socket_dir: str) -> int:
    """The longest fork id whose socket ``<socket_dir>/<id>.sock`` fits :data:`MAX_SOCKET_PATH`."""
    return MAX_SOCKET_PATH - len(os.fsencode(os.path.join(socket_dir, ""))) - len(".sock")


@dataclass(frozen=True)
class ManagerConfig:
    """Settings of a :class:`ForkManager`.

    ``socket_dir`` holds every fork's uffd socket (keep it short: a socket path has at most
    107 bytes; the manager refuses a directory that leaves no room for a generated fork id,
    and warns when it leaves less than the longest one allowed). The recording window of a
    warm-up fork closes after ``record_max_seconds`` or ``record_max_share`` of the template's
    pages, whichever comes first.
    """

    socket_dir: str
    record_max_seconds: float = 30.0
    record_max_share: float = 0.25
    handshake_timeout: float = 10.0
    prefetch_timeout: float = 30.0
    restore_timeout: float = 30.0
    #: How long a fork waits for its template's page server, which another fork is starting
    #: (it scans the whole mem-file: about 1.2 s per GiB here).
    server_start_timeout: float = 120.0
    #: Worker processes of each template's page server (``"auto"``: one per usable CPU).
    workers: int | Literal["auto"] = "auto"
    #: A snapshot whose chain would be deeper than this many layers is flattened at once
    #: (None: only the chain's hard limit applies).
    max_layer_depth: int | None = None
    #: How long a snapshot may take, the VMM's pause and write included.
    snapshot_timeout: float = 60.0
    #: How templates in object storage are reached; one chunk cache for all of them (None:
    #: STATE_DIR/chunk-cache, bounded at 10 GiB).
    store: StoreOptions | None = None


@dataclass
class Fork:
    """A fork the manager knows: where its VMM connects and what the manager did for it."""

    fork_id: str
    template_id: str
    socket_path: str
    role: ForkRole
    created: float
    driver: str | None = None
    handle: VmmHandle | None = None
    prefetch: dict[str, Any] | None = None
    final_stats: ForkStats | None = None
    hot: HotPageList | None = None  # what this fork prefetches (role "prefetch")
    phase: ForkPhase = ForkPhase.LIVE
    template_created: float = 0.0  # the template record's ``created``: see TemplateKey
    #: The VMM's exit status once it has exited (negative: the signal that killed it; None
    #: while it runs, or when the driver cannot tell).
    exit_status: int | None = None
    # Set when the VMM has exited (``exit_status`` may still be None).
    vmm_exited: bool = field(default=False, repr=False)
    # Set when a wait saw the fork's session end (its final stats may come a moment later).
    session_ended: bool = field(default=False, repr=False)
    # The exit watcher's token for this fork's VMM, while watched.
    exit_watch: int | None = field(default=None, repr=False)
    # A release arrived while the fork was starting: its creator releases it.
    release_requested: bool = field(default=False, repr=False)
    # Set once the fork is torn down; ``released_stats`` then holds its final counters.
    released: threading.Event = field(default_factory=threading.Event, repr=False)
    released_stats: ForkStats | None = field(default=None, repr=False)
    # Snapshots (see ForkManager.snapshot): one at a time; the last child (its identity), and
    # the removed ranges it holds; why no more can be taken, once the diff chain broke.
    snapshot_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    last_snapshot: TemplateKey | None = field(default=None, repr=False)
    removed_at_snapshot: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    snapshot_lost: str | None = field(default=None, repr=False)

    @property
    def template_key(self) -> TemplateKey:
        """The identity of the template this fork is of."""
        return (self.template_id, self.template_created)

    @property
    def state(self) -> ForkStateWord:
        """``live`` or ``exited``: the one word the API, the CLI and the metrics use.

        A fork is *exited* once its VMM has exited or its page-server session has ended (its
        guest memory is gone, whether or not the driver can see the process go); it is held
        until it is *released*. Every other fork the manager holds is *live*.
        """
        gone = self.vmm_exited or self.session_ended or self.final_stats is not None
        return "exited" if gone or self.phase is ForkPhase.EXITED else "live"

    def to_dict(self) -> dict[str, Any]:
        """The API's fork object (without live counters)."""
        return {
            "fork": self.fork_id,
            "template": self.template_id,
            "socket": self.socket_path,
            "role": self.role,
            "state": self.state,
            "phase": self.phase,
            "driver": self.driver,
            "pid": self.handle.pid if self.handle is not None else None,
            "exit_status": self.exit_status,
            "created": self.created,
            "prefetch": self.prefetch,
        }


def journal_record(fork: Fork) -> dict[str, Any]:
    """What :class:`ForkJournal` keeps of ``fork``."""
    return {
        "fork": fork.fork_id,
        "template": fork.template_id,
        "template_created": fork.template_created,
        "socket": fork.socket_path,
        "role": fork.role,
        "created": fork.created,
        "driver": fork.driver,
    }


@dataclass
class _TemplateState:
    """A template's page server, its forks, and where its hot-page loop stands."""

    record: TemplateRecord
    server: PageServer
    forks: set[str] = field(default_factory=set)

    @property
    def key(self) -> TemplateKey:
        return (self.record.id, self.record.created)


@dataclass
class _ServerStart:
    """A template's page server being started (outside the manager's lock) by one fork's
    creator; the creators of other forks of it wait on ``ready``."""

    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _no_snapshot_why(fork: Fork) -> str:
    """Why ``fork`` (not live, or with no VMM the daemon drives) cannot be snapshotted."""
    if fork.handle is None:
        return (
            f"fork {fork.fork_id} has no VMM the daemon drives: no snapshot (create the fork "
            "with --vmm to snapshot it)"
        )
    phase = getattr(fork.phase, "value", fork.phase)
    if fork.state == "exited" or fork.phase is ForkPhase.EXITED:
        status = "" if fork.exit_status is None else f" (status {fork.exit_status})"
        why = f"fork {fork.fork_id} is exited: its VMM has exited{status}, and only a live fork "
        why += "can be snapshotted"
        if not getattr(fork.handle, "stays_after_run", False):
            why += (
                "; a built-in microVM fork stays after its guest's run only when created with "
                "--option snapshots=true"
            )
        return why
    return f"fork {fork.fork_id} is not live ({phase}): no snapshot"


def _misfit(hot: HotPageList, regions: Sequence[Region]) -> str | None:
    """Why ``hot`` cannot be installed into a fork with ``regions`` (its first bad entry), or
    None if every entry fits."""
    for index, (region, offset) in enumerate(hot.in_order()):
        if not 0 <= region < len(regions):
            return f"entry {index} is in region {region}; the fork has {len(regions)}"
        r = regions[region]
        if offset % r.page_size or offset >= r.size:
            return f"entry {index} (offset {offset:#x}) lies outside region {region}"
    return None


def _check_mergeable(fork_id: str, pid: int | None) -> None:
    """Warn when a fork of a sharing template runs in a VMM that is not mergeable: one the
    caller started (``api_socket``) must be started with ``PR_SET_MEMORY_MERGE`` set."""
    memory = try_measure(pid, guest=False)
    if memory is not None and memory.merge_any is False:
        log.warning(
            "fork %s: its template shares memory, but VMM pid %d is not mergeable (a VMM "
            "pagefork did not start must be started with prctl(PR_SET_MEMORY_MERGE, 1))",
            fork_id,
            pid,
        )


def new_latency_samples(
    values: Sequence[int], seen: int, written: int, window: int = LATENCY_WINDOW
) -> tuple[list[int], int]:
    """The samples of a fork's latency ring that came after the first ``seen``, and how many
    it has had in all; ``written`` is how many are surely in it (a lower bound).

    The ring keeps the last ``window`` samples, sample ``n`` at index ``n % window``. Until
    it wraps, ``values`` holds exactly the samples written so far, in order.
    """
    if len(values) < window:
        return list(values[seen:]), len(values)
    total = max(seen, written)
    first = max(seen, total - window)  # older ones have been overwritten
    return [values[n % window] for n in range(first, total)], total


class ForkManager:
    """Creates and releases forks of the registry's templates; safe from any thread.

    Lock order: ``_hot_lock`` before ``_lock`` before the registry's lock. ``_feed_lock`` is
    taken alone.
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
        #: Called with (template id, final stats) when a fork's session ends (for metrics).
        self.on_fork_end = on_fork_end
        #: Called with (template id, fault latencies in ns) with each fork's new latencies:
        #: from :meth:`live_stats` (a metrics scrape) and when the fork is released.
        self.on_fault_latencies = on_fault_latencies
        #: Called with the template id when a worker of its page server died and was replaced.
        self.on_worker_restarted = on_worker_restarted
        self.socket_journal = socket_journal
        #: Set by a daemon whose workers outlive it (pagefork.takeover.orphan): each fork's
        #: record, and what each new page server's workers are told.
        self.fork_journal: ForkJournal | None = None
        self.orphan_setup: Callable[[TemplateRecord], dict[str, Any]] | None = None
        self._id_room = self._check_socket_dir(config.socket_dir)
        try:
            os.makedirs(config.socket_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PageforkError(
                f"cannot create socket dir {config.socket_dir}: {exc.strerror}"
            ) from None
        self._lock = threading.Lock()
        # Notified when a fork's final stats arrive (after its hot-set window was reported).
        self._final = threading.Condition(self._lock)
        self._store: StoreOptions | None = None  # made on first use: see _store_options
        self._store_lock = threading.Lock()
        self._templates: dict[TemplateKey, _TemplateState] = {}
        self._starting: dict[TemplateKey, _ServerStart] = {}
        self._forks: dict[str, Fork] = {}
        self._reserved: set[str] = set()  # ids of forks waiting for their page server
        # Each template's hot-page loop (its hot set, loaded from its file once, and who
        # records), by template identity: a template deleted and created again under its id
        # starts a loop of its own. It outlives the template's page server.
        self._loops: dict[TemplateKey, HotSetLoop] = {}
        # Serialises saving hot sets, and a template's delete against a save into its directory.
        self._hot_lock = threading.Lock()
        # Fault latencies already fed to ``on_fault_latencies``, per fork (sample counts).
        self._fed: dict[str, int] = {}
        self._feed_lock = threading.Lock()
        self._closed = False
        # A child template's inherited hot set, by template identity (see _inherited_of).
        self._inherited: dict[TemplateKey, InheritedHotSet | None] = {}
        self._exits = ExitWatcher()
        registry.live_forks = self.live_forks_of

    @staticmethod
    def _check_socket_dir(socket_dir: str) -> int:
        """Refuse a socket dir that leaves no room for a generated fork id; warn (one line)
        when it leaves less than the longest id allowed. Returns the room."""
        room = fork_id_room(socket_dir)
        if room < 1 + _GENERATED_SUFFIX:
            raise PageforkError(
                f"socket dir {socket_dir} is too long: a fork socket in it would exceed "
                f"{MAX_SOCKET_PATH} bytes (use a shorter --socket-dir)"
            )
        if room < MAX_FORK_ID:
            log.warning(
                "socket dir %s leaves room for fork ids of at most %d characters (%d are "
                "allowed): longer ids will be refused; a shorter --socket-dir avoids this",
                socket_dir,
                room,
                MAX_FORK_ID,
            )
        return room

    # --- queries -----------------------------------------------------------------------------
    def has_fork(self, fork_id: str) -> bool:
        """True if ``fork_id`` is live."""
        with self._lock:
            return fork_id in self._forks

    def fork(self, fork_id: str) -> Fork:
        """The live fork ``fork_id``; :class:`UnknownForkError` if unknown."""
        with self._lock:
            fork = self._forks.get(fork_id)
        if fork is None:
            raise UnknownForkError(f"unknown fork {fork_id!r}")
        return fork

    def forks(self) -> list[Fork]:
        """Every live fork, oldest first."""
        with self._lock:
            return sorted(self._forks.values(), key=lambda f: f.created)

    def live_forks_of(self, template_id: str, created: float) -> int:
        """How many forks of the template (id, ``created``) the manager holds now.

        Takes no lock (the registry calls it with its own lock held, sometimes from a thread
        that holds ours): ``list()`` copies the table in one step under the GIL.
        """
        key = (template_id, created)
        return sum(1 for f in list(self._forks.values()) if f.template_key == key)

    def fork_counts(self) -> dict[TemplateKey, dict[ForkStateWord, int]]:
        """Per template identity, how many of its held forks are in each
        :data:`ForkStateWord` (templates with no fork are absent)."""
        out: dict[TemplateKey, dict[ForkStateWord, int]] = {}
        for fork in self.forks():
            counts = out.setdefault(fork.template_key, dict.fromkeys(FORK_STATES, 0))
            counts[fork.state] += 1
        return out

    def _state_of(self, fork: Fork) -> _TemplateState:
        with self._lock:
            state = self._templates.get(fork.template_key)
        if state is None:
            raise ForkError(f"fork {fork.fork_id}: its page server is gone")
        return state

    def stats(self, fork_id: str) -> ForkStats:
        """The fork's counters from its page server."""
        fork = self.fork(fork_id)
        state = self._state_of(fork)
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
                server = self._state_of(fork).server
                stats = server.stats(fork.fork_id)
            except ForkError:
                continue  # released meanwhile
            self._feed_latencies(server, fork, stats)
            if fork.final_stats is None:  # else counted as ended already
                out.setdefault(fork.template_id, []).append(stats)
        return out

    def hot_set(self, template_id: str) -> HotPageList | None:
        """The template's hot set (loaded from its file once), or None if it has none."""
        return self._hot_set_of(self.registry.get(template_id))

    def _hot_set_of(self, record: TemplateRecord) -> HotPageList | None:
        return self._loop_of(record).hot

    def _loop_of(self, record: TemplateRecord) -> HotSetLoop:
        """The template's hot-page loop, its hot set loaded from the template's file."""
        key: TemplateKey = (record.id, record.created)
        with self._lock:
            loop = self._loops.get(key)
            if loop is not None:
                return loop
        try:
            hot: HotPageList | None = load_hot_pages(record.hot_pages_path)
        except HotPageFileError as exc:
            log.warning(
                "template %s: ignoring its hot set, it will be re-recorded: %s", record.id, exc
            )
            hot = None
        with self._lock:
            # Loaded meanwhile, or made by a warm-up: that one wins.
            return self._loops.setdefault(key, HotSetLoop.for_file(hot, record.hot_pages_path))

    # --- creating ----------------------------------------------------------------------------
    def check_options(
        self, driver: str, options: Mapping[str, Any], fork_id: str | None = None
    ) -> None:
        """Validate ``options`` for ``driver`` (and what they make of ``fork_id``) without
        side effects; :class:`DriverOptionsError` naming the option if they are invalid."""
        vmm = self.drivers.get(driver)
        if vmm is None:
            known = ", ".join(sorted(self.drivers)) or "none available"
            raise VmmError(f"unknown VMM driver {driver!r} (known: {known})")
        try:
            vmm.check_options(options, fork_id)
        except VmmError as exc:
            raise DriverOptionsError(f"driver {driver}: {exc}") from None

    def new_fork_id(self, template_id: str) -> str:
        """A fresh fork id for ``template_id`` whose socket path fits the socket dir."""
        part = template_id[: min(_GENERATED_TEMPLATE_PART, self._id_room - _GENERATED_SUFFIX)]
        return f"{part}-{secrets.token_hex(4)}"

    def create_fork(
        self,
        template_id: str,
        fork_id: str | None = None,
        driver: str | None = None,
        options: Mapping[str, Any] | None = None,
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
        """
        if fork_id is None:
            fork_id = self.new_fork_id(template_id)
        validate_fork_id(fork_id)
        if len(fork_id) > self._id_room:
            raise ForkError(
                f"fork id {fork_id!r} is too long for socket dir {self.config.socket_dir}: "
                f"at most {self._id_room} characters fit a socket path there"
            )
        vmm: VmmDriver | None = None
        opts = dict(options or {})
        if driver is not None:
            self.check_options(driver, opts, fork_id)
            vmm = self.drivers[driver]
        seen = self.registry.get(template_id)
        hot = self._hot_set_of(seen)
        fork, record = self._register(seen, fork_id, hot, driver, starting=vmm is not None)
        log.info("fork %s of %s: %s, socket %s", fork_id, template_id, fork.role, fork.socket_path)
        if self.socket_journal is not None:
            self.socket_journal.add(fork_id, fork.socket_path)
        if self.fork_journal is not None:
            self.fork_journal.write(fork_id, journal_record(fork))
        self.registry.touch(template_id, record.created)
        if vmm is None:
            return fork
        error: BaseException | None = None
        try:
            self._start_vmm(fork, vmm, record, opts)
        except BaseException as exc:
            error = exc
        if error is None and self.socket_journal is not None:
            # A driver may have linked the socket into a jail: a new link count is a new
            # change time, by which the journal knows the file.
            self.socket_journal.add(fork_id, fork.socket_path)
        with self._lock:
            if error is None and not fork.release_requested:
                fork.phase = transition(
                    fork_id, fork.phase, ForkPhase.EXITED if fork.vmm_exited else ForkPhase.LIVE
                )
                return fork
            fork.phase = transition(fork_id, fork.phase, ForkPhase.RELEASING)
        # Failed, or released while starting: this call releases it (stopping the handle the
        # driver returned, if any). A failing cleanup is logged; it never hides ``error``.
        try:
            self._teardown(fork)
        except Exception:
            log.exception("fork %s: releasing it after its start failed", fork_id)
        if error is not None:
            raise error
        raise ForkError(f"fork {fork_id} was released while its VMM was starting")

    def _register(
        self,
        seen: TemplateRecord,
        fork_id: str,
        hot: HotPageList | None,
        driver: str | None,
        starting: bool,
    ) -> tuple[Fork, TemplateRecord]:
        """Add the fork to its template's page server, starting that server if needed."""
        template_id = seen.id
        while True:
            with self._lock:
                if self._closed:
                    raise ForkError("the fork manager is shutting down")
                if fork_id in self._forks or fork_id in self._reserved:
                    raise ForkError(f"fork {fork_id} already exists")
                # Read under our lock: a delete holds it, so the template is there right now.
                record = self.registry.get(template_id)
                if record.created != seen.created:
                    raise TemplateError(
                        f"template {template_id!r} was deleted and created again meanwhile; retry"
                    )
                key: TemplateKey = (template_id, record.created)
                state = self._templates.get(key)
                if state is not None:
                    return self._add_fork(state, fork_id, hot, driver, starting), record
                start = self._starting.get(key)
                starter = start is None
                if start is None:
                    start = self._starting[key] = _ServerStart()
                self._reserved.add(fork_id)
            if not starter:
                started = start.ready.wait(self.config.server_start_timeout)
                with self._lock:
                    self._reserved.discard(fork_id)
                if not started:
                    raise ForkError(
                        f"template {template_id!r}: its page server is still starting after "
                        f"{self.config.server_start_timeout:g}s; retry later"
                    )
                if start.error is not None:
                    raise ForkError(
                        f"template {template_id!r}: its page server did not start: {start.error}"
                    )
                continue  # the server is up: register with it (or start again if it stopped)
            try:
                server = self._open_server(record)  # maps and scans the mem-file: slow
            except BaseException as exc:
                with self._lock:
                    start.error = exc
                    self._reserved.discard(fork_id)
                    del self._starting[key]
                start.ready.set()
                raise
            stop: PageServer | None = None
            try:
                with self._lock:
                    self._reserved.discard(fork_id)
                    del self._starting[key]
                    state = _TemplateState(record, server)
                    self._templates[key] = state
                    try:
                        return self._add_fork(state, fork_id, hot, driver, starting), record
                    except BaseException:
                        stop = self._drop_if_idle(state)
                        raise
            finally:
                start.ready.set()  # the waiters find the server (or start again without it)
                if stop is not None:
                    stop.close()

    def _add_fork(
        self,
        state: _TemplateState,
        fork_id: str,
        hot: HotPageList | None,
        driver: str | None,
        starting: bool,
    ) -> Fork:
        """Register the fork with ``state``'s page server (called with the lock held)."""
        if self._closed:
            raise ForkError("the fork manager is shutting down")
        loop = self._loops.get(state.key) or self._loops.setdefault(
            state.key, HotSetLoop.for_file(hot, state.record.hot_pages_path)
        )
        role = loop.role(fork_id)
        try:
            socket_path = state.server.register_fork(fork_id, record=loop.records(role))
        except BaseException:
            loop.fork_gone(fork_id)  # a warm-up that never was: the next fork records
            raise
        fork = Fork(
            fork_id,
            state.record.id,
            socket_path,
            role,
            time.time(),
            driver=driver,
            hot=loop.hot if role == "prefetch" else None,
            phase=ForkPhase.STARTING if starting else ForkPhase.LIVE,
            template_created=state.record.created,
        )
        state.forks.add(fork_id)
        self._forks[fork_id] = fork
        return fork

    def _drop_if_idle(self, state: _TemplateState) -> PageServer | None:
        """Forget ``state`` if it has no fork left (lock held); its server, to be closed by
        the caller outside the lock, or None."""
        if state.forks:
            return None
        if self._templates.get(state.key) is state:
            del self._templates[state.key]
        return state.server

    def _open_server(self, record: TemplateRecord) -> PageServer:
        key: TemplateKey = (record.id, record.created)
        max_pages = max(1, int(record.mem_pages * self.config.record_max_share))

        def window_closed(fork_id: str, pages: HotPageList) -> None:
            self._adopt_hot_set(key, fork_id, pages)

        def fork_ended(fork_id: str, stats: ForkStats) -> None:
            with self._lock:
                fork = self._forks.get(fork_id)
                if fork is not None and fork.template_key == key:
                    fork.final_stats = stats
                    self._final.notify_all()
            if self.on_fork_end is not None:
                self.on_fork_end(record.id, stats)

        def worker_restarted(old_pid: int, pid: int, forks: int) -> None:
            log.warning(
                "template %s: worker %d died; worker %d took over its %d forks",
                record.id,
                old_pid,
                pid,
                forks,
            )
            if self.on_worker_restarted is not None:
                self.on_worker_restarted(record.id)

        server = PageServer(
            ServerConfig(
                mem_file_path=record.mem_file,
                layers=tuple(record.layers),
                socket_dir=self.config.socket_dir,
                handshake_timeout=self.config.handshake_timeout,
                record_max_pages=max_pages,
                record_max_seconds=self.config.record_max_seconds,
                on_window_closed=window_closed,
                on_fork_end=fork_ended,
                on_worker_restarted=worker_restarted,
                workers=self.config.workers,
                store=self._store_options() if is_s3_url(record.mem_file) else None,
            )
        )
        if self.orphan_setup is not None:
            server.keep_forks_if_killed(self.orphan_setup(record))
        log.info("template %s: page server started", record.id)
        return server

    def _store_options(self) -> StoreOptions:
        """The object-storage options, with the one chunk cache every template shares."""
        with self._store_lock:
            if self._store is None:
                options = self.config.store or StoreOptions()
                if options.cache is None:
                    cache = ChunkCache(str(self.registry.state_dir / "chunk-cache"))
                    options = dataclasses.replace(options, cache=cache)
                self._store = options
            return self._store

    def create_template_from(
        self, template_id: str, source: str, name: str | None = None
    ) -> TemplateRecord:
        """Register the template pushed at ``source`` (``s3://BUCKET/PREFIX``)."""
        validate_template_id(template_id)
        try:
            pushed = fetch_pushed(source, self._store_options())
        except StoreError as exc:
            raise TemplateFieldError("source", str(exc)) from None
        return self.registry.create_from_store(
            template_id, pushed.url, pushed.size, pushed.vmstate, pushed.hot_pages, name=name
        )

    def _start_vmm(
        self, fork: Fork, vmm: VmmDriver, record: TemplateRecord, options: dict[str, Any]
    ) -> None:
        """Restore, prefetch, resume; stops early (without error) once a release is pending."""
        request = RestoreRequest(
            fork_id=fork.fork_id,
            uffd_socket=fork.socket_path,
            snapshot_path=record.snapshot_path,
            mem_file=record.mem_file,
            options=options,
            layers=tuple(record.layers),
            share_memory=record.share_memory,
        )
        fork.handle = vmm.restore(request, timeout=self.config.restore_timeout)
        if record.share_memory:
            _check_mergeable(fork.fork_id, fork.handle.pid)
        self._watch_exit(fork)
        if fork.release_requested:
            return
        self.prefetch(fork.fork_id)
        if fork.release_requested:
            return
        fork.handle.resume()

    # --- VMM exits -----------------------------------------------------------------------------
    def _watch_exit(self, fork: Fork) -> None:
        pidfd = fork.handle.pidfd if fork.handle is not None else None
        if pidfd is None:
            return  # this driver cannot tell: the fork stays live until released
        fork.exit_watch = self._exits.watch(pidfd, lambda: self._vmm_exited(fork))

    def _vmm_exited(self, fork: Fork) -> None:
        """On the watcher's thread: the fork's VMM has exited. Reap it, and say so."""
        status = fork.handle.exit_status() if fork.handle is not None else None
        with self._lock:
            fork.exit_watch = None
            fork.vmm_exited = True
            fork.exit_status = status
            if fork.phase is ForkPhase.LIVE:
                fork.phase = transition(fork.fork_id, fork.phase, ForkPhase.EXITED)
        log.info("fork %s: its VMM exited (status %s)", fork.fork_id, fork.exit_status)

    # --- prefetch ----------------------------------------------------------------------------
    def prefetch(self, fork_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Install the template's hot set into the fork (waits for its handshake).

        A warm-up or demand fork has nothing to prefetch: the result says so, installs nothing.
        A hot set that does not fit the fork's memory installs nothing either: the fork is
        served on demand, the result's ``note`` says why, and the next fork re-records.
        """
        fork = self.fork(fork_id)
        state = self._state_of(fork)
        wait = timeout if timeout is not None else self.config.prefetch_timeout
        if fork.role != "prefetch" or fork.hot is None:
            regions = state.server.wait_connected(fork_id, timeout=wait)
            inherited = self._inherited_of(state.record) if fork.role == "demand" else None
            if inherited is not None:  # a child that has no hot set of its own yet
                hot = inherited.for_regions(regions)
                result = state.server.prefetch(fork_id, hot, timeout=wait)
                fork.prefetch = {
                    "role": fork.role,
                    "inherited": True,
                    "hot_pages": len(hot),
                    "installed": result.installed,
                    "already_present": result.already_present,
                    "seconds": result.seconds,
                }
                return fork.prefetch
            fork.prefetch = {"role": fork.role, "hot_pages": 0, "installed": 0}
            return fork.prefetch
        try:
            result = state.server.prefetch(fork_id, fork.hot, timeout=wait)
        except PrefetchError as exc:
            problem = None
            if not exc.installed:
                with contextlib.suppress(ForkError):
                    problem = _misfit(fork.hot, state.server.wait_connected(fork_id, wait))
            if problem is None:
                raise
            return self._fall_back_to_demand(fork, problem)
        fork.prefetch = {
            "role": fork.role,
            "hot_pages": len(fork.hot),
            "installed": result.installed,
            "already_present": result.already_present,
            "skipped_removed": result.skipped_removed,
            "runs": result.runs,
            "ioctls": result.ioctls,
            "bytes": result.bytes,
            "seconds": result.seconds,
            # A template in object storage: what its hot chunks cost to fetch first.
            "fetched_bytes": result.fetched_bytes,
            "fetch_seconds": result.fetch_seconds,
            # Gaps between hot runs installed with them (one copy cheaper than two ioctls).
            "bridged_bytes": result.bridged_bytes,
        }
        return fork.prefetch

    def _inherited_of(self, record: TemplateRecord) -> InheritedHotSet | None:
        """What a child template's forks are prefetched from while its first fork records
        its own hot set (:mod:`pagefork.layers.hotset`), made once per template; None for a
        template without layers."""
        key: TemplateKey = (record.id, record.created)
        with self._lock:
            if key in self._inherited:
                return self._inherited[key]
        found = inherited_hot_set(self.registry, record) if record.layers else None
        with self._lock:
            return self._inherited.setdefault(key, found)

    def _fall_back_to_demand(self, fork: Fork, problem: str) -> dict[str, Any]:
        note = (
            f"the template's hot set does not fit this fork's memory ({problem}): served on "
            "demand; the template's next fork records a new hot set"
        )
        log.warning("fork %s of %s: %s", fork.fork_id, fork.template_id, note)
        with self._lock:
            loop = self._loops.get(fork.template_key)
            if loop is not None:
                loop.misfit()  # later forks are served on demand until the next one records
            fork.role = "demand"
            fork.hot = None
            fork.prefetch = {"role": "demand", "hot_pages": 0, "installed": 0, "note": note}
            return fork.prefetch

    def wait(self, fork_id: str, timeout: float) -> dict[str, Any]:
        """Wait until the fork's guest has done its work (when its driver can tell) and its
        session has ended; the driver's summary (``vmm``) and the final ``stats``."""
        fork = self.fork(fork_id)
        state = self._state_of(fork)
        summary = fork.handle.wait(timeout) if fork.handle is not None else None
        if fork.handle is not None and fork.handle.stays_after_run:
            # Kept for snapshots: its VMM stays, stopped, so its session goes on.
            stats = state.server.stats(fork_id)
        else:
            deadline = time.monotonic() + timeout
            stats = state.server.wait_ended(fork_id, timeout=timeout)
            # Its state says so from now on, whenever the final stats arrive.
            fork.session_ended = stats.state in ("ended", "failed")
            # The page server reports a fork's end, and a warm-up's hot set before it, on a
            # thread of its own: wait for that too, so a fork created once this returns is
            # prefetched from the set the warm-up just recorded.
            with self._final:
                self._final.wait_for(
                    lambda: fork.final_stats is not None, max(0.0, deadline - time.monotonic())
                )
        return {"vmm": summary, "stats": stats.to_dict()}

    # --- the hot-page loop -------------------------------------------------------------------
    def _adopt_hot_set(self, key: TemplateKey, fork_id: str, pages: HotPageList) -> None:
        """Save the warm-up fork's hot set as the template's (first call per warm-up wins).

        Holds ``_hot_lock`` throughout: :meth:`delete_template` takes it too, so the set is
        never written into a template deleted (or deleted and created again) meanwhile.
        """
        template_id = key[0]
        with self._hot_lock:
            with self._lock:
                loop = self._loops.get(key)
                if loop is None or not loop.claim(fork_id):
                    return  # not this template's warm-up, or its set was saved already
                state = self._templates.get(key)
            hot: HotPageList | None = None
            try:
                if state is not None and len(pages):
                    pages.save(state.record.hot_pages_path)
                    hot = load_hot_pages(state.record.hot_pages_path)  # as later forks read it
                    prepare_planner()  # numpy and the host's copy costs: no fork waits for them
                    log.info("template %s: hot set of %d pages saved", template_id, len(hot))
                elif state is not None:
                    log.warning(
                        "template %s: warm-up fork %s faulted no page", template_id, fork_id
                    )
            except PageforkError as exc:
                log.error("template %s: cannot save the hot set: %s", template_id, exc)
            finally:
                loop.adopt(fork_id, hot)

    def _learn_from(self, state: _TemplateState, fork_id: str) -> None:
        """A prefetched fork ends: a learning hot set takes its misses (and is saved if it
        changed). Under ``_hot_lock``, as every write of a template's hot set."""
        with self._lock:
            loop = self._loops.get(state.key)
        if loop is None or not loop.records("prefetch"):
            return
        with self._hot_lock, contextlib.suppress(ForkError):
            try:
                loop.learn_and_save(
                    fork_id, state.server.hot_pages(fork_id), state.record.hot_pages_path
                )
            except PageforkError as exc:
                log.error("template %s: cannot save the learned hot set: %s", state.key[0], exc)

    def rerecord(self, template_id: str) -> None:
        """Make the template's next fork a recording warm-up again."""
        self._loop_of(self.registry.get(template_id)).rerecord()

    # --- snapshots ---------------------------------------------------------------------------
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
        validate_template_id(template_id)
        fork = self.fork(fork_id)
        # Wait for a snapshot under way: this one is a layer over its child.
        if not fork.snapshot_lock.acquire(timeout=self.config.snapshot_timeout):
            raise ForkConflictError(
                f"fork {fork_id}: a snapshot of it is still under way after "
                f"{self.config.snapshot_timeout:g}s"
            )
        try:
            with self._lock:
                if fork.phase is not ForkPhase.LIVE or fork.handle is None:
                    raise ForkConflictError(_no_snapshot_why(fork))
            handle = fork.handle
            if fork.snapshot_lost is not None:
                raise ForkConflictError(fork.snapshot_lost)
            if self.registry.exists(template_id):
                raise TemplateError(f"template {template_id!r} already exists")
            parent = self._snapshot_parent(fork)
            state = self._state_of(fork)

            def taken() -> None:
                # Cleared again below on success.
                fork.snapshot_lost = (
                    f"fork {fork_id}: snapshot {template_id!r} failed after the VMM had written "
                    "its diff, and a diff holds only what changed since the one before: a later "
                    "snapshot of this fork would miss those writes, so none is taken"
                )

            try:
                result = snapshot_fork(
                    fork_id=fork_id,
                    handle=handle,
                    server=state.server,
                    parent=parent,
                    registry=self.registry,
                    template_id=template_id,
                    timeout=self.config.snapshot_timeout,
                    max_layer_depth=self.config.max_layer_depth,
                    removed_before=fork.removed_at_snapshot,
                    on_taken=taken,
                )
            finally:
                if not release:
                    try:
                        handle.resume()
                    except Exception as exc:  # released meanwhile, say: never hide the cause
                        log.warning("fork %s: cannot resume it after a snapshot: %s", fork_id, exc)
            fork.snapshot_lost = None
            fork.last_snapshot = (result.template.id, result.template.created)
            fork.removed_at_snapshot = result.removed
            log.info("fork %s: snapshot registered as template %s", fork_id, template_id)
            # Inside the lock: a snapshot waiting for this one must find the fork released.
            return result, self.release(fork_id) if release else None
        finally:
            fork.snapshot_lock.release()

    def _snapshot_parent(self, fork: Fork) -> TemplateRecord:
        """What the fork's next snapshot is a layer over: its template, or its last snapshot."""
        if fork.last_snapshot is None:
            return self.registry.get(fork.template_id)
        child_id, created = fork.last_snapshot
        try:
            record: TemplateRecord | None = self.registry.get(child_id)
        except UnknownTemplateError:
            record = None
        if record is None or record.created != created:
            raise ForkConflictError(
                f"fork {fork.fork_id}: its previous snapshot, template {child_id!r}, was "
                "deleted, and the VMM's next diff holds only what changed since that one: "
                "no later snapshot of this fork can be whole"
            )
        return record

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
        with self._lock:
            fork = self._forks.get(fork_id)
            if fork is None or fork.phase is ForkPhase.RELEASING or fork.release_requested:
                raise UnknownForkError(f"unknown fork {fork_id!r}")
            deferred = fork.phase is ForkPhase.STARTING
            if deferred:
                fork.release_requested = True
            else:
                fork.phase = transition(fork_id, fork.phase, ForkPhase.RELEASING)
        if not deferred:
            return self._teardown(fork)
        bound = self.config.restore_timeout + self.config.prefetch_timeout + 5.0
        if not fork.released.wait(bound):
            raise ForkError(
                f"fork {fork_id} is still starting after {bound:g}s; it is released as soon "
                "as its start ends"
            )
        return fork.released_stats or ForkStats(fork=fork_id, state="released")

    def _teardown(self, fork: Fork) -> ForkStats:
        """Release ``fork``, claimed by exactly one caller (phase ``releasing``)."""
        fork_id = fork.fork_id
        try:
            if fork.exit_watch is not None:
                self._exits.unwatch(fork.exit_watch)
            if fork.handle is not None:
                try:
                    fork.handle.stop()
                except Exception as exc:  # stop what else we can: the page server, the count
                    log.warning("fork %s: stopping its VMM: %s", fork_id, exc)
            with self._lock:
                state = self._templates.get(fork.template_key)
            stats = ForkStats(fork=fork_id, state="released")
            if state is not None:
                with contextlib.suppress(ForkError):
                    stats = state.server.stats(fork_id)
                    self._feed_latencies(state.server, fork, stats)
                hot = None
                if fork.role == "warmup":
                    with contextlib.suppress(ForkError):
                        hot = state.server.hot_pages(fork_id)
                elif fork.role == "prefetch":
                    self._learn_from(state, fork_id)
                with contextlib.suppress(ForkError):
                    state.server.unregister_fork(fork_id)  # stops the session: recording ends
                if hot is not None:
                    self._adopt_hot_set(fork.template_key, fork_id, hot)
            if self.socket_journal is not None:
                self.socket_journal.remove(fork_id)
            if self.fork_journal is not None:
                self.fork_journal.remove(fork_id)
            with self._feed_lock:
                self._fed.pop(fork_id, None)
            stop_server: PageServer | None = None
            with self._lock:
                if self._forks.get(fork_id) is fork:
                    del self._forks[fork_id]
                loop = self._loops.get(fork.template_key)
                if loop is not None:
                    loop.fork_gone(fork_id)  # a warm-up that never recorded: the next one does
                if state is not None:
                    state.forks.discard(fork_id)
                    stop_server = self._drop_if_idle(state)
            if stop_server is not None:
                stop_server.close()  # joins its callbacks: the hot set is on disk by now
                log.info("template %s: page server stopped", fork.template_id)
            fork.released_stats = fork.final_stats or stats
            return fork.released_stats
        finally:
            fork.released.set()

    def _feed_latencies(self, server: PageServer, fork: Fork, stats: ForkStats) -> None:
        """Hand ``on_fault_latencies`` the fork's fault latencies recorded since the last call
        (they feed the histogram). ``stats`` were read just before: their ``faults`` bound the
        samples that are surely written."""
        if self.on_fault_latencies is None:
            return
        # The fault loop notes a fault's latency just after counting it: while the session
        # serves, the last counted fault may not have its sample yet.
        over = stats.state in ("ended", "failed")
        written = stats.faults if over else stats.faults - 1
        with self._feed_lock:
            seen = self._fed.get(fork.fork_id, 0)
            if written <= seen:
                return  # nothing new: skip copying the window
            try:
                values = server.fault_latencies_ns(fork.fork_id)
            except ForkError:
                return
            new, total = new_latency_samples(values, seen, written)
            self._fed[fork.fork_id] = total
        if new:
            self.on_fault_latencies(fork.template_id, new)

    # --- templates -----------------------------------------------------------------------------
    def in_use(self, template_id: str) -> tuple[int, bool]:
        """How many forks of ``template_id`` the manager holds, and whether a page server of
        it runs or starts (forks being released included)."""
        with self._lock:
            return self._in_use(template_id)

    def _in_use(self, template_id: str) -> tuple[int, bool]:
        forks = sum(1 for f in self._forks.values() if f.template_id == template_id)
        serving = any(k[0] == template_id for k in (*self._templates, *self._starting))
        return forks, serving

    def delete_template(self, template_id: str) -> None:
        """Delete the template; :class:`TemplateError` while the manager holds forks or a page
        server of it, :class:`UnknownTemplateError` if it does not exist. No fork of it can be
        created meanwhile."""
        with self._hot_lock, self._lock:
            forks, serving = self._in_use(template_id)
            if forks:
                held = [f for f in self._forks.values() if f.template_id == template_id]
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
            self._forget_hot_set(template_id)
        self.registry.purge(doomed)

    def forget_hot_set(self, template_id: str) -> None:
        """Drop the cached hot set and a pending re-record (the template was deleted)."""
        with self._lock:
            self._forget_hot_set(template_id)

    def _forget_hot_set(self, template_id: str) -> None:
        self._loops = {k: v for k, v in self._loops.items() if k[0] != template_id}

    # --- live takeover ---------------------------------------------------------------------
    # What :mod:`pagefork.takeover.daemon` moves between daemons, through these methods only.

    def template_servers(self) -> list[tuple[TemplateRecord, PageServer]]:
        """Every template whose page server runs, with that server."""
        with self._lock:
            return [(s.record, s.server) for s in self._templates.values()]

    def open_server(self, record: TemplateRecord) -> PageServer:
        """Start ``record``'s page server (it maps and scans the mem-file) without giving it
        forks: a takeover's new side builds the old side's servers before it adopts them."""
        return self._open_server(record)

    def export_state(
        self,
    ) -> tuple[list[Fork], list[tuple[TemplateKey, dict[str, Any]]], dict[str, int]]:
        """For a takeover's old side, once quiesced: every fork, where each template's
        hot-page loop stands, and how many of each fork's fault latencies the metrics have
        counted already."""
        with self._lock:
            forks = list(self._forks.values())
            loops = [(key, loop.snapshot()) for key, loop in self._loops.items()]
        with self._feed_lock:
            fed = {f.fork_id: self._fed.get(f.fork_id, 0) for f in forks}
        return forks, loops, fed

    def adopt_template(self, record: TemplateRecord, server: PageServer) -> None:
        """Serve ``record``'s forks from ``server``, which a takeover handed them to."""
        with self._lock:
            self._templates[(record.id, record.created)] = _TemplateState(record, server)

    def adopt_loop(self, key: TemplateKey, snapshot: dict[str, Any]) -> None:
        """Continue a template's hot-page loop from another daemon's :meth:`export_state`."""
        loop = HotSetLoop()
        loop.restore(snapshot)
        with self._lock:
            self._loops[key] = loop

    def adopt_fork(self, fork: Fork, latencies_fed: int) -> None:
        """Hold ``fork``, which another daemon handed over (its template adopted first): a
        prefetch fork gets its template's hot set, and its VMM's exit is watched."""
        with self._feed_lock:
            self._fed[fork.fork_id] = latencies_fed
        with self._lock:
            loop = self._loops.get(fork.template_key)
            if fork.role == "prefetch" and loop is not None:
                fork.hot = loop.hot
            self._forks[fork.fork_id] = fork
            state = self._templates.get(fork.template_key)
            if state is not None:
                state.forks.add(fork.fork_id)
        if fork.handle is not None and not fork.vmm_exited:
            self._watch_exit(fork)

    def abandon(self) -> list[PageServer]:
        """Let go of every template and fork without releasing one or stopping a VMM (a
        takeover moved them, or a failed one's new side built them for nothing) and stop
        watching VMM exits; the page servers, which the caller abandons."""
        with self._lock:
            servers = [s.server for s in self._templates.values()]
            self._templates.clear()
            self._forks.clear()
        self._exits.close()
        return servers

    def close(self) -> None:
        """Release every fork (stopping the VMMs the manager started) and stop all servers."""
        with self._lock:
            self._closed = True
            ids = list(self._forks)
            starts = list(self._starting.values())
        for start in starts:
            start.ready.wait(self.config.restore_timeout)  # its forks are refused once up
        for fork_id in ids:
            with contextlib.suppress(ForkError):
                self.release(fork_id)
        with self._lock:
            states = list(self._templates.values())
            self._templates.clear()
        for state in states:
            state.server.close()
        self._exits.close()
        for vmm in self.drivers.values():
            vmm.close()


__all__ = [
    "DRIVER_CLASSES",
    "MAX_FORK_ID",
    "MAX_SOCKET_PATH",
    "DriverOptionsError",
    "Fork",
    "ForkManager",
    "ForkPhase",
    "ForkRole",
    "ManagerConfig",
    "TemplateKey",
    "UnknownForkError",
    "fork_id_room",
    "load_drivers",
    "new_latency_samples",
]
