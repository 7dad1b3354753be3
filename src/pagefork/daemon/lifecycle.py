"""A daemon fork's lifecycle: one table, keyed by (stage, event) (the h11 style).

The daemon's record of a fork (:class:`~pagefork.daemon.fork.Fork`) moves only through
:data:`DAEMON_TABLE`. What used to be flags beside its phase (its VMM has exited, its session
has ended, a release arrived while it was starting) are stages of their own, so a reader sees
every combination that can occur and where each one goes:

- *starting*: the manager restores the fork's VMM. Its VMM may exit, or its session end,
  before that start is over (``STARTING_EXITED``, ``STARTING_ENDED``); a release that arrives
  meanwhile is carried out by the fork's creator once the start ends (``CANCELLED*``).
- *live*: restored, or driven by the caller. Its session may end before the daemon sees its VMM
  go (``ENDED``: a caller's VMM, or a driver without a pidfd), or its VMM exits (``EXITED``).
- *releasing*: one release has claimed it; it is ``RELEASED`` once torn down.

Each stage shows as a :class:`ForkPhase` (the API's ``phase``) and a state word (``live`` or
``exited``: the API's ``state``). Nothing here does I/O: the tests walk every pair. A pair that
is neither in the table nor ignored on purpose is a bug, raised as :class:`ForkError` naming
the fork.
"""

from __future__ import annotations

import enum
from typing import Literal

from pagefork.errors import ForkError

#: What a held fork is, in the words the API, the CLI and the metrics share. A fork that is
#: gone was *released*; a template that is gone *deleted*.
ForkStateWord = Literal["live", "exited"]
#: Every :data:`ForkStateWord`, in the order they are shown.
FORK_STATES: tuple[ForkStateWord, ...] = ("live", "exited")


class ForkPhase(str, enum.Enum):
    """Where a daemon fork's VMM stands. The values are what the API shows as ``phase``."""

    #: The manager is restoring its VMM (a release waits for that to end).
    STARTING = "starting"
    #: Restored, or driven by the caller.
    LIVE = "live"
    #: Its VMM process has exited; the fork is kept until it is released.
    EXITED = "exited"
    #: One release has claimed it.
    RELEASING = "releasing"


class DaemonStage(enum.Enum):
    """Where the daemon's record of a fork stands (finer than :class:`ForkPhase`)."""

    STARTING = "starting"  # its VMM is being restored
    STARTING_ENDED = "starting_ended"  # ... and its session has ended meanwhile
    STARTING_EXITED = "starting_exited"  # ... and its VMM has exited meanwhile
    CANCELLED = "cancelled"  # a release arrived while starting: its creator releases it
    CANCELLED_ENDED = "cancelled_ended"  # ... and its session has ended
    CANCELLED_EXITED = "cancelled_exited"  # ... and its VMM has exited
    LIVE = "live"  # restored, or driven by the caller
    ENDED = "ended"  # its session has ended; its VMM was not seen to exit
    EXITED = "exited"  # its VMM has exited
    RELEASING = "releasing"  # one release claimed it
    RELEASING_ENDED = "releasing_ended"  # ... and its session has ended
    RELEASING_EXITED = "releasing_exited"  # ... and its VMM has exited
    RELEASED = "released"  # torn down: no longer held


class DaemonEvent(enum.Enum):
    """What happens to a daemon's fork."""

    STARTED = "started"  # the manager's start of its VMM (restore, prefetch, resume) is over
    START_FAILED = "start_failed"  # that start failed: its creator releases it
    RELEASE = "release"  # a release claims it
    VMM_EXITED = "vmm_exited"  # the exit watcher saw its VMM exit
    SESSION_ENDED = "session_ended"  # its page-server session ended (a wait, or final stats)
    TORN_DOWN = "torn_down"  # the release that claimed it is done


_D, _E = DaemonStage, DaemonEvent
#: (stage, event) -> next stage. The one place a daemon's fork moves.
DAEMON_TABLE: dict[tuple[DaemonStage, DaemonEvent], DaemonStage] = {
    # Starting: the start's end decides, carrying over what happened meanwhile.
    (_D.STARTING, _E.STARTED): _D.LIVE,
    (_D.STARTING, _E.START_FAILED): _D.RELEASING,
    (_D.STARTING, _E.RELEASE): _D.CANCELLED,
    (_D.STARTING, _E.VMM_EXITED): _D.STARTING_EXITED,
    (_D.STARTING, _E.SESSION_ENDED): _D.STARTING_ENDED,
    (_D.STARTING_ENDED, _E.STARTED): _D.ENDED,
    (_D.STARTING_ENDED, _E.START_FAILED): _D.RELEASING_ENDED,
    (_D.STARTING_ENDED, _E.RELEASE): _D.CANCELLED_ENDED,
    (_D.STARTING_ENDED, _E.VMM_EXITED): _D.STARTING_EXITED,
    (_D.STARTING_EXITED, _E.STARTED): _D.EXITED,
    (_D.STARTING_EXITED, _E.START_FAILED): _D.RELEASING_EXITED,
    (_D.STARTING_EXITED, _E.RELEASE): _D.CANCELLED_EXITED,
    # Released while starting: whether the start succeeds or fails, its creator releases it.
    (_D.CANCELLED, _E.STARTED): _D.RELEASING,
    (_D.CANCELLED, _E.START_FAILED): _D.RELEASING,
    (_D.CANCELLED, _E.VMM_EXITED): _D.CANCELLED_EXITED,
    (_D.CANCELLED, _E.SESSION_ENDED): _D.CANCELLED_ENDED,
    (_D.CANCELLED_ENDED, _E.STARTED): _D.RELEASING_ENDED,
    (_D.CANCELLED_ENDED, _E.START_FAILED): _D.RELEASING_ENDED,
    (_D.CANCELLED_ENDED, _E.VMM_EXITED): _D.CANCELLED_EXITED,
    (_D.CANCELLED_EXITED, _E.STARTED): _D.RELEASING_EXITED,
    (_D.CANCELLED_EXITED, _E.START_FAILED): _D.RELEASING_EXITED,
    # Held.
    (_D.LIVE, _E.RELEASE): _D.RELEASING,
    (_D.LIVE, _E.VMM_EXITED): _D.EXITED,
    (_D.LIVE, _E.SESSION_ENDED): _D.ENDED,
    (_D.ENDED, _E.RELEASE): _D.RELEASING_ENDED,
    (_D.ENDED, _E.VMM_EXITED): _D.EXITED,
    (_D.EXITED, _E.RELEASE): _D.RELEASING_EXITED,
    # Claimed by a release: its VMM is stopped, its session unregistered, then it is gone.
    (_D.RELEASING, _E.VMM_EXITED): _D.RELEASING_EXITED,
    (_D.RELEASING, _E.SESSION_ENDED): _D.RELEASING_ENDED,
    (_D.RELEASING, _E.TORN_DOWN): _D.RELEASED,
    (_D.RELEASING_ENDED, _E.VMM_EXITED): _D.RELEASING_EXITED,
    (_D.RELEASING_ENDED, _E.TORN_DOWN): _D.RELEASED,
    (_D.RELEASING_EXITED, _E.TORN_DOWN): _D.RELEASED,
}

