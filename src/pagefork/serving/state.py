"""A fork's lifecycle, one table per role (the h11 style: every rule that moves a fork is here).

- The supervisor's fork (:class:`Stage`, :data:`SUPERVISOR_TABLE`): keyed by (stage, event),
  each entry gives the next stage and the commands the supervisor then carries out. What was
  once a set of flags (dropping, handed over) is a stage of its own.
- The worker's fork (:class:`WorkerStage`, :data:`WORKER_TABLE`): the same for a worker's copy.
- :class:`ForkState` is what the API shows of a supervisor's fork (:data:`SHOWN`). The
  daemon's record of a fork has a table of its own, in ``pagefork.daemon.lifecycle``.

Nothing here does I/O: the tests walk every (stage, event) pair without a kernel. A pair that
is neither in a table nor ignored on purpose (a message that comes after its fork moved on) is a
bug, raised as :class:`ForkError` naming the fork.
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
    if not can_move(old, new):
        raise ForkError(f"fork {fork_id}: cannot go from {old.value} to {new.value}")
    return new


# --- the supervisor's fork -------------------------------------------------------------------
class Stage(enum.Enum):
    """Where the supervisor's record of a fork stands (finer than :class:`ForkState`)."""

    WAITING = "waiting"  # registered, no VMM yet (or its handshake failed: it may retry)
    HANDSHAKE = "handshake"  # a VMM connected; its mappings and uffd are not in yet
    SERVING = "serving"  # a worker serves it
    ADOPTING = "adopting"  # its worker died; another is taking it over
    DROPPING = "dropping"  # unregistered: its worker is ending it, never to be adopted again
    RELEASING = "releasing"  # a takeover asked its worker to let it go
    MOVING = "moving"  # asked to let it go, for a worker next to its VMM to serve it next
    RELEASED = "released"  # no worker holds it: the takeover's new side or ours takes it next
    ENDED = "ended"
    FAILED = "failed"


class Event(enum.Enum):
    """What happens to a supervisor's fork."""

    ACCEPTED = "accepted"  # a VMM connected on its socket
    HANDSHAKE_FAILED = "handshake_failed"  # bad handshake on its own socket: it may retry
    HANDSHAKE_LOST = "handshake_lost"  # bad handshake on a shared socket: nobody retries
    PLACED = "placed"  # handshake in, a worker and a ledger found
    UNSERVABLE = "unservable"  # handshake in, but no worker or ledger for it
    WORKER_SERVING = "worker_serving"  # its worker says it serves it
    WORKER_ENDED = "worker_ended"  # its worker ended it (VMM exited, or dropped)
    WORKER_FAILED = "worker_failed"  # its worker failed it
    WORKER_DIED = "worker_died"  # its worker died (or was killed as stuck); a new one adopts
    WORKER_LOST = "worker_lost"  # its worker died and no other can take it
    UNREGISTERED = "unregistered"  # the caller stopped it
    RELEASE_ASKED = "release_asked"  # a takeover asks its worker to let it go
    WORKER_RELEASED = "worker_released"  # its worker let it go
    READOPTED = "readopted"  # the takeover failed: our workers take it again
    MOVE_ASKED = "move_asked"  # its VMM runs on another worker's CPU now: that worker takes it
    CLOSED = "closed"  # the page server closes


class Command(enum.Enum):
    """What the supervisor does after a move (the table's second half)."""

    HAND_TO_WORKER = "hand_to_worker"  # send it to its worker to serve
    ADOPT_ON_WORKER = "adopt_on_worker"  # send it to a worker that wakes its vCPUs first
    SEND_DROP = "send_drop"  # ask its worker to end it
    SEND_RELEASE = "send_release"  # ask its worker to let it go
    FORGET_WORKER = "forget_worker"  # no worker holds it now
    APPLY_POLICY = "apply_policy"  # kill (or leave) the VMM: nobody will serve its guest
    FINISH = "finish"  # keep its final figures, close our copies of its fds


