"""The daemon's fork lifecycle table, checked without a kernel.

Every (stage, event) pair is walked: it either moves, is ignored on purpose, or is a bug raised
as ForkError naming the fork. The stages' shown phase and state word are checked against what
the API showed when these were flags beside the phase.
"""

from __future__ import annotations

import pytest

from pagefork.daemon.fork import Fork
from pagefork.daemon.lifecycle import (
    CANCELLED,
    CLAIMED,
    DAEMON_IGNORED,
    DAEMON_TABLE,
    GONE,
    PHASE,
    STARTING,
    VMM_GONE,
    DaemonEvent,
    DaemonStage,
    ForkPhase,
    daemon_step,
    stage_of,
    state_word,
)
from pagefork.errors import ForkError

D, E = DaemonStage, DaemonEvent


@pytest.mark.parametrize("stage", list(DaemonStage))
@pytest.mark.parametrize("event", list(DaemonEvent))
def test_every_daemon_pair_moves_is_ignored_or_is_refused(
    stage: DaemonStage, event: DaemonEvent
) -> None:
    pair = (stage, event)
    assert not (pair in DAEMON_TABLE and pair in DAEMON_IGNORED)
    if pair in DAEMON_TABLE:
        new = daemon_step("f", stage, event)
        assert new is DAEMON_TABLE[pair]
        assert stage is not D.RELEASED  # nothing moves a fork that is gone
        # What happened to its guest is never forgotten by a move.
        assert stage not in GONE or new in GONE
        assert stage not in VMM_GONE or new in VMM_GONE or new is D.RELEASED
        # A claimed fork stays claimed; nothing but a release claims one.
        assert stage not in CLAIMED or new in CLAIMED
        if new in CLAIMED and stage not in CLAIMED:
            assert event in (E.RELEASE, E.START_FAILED)
        # Only the end of its start takes a fork out of starting.
        if stage in STARTING and new not in STARTING:
            assert event in (E.STARTED, E.START_FAILED)
    elif pair in DAEMON_IGNORED:
        assert daemon_step("f", stage, event) is stage
        assert event in (E.SESSION_ENDED, E.VMM_EXITED)
    else:
        with pytest.raises(ForkError, match=f"fork f: no move from {stage.value} on"):
            daemon_step("f", stage, event)


def test_every_stage_is_shown_and_every_held_fork_can_be_released() -> None:
    assert set(PHASE) == set(DaemonStage)
    for stage in DaemonStage:
        if stage in CLAIMED:  # a second release finds no fork to release
            assert (stage, E.RELEASE) not in DAEMON_TABLE
            continue
        claimed = daemon_step("f", stage, E.RELEASE)
        assert claimed in CLAIMED
        # However it was claimed, it ends torn down (a starting one once its start ends).
        if claimed in CANCELLED:
            claimed = daemon_step("f", claimed, E.STARTED)
        assert daemon_step("f", claimed, E.TORN_DOWN) is D.RELEASED


def test_a_start_ends_live_or_as_its_vmm_and_session_left_it() -> None:
    assert daemon_step("f", D.STARTING, E.STARTED) is D.LIVE
    exited = daemon_step("f", D.STARTING, E.VMM_EXITED)
    assert daemon_step("f", exited, E.STARTED) is D.EXITED
    ended = daemon_step("f", D.STARTING, E.SESSION_ENDED)
    after = daemon_step("f", ended, E.STARTED)
    assert (PHASE[after], state_word(after)) == (ForkPhase.LIVE, "exited")
    for stage in STARTING:
        assert PHASE[daemon_step("f", stage, E.START_FAILED)] is ForkPhase.RELEASING


def test_a_second_exit_of_one_vmm_is_a_bug_named_by_fork() -> None:
    with pytest.raises(ForkError, match="fork f: no move from exited on vmm_exited"):
        daemon_step("f", D.EXITED, E.VMM_EXITED)


@pytest.mark.parametrize(
    ("stage", "phase", "word"),
    [
        (D.STARTING, "starting", "live"),
        (D.STARTING_EXITED, "starting", "exited"),
        (D.CANCELLED, "starting", "live"),
        (D.LIVE, "live", "live"),
        (D.ENDED, "live", "exited"),  # session over; its VMM not seen to go
        (D.EXITED, "exited", "exited"),
        (D.RELEASING, "releasing", "live"),
        (D.RELEASING_EXITED, "releasing", "exited"),
    ],
)
def test_a_fork_shows_the_phase_and_state_the_api_showed(
    stage: DaemonStage, phase: str, word: str
) -> None:
    fork = Fork("f", "t", "/s", "demand", 0.0, stage=stage)
    shown = fork.to_dict()
    assert (shown["phase"], shown["state"]) == (phase, word)
    assert fork.vmm_exited is (stage in VMM_GONE)


def test_a_fork_moves_through_the_table_and_names_itself_when_it_cannot() -> None:
    fork = Fork("web-1", "t", "/s", "demand", 0.0, stage=D.STARTING)
    assert fork.move(E.VMM_EXITED) is D.STARTING_EXITED
    assert fork.move(E.STARTED) is D.EXITED and fork.phase is ForkPhase.EXITED
    with pytest.raises(ForkError, match="fork web-1: no move from exited on started"):
        fork.move(E.STARTED)
    assert fork.stage is D.EXITED  # a refused move changes nothing


@pytest.mark.parametrize("phase", list(ForkPhase))
@pytest.mark.parametrize("vmm_exited", [False, True])
@pytest.mark.parametrize("session_ended", [False, True])
def test_a_handed_over_fork_keeps_its_phase_and_state(
    phase: ForkPhase, vmm_exited: bool, session_ended: bool
) -> None:
    if phase is ForkPhase.EXITED and not vmm_exited:
        vmm_exited = True  # an exited phase is a VMM that exited
    stage = stage_of(phase, vmm_exited, session_ended)
    shown = ForkPhase.EXITED if phase is ForkPhase.LIVE and vmm_exited else phase
    assert PHASE[stage] is shown
    assert state_word(stage) == ("exited" if vmm_exited or session_ended else "live")
    assert (stage in VMM_GONE) is vmm_exited
