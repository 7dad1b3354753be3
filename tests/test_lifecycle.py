"""The fork lifecycle tables and the worker channel's messages, checked without a kernel.

Every (stage, event) pair of each role's table is walked: it either moves (to a stage of the
same role, with commands that exist), is ignored on purpose, or is a bug raised as ForkError.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from pagefork.errors import ForkError
from pagefork.prefetch import PrefetchResult, plan_prefetch
from pagefork.regions import Region
from pagefork.serving import messages as M
from pagefork.serving.state import (
    FINAL_STAGES,
    IGNORED,
    SHOWN,
    SUPERVISOR_TABLE,
    WORKER_IGNORED,
    WORKER_TABLE,
    Command,
    Event,
    ForkState,
    Stage,
    WorkerCommand,
    WorkerEvent,
    WorkerStage,
    step,
    worker_step,
)


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("event", list(Event))
def test_every_supervisor_pair_moves_is_ignored_or_is_refused(stage: Stage, event: Event) -> None:
    assert not ((stage, event) in SUPERVISOR_TABLE and (stage, event) in IGNORED)
    if (stage, event) in SUPERVISOR_TABLE:
        new, commands = step("f", stage, event)
        assert (new, commands) == SUPERVISOR_TABLE[(stage, event)]
        assert all(isinstance(c, Command) for c in commands)
        assert stage not in FINAL_STAGES  # nothing moves a fork that has ended
        if Command.FINISH in commands:
            assert new in FINAL_STAGES  # a fork is finished exactly when it ends
        if new in FINAL_STAGES:
            assert Command.FINISH in commands or event in (
                Event.HANDSHAKE_LOST,  # nothing to finish: it never had a session
            )
    elif (stage, event) in IGNORED:
        assert step("f", stage, event) == (stage, ())
    else:
        with pytest.raises(ForkError, match=f"fork f: no move from {stage.value}"):
            step("f", stage, event)


def test_every_supervisor_stage_is_shown_and_can_end() -> None:
    assert set(SHOWN) == set(Stage)
    assert {SHOWN[s] for s in FINAL_STAGES} == {ForkState.ENDED, ForkState.FAILED}
    # From every stage a closing server ends the fork: nothing is left serving.
    for stage in Stage:
        if stage not in FINAL_STAGES:
            assert step("f", stage, Event.CLOSED)[0] is Stage.ENDED


def test_a_worker_death_adopts_a_served_fork_and_ends_a_dropped_one() -> None:
    assert step("f", Stage.SERVING, Event.WORKER_DIED) == (
        Stage.ADOPTING,
        (Command.ADOPT_ON_WORKER,),
    )
    assert step("f", Stage.DROPPING, Event.WORKER_DIED) == (Stage.ENDED, (Command.FINISH,))
    assert step("f", Stage.SERVING, Event.WORKER_LOST)[1] == (
        Command.APPLY_POLICY,
        Command.FINISH,
    )


@pytest.mark.parametrize("stage", list(WorkerStage))
@pytest.mark.parametrize("event", list(WorkerEvent))
def test_every_worker_pair_moves_is_ignored_or_is_refused(
    stage: WorkerStage, event: WorkerEvent
) -> None:
    if (stage, event) in WORKER_TABLE:
        new, commands = worker_step("a#1", stage, event)
        assert isinstance(new, WorkerStage)
        assert all(isinstance(c, WorkerCommand) for c in commands)
    elif (stage, event) in WORKER_IGNORED:
        assert worker_step("a#1", stage, event) == (stage, ())
    else:
        with pytest.raises(ForkError, match="fork a#1: no move"):
            worker_step("a#1", stage, event)


def test_a_worker_fork_ended_mid_prefetch_ends_once_the_prefetch_stops() -> None:
    stage, _ = worker_step("a#1", WorkerStage.SERVING, WorkerEvent.PREFETCH_STARTED)
    stage, commands = worker_step("a#1", stage, WorkerEvent.END)
    assert (stage, commands) == (WorkerStage.ENDING, ())
    assert worker_step("a#1", stage, WorkerEvent.END) == (WorkerStage.ENDING, ())  # once
    assert worker_step("a#1", stage, WorkerEvent.PREFETCH_STOPPED) == (
        WorkerStage.ENDED,
        (WorkerCommand.END_DEFERRED,),
    )


def _every_message() -> list[M.Message]:
    regions = [Region(0x7F0000000000, 8 << 20, 0, 4096), Region(0x7F1000000000, 4 << 20, 8 << 20)]
    plan = plan_prefetch([(0, 0), (0, 4096), (1, 8192)], regions, lambda o, n: False)
    result = PrefetchResult(3, 2, 1, 0, 2, 2, 8192, 0.5)
    spec = M.ForkSpec("a#1", "a", 42, "kill", tuple(regions), 7, None, 1.5,
                      ("uffd", "ledger"), True, False)  # fmt: skip
    return [
        M.Hello(M.PROTOCOL_VERSION), M.Serve(spec), M.Prefetch(1, "a#1", 3, plan, 2.0),
        M.Prefetch(2, "a#1", 3, None, 2.0, 100), M.ChunkReady(5), M.ChunkFailed(5, "gone"),
        M.Drop("a#1"), M.Release(("a#1", "b#2")), M.Release(("a#1",), True),
        M.Forget(("a#1",)), M.Ping(9), M.CrashAt("fault_read", 1, 4),
        M.CrashAt("stream", 1, 5, True), M.Stop(),
        M.OrphanSetup("pagefork.takeover.orphan", '{"deadline": 60}'),
        M.Ready(M.PROTOCOL_VERSION, 123), M.Serving("a#1"),
        M.Ended("a#1", M.EndState.FAILED, "why"), M.Ended("a#1", M.EndState.ENDED, None),
        M.WindowClosed("a#1"), M.HungUp("a#1"), M.Remapped("a#1", tuple(regions)),
        M.Released(("a#1",)), M.Refused("a#1"), M.Need(3), M.Prefetched(1, result, None, 2),
        M.Prefetched(1, None, "failed", 0), M.PrefetchHead(1, result), M.Pong(9), M.Armed(4),
        M.OrphanPrepared(),
    ]  # fmt: skip


def test_every_message_type_round_trips_through_one_encoder_and_decoder() -> None:
    messages = _every_message()
    sent = {type(m) for m in messages}
    declared = {
        t
        for t in vars(M).values()
        if isinstance(t, type) and dataclasses.is_dataclass(t) and t.__module__ == M.__name__
    }
    assert declared - sent == {M.ForkSpec}  # every message is covered (ForkSpec rides in Serve)
    for message in messages:
        assert M.decode(M.encode(message)) == message
        assert dataclasses.is_dataclass(message)
        assert type(message).__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_messages_behave_as_frozen_dataclasses() -> None:
    for message in _every_message():
        fields = dataclasses.fields(message)
        values = [getattr(message, f.name) for f in fields]
        again = type(message)(*values)
        assert again == message
        if not isinstance(message, M.Prefetch):  # a plan's table is an array: no hash
            assert hash(again) == hash(message)
        shown = ", ".join(f"{f.name}={v!r}" for f, v in zip(fields, values, strict=True))
        assert repr(message) == f"{type(message).__name__}({shown})"
        for f in fields:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(message, f.name, None)
    ended = M.Ended("a#1", M.EndState.ENDED, None)
    assert dataclasses.replace(ended, key="b#2") == M.Ended("b#2", M.EndState.ENDED, None)
    assert ended != M.Ended("a#1", M.EndState.FAILED, None)
    assert ended != M.Ended("a#1", M.EndState.ENDED, "")
    assert M.Prefetch(1, "a#1", None, None, 2.0).head is None  # a default
    with pytest.raises(TypeError, match="missing argument 'error'"):
        M.Ended("a#1", M.EndState.ENDED)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="takes 1 arguments but 2"):
        M.Ping(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected argument 'sequence'"):
        M.Ping(sequence=1)  # type: ignore[call-arg]


def test_the_decoder_builds_no_object_it_does_not_declare() -> None:
    with pytest.raises(M.ProtocolError, match="undecodable"):
        M.decode(pickle.dumps(("serve", {})))
    import marshal

    with pytest.raises(M.ProtocolError, match="unknown message type 'Evil'"):
        M.decode(marshal.dumps({"@": "Evil", "f": ()}))
    with pytest.raises(M.ProtocolError, match="is not a message"):
        M.decode(marshal.dumps(("serve", 1)))
    with pytest.raises(M.ProtocolError, match="malformed Ping"):
        M.decode(marshal.dumps({"@": "Ping", "f": (1, 2)}))
    with pytest.raises(M.ProtocolError, match="not a worker-channel message"):
        M.encode(Region(0, 4096, 0))  # type: ignore[arg-type]


def test_a_peer_of_another_protocol_version_is_named_in_one_line() -> None:
    M.check_version(M.PROTOCOL_VERSION, "worker 7")
    with pytest.raises(M.ProtocolError) as err:
        M.check_version(M.PROTOCOL_VERSION + 1, "worker 7")
    text = str(err.value)
    assert "worker 7 speaks worker protocol version" in text and "\n" not in text
