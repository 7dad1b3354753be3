"""A page server's side of a takeover, in this process: release, re-adopt, hand over."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from procs import ALL_PAGES

from conftest import PAGE, needs_uffd
from pagefork.takeover import pageserver
from pagefork.takeover.protocol import TakeoverError


@needs_uffd
def test_a_release_that_times_out_is_undone_even_when_the_worker_answers_late(
    make_server, vmms, tmp_path: Path
) -> None:
    server = make_server(workers=1)
    path = server.register_fork("a")
    guest = vmms(path)
    server.wait_connected("a")
    assert guest.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    worker = server.stats("a").worker_pid
    assert worker is not None
    os.kill(worker, signal.SIGSTOP)  # stuck: it cannot answer the release in time
    try:
        pageserver.quiesce(server, time.monotonic() + 5)
        with pytest.raises(TakeoverError, match="did not release their forks in time"):
            pageserver.release(server, time.monotonic() + 0.3)
        assert pageserver.readopt(server) == 1
    finally:
        os.kill(worker, signal.SIGCONT)  # it reads "release", then the adoption after it
    reply = guest.send(cmd="touch", all=True)
    assert reply["bad"] == 0 and reply["touched"] == ALL_PAGES
    stats = server.stats("a")
    assert stats.worker_pid == worker and stats.faults == ALL_PAGES and stats.errors == 0
    guest.close()
    assert server.wait_ended("a", timeout=30).faults == ALL_PAGES


@needs_uffd
def test_released_forks_go_to_another_server_with_their_ledgers(
    make_server, vmms, tmp_path: Path
) -> None:
    old = make_server(workers=1)
    path = old.register_fork("a", record=True)
    guest = vmms(path, "--pending-remove", f"0:{4 * PAGE}:{4 * PAGE}")
    old.wait_connected("a")
    assert guest.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
    pageserver.quiesce(old, time.monotonic() + 5)
    pageserver.release(old, time.monotonic() + 5)
    state, fds = pageserver.export(old)
    (spec,) = state["forks"]
    assert spec["fork"] == "a" and spec["record"] and set(spec["fds"]) == {
        "uffd", "conn", "pidfd", "ledger"}  # fmt: skip
    new = make_server(workers=1)
    moved = [os.dup(fd) for fd in fds]
    assert pageserver.adopt(new, state, moved) == 1
    pageserver.abandon(old)
    # The removed range stays zero, the recording and counters go on, in the new server.
    assert guest.send(cmd="check_zero", region=0, offset=4 * PAGE, length=4 * PAGE)["zero"]
    reply = guest.send(cmd="touch", all=True)
    assert reply["bad"] == 0
    stats = new.stats("a")
    assert stats.removed_bytes == 4 * PAGE and stats.worker_pid in new.worker_pids()
    assert stats.faults == ALL_PAGES  # every page once, across both servers
    hot = new.hot_pages("a").in_order()
    assert hot[:2] == [(0, 0), (1, PAGE)] and len(hot) == ALL_PAGES
    guest.close()
    assert new.wait_ended("a", timeout=30).faults == ALL_PAGES
    assert os.path.exists(path)  # the old server left the fork's socket to the new one
    new.unregister_fork("a")
    assert not os.path.exists(path)


@needs_uffd
def test_a_release_asks_each_worker_once_for_all_its_forks(
    make_server, vmms, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pagefork.serving import messages as M
    from pagefork.serving.pool import WorkerProcess

    server = make_server(workers=1)
    guests = {name: vmms(server.register_fork(name)) for name in ("a", "b", "c")}
    for name in guests:
        server.wait_connected(name)
    sent: list[M.Release] = []
    real_send = WorkerProcess.send

    def send(self: WorkerProcess, message: M.ToWorker, *args: object, **kwargs: object) -> bool:
        if isinstance(message, M.Release):
            sent.append(message)
        return real_send(self, message, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(WorkerProcess, "send", send)
    pageserver.quiesce(server, time.monotonic() + 5)
    pageserver.release(server, time.monotonic() + 10)
    # One message for the worker's three forks: the forks wait while their release goes on.
    assert [len(m.keys) for m in sent] == [3]
    assert pageserver.readopt(server) == 3
    for name, guest in guests.items():
        assert guest.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
        assert server.stats(name).faults == 2
