"""What the fork manager holds, under one lock: its forks, its templates' page servers (and
the ones starting), and each template's hot-page loop.

The manager's parts (:mod:`~pagefork.daemon.servers`, :mod:`~pagefork.daemon.hotsets`,
:mod:`~pagefork.daemon.releasing`, :mod:`~pagefork.daemon.fork_snapshots`,
:mod:`~pagefork.daemon.handover`) share one :class:`Holdings`; every read or change of its
tables happens with :attr:`Holdings.lock` held.

Lock order: ``hot_lock`` before ``lock`` before the registry's lock. ``feed_lock`` is taken
alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagefork.daemon.fork import Fork, TemplateKey, UnknownForkError
from pagefork.daemon.journal import ForkJournal, SocketJournal
from pagefork.daemon.lifecycle import DaemonEvent
from pagefork.errors import ForkError
from pagefork.hotloop import HotSetLoop
from pagefork.server import PageServer
from pagefork.stats import ForkStats
from pagefork.templates import TemplateRecord


@dataclass
class Hooks:
    """Who the fork manager tells what happened, and where it notes its forks."""

    #: Called with (template id, final stats) when a fork's session ends (for metrics).
    on_fork_end: Callable[[str, ForkStats], None] | None = None
    #: Called with (template id, fault latencies in ns) with each fork's new latencies: from
    #: a metrics scrape and when the fork is released.
    on_fault_latencies: Callable[[str, list[int]], None] | None = None
    #: Called with the template id when a worker of its page server died and was replaced.
    on_worker_restarted: Callable[[str], None] | None = None
    #: The fork sockets this daemon created, so that a restart removes exactly those.
    socket_journal: SocketJournal | None = None
    #: Set by a daemon whose workers outlive it (pagefork.takeover.orphan): each fork's
    #: record, and what each new page server's workers are told.
    fork_journal: ForkJournal | None = None
    orphan_setup: Callable[[TemplateRecord], dict[str, Any]] | None = None


@dataclass
class TemplateState:
    """A template's page server and its forks."""

    record: TemplateRecord
    server: PageServer
    forks: set[str] = field(default_factory=set)

    @property
    def key(self) -> TemplateKey:
        """The template's identity."""
        return (self.record.id, self.record.created)


@dataclass
class ServerStart:
    """A template's page server being started (outside the manager's lock) by one fork's
    creator; the creators of other forks of it wait on ``ready``."""

    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Holdings:
    """The fork manager's tables and the locks that guard them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Notified when a fork's final stats arrive (after its hot-set window was reported).
        self.final = threading.Condition(self.lock)
        self.templates: dict[TemplateKey, TemplateState] = {}
        self.starting: dict[TemplateKey, ServerStart] = {}
        self.forks: dict[str, Fork] = {}
        #: Ids of forks waiting for their template's page server.
        self.reserved: set[str] = set()
        #: Each template's hot-page loop (its hot set, loaded from its file once, and who
        #: records), by template identity: a template deleted and created again under its id
        #: starts a loop of its own. It outlives the template's page server.
        self.loops: dict[TemplateKey, HotSetLoop] = {}
        #: Serialises saving hot sets, and a template's delete against a save into it.
        self.hot_lock = threading.Lock()
        #: Fault latencies already fed to the metrics, per fork (sample counts).
        self.fed: dict[str, int] = {}
        self.feed_lock = threading.Lock()
        #: Set once the manager closes: no fork is created after.
        self.closed = False

    def fork(self, fork_id: str) -> Fork:
        """The held fork ``fork_id``; :class:`UnknownForkError` if unknown."""
        with self.lock:
            fork = self.forks.get(fork_id)
        if fork is None:
            raise UnknownForkError(f"unknown fork {fork_id!r}")
        return fork

    def state_of(self, fork: Fork) -> TemplateState:
        """The page server ``fork`` is served by; :class:`ForkError` if it is gone."""
        with self.lock:
            state = self.templates.get(fork.template_key)
        if state is None:
            raise ForkError(f"fork {fork.fork_id}: its page server is gone")
        return state

    def move(self, fork: Fork, event: DaemonEvent) -> None:
        """Move ``fork`` through the lifecycle table, under the lock."""
        with self.lock:
            fork.move(event)

    def drop_if_idle(self, state: TemplateState) -> PageServer | None:
        """Forget ``state`` if it has no fork left (lock held); its server, to be closed by
        the caller outside the lock, or None."""
        if state.forks:
            return None
        if self.templates.get(state.key) is state:
            del self.templates[state.key]
        return state.server
