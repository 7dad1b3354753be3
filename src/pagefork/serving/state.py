"""A fork's lifecycle as explicit state machines (the h11 style: a table of allowed moves).

:class:`ForkState` is the page server's view of a fork (its uffd): the supervisor owns it, the
workers report what happened, and the supervisor moves it. :class:`ForkPhase` is the daemon's
view of the fork's VMM, owned by the fork manager. Every move goes through :func:`transition`,
so an impossible one is a bug that shows up at once instead of a fork stuck in a state nobody
expected.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from pagefork.errors import ForkError


class ForkState(str, enum.Enum):
    """Where a fork stands. The values are what ``ForkStats.state`` and the API show."""

    #: Registered; no VMM has connected yet (or its handshake failed and it may retry).
    WAITING = "waiting"
    #: A VMM connected; its mappings and uffd are not in yet.
    HANDSHAKE = "handshake"
    #: A worker serves its faults.
    SERVING = "serving"
    #: Its worker died; a replacement is adopting it (faults wait, nothing is lost).
    ADOPTING = "adopting"
    #: The VMM exited or the fork was stopped: served to the end.
    ENDED = "ended"
    #: A fatal error ended it; the failure policy was applied.
    FAILED = "failed"


_ALLOWED: dict[ForkState, frozenset[ForkState]] = {
    ForkState.WAITING: frozenset({ForkState.HANDSHAKE, ForkState.ENDED}),
    ForkState.HANDSHAKE: frozenset(
        {ForkState.SERVING, ForkState.WAITING, ForkState.FAILED, ForkState.ENDED}
    ),
    ForkState.SERVING: frozenset({ForkState.ADOPTING, ForkState.ENDED, ForkState.FAILED}),
    ForkState.ADOPTING: frozenset({ForkState.SERVING, ForkState.ENDED, ForkState.FAILED}),
    ForkState.ENDED: frozenset(),
    ForkState.FAILED: frozenset(),
}

_S = TypeVar("_S", "ForkState", "ForkPhase")

#: States after which a fork is never served again.
FINAL = frozenset({ForkState.ENDED, ForkState.FAILED})


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


_PHASES: dict[ForkPhase, frozenset[ForkPhase]] = {
    ForkPhase.STARTING: frozenset({ForkPhase.LIVE, ForkPhase.EXITED, ForkPhase.RELEASING}),
    ForkPhase.LIVE: frozenset({ForkPhase.EXITED, ForkPhase.RELEASING}),
    ForkPhase.EXITED: frozenset({ForkPhase.RELEASING}),
    ForkPhase.RELEASING: frozenset(),
}


def can_move(old: ForkState | ForkPhase, new: ForkState | ForkPhase) -> bool:
    """True when a fork in ``old`` may move to ``new``."""
    if isinstance(old, ForkState):
        return new in _ALLOWED[old]
    return new in _PHASES[old]


def transition(fork_id: str, old: _S, new: _S) -> _S:
    """Return ``new`` if the move is allowed; raise :class:`ForkError` naming the fork if not."""
    if not can_move(old, new):
        raise ForkError(f"fork {fork_id}: cannot go from {old.value} to {new.value}")
    return new
