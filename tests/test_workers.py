"""Worker processes: a worker that dies loses nothing, at whatever point it dies.

Each test kills a worker at a chosen point (it SIGKILLs itself there) or from outside with a
real SIGKILL, and checks what the guest reads, byte for byte, and what the server counted.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from conftest import PAGE, needs_uffd
from pagefork.errors import PageforkError
from pagefork.hotpages import HotPageList
from pagefork.server import PageServer, ServerConfig

MIB = 1 << 20
pytestmark = needs_uffd


class Restarts:
    """Collects ``on_worker_restarted`` calls; ``wait(n)`` waits for the n-th."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self._cond = threading.Condition()

    def __call__(self, old: int, new: int, forks: int) -> None:
        with self._cond:
            self.calls.append((old, new, forks))
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[int, int, int]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, timeout)
            return list(self.calls)


def test_worker_killed_after_reading_a_fault_is_replaced_and_the_guest_runs_on(make_server, vmms):
    restarts = Restarts()
    server = make_server(workers=1, on_worker_restarted=restarts)
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    assert vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
    old = server._debug_crash_worker_at("a", "fault_read")
    # The next fault is read by the worker, which dies before serving it: the vCPU sleeps
    # until the replacement's UFFDIO_WAKE makes it fault again.
    reply = vmm.send(cmd="touch", all=True)
    assert reply["touched"] == 3072 and reply["bad"] == 0, reply["mismatches"]
    [(dead, new, forks)] = restarts.wait(1)
    assert dead == old and forks == 1 and server.worker_pids() == [new] and new != old
    stats = server.stats("a")
    assert stats.state == "serving" and stats.errors == 0
    # Counters survive the worker: the 2 faults before it died and the 3070 after.
    assert stats.faults == 3072 and stats.pages_copied + stats.zero_pages == 3072


def test_a_range_removed_before_the_crash_is_served_zero_after_it(make_server, vmms):
    restarts = Restarts()
    server = make_server(workers=1, on_worker_restarted=restarts)
    vmm = vmms(server.register_fork("a"))
    assert vmm.send(cmd="touch", all=True)["bad"] == 0  # template bytes everywhere
    server._debug_crash_worker_at("a", "remove_noted")
    # The worker reads the REMOVE, makes it durable, and dies before serving anything after.
    assert vmm.send(cmd="remove", region=0, offset=MIB, length=2 * MIB) == {"ok": True}
    restarts.wait(1)
    assert vmm.send(cmd="check_zero", region=0, offset=MIB, length=2 * MIB)["zero"] is True
    # Outside the range the template bytes stand (page 3M+4K is not a zero page in the template).
    assert vmm.send(cmd="check_zero", region=0, offset=3 * MIB + PAGE, length=PAGE)["zero"] is False
    stats = server.stats("a")
    assert stats.removed_bytes == 2 * MIB and stats.zero_pages >= 512


def test_a_prefetch_whose_worker_dies_is_finished_by_the_replacement(make_server, vmms):
    restarts = Restarts()
    server = make_server(workers=1, on_worker_restarted=restarts)
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    hot = HotPageList.from_pages([(0, off) for off in range(0, 8 * MIB, PAGE)])
    server._debug_crash_worker_at("a", "prefetch")  # dies after 16 of the prefetch's ioctls
    result = server.prefetch("a", hot, timeout=20)
    assert restarts.wait(1)[0][2] == 1
    assert result.installed + result.already_present == 2048 and result.already_present >= 1
    assert vmm.send(cmd="touch", pages=[[0, off] for off in range(0, 8 * MIB, PAGE)])["bad"] == 0
    stats = server.stats("a")
    assert stats.faults == 0 and stats.prefetched_pages == result.installed


def test_a_recording_continues_across_a_worker_death_with_every_page(make_server, vmms):
    saved: list[HotPageList] = []
    done = threading.Event()
    restarts = Restarts()
    server = make_server(
        workers=1,
        record_hot_pages=True,
        on_worker_restarted=restarts,
        on_window_closed=lambda fork, hot: (saved.append(hot), done.set()),
    )
    vmm = vmms(server.register_fork("a"))
    first = [[0, off] for off in range(0, 40 * PAGE, 4 * PAGE)]
    second = [[1, off] for off in range(PAGE, 60 * PAGE, 3 * PAGE)]
    assert vmm.send(cmd="touch", pages=first)["bad"] == 0
    server._debug_crash_worker_at("a", "recorded")  # dies right after recording a page
    assert vmm.send(cmd="touch", pages=second)["bad"] == 0
    restarts.wait(1)
    vmm.close()
    server.wait_ended("a")
    assert done.wait(10)
    [hot] = saved
    assert [list(p) for p in hot.in_order()] == first + second  # complete, in order, once
    assert server.hot_pages("a").in_order() == hot.in_order()


