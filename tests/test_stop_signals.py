"""Every stop stops: whichever thread a signal lands on, and whatever phase a takeover is in.

A process-directed signal may be delivered to any thread. These tests aim it at a thread other
than the main one on purpose (``tgkill``), which is the case that used to leave ``serve`` and
the daemon running with the stop pending.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from procs import PAGEFORK, DaemonProc, Proc, exited, setup_forks

from conftest import needs_uffd
from pagefork.signals import POSTED, SignalInbox

_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of process ``pid`` (not to the process)."""
    if _SYS_TGKILL is None:
        pytest.skip(f"tgkill's number is not known on {platform.machine()}")
    if _libc.syscall(_SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig})")


def other_thread(pid: int) -> int:
    """A thread of ``pid`` that is not its main thread."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, f"process {pid} runs one thread only"
    return tids[0]


# --- the inbox itself ------------------------------------------------------------------------


def test_a_signal_taken_by_another_thread_wakes_the_main_thread() -> None:
    parked = threading.Event()
    release = threading.Event()

    def park() -> None:
        parked.set()
        release.wait(30)

    t = threading.Thread(target=park)
    with SignalInbox([signal.SIGTERM]) as inbox:
        t.start()
        assert parked.wait(10)
        assert t.ident is not None
        signal.pthread_kill(t.ident, signal.SIGTERM)  # not the main thread
        try:
            assert inbox.wait(20) == [signal.SIGTERM]
        finally:
            release.set()
            t.join()


def test_the_inbox_keeps_the_order_of_signals_and_posts() -> None:
    with SignalInbox([signal.SIGHUP, signal.SIGTERM]) as inbox:
        os.kill(os.getpid(), signal.SIGHUP)
        inbox.post()
        os.kill(os.getpid(), signal.SIGTERM)
        got: list[int] = []
        while len(got) < 3:
            more = inbox.wait(10)
            assert more, f"only {got} arrived"
            got += more
    assert got == [signal.SIGHUP, POSTED, signal.SIGTERM]


def test_an_ignored_sighup_stays_ignored_and_handlers_are_restored() -> None:
    before_term = signal.getsignal(signal.SIGTERM)
    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with SignalInbox([signal.SIGTERM, signal.SIGHUP], keep_ignored=[signal.SIGHUP]) as inbox:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert inbox.signals == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == before_term
        assert signal.set_wakeup_fd(-1) == -1  # no wake-up fd left behind
    finally:
        signal.signal(signal.SIGHUP, before_hup)


# --- serve ----------------------------------------------------------------------------------


@needs_uffd
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_serve_stops_on_a_signal_taken_by_a_thread_other_than_main(
    short_dir: Path, mem_file: Path, sig: int
) -> None:
    sock = short_dir / "s.sock"
    serve = Proc([*PAGEFORK, "serve", "--mem-file", str(mem_file), "--socket", str(sock)])
    try:
        workers = serve.wait_for("listening")["worker_pids"]
        tgkill(serve.proc.pid, other_thread(serve.proc.pid), sig)
        assert serve.proc.wait(30) == 0
        assert not sock.exists()
        for pid in workers:
            assert exited(pid, 30), f"worker {pid} outlived its server"
    finally:
        serve.kill()


@needs_uffd
def test_workers_ignore_a_stop_sent_to_the_process_group_and_are_not_replaced(
    short_dir: Path, mem_file: Path
) -> None:
    # `kill -TERM -PGID` reaches the workers too: the supervisor alone decides when they stop,
    # so none dies and none is replaced while it stops.
    sock = short_dir / "s.sock"
    serve = Proc(
        [*PAGEFORK, "serve", "--mem-file", str(mem_file), "--socket", str(sock), "--workers", "2"]
    )
    try:
        workers = serve.wait_for("listening")["worker_pids"]
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGHUP)
            os.kill(pid, signal.SIGINT)
        for pid in workers:
            assert not exited(pid, 0.5), f"worker {pid} died of a stop signal"
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0
        assert not any(e["event"] == "worker_restarted" for e in serve.events), serve.events
        for pid in workers:
            assert exited(pid, 30)
    finally:
        serve.kill()


# --- the daemon -----------------------------------------------------------------------------


def _daemon(state: Path, control: Path, *extra: str, env: dict[str, str] | None = None) -> Proc:
    return DaemonProc(state, control, *extra, env=env, workers=1)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def _one_fork(control: Path, mem_file: Path, tmp_path: Path, vmms: Any) -> Any:
    (guest,) = setup_forks(control, mem_file, tmp_path, vmms, n=1)[2]
    return guest


@needs_uffd
def test_the_daemon_stops_on_a_reload_then_a_stop_taken_by_another_thread(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms: Any
) -> None:
    control = short_dir / "c.sock"
    daemon = _daemon(tmp_path / "state", control, "--on-sighup", "takeover")
    try:
        daemon.wait_for("listening")
        _one_fork(control, mem_file, tmp_path, vmms)
        pid = daemon.proc.pid
        tgkill(pid, other_thread(pid), signal.SIGHUP)
        tgkill(pid, other_thread(pid), signal.SIGTERM)
        assert daemon.proc.wait(60) == 0
        handed = [e for e in daemon.events if e["event"] == "handed_over"]
        if handed:  # the stop came after the successor said done: it was passed on
            assert exited(handed[0]["to_pid"], 60), "the successor runs on"
        assert not control.exists()
    finally:
        daemon.kill()


@needs_uffd
@pytest.mark.parametrize("step", ["hello", "built", "state"])
def test_a_stop_while_the_successor_is_stuck_at_a_step_stops_the_daemon_at_once(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms: Any, step: str
) -> None:
    # The successor started by SIGHUP inherits the environment, so it blocks at `step` for
    # good. A stop must not wait for it (the old side used to wait up to 120 s at `built`):
    # the takeover fails at once, the old side keeps or takes back every fork, then stops.
    control = short_dir / "c.sock"
    daemon = _daemon(
        tmp_path / "state",
        control,
        "--on-sighup",
        "takeover",
        env={"PAGEFORK_TAKEOVER_STOP_AT": step},
    )
    successors: list[int] = []
    try:
        daemon.wait_for("listening")
        guest = _one_fork(control, mem_file, tmp_path, vmms)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_err(f"takeover: stopped at {step}")
        successors = [
            c
            for c in _children(daemon.proc.pid)
            if b"--takeover" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        assert len(successors) == 1
        if step == "state":  # the forks are released: the old side must take them back first
            daemon.wait_err("is taking over")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0, daemon.errors
        assert [e["event"] for e in daemon.events][-1] == "stopped"
        assert not control.exists()
        if step == "state":  # the successor had the forks' state: it was stopped for good
            assert exited(successors[0], 10)
        guest.close()
    finally:
        for pid in successors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        daemon.kill()