_ENDED_ALREADY = (_D.STARTING_ENDED, _D.STARTING_EXITED, _D.CANCELLED_ENDED,
                  _D.CANCELLED_EXITED, _D.ENDED, _D.EXITED, _D.RELEASING_ENDED,
                  _D.RELEASING_EXITED)  # fmt: skip
#: Pairs that change nothing on purpose: a session's end is heard twice (a wait sees it, then
#: its final stats arrive) or after its VMM's exit; a torn-down fork hears the last of its VMM
#: and its session after it is gone (the exit watcher and the page server run on threads of
#: their own).
DAEMON_IGNORED: frozenset[tuple[DaemonStage, DaemonEvent]] = frozenset(
    {(s, _E.SESSION_ENDED) for s in (*_ENDED_ALREADY, _D.RELEASED)} | {(_D.RELEASED, _E.VMM_EXITED)}
)

#: Stages a release has claimed already: a second release finds no fork to release.
CLAIMED = frozenset({_D.CANCELLED, _D.CANCELLED_ENDED, _D.CANCELLED_EXITED, _D.RELEASING,
                     _D.RELEASING_ENDED, _D.RELEASING_EXITED, _D.RELEASED})  # fmt: skip
#: Stages of a starting fork that a release has claimed: its start stops early.
CANCELLED = frozenset({_D.CANCELLED, _D.CANCELLED_ENDED, _D.CANCELLED_EXITED})
#: Stages of a fork whose VMM the manager is still starting.
STARTING = frozenset({_D.STARTING, _D.STARTING_ENDED, _D.STARTING_EXITED, _D.CANCELLED,
                      _D.CANCELLED_ENDED, _D.CANCELLED_EXITED})  # fmt: skip
#: Stages of a fork whose VMM the daemon saw exit.
VMM_GONE = frozenset({_D.STARTING_EXITED, _D.CANCELLED_EXITED, _D.EXITED,
                      _D.RELEASING_EXITED})  # fmt: skip
#: Stages in which the fork's guest is gone (its VMM exited or its session ended): the API
#: calls such a fork ``exited``.
GONE = frozenset(_ENDED_ALREADY) | {_D.RELEASED}

#: What the API shows as ``phase`` for each stage (a released fork is no longer shown).
PHASE: dict[DaemonStage, ForkPhase] = {
    **{s: ForkPhase.STARTING for s in STARTING},
    _D.LIVE: ForkPhase.LIVE,
    _D.ENDED: ForkPhase.LIVE,
    _D.EXITED: ForkPhase.EXITED,
    **{s: ForkPhase.RELEASING for s in CLAIMED - STARTING},
}


def daemon_step(fork_id: str, stage: DaemonStage, event: DaemonEvent) -> DaemonStage:
    """The next stage of a daemon fork in ``stage`` on ``event``; :class:`ForkError` naming the
    fork if the table has no such move."""
    found = DAEMON_TABLE.get((stage, event))
    if found is not None:
        return found
    if (stage, event) in DAEMON_IGNORED:
        return stage
    raise ForkError(f"fork {fork_id}: no move from {stage.value} on {event.value} in the daemon")


def state_word(stage: DaemonStage) -> ForkStateWord:
    """``live`` or ``exited``: what the API, the CLI and the metrics call a fork in ``stage``."""
    return "exited" if stage in GONE else "live"


def stage_of(phase: ForkPhase, vmm_exited: bool, session_ended: bool) -> DaemonStage:
    """The stage a fork handed over by another daemon (which sends its ``phase``, whether its
    VMM exited and whether its session ended) is in here."""
    if phase is ForkPhase.STARTING:
        base = (_D.STARTING, _D.STARTING_ENDED, _D.STARTING_EXITED)
    elif phase is ForkPhase.RELEASING:
        base = (_D.RELEASING, _D.RELEASING_ENDED, _D.RELEASING_EXITED)
    else:
        base = (_D.LIVE, _D.ENDED, _D.EXITED)
    if vmm_exited or phase is ForkPhase.EXITED:
        return base[2]
    return base[1] if session_ended else base[0]