def test_a_crash_looping_worker_is_given_up_and_its_forks_get_the_failure_policy(
    make_server, vmms, monkeypatch: pytest.MonkeyPatch
):
    from pagefork.serving import pool

    restarts = Restarts()
    server = make_server(workers=1, on_worker_restarted=restarts)
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    for i in range(4):
        server._debug_crash_worker_at("a", "fault_read")
        assert vmm.send(cmd="touch", pages=[[0, i * PAGE]])["bad"] == 0
        restarts.wait(i + 1)
    server._debug_crash_worker_at("a", "fault_read")  # the fifth death within 10 s
    with pytest.raises(EOFError):
        vmm.send(cmd="touch", pages=[[0, 8 * PAGE]])
    assert vmm.proc.wait(10) == -signal.SIGKILL  # a guest whose handler is gone would hang
    stats = server.wait_ended("a")
    assert stats.state == "failed" and "died 5 times" in (stats.error or "")
    assert server.worker_pids() == []
    # The slot is not tried again at once; after a while (here: at once) a new fork is served.
    monkeypatch.setattr(pool, "GIVE_UP_SECONDS", 0.0)
    later = vmms(server.register_fork("b"))
    server.wait_connected("b")
    assert later.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
    assert len(server.worker_pids()) == 1


def test_workers_killed_from_outside_with_no_forks_never_give_their_slot_up(make_server, vmms):
    restarts = Restarts()
    server = make_server(workers=1, on_worker_restarted=restarts)
    for i in range(6):  # more deaths than a crash loop needs, but none with a fork on it
        [worker] = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        restarts.wait(i + 1)
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    assert vmm.send(cmd="touch", all=True)["bad"] == 0


def test_sigkill_from_outside_during_a_fault_storm_of_two_forks_loses_no_byte(make_server, vmms):
    restarts = Restarts()
    server = make_server(workers=2, on_worker_restarted=restarts)
    a = vmms(server.register_fork("a"))
    b = vmms(server.register_fork("b"))
    server.wait_connected("a")
    server.wait_connected("b")
    pids = server.worker_pids()
    assert len(pids) == 2
    results: dict[str, dict[str, object]] = {}

    def storm(name: str, vmm: object) -> None:
        results[name] = vmm.send(cmd="touch", all=True, threads=4)  # type: ignore[attr-defined]

    threads = [threading.Thread(target=storm, args=(n, v)) for n, v in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert results["a"]["bad"] == 0 and results["b"]["bad"] == 0
    assert results["a"]["touched"] == results["b"]["touched"] == 3072
    assert restarts.wait(1)[0][0] == pids[0]
    assert server.stats("a").faults == server.stats("b").faults == 3072


def test_a_mem_file_that_shrinks_fails_only_the_fork_that_reads_past_its_end(
    tmp_path: Path, mem_file: Path, vmms
):
    server = PageServer(ServerConfig(str(mem_file), str(tmp_path), on_failure="kill"))
    try:
        doomed = vmms(server.register_fork("doomed"))
        healthy = vmms(server.register_fork("healthy"))
        server.wait_connected("doomed")
        server.wait_connected("healthy")
        os.truncate(mem_file, 6 * MIB)  # a careless operator rewrites the template
        doomed.proc.stdin.write('{"cmd": "touch", "pages": [[1, 4096]]}\n')  # offset 8 MiB+4K
        doomed.proc.stdin.flush()
        stats = server.wait_ended("doomed", timeout=10)
        assert stats.state == "failed" and "did it shrink?" in (stats.error or "")
        assert doomed.proc.wait(10) == -signal.SIGKILL
        # The worker and the server live on: the other fork reads what is still there.
        assert healthy.send(cmd="touch", pages=[[0, 0], [0, 5 * MIB]])["bad"] == 0
    finally:
        server.close()


def test_workers_setting_is_checked(tmp_path: Path, mem_file: Path) -> None:
    for bad in (0, -1, "many", True, 1.5, 4 * len(os.sched_getaffinity(0)) + 1, 10**6):
        with pytest.raises(PageforkError, match="workers must be"):
            PageServer(ServerConfig(str(mem_file), str(tmp_path), workers=bad))  # type: ignore[arg-type]


@pytest.mark.parametrize("pin", [True, False])
def test_a_pinned_vmm_is_served_by_the_worker_of_its_cpu_pinned_or_not(make_server, vmms, pin):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    server = make_server(pin_workers=pin)  # workers="auto": one per CPU, CPU i slot i's home
    pids = server.worker_pids()
    # Pinned: each worker runs on its CPU only; else wherever the scheduler puts it.
    home = [{c} if pin else set(cpus) for c in cpus]
    assert [os.sched_getaffinity(p) for p in pids] == home
    for cpu in reversed(cpus):  # the last CPU first: least-loaded alone would pick another
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})  # the VMM inherits it: all its threads on one CPU
        try:
            vmm = vmms(server.register_fork(f"on{cpu}"))
        finally:
            os.sched_setaffinity(0, mine)
        server.wait_connected(f"on{cpu}")
        assert server.stats(f"on{cpu}").worker_pid == pids[cpus.index(cpu)]
        assert vmm.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
    unpinned = vmms(server.register_fork("free"))
    server.wait_connected("free")
    assert server.stats("free").worker_pid in pids
    assert unpinned.send(cmd="touch", pages=[[0, PAGE]])["bad"] == 0


