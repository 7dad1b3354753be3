"""A supervisor killed in the middle of a move: the fork is in exactly one worker, and served.

A move hands a fork from one worker to another through the supervisor. The supervisor here is
a process of its own (a page server in a child, driven over its stdin), killed with SIGKILL
at a chosen step of a move, held there deterministically: the child blocks its own loop at
that step and says so. The VMMs are real processes faulting real uffd memory and checking
every byte against the template. Which worker serves a fork is decided by the lock on its
ledger (an open-file-description lock), held by another process in the unit tests at the end,
which drive one worker's fork table directly.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import ALL_PAGES, Proc, exited, uffds_held

from conftest import in_thread, needs_uffd
from pagefork import uffd
from pagefork.regions import Region
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.state import Stage
from pagefork.serving.workerforks import PARKED, WorkerForks
from pagefork.testing.vmm import VmmProcess

#: The supervisor: a page server whose workers serve on if it is killed, with two forks; it
#: moves fork "a" to its other worker when told, and holds its loop at the step it is told.
_SUPERVISOR = r"""
import json, sys, threading
from pagefork.server import PageServer, ServerConfig
from pagefork.takeover.orphan import setup

mem, socket_dir, takeover = sys.argv[1:4]
server = PageServer(ServerConfig(mem_file_path=mem, socket_dir=socket_dir, workers=2))
server.keep_forks_if_killed(setup(takeover, "serve", {}))
sup = server._sup

def say(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)

say("listening", sockets={f: server.register_fork(f) for f in ("a", "b")},
    workers=server.worker_pids())
for line in sys.stdin:
    command = json.loads(line)
    if command["do"] == "where":
        for fork in ("a", "b"):
            server.wait_connected(fork)
        say("where", **{f: server.stats(f).worker_pid for f in ("a", "b")})
    elif command["do"] == "move":
        step = command["hold"]
        def hold(*args):  # on the loop's thread, the lock held: the move stops here
            say("held", step=step)
            threading.Event().wait()
        if step == "released":  # the old worker let it go; the target is not told yet
            sup.follower.released = hold
        else:  # the target serves it; the old worker is not told to forget it yet
            adopted = sup.follower.adopted
            def adopted_or_hold(entry, worker):
                if entry.fork_id == "a":
                    hold()
                adopted(entry, worker)
            sup.follower.adopted = adopted_or_hold
        with sup.lock:
            entry = sup.table.by_id["a"]
            target = next(w for w in sup.pool.live() if w is not entry.worker)
            assert sup.follower.move(entry, target)
"""


@pytest.fixture
def supervisor(short_dir: Path, mem_file: Path) -> Iterator[Proc]:
    """The supervisor's process (SIGKILLed at the end if the test did not)."""
    proc = Proc(
        [sys.executable, "-c", _SUPERVISOR, str(mem_file), str(short_dir),
         str(short_dir / "t.sock")],
        env={"PAGEFORK_ORPHAN_DEADLINE": "60"},
    )  # fmt: skip
    yield proc
    proc.kill()


def _tell(proc: Proc, **command: object) -> None:
    assert proc.proc.stdin is not None
    proc.proc.stdin.write(json.dumps(command) + "\n")
    proc.proc.stdin.flush()


