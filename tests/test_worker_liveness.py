"""A worker that stops answering, a spare killed from outside, a uffd the VMM never set up.

Real worker processes, real signals, guests in other processes; every byte the guest reads is
checked against the template.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import PAGE, needs_uffd
from pagefork.errors import ForkError
from pagefork.serving import pool

pytestmark = needs_uffd

#: What this page server promises: a stopped worker is killed once a ping has waited
#: STUCK_AFTER, and pings go out every PING_INTERVAL.
DETECTION_BOUND = pool.STUCK_AFTER + pool.PING_INTERVAL
#: Room for a loaded machine (a test host runs many suites at once): the bound is a promise
#: about the server's timers, not about the scheduler.
SLACK = 4.0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``predicate`` (checked every few ms) or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Restarts:
    """Collects ``on_worker_restarted`` calls with the time each came."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, float]] = []
        self._cond = threading.Condition()

    def __call__(self, old: int, new: int, forks: int) -> None:
        with self._cond:
            self.calls.append((old, new, forks, time.monotonic()))
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 30.0) -> list[tuple[int, int, int, float]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, timeout)
            return list(self.calls)


def test_a_stopped_worker_is_killed_within_the_bound_and_its_forks_served_on(make_server, vmms):
    restarts = Restarts()
    # Forks stay on the workers they were placed on (not following their VMMs between CPUs):
    # the test counts what the stopped worker held.
    server = make_server(workers=2, on_worker_restarted=restarts, follow_vmms=False)
    server.wait_ready()
    guests = {name: vmms(server.register_fork(name)) for name in ("a", "b", "c")}
    for name in guests:
        server.wait_connected(name)
    victim = server.stats("a").worker_pid
    assert victim is not None
    orphans = [n for n in guests if server.stats(n).worker_pid == victim]
    replies: dict[str, dict[str, Any]] = {}

    def storm(name: str) -> None:
        replies[name] = guests[name].send(cmd="touch", all=True, order="random")

    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        threads = [threading.Thread(target=storm, args=(n,)) for n in guests]
        for t in threads:
            t.start()
        [(dead, new, forks, noticed_at)] = restarts.wait(1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # frees it if it was not killed
            os.kill(victim, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert dead == victim and new != victim and forks == len(orphans)
    detection = noticed_at - stopped_at
    assert detection < DETECTION_BOUND + SLACK, f"noticed after {detection:.2f}s"
    for name in guests:  # every page of every fork, the stopped worker's too
        assert replies[name]["touched"] == 3072 and replies[name]["bad"] == 0, name
        stats = server.stats(name)
        assert stats.state == "serving" and stats.errors == 0
    assert victim not in server.worker_pids()
    assert all(server.stats(n).worker_pid == new for n in orphans)  # adopted by the new one


def test_new_forks_are_never_placed_on_a_worker_that_does_not_answer(
    make_server, vmms, monkeypatch: pytest.MonkeyPatch
):
    # Never killed here: the point is placement while it does not answer.
    monkeypatch.setenv("PAGEFORK_WORKER_STUCK_AFTER", "600")
    server = make_server(workers=2, spare_worker=False)
    server.wait_ready()
    first = vmms(server.register_fork("first"))
    server.wait_connected("first")
    victim = server.stats("first").worker_pid
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: victim not in server.answering_worker_pids(), 30, "a missed ping")
        # It holds one fork and the other worker none: least-loaded alone would pick the other
        # anyway for the first new fork, but not for the second.
        late = {name: vmms(server.register_fork(name)) for name in ("n1", "n2", "n3")}
        for name in late:
            server.wait_connected(name)
            assert server.stats(name).worker_pid != victim, name
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_until(lambda: victim in server.answering_worker_pids(), 30, "its answer")
    assert first.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
    for guest in late.values():
        assert guest.send(cmd="touch", pages=[[0, PAGE], [1, 0]])["bad"] == 0


def test_a_spare_killed_from_outside_again_and_again_is_always_replaced(make_server):
    server = make_server(workers=1, spare_worker=True)
    server.wait_ready()
    for _ in range(pool.CRASH_LOOP_DEATHS + 2):  # well past the crash-loop limit, in seconds
        spare = server.spare_pid()
        assert spare is not None
        os.kill(spare, signal.SIGKILL)
        wait_until(lambda s=spare: server.spare_pid() not in (None, s), 30, "a new spare")
        server.wait_ready()
    assert server.spare_pid() is not None  # not "running without one"


def test_a_worker_killed_with_no_forks_again_and_again_keeps_its_slot(make_server, vmms):
    restarts = Restarts()
    server = make_server(workers=1, spare_worker=True, on_worker_restarted=restarts)
    server.wait_ready()
    for i in range(pool.CRASH_LOOP_DEATHS + 1):
        [worker] = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        restarts.wait(i + 1)
        server.wait_ready()
    assert len(server.worker_pids()) == 1  # deaths without forks are not a crash loop
    guest = vmms(server.register_fork("a"))
    assert guest.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0


_NO_API_GUEST = """
import mmap, socket, sys
from pagefork import uffd
from pagefork.handshake import encode_mappings
from pagefork.regions import Region
fd = uffd.open_userfaultfd()  # and never UFFDIO_API
mem = mmap.mmap(-1, 1 << 20)
import ctypes
base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
socket.send_fds(sock, [encode_mappings([Region(base, 1 << 20, 0)])], [fd])
sys.stdin.read()
"""


def test_a_uffd_without_uffdio_api_is_refused_at_the_handshake_saying_so(
    make_server, tmp_path: Path
):
    server = make_server(workers=1, spare_worker=False)
    path = server.register_fork("a")
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
    }
    guest = subprocess.Popen(
        [sys.executable, "-c", _NO_API_GUEST, path], stdin=subprocess.PIPE, env=env
    )
    try:
        with pytest.raises(ForkError) as err:
            server.wait_connected("a", timeout=30)
        message = str(err.value)
        assert "has not been through UFFDIO_API" in message, message
        assert "O_NONBLOCK" not in message
        assert server.stats("a").state == "failed"  # until a VMM connects again
    finally:
        guest.kill()
        guest.wait()


