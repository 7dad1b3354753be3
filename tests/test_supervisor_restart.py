"""A supervisor restarted after a crash: one owner per socket, an adoption nothing can hold or
split.

Real ``pagefork serve`` processes, real SIGKILL and SIGTERM, test VMMs that fault real uffd
memory; each race is held at a chosen step (``PAGEFORK_TAKEOVER_PAUSE_AT``), never timed.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

from procs import (
    ALL_PAGES,
    PAGEFORK,
    DaemonProc,
    Serve,
    args_for,
    exited,
    go_on,
    kill,
    orphans,
    rendezvous,
    serve_with_guests,
    setup_forks,
)

from conftest import needs_uffd


def paused(serve: Serve, count: int, timeout: float = 30) -> None:
    """Wait until ``serve`` has paused at a takeover step ``count`` times."""
    with serve._cond:
        ok = serve._cond.wait_for(
            lambda: sum("takeover: paused at" in line for line in serve.errors) >= count, timeout
        )
    assert ok, f"not paused {count} times; stderr {serve.errors}"


@needs_uffd
def test_two_serves_restarted_at_once_one_adopts_and_the_other_names_the_holder(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old, guests = serve_with_guests(sock, mem_file, vmms, 2)
    kill(old)
    # The first restart holds the lock and is in the middle of adopting the orphans.
    first = Serve(*args_for(sock, mem_file), env={"PAGEFORK_TAKEOVER_PAUSE_AT": "hello"})
    paused(first, 1)
    lock = Path(f"{sock}.lock")
    st = os.lstat(lock)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    second = Serve(*args_for(sock, mem_file))
    assert second.proc.wait(60) == 2
    second.wait_err("pagefork: error:")
    assert [line for line in second.errors if line.strip()] == [
        f"pagefork: error: {sock} is in use by pid {first.proc.pid} (it holds {lock})\n"
    ]
    for _ in range(3):  # one pause per orphaned worker (extra lines are never read)
        go_on(first.proc)
    (adopted,) = first.wait_for("adopted")
    assert adopted["forks"] == 2 and adopted["failed"] == 0
    first.wait_for("listening")
    for g in guests:
        assert g.send(cmd="touch", all=True)["bad"] == 0
    # The lock dies with its holder: a SIGKILLed supervisor never blocks its restart.
    kill(first)
    last = Serve(*args_for(sock, mem_file))
    assert last.wait_for("adopted")[0]["forks"] == 2
    last.wait_for("listening")
    for g in guests:
        g.close()
    ends = last.wait_for("fork_end", count=2)
    assert sorted(e["faults"] for e in ends) == [ALL_PAGES] * 2
    assert last.stop() == 0
    assert not lock.exists()  # an orderly stop removes it


def test_a_symlink_at_the_lock_path_is_refused_and_its_target_untouched(
    short_dir: Path, mem_file: Path, tmp_path: Path
) -> None:
    sock = short_dir / "h.sock"
    target = tmp_path / "precious"
    target.write_bytes(b"keep me\n")
    os.symlink(target, f"{sock}.lock")
    serve = Serve(*args_for(sock, mem_file))
    assert serve.proc.wait(60) == 2
    serve.wait_err("pagefork: error:")
    assert [line for line in serve.errors if line.strip()] == [
        f"pagefork: error: {sock}.lock is a symbolic link: refusing to lock {sock} through it\n"
    ]
    assert target.read_bytes() == b"keep me\n"
    assert os.path.islink(f"{sock}.lock") and not sock.exists()


@needs_uffd
def test_a_successor_is_handed_the_socket_lock(short_dir: Path, mem_file: Path) -> None:
    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    new = Serve(*args_for(sock, mem_file, "--takeover"))
    new.wait_for("listening")
    assert old.proc.wait(60) == 0
    third = Serve(*args_for(sock, mem_file))
    assert third.proc.wait(60) == 2
    third.wait_err(f"{sock} is in use by pid {new.proc.pid} (it holds {sock}.lock)")
    assert new.stop() == 0
    assert not Path(f"{sock}.lock").exists()


@needs_uffd
def test_a_silent_peer_on_the_rendezvous_does_not_hold_the_adoption(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old, (guest,) = serve_with_guests(sock, mem_file, vmms, 1, "--workers", "1")
    (worker,) = kill(old)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(f"{sock}.takeover.orphan.{worker}")  # and says nothing
    try:
        new = Serve(*args_for(sock, mem_file, "--workers", "1"))
        (adopted,) = new.wait_for("adopted")
        assert adopted["forks"] == 1 and adopted["failed"] == 0
        assert exited(worker, 30)
    finally:
        silent.close()
    # The orphaned worker handed its fork over and exited while the silent peer still
    # waited: it never gave up on it (after 10 s), which it would have had to first had
    # the silent peer held it. (It logs to the dead serve's stderr.)
    assert old.stderr_closed.wait(30)
    me = f"takeover by pid {os.getpid()}: timed out waiting for the peer"
    assert not [line for line in old.errors if me in line]
    assert guest.send(cmd="touch", all=True)["bad"] == 0
    guest.close()
    (end,) = new.wait_for("fork_end")
    assert end["faults"] == ALL_PAGES and end["errors"] == 0
    assert new.stop() == 0


@needs_uffd
def test_a_stop_during_adoption_adopts_every_orphan_then_stops_them_all(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old, _guests = serve_with_guests(sock, mem_file, vmms, 2)
    workers = kill(old)
    assert len(rendezvous(sock)) >= 2  # one orphaned worker per fork
    new = Serve(*args_for(sock, mem_file), env={"PAGEFORK_TAKEOVER_PAUSE_AT": "hello"})
    paused(new, 1)
    go_on(new.proc)  # the first orphan is adopted
    paused(new, 2)  # held at the second
    new.proc.send_signal(signal.SIGTERM)
    for _ in range(2):
        go_on(new.proc)
    assert new.proc.wait(60) == 0
    (adopted,) = new.wait_for("adopted")
    assert adopted["forks"] == 2 and adopted["failed"] == 0
    # Both forks ended by the stop, as a normal stop ends them; no worker is left orphaned.
    ends = new.wait_for("fork_end", count=2)
    assert sorted(e["fork"] for e in ends) == ["fork-1", "fork-2"]
    for pid in workers:
        assert exited(pid, 30), f"orphaned worker {pid} was left behind"
    assert orphans(sock, []) == []  # the spare, too, removed its own


@needs_uffd
def test_a_daemon_fork_whose_vmm_never_connected_is_reported_lost_on_restart(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    client, _, guests = setup_forks(control, mem_file, tmp_path, vmms, n=1)
    waiting = client.create_fork("t", "nobody")  # no VMM ever connects to its socket
    old.proc.kill()
    assert old.proc.wait(30) == -signal.SIGKILL
    new = DaemonProc(tmp_path / "state", control)
    adopted = new.wait_for("adopted")
    assert adopted["forks"] == 1 and adopted["lost"] == ["nobody"]
    new.wait_err(
        f"fork nobody (template t, socket {waiting['socket']}) is lost: no worker of the "
        "daemon that died served it"
    )
    new.wait_for("listening")
    assert [f["fork"] for f in client.forks()] == ["f0"]
    assert guests[0].send(cmd="touch", all=True)["bad"] == 0
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(60) == 0


def test_a_symlink_at_the_daemon_lock_is_refused_and_its_target_untouched(
    tmp_path: Path, short_dir: Path
) -> None:
    import subprocess

    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "precious"
    target.write_bytes(b"keep me\n")
    os.symlink(target, state / "daemon.lock")
    control = short_dir / "c.sock"
    proc = subprocess.run(
        [*PAGEFORK, "daemon", "--state-dir", str(state), "--control", str(control)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"pagefork: error: cannot open {state / 'daemon.lock'}: ")
    assert target.read_bytes() == b"keep me\n" and not control.exists()


@needs_uffd
def test_a_stop_during_a_daemons_adoption_adopts_every_orphan_then_stops(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    setup_forks(control, mem_file, tmp_path, vmms, n=2)  # one per worker
    orphans = rendezvous(tmp_path / "state" / "takeover.sock")
    old.proc.kill()
    assert old.proc.wait(30) == -signal.SIGKILL
    new = DaemonProc(tmp_path / "state", control, env={"PAGEFORK_TAKEOVER_PAUSE_AT": "hello"})
    paused(new, 1)  # type: ignore[arg-type]
    go_on(new.proc)
    paused(new, 2)  # type: ignore[arg-type]
    new.proc.send_signal(signal.SIGTERM)
    for _ in range(2):
        go_on(new.proc)
    assert new.proc.wait(60) == 0
    adopted = new.wait_for("adopted")
    assert adopted["forks"] == 2 and adopted["failed"] == 0 and adopted["lost"] == []
    for name in orphans:
        assert exited(int(name.rpartition(".")[2]), 30), f"orphan {name} was left behind"
