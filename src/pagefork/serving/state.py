"""A fork's lifecycle as one explicit state machine (the h11 style: a table of allowed moves).

The supervisor owns each fork's state; workers report what happened and the supervisor moves
the state. Every move goes through :func:`transition`, so an impossible one is a bug that
shows up at once instead of a fork stuck in a state nobody expected.
"""

from __future__ import annotations

import enum

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

#: States after which a fork is never served again.
FINAL = frozenset({ForkState.ENDED, ForkState.FAILED})


def can_move(old: ForkState, new: ForkState) -> bool:
    """True when a fork in ``old`` may move to ``new``."""
    return new in _ALLOWED[old]


def transition(fork_id: str, old: ForkState, new: ForkState) -> ForkState:
    """Return ``new`` if the move is allowed; raise :class:`ForkError` naming the fork if not."""
    if new not in _ALLOWED[old]:
        raise ForkError(f"fork {fork_id}: cannot go from {old.value} to {new.value}")
    return new