def test_a_worker_of_another_protocol_version_is_refused_in_one_line(
    make_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from pagefork.errors import PageforkError
    from pagefork.serving import messages

    # This process speaks a version the worker processes (started afresh) do not.
    monkeypatch.setattr(messages, "PROTOCOL_VERSION", messages.PROTOCOL_VERSION + 1)
    server = make_server(workers=1, spare_worker=False)
    with pytest.raises(PageforkError, match="exited before it could serve"):
        server.wait_ready(30)
    assert f"speaks worker protocol version {messages.PROTOCOL_VERSION - 1}" in caplog.text


def test_a_runnable_worker_is_slow_not_stuck_and_a_stopped_one_is_stuck() -> None:
    # The verdict reads the kernel's own state of the process: a host short of CPU leaves a
    # worker runnable (R) but unanswered, and killing it would only add work.
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_until(lambda: pool.scheduler_state(spin.pid) == "R", 10, "a spinning process")
        wait_until(lambda: pool.scheduler_state(sleeper.pid) == "S", 10, "a sleeping process")
        os.kill(sleeper.pid, signal.SIGSTOP)
        wait_until(lambda: pool.scheduler_state(sleeper.pid) == "T", 10, "a stopped process")
        assert pool.stuck_bound(pool.scheduler_state(sleeper.pid)) == pool.STUCK_AFTER
        assert pool.stuck_bound(pool.scheduler_state(spin.pid)) == pool.BUSY_STUCK_AFTER
        assert pool.stuck_bound("D") == pool.BUSY_STUCK_AFTER  # in an I/O wait: slow, too
        assert pool.stuck_bound("S") == pool.STUCK_AFTER  # asleep, not in its loop: stuck
    finally:
        for p in (spin, sleeper):
            p.kill()
            p.wait()
    assert pool.scheduler_state(spin.pid) is None  # gone: nothing to read
