"""A fork the daemon holds (:class:`Fork`), and the errors the fork manager answers with."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from pagefork.daemon.config import PrefetchPolicy
from pagefork.daemon.lifecycle import (
    PHASE,
    VMM_GONE,
    DaemonEvent,
    DaemonStage,
    ForkPhase,
    ForkStateWord,
    daemon_step,
    state_word,
)
from pagefork.errors import ForkError, PageforkError
from pagefork.hotloop import Role
from pagefork.hotpages import HotPageList
from pagefork.stats import ForkStats
from pagefork.vmm.base import VmmHandle

ForkRole = Role  # the fork's part in its template's hot-page loop

#: A template's identity: its id and its record's ``created`` stamp. A template deleted and
#: created again under the same id is another template: it never shares a page server, a
#: cached hot set or a re-record request with the old one.
TemplateKey = tuple[str, float]


class UnknownForkError(ForkError):
    """No live fork has this id, or another release has claimed it (the API answers 404)."""


class ForkConflictError(ForkError):
    """The fork is in no state for this request (the API answers 409)."""


class DriverOptionsError(PageforkError):
    """A fork's driver ``options`` are invalid (the API answers 400); nothing was started."""


@dataclass
class Fork:
    """A fork the manager knows: where its VMM connects and what the manager did for it.

    Where it stands is its :attr:`stage`, moved only by :meth:`move` through the daemon's
    lifecycle table (:mod:`pagefork.daemon.lifecycle`), under the manager's lock.
    """

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
    #: How its hot set goes in around its resume (its template's policy, or the request's).
    policy: PrefetchPolicy = field(default_factory=PrefetchPolicy)
    stage: DaemonStage = DaemonStage.LIVE
    template_created: float = 0.0  # the template record's ``created``: see TemplateKey
    #: The VMM's exit status once it has exited (negative: the signal that killed it; None
    #: while it runs, or when the driver cannot tell).
    exit_status: int | None = None
    # The exit watcher's token for this fork's VMM, while watched.
    exit_watch: int | None = field(default=None, repr=False)
    # Set once the fork is torn down; ``released_stats`` then holds its final counters.
    released: threading.Event = field(default_factory=threading.Event, repr=False)
    released_stats: ForkStats | None = field(default=None, repr=False)
    # Snapshots (see ForkSnapshots): one at a time; the last child (its identity), and the
    # removed ranges it holds; why no more can be taken, once the diff chain broke.
    snapshot_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    last_snapshot: TemplateKey | None = field(default=None, repr=False)
    removed_at_snapshot: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    snapshot_lost: str | None = field(default=None, repr=False)

    def move(self, event: DaemonEvent) -> DaemonStage:
        """Move the fork on ``event`` through the lifecycle table (the manager's lock held);
        :class:`ForkError` naming the fork if the table has no such move."""
        self.stage = daemon_step(self.fork_id, self.stage, event)
        return self.stage

    @property
    def phase(self) -> ForkPhase:
        """Where its VMM stands, as the API shows it."""
        return PHASE[self.stage]

    @property
    def vmm_exited(self) -> bool:
        """True once the daemon saw its VMM exit (``exit_status`` may still be None)."""
        return self.stage in VMM_GONE

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
        return state_word(self.stage)

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
    """What :class:`~pagefork.daemon.journal.ForkJournal` keeps of ``fork``."""
    return {
        "fork": fork.fork_id,
        "template": fork.template_id,
        "template_created": fork.template_created,
        "socket": fork.socket_path,
        "role": fork.role,
        "created": fork.created,
        "driver": fork.driver,
    }