def test_every_worker_maps_the_mem_file_shared_and_read_only_and_the_zero_index_once(
    make_server, mem_file: Path
):
    server = make_server(workers=2)
    server.wait_ready()
    for pid in server.worker_pids():
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read().splitlines()
        mem = [m for m in maps if m.endswith(str(mem_file))]
        assert [m.split()[1] for m in mem] == ["r--s"]  # one shared, read-only mapping
        # The zero-page index comes from the supervisor's memfd: no worker scans the file.
        assert sum("pagefork-zero-index" in m for m in maps) == 1


def test_a_mem_file_that_shrinks_while_it_is_scanned_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import make_mem_file
    from pagefork.errors import MemFileError
    from pagefork.memfile import MemFile

    mem = make_mem_file(tmp_path / "mem", 512)  # 2 MiB: two scan chunks
    real_preadv = os.preadv

    def shrink_first(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset == 1 << 20:  # the second chunk: the file shrank after the first one was read
            os.truncate(mem, (1 << 20) + 5 * PAGE)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", shrink_first)
    # Read through a mapping this would be a SIGBUS that kills the whole server.
    with pytest.raises(MemFileError, match=r"shrank while being read \(ends at 0x105000"):
        MemFile(mem)


def test_a_fork_unregistered_while_its_worker_dies_is_finished_not_adopted(make_server, vmms):
    restarts = Restarts()
    server = make_server(workers=1, on_worker_restarted=restarts)
    vmms(server.register_fork("a"))
    server.wait_connected("a")
    [worker] = server.worker_pids()
    os.kill(worker, signal.SIGSTOP)  # it cannot take the "drop" off its channel
    try:
        dropping = threading.Thread(target=server.unregister_fork, args=("a",))
        dropping.start()
        while "a" in server.forks():  # unregister has claimed the fork and sent the drop
            dropping.join(0.001)
    finally:
        os.kill(worker, signal.SIGKILL)  # the drop dies with the worker
    dropping.join(10)
    assert not dropping.is_alive()
    [(dead, _, forks)] = restarts.wait(1)
    assert dead == worker and forks == 0  # nothing left to adopt: it was unregistered
    assert server.forks() == []


def test_when_no_worker_can_start_another_takes_the_forks_and_the_slot_refills_later(
    make_server, vmms, monkeypatch: pytest.MonkeyPatch
):
    from pagefork.serving import pool

    restarts = Restarts()
    server = make_server(workers=2, spare_worker=False, on_worker_restarted=restarts)
    a = vmms(server.register_fork("a"))
    b = vmms(server.register_fork("b"))
    server.wait_connected("a")
    server.wait_connected("b")
    victim = server.stats("a").worker_pid
    survivor = server.stats("b").worker_pid
    assert victim != survivor and victim is not None
    real_init = pool.WorkerProcess.__init__

    def out_of_fds(self: pool.WorkerProcess, *args: object, **kw: object) -> None:
        raise PageforkError("cannot start a worker process: Too many open files")

    monkeypatch.setattr(pool.WorkerProcess, "__init__", out_of_fds)
    os.kill(victim, signal.SIGKILL)
    [(dead, new, forks)] = restarts.wait(1)
    assert (dead, new, forks) == (victim, survivor, 1)  # the live worker took fork a
    assert a.send(cmd="touch", all=True)["bad"] == 0
    assert server.worker_pids() == [survivor]
    monkeypatch.setattr(pool.WorkerProcess, "__init__", real_init)  # fds are back
    c = vmms(server.register_fork("c"))
    server.wait_connected("c")
    assert len(server.worker_pids()) == 2  # the empty slot was filled for the new fork
    assert c.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
    assert b.send(cmd="touch", pages=[[0, PAGE]])["bad"] == 0
