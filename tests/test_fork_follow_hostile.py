"""Hostile moves: a fork moved between workers while its old worker is stopped or killed,
its guest removes memory, it is unregistered, or the page server is taken over or closed.

Each move is decided as the follower decides one (:meth:`ForkFollower.move`), held where the
test wants it by a real SIGSTOP of the worker that must answer; the guests are real VMM
processes faulting real uffd memory and checking every byte against the template (zeros where
they removed memory). Waits are on the server's condition or a worker's fds, with timeouts.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable

import pytest
from procs import fd_targets, uffds_held

from conftest import PAGE, in_thread, make_mem_file, needs_uffd
from pagefork.hotpages import HotPageList
from pagefork.server import PageServer
from pagefork.serving import following
from pagefork.serving.state import Stage
from pagefork.takeover import pageserver
from pagefork.takeover.protocol import TakeoverError
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd

PAGES = 2048  # the 8 MiB region of the default two-region guest


def _two_workers(server: PageServer) -> tuple[int, int]:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs (a worker pinned to each)")
    server.wait_ready()
    first, other = server.worker_pids()[:2]
    return first, other


def _until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """True once ``check()`` holds (re-checked every millisecond), False after ``timeout``."""
    tick = threading.Event()
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        tick.wait(0.001)
    return True


def _move(server: PageServer, fork: str, to_pid: int) -> None:
    """Decide a move of ``fork`` to the worker ``to_pid`` (as the follower does)."""
    sup = server._sup
    with sup.lock:
        entry = sup.table.by_id[fork]
        target = next(w for w in sup.pool.live() if w.pid == to_pid)
        assert sup.follower.move(entry, target)
        assert entry.stage is Stage.MOVING


def _served_by(server: PageServer, fork: str, pid: int) -> None:
    sup = server._sup
    entry = sup.table.by_id[fork]
    with sup.changed:
        assert sup.changed.wait_for(
            lambda: entry.stage is Stage.SERVING and entry.worker is not None
            and entry.worker.pid == pid, 10
        ), (entry.stage, entry.worker)  # fmt: skip


def _start(server: PageServer, vmms, fork: str = "a") -> VmmProcess:
    sup = server._sup
    sup.follower.enabled = False  # only the test's moves
    vmm = vmms(server.register_fork(fork))
    server.wait_connected(fork)
    return vmm


def _placed(server: PageServer, vmms, touch_first: bool) -> tuple[VmmProcess, int, int]:
    """Fork "a" of a new VMM on ``server`` (its first page in, if ``touch_first``): the VMM,
    the worker serving it, and the other worker (a move's target)."""
    first, other = _two_workers(server)
    vmm = _start(server, vmms)
    if touch_first:
        assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    start = server.stats("a").worker_pid
    return vmm, start, other if start == first else first


def _wait_stage(entry, sup, stage: Stage) -> None:
    """Wait (10 s at most) until the fork ``entry`` of supervisor ``sup`` is at ``stage``."""
    with sup.changed:
        assert sup.changed.wait_for(lambda: entry.stage is stage, 10), entry.stage


def test_a_range_removed_while_its_fork_moves_stays_zero_on_both_workers(make_server, vmms) -> None:
    server = make_server()
    vmm, start, to = _placed(server, vmms, touch_first=False)
    pages = [[0, i * PAGE] for i in range(128)]
    assert vmm.send(cmd="touch", pages=pages)["bad"] == 0  # template bytes in
    os.kill(start, signal.SIGSTOP)  # the move's release waits, unread
    try:
        _move(server, "a", to)
        # The guest removes half of what it read while nobody serves the fork: its madvise
        # waits in the uffd until the next server of the fork reads the REMOVE.
        thread, result = in_thread(
            lambda: vmm.send(cmd="remove", region=0, offset=0, length=64 * PAGE)
        )
    finally:
        os.kill(start, signal.SIGCONT)
    thread.join(30)
    assert "error" not in result and "error" not in result["result"], result
    _served_by(server, "a", to)
    for where in (to, start):  # on the target, then moved back to the first worker
        if server.stats("a").worker_pid != where:
            _move(server, "a", where)
            _served_by(server, "a", where)
        assert vmm.send(cmd="check_zero", region=0, offset=0, length=64 * PAGE)["zero"]
        reply = vmm.send(cmd="touch", pages=[[0, i * PAGE] for i in range(256)])
        assert reply["bad"] == 0, reply["mismatches"]
    stats = server.stats("a")
    assert stats.removed_bytes == 64 * PAGE and stats.moves == 2 and stats.errors == 0
    # 128 first reads, 64 removed pages read again, 128 new ones: each fault served once.
    assert stats.faults == 128 + 64 + 128


def test_many_moves_lose_nothing_and_leak_no_fd(make_server, vmms) -> None:
    server = make_server()
    first, other = _two_workers(server)
    vmm = _start(server, vmms)
    at = server.stats("a").worker_pid
    assert at is not None
    order = list(range(PAGES))
    chunk = 32
    touched = 0

    def step() -> None:
        nonlocal at, touched
        to = other if at == first else first
        _move(server, "a", to)
        # Faults raised during the move wait in the uffd for the target.
        pages = [[0, i * PAGE] for i in order[touched : touched + chunk]]
        reply = vmm.send(cmd="touch", pages=pages)
        assert reply["bad"] == 0, reply["mismatches"]
        touched += len(pages)
        _served_by(server, "a", to)
        at = to

    step()
    step()
    before = {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in (os.getpid(), first, other)}
    for _ in range(40):
        step()
    # The worker that served it last parked its copies until told to forget them.
    assert _until(lambda: uffds_held(first) + uffds_held(other) == 1)
    after = {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in (os.getpid(), first, other)}
    assert after == before
    stats = server.stats("a")
    assert stats.moves == 42 and stats.faults == touched == 42 * chunk and stats.errors == 0
    assert stats.pages_copied + stats.zero_pages == touched


def test_a_target_killed_before_it_adopts_leaves_the_fork_served_and_the_old_copy_closed(
    make_server, vmms
) -> None:
    server = make_server()
    vmm, _start_pid, to = _placed(server, vmms, touch_first=False)
    sup = server._sup
    entry = sup.table.by_id["a"]
    os.kill(to, signal.SIGSTOP)  # the adoption waits in its channel, unread
    _move(server, "a", to)
    # The first worker let it go (parked): the target is told.
    _wait_stage(entry, sup, Stage.ADOPTING)
    os.kill(to, signal.SIGKILL)
    reply = vmm.send(cmd="touch", all=True)
    assert reply["bad"] == 0, reply["mismatches"]
    with sup.changed:
        assert sup.changed.wait_for(lambda: entry.stage is Stage.SERVING, 10)
    served = server.stats("a").worker_pid
    assert served not in (to, None)
    stats = server.stats("a")
    assert stats.faults == reply["touched"] and stats.errors == 0
    # Exactly one copy of the fork's uffd among the workers: no parked copy left behind.
    pids = [p for p in server.worker_pids() if p != to]
    assert _until(lambda: sum(uffds_held(p) for p in pids) == 1)


def test_a_fork_unregistered_while_it_moves_ends_and_leaves_no_copy(make_server, vmms) -> None:
    server = make_server()
    _vmm, start, to = _placed(server, vmms, touch_first=True)
    os.kill(start, signal.SIGSTOP)
    try:
        _move(server, "a", to)
        thread, result = in_thread(lambda: server.unregister_fork("a"))
    finally:
        os.kill(start, signal.SIGCONT)
    thread.join(30)
    assert not thread.is_alive() and "error" not in result, result
    assert _until(lambda: uffds_held(start) + uffds_held(to) == 0)
    assert set(server.worker_pids()[:2]) == {start, to}  # nobody died for it
    # Another fork is served as usual.
    vmm2 = _start(server, vmms, "b")
    assert vmm2.send(cmd="touch", all=True)["bad"] == 0


def test_a_takeover_during_a_move_releases_the_fork_once_and_readopts_it(make_server, vmms) -> None:
    server = make_server()
    vmm, start, to = _placed(server, vmms, touch_first=True)
    os.kill(start, signal.SIGSTOP)
    try:
        _move(server, "a", to)
        pageserver.quiesce(server, time.monotonic() + 5)
        thread, result = in_thread(lambda: pageserver.release(server, time.monotonic() + 20))
    finally:
        os.kill(start, signal.SIGCONT)
    thread.join(30)
    assert "error" not in result, result
    state, _ = pageserver.export(server)  # the fds stay the server's
    assert [f["fork"] for f in state["forks"]] == ["a"]
    # Released whole: no worker keeps a copy for the new side to compete with.
    assert _until(lambda: uffds_held(start) + uffds_held(to) == 0)
    assert pageserver.readopt(server) == 1
    reply = vmm.send(cmd="touch", all=True)
    assert reply["bad"] == 0, reply["mismatches"]
    stats = server.stats("a")
    assert stats.state == "serving" and stats.errors == 0 and stats.faults == reply["touched"]
    assert _until(lambda: uffds_held(start) + uffds_held(to) == 1)


def test_a_page_server_closed_during_a_move_closes_and_leaves_the_vmm_alone(
    make_server, vmms
) -> None:
    server = make_server()
    vmm, start, to = _placed(server, vmms, touch_first=False)
    os.kill(start, signal.SIGSTOP)
    _move(server, "a", to)
    thread, result = in_thread(server.close)
    os.kill(start, signal.SIGCONT)
    thread.join(30)
    assert not thread.is_alive() and "error" not in result, result
    assert vmm.proc.poll() is None  # the server never kills a VMM on its own close


def test_a_prefetch_armed_during_a_move_runs_on_the_worker_that_takes_the_fork(
    make_server, vmms
) -> None:
    server = make_server()
    vmm, start, to = _placed(server, vmms, touch_first=False)
    hot = HotPageList.from_pages([(0, i * PAGE) for i in range(256)])
    os.kill(start, signal.SIGSTOP)  # the move's release waits, unread
    try:
        _move(server, "a", to)
        # Sent to the old worker now, it would meet a fork already let go, and fail.
        server.prefetch_at_handshake("a", hot, timeout=20)
    finally:
        os.kill(start, signal.SIGCONT)
    # It starts on its own once the new worker serves the fork, before anyone asks for it.
    assert _until(lambda: server.stats("a").prefetched_pages == 256), server.stats("a")
    result = server.prefetch("a", hot, timeout=20)
    assert result.installed + result.already_present == 256
    stats = server.stats("a")
    assert stats.worker_pid == to and stats.moves == 1 and stats.errors == 0
    reply = vmm.send(cmd="touch", pages=[[0, i * PAGE] for i in range(256)])
    assert reply["bad"] == 0, reply["mismatches"]
    assert server.stats("a").faults == 0  # every page was there already


def test_a_vmm_that_exits_during_a_move_ends_its_fork_and_leaves_no_fd(make_server, vmms) -> None:
    server = make_server()
    first, other = _two_workers(server)
    server.wait_ready()
    pidfds = fd_targets().count("anon_inode:[pidfd]")
    vmm = _start(server, vmms)
    assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    start = server.stats("a").worker_pid
    to = other if start == first else first
    os.kill(start, signal.SIGSTOP)
    try:
        _move(server, "a", to)
        vmm.proc.send_signal(signal.SIGKILL)
        vmm.proc.wait(10)
    finally:
        os.kill(start, signal.SIGCONT)
    assert server.wait_ended("a", timeout=10).faults == 1
    assert _until(lambda: uffds_held(start) + uffds_held(to) == 0)
    server.unregister_fork("a")
    # This process (the supervisor) keeps neither its uffd nor its pidfd.
    assert "anon_inode:[userfaultfd]" not in fd_targets()
    assert fd_targets().count("anon_inode:[pidfd]") == pidfds
    assert set(server.worker_pids()[:2]) == {start, to}  # nobody died for it


def test_forks_whose_vmms_hop_between_cpus_are_served_every_byte_once(
    make_server, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(following, "SAMPLE_INTERVAL", 0.002)
    monkeypatch.setattr(following, "PINNED_RECHECK", 0.002)
    monkeypatch.setattr(following, "SETTLE_LOOKS", 1)  # move at the first look: many moves
    mem = make_mem_file(tmp_path / "hop.mem", 4096)
    server = make_server(mem_file_path=str(mem))
    _two_workers(server)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    guests = {f: VmmProcess(server.register_fork(f), str(mem), ["16M"]) for f in ("a", "b")}
    try:

        def hop(fork: str, vmm: VmmProcess) -> int:
            server.wait_connected(fork)
            order = [[0, i * PAGE] for i in range(4096)]
            random.Random(fork).shuffle(order)
            for n, i in enumerate(range(0, len(order), 128)):
                cpu = cpus[(n + (fork == "b")) % 2]
                for tid in os.listdir(f"/proc/{vmm.pid}/task"):
                    os.sched_setaffinity(int(tid), {cpu})
                reply = vmm.send(cmd="touch", pages=order[i : i + 128])
                assert reply["bad"] == 0, reply["mismatches"]
            return len(order)

        runs = {f: in_thread(lambda f=f, v=v: hop(f, v)) for f, v in guests.items()}
        for thread, result in runs.values():
            thread.join(60)
            assert "error" not in result, result
        for fork in guests:
            stats = server.stats(fork)
            assert stats.faults == 4096 and stats.pages_copied + stats.zero_pages == 4096
            assert stats.errors == 0 and stats.state == "serving"
        workers = server.worker_pids()[:2]
        assert _until(lambda: sum(uffds_held(p) for p in workers) == 2)  # no parked copy kept
    finally:
        for vmm in guests.values():
            vmm.close()


def test_an_old_worker_killed_after_it_parked_the_fork_costs_the_move_nothing(
    make_server, vmms
) -> None:
    server = make_server()
    vmm, start, to = _placed(server, vmms, touch_first=False)
    sup = server._sup
    entry = sup.table.by_id["a"]
    os.kill(to, signal.SIGSTOP)  # the adoption waits in the target's channel
    try:
        _move(server, "a", to)
        _wait_stage(entry, sup, Stage.ADOPTING)  # the old worker parked it and answered
        os.kill(start, signal.SIGKILL)
        thread, result = in_thread(lambda: vmm.send(cmd="touch", all=True, order="random"))
    finally:
        os.kill(to, signal.SIGCONT)
    thread.join(30)
    assert "error" not in result, result
    assert result["result"]["bad"] == 0, result["result"]["mismatches"]
    _served_by(server, "a", to)
    stats = server.stats("a")
    assert stats.faults == result["result"]["touched"] and stats.errors == 0
    assert stats.moves == 1


def test_a_takeover_whose_release_times_out_mid_move_readopts_the_fork_once(
    make_server, vmms
) -> None:
    server = make_server()
    vmm, start, to = _placed(server, vmms, touch_first=True)
    os.kill(start, signal.SIGSTOP)  # asked to park it for the move, it cannot answer
    try:
        _move(server, "a", to)
        pageserver.quiesce(server, time.monotonic() + 5)
        with pytest.raises(TakeoverError, match="did not release their forks in time"):
            pageserver.release(server, time.monotonic() + 0.3)
        assert pageserver.readopt(server) == 1
    finally:
        os.kill(start, signal.SIGCONT)  # it parks the fork, then takes it back
    reply = vmm.send(cmd="touch", all=True, order="random")
    assert reply["bad"] == 0, reply["mismatches"]
    stats = server.stats("a")
    assert stats.state == "serving" and stats.errors == 0
    assert stats.faults == reply["touched"]  # the first page was in already
    assert _until(lambda: uffds_held(start) + uffds_held(to) == 1)


def test_a_fork_taken_over_while_its_move_target_is_stopped_is_served_by_the_new_side(
    make_server, vmms
) -> None:
    old = make_server()
    vmm, _start_pid, to = _placed(old, vmms, touch_first=True)
    sup = old._sup
    entry = sup.table.by_id["a"]
    os.kill(to, signal.SIGSTOP)  # the adoption waits in the target's channel
    try:
        _move(old, "a", to)
        # Parked by the first worker, not yet taken by the target.
        _wait_stage(entry, sup, Stage.ADOPTING)
        pageserver.quiesce(old, time.monotonic() + 5)
        thread, result = in_thread(lambda: pageserver.release(old, time.monotonic() + 20))
    finally:
        os.kill(to, signal.SIGCONT)
    thread.join(30)
    assert "error" not in result, result
    state, fds = pageserver.export(old)
    new = make_server(workers=1)
    assert pageserver.adopt(new, state, [os.dup(fd) for fd in fds]) == 1
    pageserver.abandon(old)
    reply = vmm.send(cmd="touch", all=True, order="random")
    assert reply["bad"] == 0, reply["mismatches"]
    stats = new.stats("a")
    assert stats.errors == 0 and stats.faults == reply["touched"]  # every page once
    assert stats.worker_pid in new.worker_pids()


def test_a_fork_unregistered_while_its_move_target_dies_leaves_no_parked_copy_following_off(
    make_server, vmms
) -> None:
    server = make_server()
    _vmm, start, to = _placed(server, vmms, touch_first=True)
    sup = server._sup
    entry = sup.table.by_id["a"]
    os.kill(to, signal.SIGSTOP)  # the adoption and the drop wait in the target's channel
    try:
        _move(server, "a", to)
        # Parked by the first worker, not yet taken by the target.
        _wait_stage(entry, sup, Stage.ADOPTING)
        thread, result = in_thread(lambda: server.unregister_fork("a"))
        with sup.changed:
            assert sup.changed.wait_for(lambda: entry.stage is Stage.DROPPING, 10)
    finally:
        os.kill(to, signal.SIGKILL)  # dies with the adoption unread: the drop ends the fork
    thread.join(30)
    assert not thread.is_alive() and "error" not in result, result
    assert entry.final  # following is off (as _start left it): no move is decided again
    # The first worker must not keep its parked copy of the uffd: with it open, the guest
    # (still running) would wait on its next fault for a server that never comes.
    assert _until(lambda: uffds_held(start) == 0, 5), "the parked copy was never forgotten"
