"""A fork follows its VMM: moved by the test from CPU to CPU, the VMM's fork moves to the
worker of its new CPU, while its guest faults on, and every byte it reads is the template's.

The VMMs are real processes faulting on real uffds; the test moves them between CPUs with
``sched_setaffinity`` and waits for the server's count of moves (each touch is real work that
the server must serve, never a sleep).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PAGE, in_thread, make_mem_file, needs_uffd
from pagefork.hotpages import HotPageList
from pagefork.serving import following
from pagefork.serving.following import busiest_cpu
from pagefork.serving.state import Stage
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd

PAGES = 16384  # a 64 MiB guest: faults enough to outlast two moves on any host
CHUNK = 256  # pages per touch command: the server's move count is read between two


def _two_cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    return cpus[:2]


@pytest.fixture
def big_mem(tmp_path: Path) -> Path:
    return make_mem_file(tmp_path / "big.mem", PAGES)


@pytest.fixture(autouse=True)
def quick_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Looks every 5 ms rather than 25: a move takes a few ms of faults, not a hundred.
    monkeypatch.setattr(following, "SAMPLE_INTERVAL", 0.005)
    # A VMM pinned to its worker's CPU, then moved by the test, is seen at once.
    monkeypatch.setattr(following, "PINNED_RECHECK", 0.005)


def _start_on(cpu: int, socket: str, mem: Path) -> VmmProcess:
    """A test VMM whose every thread starts on ``cpu`` (it inherits this thread's affinity)."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return VmmProcess(socket, str(mem), [f"{PAGES * PAGE >> 20}M"])
    finally:
        os.sched_setaffinity(0, mine)


def _move_vmm(vmm: VmmProcess, cpu: int) -> None:
    for tid in os.listdir(f"/proc/{vmm.pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def _chunks(pages: list[list[int]]) -> Iterator[list[list[int]]]:
    for i in range(0, len(pages), CHUNK):
        yield pages[i : i + CHUNK]


def test_a_fork_moves_to_the_worker_of_the_cpu_its_vmm_moved_to_and_back(
    make_server, big_mem: Path
) -> None:
    cpus = _two_cpus()
    server = make_server(mem_file_path=str(big_mem))
    workers = server.worker_pids()  # slot i's home is CPU i
    vmm = _start_on(cpus[0], server.register_fork("a"), big_mem)
    try:
        server.wait_connected("a")
        assert server.stats("a").worker_pid == workers[0]  # placed by its CPU
        pages = [[0, i * PAGE] for i in range(PAGES)]
        random.Random(7).shuffle(pages)
        chunks = _chunks(pages)
        touched = 0
        for moves, cpu in ((1, cpus[1]), (2, cpus[0])):
            _move_vmm(vmm, cpu)
            # Fault on until the server has moved the fork (the pages run out otherwise).
            while server.stats("a").moves < moves:
                chunk = next(chunks, None)
                assert chunk is not None, f"the fork never moved to CPU {cpu}'s worker"
                reply = vmm.send(cmd="touch", pages=chunk)
                assert reply["bad"] == 0, reply["mismatches"]
                touched += len(chunk)
            assert server.stats("a").worker_pid == workers[cpus.index(cpu)]
        rest = [p for chunk in chunks for p in chunk]
        reply = vmm.send(cmd="touch", pages=rest)
        assert reply["bad"] == 0, reply["mismatches"]
        assert touched + len(rest) == PAGES
        # Every page read is the template's, each fault served once: none lost, none twice.
        stats = server.stats("a")
        assert stats.faults == PAGES and stats.pages_copied + stats.zero_pages == PAGES
        assert stats.moves == 2 and stats.errors == 0 and stats.state == "serving"
    finally:
        vmm.close()


def test_a_vmm_that_stays_on_its_workers_cpu_is_never_moved(make_server, big_mem: Path) -> None:
    cpus = _two_cpus()
    server = make_server(mem_file_path=str(big_mem))
    vmm = _start_on(cpus[1], server.register_fork("a"), big_mem)
    try:
        assert vmm.send(cmd="touch", all=True, order="random")["bad"] == 0
        stats = server.stats("a")
        assert stats.faults == PAGES and stats.moves == 0
        assert stats.worker_pid == server.worker_pids()[1]
    finally:
        vmm.close()


def test_a_worker_killed_after_a_move_was_decided_has_its_fork_adopted_and_served(
    make_server, big_mem: Path
) -> None:
    cpus = _two_cpus()
    restarts: list[tuple[int, int, int]] = []
    restarted = threading.Event()

    def on_restart(old: int, new: int, forks: int) -> None:
        restarts.append((old, new, forks))
        restarted.set()

    server = make_server(mem_file_path=str(big_mem), on_worker_restarted=on_restart)
    first, other = server.worker_pids()
    vmm = _start_on(cpus[0], server.register_fork("a"), big_mem)
    try:
        server.wait_connected("a")
        assert vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
        # The worker is stopped, so the move's release waits in its channel, unread; then
        # the move is decided (as the follower decides it) and the worker dies.
        os.kill(first, signal.SIGSTOP)
        sup = server._sup
        with sup.lock:
            entry = sup.table.by_id["a"]
            target = next(w for w in sup.pool.live() if w.pid == other)
            assert sup.follower.move(entry, target)
            assert entry.stage is Stage.MOVING
        thread, result = in_thread(lambda: vmm.send(cmd="touch", all=True, order="random"))
        os.kill(first, signal.SIGKILL)
        assert restarted.wait(10)
        thread.join(30)
        assert "error" not in result, result
        reply = result["result"]
        assert reply["touched"] == PAGES and reply["bad"] == 0, reply["mismatches"]
        [(dead, new, forks)] = restarts
        assert dead == first and forks == 1 and new not in (first, other)
        with sup.changed:
            assert sup.changed.wait_for(lambda: entry.stage is Stage.SERVING, 10)
        stats = server.stats("a")
        # The replacement adopted it (the move died with the worker): nothing lost.
        assert stats.worker_pid == new and stats.moves == 0 and stats.errors == 0
        assert stats.faults == PAGES
    finally:
        vmm.close()


def _blocked_in_a_wait(thread: threading.Thread, timeout: float = 10.0) -> bool:
    """True once ``thread`` waits on a lock or condition (its innermost Python frame is
    threading's ``wait``), False if it did not within ``timeout``."""
    until = threading.Event()
    for _ in range(int(timeout * 1000)):
        frame = sys._current_frames().get(thread.ident or -1)
        code = frame.f_code if frame is not None else None
        if code is not None and code.co_name == "wait" and "threading" in code.co_filename:
            return True
        until.wait(0.001)
    return False


def test_a_prefetch_asked_for_during_a_move_waits_for_it_and_runs_on_the_new_worker(
    make_server, big_mem: Path
) -> None:
    cpus = _two_cpus()
    server = make_server(mem_file_path=str(big_mem))
    first, other = server.worker_pids()
    vmm = _start_on(cpus[0], server.register_fork("a"), big_mem)
    try:
        server.wait_connected("a")
        # The move's release waits in the stopped worker's channel: the fork stays MOVING.
        os.kill(first, signal.SIGSTOP)
        sup = server._sup
        with sup.lock:
            entry = sup.table.by_id["a"]
            target = next(w for w in sup.pool.live() if w.pid == other)
            assert sup.follower.move(entry, target)
        hot = HotPageList.from_pages([(0, i * PAGE) for i in range(1024)])
        thread, result = in_thread(lambda: server.prefetch("a", hot, timeout=20))
        # Sent to the old worker now, it would meet a fork already let go, and fail.
        assert _blocked_in_a_wait(thread)
        os.kill(first, signal.SIGCONT)
        thread.join(30)
        assert "error" not in result, result
        assert result["result"].installed + result["result"].already_present == 1024
        stats = server.stats("a")
        assert stats.worker_pid == other and stats.moves == 1
        reply = vmm.send(cmd="touch", pages=[[0, i * PAGE] for i in range(1024)])
        assert reply["bad"] == 0, reply["mismatches"]
        assert server.stats("a").faults == 0  # every page was there already
    finally:
        vmm.close()


def test_the_busiest_cpu_is_where_the_threads_took_most_of_their_time() -> None:
    before = {1: (0, 100), 2: (1, 100), 3: (0, 5)}
    # Thread 1 ran 900 ns on CPU 1, thread 2 100 ns on CPU 0: CPU 1 has most of it.
    assert busiest_cpu(before, {1: (1, 1000), 2: (0, 200), 3: (0, 5)}) == 1
    # Half and half is no CPU; nothing run is none; a new thread counts from its next look.
    assert busiest_cpu(before, {1: (1, 200), 2: (0, 200)}) is None
    assert busiest_cpu(before, dict(before)) is None
    assert busiest_cpu({}, {4: (1, 10**9)}) is None


def test_a_fork_is_not_moved_to_a_worker_late_with_its_heartbeat(
    make_server, big_mem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpus = _two_cpus()
    monkeypatch.setenv("PAGEFORK_WORKER_STUCK_AFTER", "600")  # late, never killed for it
    server = make_server(mem_file_path=str(big_mem))
    server.wait_ready()  # pinged from now on
    first, other = server.worker_pids()
    vmm = _start_on(cpus[0], server.register_fork("a"), big_mem)
    try:
        server.wait_connected("a")
        os.kill(other, signal.SIGSTOP)  # stopped: it answers no ping until SIGCONT
        try:
            late = threading.Event()
            for _ in range(3000):  # its pings wait: it counts as late within half a second
                if other not in server.answering_worker_pids():
                    late.set()
                    break
                late.wait(0.01)
            assert late.is_set(), "the stopped worker still counts as answering"
            sup = server._sup
            with sup.lock:
                entry = sup.table.by_id["a"]
                target = next(w for w in sup.pool.live() if w.pid == other)
                assert not sup.follower.move(entry, target)
                assert entry.stage is Stage.SERVING and entry.worker is not target
        finally:
            os.kill(other, signal.SIGCONT)
        assert vmm.send(cmd="touch", pages=[[0, i * PAGE] for i in range(64)])["bad"] == 0
        stats = server.stats("a")
        assert stats.worker_pid == first and stats.moves == 0
    finally:
        vmm.close()