_S_, _E_, _C_ = Stage, Event, Command
#: (stage, event) -> (next stage, commands). The one place a supervisor's fork moves.
SUPERVISOR_TABLE: dict[tuple[Stage, Event], tuple[Stage, tuple[Command, ...]]] = {
    (_S_.WAITING, _E_.ACCEPTED): (_S_.HANDSHAKE, ()),
    (_S_.WAITING, _E_.UNREGISTERED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.WAITING, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.HANDSHAKE, _E_.HANDSHAKE_FAILED): (_S_.WAITING, ()),
    (_S_.HANDSHAKE, _E_.HANDSHAKE_LOST): (_S_.FAILED, ()),
    (_S_.HANDSHAKE, _E_.PLACED): (_S_.SERVING, (_C_.HAND_TO_WORKER,)),
    (_S_.HANDSHAKE, _E_.UNSERVABLE): (_S_.FAILED, (_C_.APPLY_POLICY, _C_.FINISH)),
    (_S_.HANDSHAKE, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.SERVING, _E_.WORKER_ENDED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.SERVING, _E_.WORKER_FAILED): (_S_.FAILED, (_C_.FINISH,)),
    (_S_.SERVING, _E_.WORKER_DIED): (_S_.ADOPTING, (_C_.ADOPT_ON_WORKER,)),
    (_S_.SERVING, _E_.WORKER_LOST): (_S_.FAILED, (_C_.APPLY_POLICY, _C_.FINISH)),
    (_S_.SERVING, _E_.UNREGISTERED): (_S_.DROPPING, (_C_.SEND_DROP,)),
    (_S_.SERVING, _E_.RELEASE_ASKED): (_S_.RELEASING, (_C_.SEND_RELEASE,)),
    (_S_.SERVING, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.ADOPTING, _E_.WORKER_SERVING): (_S_.SERVING, ()),
    (_S_.ADOPTING, _E_.WORKER_ENDED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.ADOPTING, _E_.WORKER_FAILED): (_S_.FAILED, (_C_.FINISH,)),
    (_S_.ADOPTING, _E_.WORKER_DIED): (_S_.ADOPTING, (_C_.ADOPT_ON_WORKER,)),
    (_S_.ADOPTING, _E_.WORKER_LOST): (_S_.FAILED, (_C_.APPLY_POLICY, _C_.FINISH)),
    (_S_.ADOPTING, _E_.UNREGISTERED): (_S_.DROPPING, (_C_.SEND_DROP,)),
    (_S_.ADOPTING, _E_.RELEASE_ASKED): (_S_.RELEASING, (_C_.SEND_RELEASE,)),
    (_S_.ADOPTING, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    # Unregistered: whatever its worker says next ends it; a worker death ends it too.
    (_S_.DROPPING, _E_.WORKER_ENDED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.DROPPING, _E_.WORKER_FAILED): (_S_.FAILED, (_C_.FINISH,)),
    (_S_.DROPPING, _E_.WORKER_DIED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.DROPPING, _E_.WORKER_LOST): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.DROPPING, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    # A takeover: the worker lets it go; a replacement of a dead one adopts it and is asked
    # again (the release loop asks every worker that holds a fork being released).
    (_S_.RELEASING, _E_.WORKER_RELEASED): (_S_.RELEASED, (_C_.FORGET_WORKER,)),
    (_S_.RELEASING, _E_.WORKER_ENDED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.RELEASING, _E_.WORKER_FAILED): (_S_.FAILED, (_C_.FINISH,)),
    (_S_.RELEASING, _E_.WORKER_DIED): (_S_.RELEASING, (_C_.ADOPT_ON_WORKER,)),
    (_S_.RELEASING, _E_.WORKER_LOST): (_S_.FAILED, (_C_.APPLY_POLICY, _C_.FINISH)),
    (_S_.RELEASING, _E_.UNREGISTERED): (_S_.DROPPING, (_C_.SEND_DROP,)),
    (_S_.RELEASING, _E_.READOPTED): (_S_.ADOPTING, (_C_.ADOPT_ON_WORKER,)),
    (_S_.RELEASING, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.RELEASED, _E_.READOPTED): (_S_.ADOPTING, (_C_.ADOPT_ON_WORKER,)),
    (_S_.RELEASED, _E_.UNREGISTERED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.RELEASED, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    # A move (pagefork.serving.following): the worker lets it go, then the worker on its
    # VMM's CPU adopts it (wakes its vCPUs: faults raised meanwhile wait in the uffd). A death
    # of the first worker ends the move there: a replacement adopts it as any other orphan. A
    # takeover's release takes over the release already asked for.
    (_S_.SERVING, _E_.MOVE_ASKED): (_S_.MOVING, (_C_.SEND_RELEASE,)),
    (_S_.MOVING, _E_.WORKER_RELEASED): (_S_.ADOPTING, (_C_.ADOPT_ON_WORKER,)),
    (_S_.MOVING, _E_.WORKER_ENDED): (_S_.ENDED, (_C_.FINISH,)),
    (_S_.MOVING, _E_.WORKER_FAILED): (_S_.FAILED, (_C_.FINISH,)),
    (_S_.MOVING, _E_.WORKER_DIED): (_S_.ADOPTING, (_C_.ADOPT_ON_WORKER,)),
    (_S_.MOVING, _E_.WORKER_LOST): (_S_.FAILED, (_C_.APPLY_POLICY, _C_.FINISH)),
    (_S_.MOVING, _E_.UNREGISTERED): (_S_.DROPPING, (_C_.SEND_DROP,)),
    (_S_.MOVING, _E_.RELEASE_ASKED): (_S_.RELEASING, ()),
    (_S_.MOVING, _E_.CLOSED): (_S_.ENDED, (_C_.FINISH,)),
    # Unregistered while its worker let it go (a move or a takeover): nobody serves it now.
    (_S_.DROPPING, _E_.WORKER_RELEASED): (_S_.ENDED, (_C_.FINISH,)),
}

_WORKER_EVENTS = frozenset(
    {_E_.WORKER_SERVING, _E_.WORKER_ENDED, _E_.WORKER_FAILED, _E_.WORKER_RELEASED,
     _E_.WORKER_DIED, _E_.WORKER_LOST}
)  # fmt: skip
#: Pairs that change nothing on purpose: a worker's word that arrives after its fork moved on
#: (a re-adopted fork's late "released", an ended fork's late "serving"), a stop of what ended.
IGNORED: frozenset[tuple[Stage, Event]] = frozenset(
    {(s, e) for s in (_S_.ENDED, _S_.FAILED) for e in (*_WORKER_EVENTS, _E_.UNREGISTERED,
                                                          _E_.CLOSED, _E_.READOPTED)}
    | {(s, _E_.WORKER_SERVING) for s in (_S_.SERVING, _S_.DROPPING, _S_.RELEASING, _S_.MOVING)}
    | {(s, _E_.MOVE_ASKED) for s in _S_ if s is not _S_.SERVING}
    | {(s, _E_.WORKER_RELEASED) for s in (_S_.SERVING, _S_.ADOPTING)}
    | {(_S_.SERVING, _E_.READOPTED), (_S_.ADOPTING, _E_.READOPTED), (_S_.MOVING, _E_.READOPTED)}
    | {(_S_.DROPPING, _E_.UNREGISTERED), (_S_.DROPPING, _E_.RELEASE_ASKED)}
    | {(_S_.RELEASING, _E_.RELEASE_ASKED)}
)  # fmt: skip

#: What the API shows for each stage.
SHOWN: dict[Stage, ForkState] = {
    _S_.WAITING: ForkState.WAITING,
    _S_.HANDSHAKE: ForkState.HANDSHAKE,
    _S_.SERVING: ForkState.SERVING,
    _S_.ADOPTING: ForkState.ADOPTING,
    _S_.DROPPING: ForkState.SERVING,
    _S_.RELEASING: ForkState.SERVING,
    _S_.RELEASED: ForkState.SERVING,
    _S_.MOVING: ForkState.SERVING,
    _S_.ENDED: ForkState.ENDED,
    _S_.FAILED: ForkState.FAILED,
}
#: Stages after which a fork is never served again.
FINAL_STAGES = frozenset({Stage.ENDED, Stage.FAILED})
#: Stages in which a worker holds the fork.
HELD = frozenset({Stage.SERVING, Stage.ADOPTING, Stage.DROPPING, Stage.RELEASING, Stage.MOVING})


def step(fork_id: str, stage: Stage, event: Event) -> tuple[Stage, tuple[Command, ...]]:
    """The next stage of a fork in ``stage`` on ``event``, and the commands to carry out."""
    found = SUPERVISOR_TABLE.get((stage, event))
    if found is not None:
        return found
    if (stage, event) in IGNORED:
        return stage, ()
    raise ForkError(f"fork {fork_id}: no move from {stage.value} on {event.value}")


# --- the worker's fork -----------------------------------------------------------------------
class WorkerStage(enum.Enum):
    """Where a worker's copy of a fork stands."""

    SERVING = "serving"
    PREFETCHING = "prefetching"  # a prefetch runs in it (the loop serves faults between slices)
    ENDING = "ending"  # asked to end while prefetching: it ends once the prefetch stops
    ENDED = "ended"  # its fds are closed and the supervisor told
    RELEASED = "released"  # let go in a takeover: fds closed, nothing told but "released"


class WorkerEvent(enum.Enum):
    """What happens to a worker's copy of a fork."""

    PREFETCH_STARTED = "prefetch_started"
    PREFETCH_STOPPED = "prefetch_stopped"
    END = "end"  # its VMM exited, it failed, or it was dropped
    RELEASE = "release"


class WorkerCommand(enum.Enum):
    """What the worker does after a move."""

    CLOSE = "close"  # stop watching it, close its fds, tell the supervisor how it ended
    END_DEFERRED = "end_deferred"  # carry out the end that waited for the prefetch
    LET_GO = "let_go"  # stop watching it and close its fds, without ending it


_W_, _WE_, _WC_ = WorkerStage, WorkerEvent, WorkerCommand
#: (stage, event) -> (next stage, commands) for a worker's copy of a fork.
_WorkerMove = tuple[WorkerStage, tuple[WorkerCommand, ...]]
WORKER_TABLE: dict[tuple[WorkerStage, WorkerEvent], _WorkerMove] = {
    (_W_.SERVING, _WE_.PREFETCH_STARTED): (_W_.PREFETCHING, ()),
    (_W_.SERVING, _WE_.END): (_W_.ENDED, (_WC_.CLOSE,)),
    (_W_.SERVING, _WE_.RELEASE): (_W_.RELEASED, (_WC_.LET_GO,)),
    (_W_.PREFETCHING, _WE_.PREFETCH_STOPPED): (_W_.SERVING, ()),
    # The prefetch holds the fork's uffd: it stops at its next slice, then the fork ends.
    (_W_.PREFETCHING, _WE_.END): (_W_.ENDING, ()),
    (_W_.ENDING, _WE_.PREFETCH_STOPPED): (_W_.ENDED, (_WC_.END_DEFERRED,)),
}
#: Worker pairs that change nothing on purpose: the first reason to end a fork is the one kept.
WORKER_IGNORED: frozenset[tuple[WorkerStage, WorkerEvent]] = frozenset(
    {(_W_.ENDING, _WE_.END), (_W_.ENDED, _WE_.END), (_W_.RELEASED, _WE_.END),
     (_W_.ENDED, _WE_.RELEASE), (_W_.RELEASED, _WE_.RELEASE)}
)  # fmt: skip


def worker_step(
    fork_id: str, stage: WorkerStage, event: WorkerEvent
) -> tuple[WorkerStage, tuple[WorkerCommand, ...]]:
    """The next stage of a worker's fork in ``stage`` on ``event``, and what to do."""
    found = WORKER_TABLE.get((stage, event))
    if found is not None:
        return found
    if (stage, event) in WORKER_IGNORED:
        return stage, ()
    raise ForkError(f"fork {fork_id}: no move from {stage.value} on {event.value} in the worker")