def _kill_mid_move(
    supervisor: Proc, mem_file: Path, step: str
) -> tuple[dict[str, VmmProcess], int, int]:
    """Two forks served by one worker, a move of "a" to the other held at ``step``, then the
    supervisor SIGKILLed: the guests, the old worker and the target."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs (a worker pinned to each)")
    listening = supervisor.wait_for("listening")
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})  # both VMMs pinned to the first worker's CPU
    try:
        guests = {
            f: VmmProcess(path, str(mem_file), ["8M", "4M"])
            for f, path in listening["sockets"].items()
        }
    finally:
        os.sched_setaffinity(0, mine)
    _tell(supervisor, do="where")
    where = supervisor.wait_for("where")
    old = where["a"]
    assert where["b"] == old  # placed by their CPU
    (target,) = [w for w in listening["workers"] if w != old]
    for g in guests.values():
        assert g.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    _tell(supervisor, do="move", hold=step)
    assert supervisor.wait_for("held")["step"] == step
    supervisor.proc.kill()
    assert supervisor.proc.wait(30) == -signal.SIGKILL
    return guests, old, target


def _touch_all(guests: dict[str, VmmProcess]) -> None:
    """Every page of every guest, each checked against the template; a fault nobody serves
    fails this at the timeout instead of hanging the test."""
    for fork, g in guests.items():
        thread, out = in_thread(lambda g=g: g.send(cmd="touch", all=True, order="random"))
        thread.join(30)
        if thread.is_alive():
            g.kill()
            thread.join(30)
            pytest.fail(f"fork {fork}: a fault was never served after the supervisor's death")
        assert "error" not in out, out
        assert out["result"]["touched"] == ALL_PAGES and out["result"]["bad"] == 0


@needs_uffd
def test_supervisor_killed_between_the_release_and_the_adoption_the_old_worker_serves_on(
    supervisor: Proc, mem_file: Path
) -> None:
    guests, old, target = _kill_mid_move(supervisor, mem_file, "released")
    try:
        # The target was never told: nothing of the fork is there, and it exits.
        assert exited(target, 30), f"the target worker {target} serves on with nothing"
        # The old worker had parked "a": nobody took its ledger's lock, so it serves it on.
        _touch_all(guests)
        supervisor.wait_err(f"pagefork worker {old}: supervisor gone: serving 2 forks on")
        assert uffds_held(old) == 2
    finally:
        for g in guests.values():
            g.close()
    assert exited(old, 30), "the orphaned worker did not exit after its last fork ended"


@needs_uffd
def test_supervisor_killed_after_the_adoption_only_the_target_serves_the_fork(
    supervisor: Proc, mem_file: Path
) -> None:
    guests, old, target = _kill_mid_move(supervisor, mem_file, "adopted")
    try:
        # The target holds the ledger's lock: the old worker closes its parked copy and
        # serves only "b" on; the target serves "a" on.
        supervisor.wait_err(f"pagefork worker {old}: supervisor gone: serving 1 forks on")
        supervisor.wait_err(f"pagefork worker {target}: supervisor gone: serving 1 forks on")
        assert uffds_held(old) == 1 and uffds_held(target) == 1
        _touch_all(guests)
        assert uffds_held(old) == 1 and uffds_held(target) == 1
    finally:
        for g in guests.values():
            g.close()
    assert exited(old, 30) and exited(target, 30)


_HOLDER = r"""
import sys
from pagefork.serving import ledger as L
held = L.Ledger(int(sys.argv[1]), 0)
print("held" if held.own() else "refused", flush=True)
sys.stdin.read()
"""


@needs_uffd
def test_a_worker_refuses_a_fork_whose_ledger_lock_another_process_holds() -> None:
    ledger = L.Ledger.create(0)
    chan, supervisor_end = ipc.channel_pair()
    ep = select.epoll()
    forks = WorkerForks(chan, ep)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(ledger.fd)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=[ledger.fd],
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        spec = M.ForkSpec("a#1", "a", None, "close", (Region(0x7F0000000000, 1 << 20, 0),),
                          0, None, None, ("uffd", "ledger"), False, False)  # fmt: skip

        def hand() -> tuple[M.Message, int]:
            fd = uffd.open_userfaultfd()
            forks.add(spec, [fd, os.dup(ledger.fd)])
            message, _ = ipc.recv(supervisor_end)
            return message, fd

        message, fd = hand()
        assert message == M.Refused("a#1") and forks.forks == {} and forks.by_fd == {}
        with pytest.raises(OSError):
            os.fstat(fd)  # its copy closed, not kept
        # The holder exits: its lock goes with it, and the fork is served here.
        holder.stdin.close()  # type: ignore[union-attr]
        assert holder.wait(30) == 0
        message, fd = hand()
        assert message == M.Serving("a#1") and forks.forks["a#1"].uffd == fd
        assert ledger.own() is False  # this process's other description is refused too
        forks.release(("a#1",))
        assert ipc.recv(supervisor_end)[0] == M.Released(("a#1",))
        assert ledger.own() is True  # released: the lock went with the worker's description
    finally:
        holder.kill()
        holder.wait(30)
        ledger.close()
        ep.close()
        chan.close()
        supervisor_end.close()


@needs_uffd
def test_after_a_move_the_old_worker_closes_its_parked_copy_once_the_target_serves(
    make_server, vmms
) -> None:
    server = make_server(workers=2, follow_vmms=False)
    server.wait_ready()
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    sup = server._sup
    with sup.lock:
        entry = sup.table.by_id["a"]
        old = entry.worker
        target = next(w for w in sup.pool.live() if w is not old)
        assert old is not None and sup.follower.move(entry, target)
        assert sup.changed.wait_for(
            lambda: entry.stage is Stage.SERVING and entry.worker is target, 10
        )
    # Told to forget it once the target serves it: its copies go (the uffd among them).
    gone = threading.Event()
    for _ in range(3000):
        if uffds_held(old.pid) == 0:
            gone.set()
            break
        gone.wait(0.01)
    assert gone.is_set(), "the old worker keeps its copy of the moved fork's uffd"
    assert uffds_held(target.pid) == 1
    assert vmm.send(cmd="touch", all=True, order="random")["bad"] == 0
    stats = server.stats("a")
    assert stats.worker_pid == target.pid and stats.moves == 1 and stats.faults == ALL_PAGES


@needs_uffd
def test_a_parked_fork_keeps_its_fds_without_the_lock_until_its_owner_is_known() -> None:
    ledger = L.Ledger.create(0)
    chan, supervisor_end = ipc.channel_pair()
    ep = select.epoll()
    forks = WorkerForks(chan, ep)
    vmm = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                           stdin=subprocess.PIPE)  # fmt: skip
    spec = M.ForkSpec("a#1", "a", vmm.pid, "close", (Region(0x7F0000000000, 1 << 20, 0),),
                      0, None, None, ("uffd", "ledger", "pidfd"), False, False)  # fmt: skip

    def serve_and_park() -> tuple[int, int]:
        fd, pidfd = uffd.open_userfaultfd(), os.pidfd_open(vmm.pid)
        forks.add(spec, [fd, os.dup(ledger.fd), pidfd])
        assert ipc.recv(supervisor_end)[0] == M.Serving("a#1")
        forks.release(("a#1",), park=True)
        assert ipc.recv(supervisor_end)[0] == M.Released(("a#1",))
        # Parked: unwatched but for its VMM's exit, its fds kept, its ledger's lock free.
        assert forks.forks == {} and forks.by_fd == {pidfd: (PARKED, forks.parked["a#1"])}
        os.fstat(fd)
        return fd, pidfd

    try:
        fd, _ = serve_and_park()
        assert ledger.own()  # another "worker" (this test) adopted it
        forks.claim_parked()  # as the supervisor's death has it do
        assert forks.parked == {} and forks.forks == {} and forks.by_fd == {}
        with pytest.raises(OSError):
            os.fstat(fd)  # its copy closed: the lock's holder serves it
        ledger.disown()
        fd, _ = serve_and_park()
        forks.claim_parked()  # nobody adopted it: served here again, its vCPUs woken
        assert ipc.recv(supervisor_end)[0] == M.Serving("a#1")
        assert forks.forks["a#1"].uffd == fd and forks.parked == {}
        assert not ledger.own()  # the lock is the worker's again
        forks.end(forks.forks["a#1"], M.EndState.ENDED, None)
        assert ipc.recv(supervisor_end)[0] == M.Ended("a#1", M.EndState.ENDED, None)
        fd, pidfd = serve_and_park()
        vmm.kill()  # its VMM exits: the worker's loop sees the pidfd and forgets the fork
        assert ep.poll(30) == [(pidfd, select.EPOLLIN)]
        forks.forget(("a#1",))
        assert forks.parked == {} and forks.by_fd == {}
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        vmm.kill()
        vmm.wait(30)
        ledger.close()
        ep.close()
        chan.close()
        supervisor_end.close()
