"""``pagefork serve --takeover``: real serve processes, real test VMMs, faults in flight."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from procs import ALL_PAGES, PAGEFORK, Serve, args_for, go_on, serve_with_guests, storm

from conftest import PAGE, needs_uffd
from pagefork.hotpages import load
from pagefork.takeover.protocol import Channel, TakeoverError


@needs_uffd
def test_takeover_mid_fault_storm_every_byte_exact(short_dir: Path, mem_file: Path, vmms) -> None:
    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    guests = [vmms(str(sock)) for _ in range(3)]
    assert guests[0].send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    new = Serve(
        *args_for(sock, mem_file, "--takeover"), env={"PAGEFORK_TAKEOVER_PAUSE_AT": "state"}
    )
    # Paused with the state in hand: the old workers have let every fork go, and nobody
    # serves the storm's faults until the new side adopts them.
    new.wait_err("takeover: paused at state")
    replies: list[dict[str, Any]] = []
    threads = [storm(g, replies, seed=i) for i, g in enumerate(guests)]
    assert replies == []
    go_on(new.proc)
    (took,) = new.wait_for("took_over")
    assert took["from_pid"] == old.proc.pid and took["forks"] == 3
    (handed,) = old.wait_for("handed_over")
    assert handed == {
        "event": "handed_over",
        "to_pid": new.proc.pid,
        "forks": 3,
        "_at": handed["_at"],
    }
    assert old.proc.wait(30) == 0
    for t in threads:
        t.join(60)
    assert [r["bad"] for r in replies] == [0, 0, 0]
    assert sum(r["touched"] for r in replies) == 3 * ALL_PAGES
    assert sock.exists() and Path(f"{sock}.takeover").exists()
    assert not any(e["event"] == "fork_end" for e in old.events)  # the old one ended none
    # New VMMs connect to the same socket and are served by the new server.
    late = vmms(str(sock))
    assert late.send(cmd="touch", all=True)["bad"] == 0
    for g in [*guests, late]:
        g.close()
    ends = new.wait_for("fork_end", count=4)
    faults = {e["fork"]: e["faults"] for e in ends}
    # Counters went on across the handover: the first guest's one page, then every page.
    assert faults == {"fork-1": ALL_PAGES, "fork-2": ALL_PAGES, "fork-3": ALL_PAGES,
                      "fork-4": ALL_PAGES}  # fmt: skip
    assert all(e["errors"] == 0 and e["state"] == "ended" for e in ends)
    assert new.stop() == 0
    assert not sock.exists() and not Path(f"{sock}.takeover").exists()


@needs_uffd
@pytest.mark.parametrize("step", ["built", "state", "adopted"])
def test_new_side_killed_mid_handover_old_serves_on(
    short_dir: Path, mem_file: Path, vmms, step: str
) -> None:
    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    guests = [vmms(str(sock)) for _ in range(2)]
    for g in guests:
        assert g.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
    new = Serve(*args_for(sock, mem_file, "--takeover"), env={"PAGEFORK_TAKEOVER_STOP_AT": step})
    new.wait_err(f"takeover: stopped at {step}")
    replies: list[dict[str, Any]] = []
    threads = [storm(g, replies, seed=i) for i, g in enumerate(guests)]
    new.proc.kill()
    assert new.proc.wait(30) == -signal.SIGKILL
    for t in threads:
        t.join(60)
    assert [r["bad"] for r in replies] == [0, 0]
    # The old server still accepts: the failed takeover changed nothing.
    late = vmms(str(sock))
    assert late.send(cmd="touch", all=True)["bad"] == 0
    for g in [*guests, late]:
        g.close()
    ends = old.wait_for("fork_end", count=3)
    assert sorted(e["faults"] for e in ends) == [ALL_PAGES] * 3
    assert all(e["errors"] == 0 for e in ends)
    assert not any(e["event"] == "handed_over" for e in old.events)
    # And it can still be taken over afterwards.
    again = Serve(*args_for(sock, mem_file, "--takeover"))
    assert again.wait_for("took_over")[0]["forks"] == 0
    assert old.proc.wait(30) == 0
    assert again.stop() == 0


@needs_uffd
def test_an_unknown_protocol_version_is_refused(short_dir: Path, mem_file: Path, vmms) -> None:
    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    guest = vmms(str(sock))
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(f"{sock}.takeover")
    ch = Channel(conn)
    ch.send({"type": "hello", "protocol": [2, 0], "pid": os.getpid(), "kind": "serve"})
    with pytest.raises(TakeoverError, match=r"protocol version 2\.0 is not supported"):
        ch.recv(time.monotonic() + 10, ["plan"])
    ch.close()
    assert guest.send(cmd="touch", all=True)["bad"] == 0  # served on, by the old server
    assert old.proc.poll() is None
    guest.close()
    assert old.wait_for("fork_end")[0]["faults"] == ALL_PAGES
    assert old.stop() == 0


def test_takeover_with_nobody_to_take_over_from_is_one_line_exit_2(
    short_dir: Path, mem_file: Path
) -> None:
    proc = subprocess.run(
        [*PAGEFORK, "serve", *args_for(short_dir / "h.sock", mem_file, "--takeover")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"pagefork: error: cannot reach the running process at {short_dir}/h.sock.takeover: "
        "No such file or directory"
    ]


@needs_uffd
def test_a_takeover_onto_another_mem_file_is_refused(
    short_dir: Path, mem_file: Path, tmp_path: Path
) -> None:
    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    other = tmp_path / "other"
    other.write_bytes(mem_file.read_bytes())
    proc = subprocess.run(
        [*PAGEFORK, "serve", *args_for(sock, other, "--takeover")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--mem-file {other} is not the running server's mem-file" in proc.stderr
    assert old.proc.poll() is None
    assert old.stop() == 0


@needs_uffd
def test_warmup_recording_goes_on_across_the_takeover_and_is_saved_once(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    hot = short_dir / "hot.hpl"
    rec = ["--record", str(hot), "--record-max-pages", "6"]
    old = Serve(*args_for(sock, mem_file, *rec))
    old.wait_for("listening")
    warm = vmms(str(sock))
    before = [[0, 0], [0, PAGE], [1, 8 * PAGE]]
    assert warm.send(cmd="touch", pages=before)["bad"] == 0  # 3 of the 6-page window
    new = Serve(*args_for(sock, mem_file, "--takeover", *rec))
    assert new.wait_for("took_over")[0]["forks"] == 1
    assert old.proc.wait(30) == 0
    after = [[0, 5 * PAGE], [1, 0], [1, PAGE]]
    assert warm.send(cmd="touch", pages=after)["bad"] == 0  # fills the window, on the new side
    (saved,) = new.wait_for("hot_pages_saved")
    assert saved["fork"] == "fork-1" and saved["pages"] == 6
    assert sorted(load(hot).in_order()) == sorted(tuple(p) for p in before + after)
    # The next fork is prefetched from that hot set by the new server.
    later = vmms(str(sock))
    (done,) = new.wait_for("prefetch_done")
    assert done["fork"] == "fork-2" and done["pages"] == 6
    assert later.send(cmd="touch", pages=before + after)["bad"] == 0
    for g in (warm, later):
        g.close()
    new.wait_for("fork_end", count=2)
    assert not any(e["event"] == "hot_pages_saved" for e in old.events)
    assert len(new.wait_for("hot_pages_saved")) == 1
    assert new.stop() == 0


@needs_uffd
def test_takeover_while_a_fork_is_mid_prefetch(short_dir: Path, mem_file: Path, vmms) -> None:
    sock = short_dir / "h.sock"
    hot = short_dir / "hot.hpl"
    first = Serve(*args_for(sock, mem_file, "--record", str(hot)))
    first.wait_for("listening")
    warm = vmms(str(sock))
    assert warm.send(cmd="touch", all=True)["bad"] == 0
    warm.close()
    first.wait_for("hot_pages_saved")
    assert first.stop() == 0
    # Its workers are stopped below and must not be replaced as stuck meanwhile.
    old = Serve(*args_for(sock, mem_file, "--hot-pages", str(hot)),
                env={"PAGEFORK_WORKER_STUCK_AFTER": "600"})  # fmt: skip
    (listening,) = old.wait_for("listening")
    # Its workers stopped: the prefetch the guest's handshake starts cannot finish until the
    # takeover has begun.
    for pid in listening["worker_pids"]:
        os.kill(pid, signal.SIGSTOP)
    guest = vmms(str(sock))
    new = Serve(*args_for(sock, mem_file, "--takeover", "--hot-pages", str(hot)),
                env={"PAGEFORK_TAKEOVER_PAUSE_AT": "built"})  # fmt: skip
    new.wait_err("takeover: paused at built")
    assert not old.events[1:]  # no prefetch_done yet
    go_on(new.proc)
    for pid in listening["worker_pids"]:
        os.kill(pid, signal.SIGCONT)
    new.wait_for("took_over")
    assert old.proc.wait(30) == 0
    # The prefetch in flight finished on the old side before its worker let the fork go.
    (done,) = old.wait_for("prefetch_done")
    assert done["pages"] + done["already_present"] == ALL_PAGES
    assert guest.send(cmd="touch", all=True)["bad"] == 0
    guest.close()
    (end,) = new.wait_for("fork_end")
    assert end["prefetched_pages"] == done["pages"] and end["misses"] == 0
    assert new.stop() == 0


HOSTILE_PEER = """
import os, socket, sys, time
from pagefork.takeover.protocol import Channel
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
ch = Channel(conn)
ch.send({"type": "hello", "protocol": [1, 0], "pid": os.getpid(), "kind": "serve"})
ch.recv(time.monotonic() + 30, ["plan"])
ch.send({"type": "ready", "worker_pids": [int(sys.argv[2])]})
state, fds = ch.recv(time.monotonic() + 30, ["state"])
print(len(state["forks"]), len(fds), flush=True)
os._exit(3)  # gone without "done", holding every fork's fds
"""


@needs_uffd
def test_a_peer_that_names_a_stranger_as_its_worker_cannot_get_it_killed(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    guest = vmms(str(sock))
    assert guest.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    # Not the peer's child: a failed takeover must leave it alone.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        peer = subprocess.run(
            [sys.executable, "-c", HOSTILE_PEER, f"{sock}.takeover", str(stranger.pid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # One fork: its 4 fds, the uffd listening socket, the socket's lock and the takeover
        # socket.
        assert peer.returncode == 3 and peer.stdout.split() == ["1", "7"]
        reply = guest.send(cmd="touch", all=True)
        assert reply["bad"] == 0 and reply["touched"] == ALL_PAGES  # served on, re-adopted
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
    guest.close()
    assert old.wait_for("fork_end")[0]["faults"] == ALL_PAGES
    assert old.stop() == 0


@needs_uffd
@pytest.mark.parametrize("step", ["state", "adopted"])
def test_old_side_killed_after_handing_over_the_state_new_side_keeps_every_fork(
    short_dir: Path, mem_file: Path, vmms, step: str
) -> None:
    sock = short_dir / "h.sock"
    old, guests = serve_with_guests(sock, mem_file, vmms, 2)
    new = Serve(*args_for(sock, mem_file, "--takeover"), env={"PAGEFORK_TAKEOVER_PAUSE_AT": step})
    new.wait_err(f"takeover: paused at {step}")
    old.proc.kill()  # it sent every fork: this side is the only one left to serve them
    assert old.proc.wait(30) == -signal.SIGKILL
    go_on(new.proc)
    assert new.wait_for("took_over")[0]["forks"] == 2
    for g in guests:
        assert g.send(cmd="touch", all=True)["bad"] == 0
    late = vmms(str(sock))  # and it accepts on the socket it took
    assert late.send(cmd="touch", all=True)["bad"] == 0
    for g in [*guests, late]:
        g.close()
    ends = new.wait_for("fork_end", count=3)
    assert all(e["errors"] == 0 for e in ends)
    assert new.stop() == 0


@needs_uffd
def test_a_takeover_without_the_running_servers_recording_is_refused(
    short_dir: Path, mem_file: Path, tmp_path: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    out = tmp_path / "hot.hpl"
    old = Serve(*args_for(sock, mem_file, "--record", str(out), "--record-max-seconds", "300"))
    old.wait_for("listening")
    warm = vmms(str(sock))  # the warm-up records: a successor that does not would lose it
    assert warm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
    proc = subprocess.run(
        [*PAGEFORK, "serve", *args_for(sock, mem_file, "--takeover")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--record (none) is not the running server's ({out})" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # The old server still records: the warm-up's hot set is saved when its window closes.
    assert warm.send(cmd="touch", pages=[[0, 2 * PAGE]])["bad"] == 0
    warm.close()
    old.wait_for("fork_end")
    assert old.stop() == 0
    assert out.exists()


@needs_uffd
def test_an_old_side_that_gives_up_tells_the_new_side_why(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    from pagefork.takeover.protocol import PROTOCOL_VERSION, Channel, TakeoverError

    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    guest = vmms(str(sock))
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(f"{sock}.takeover")
    ch = Channel(peer)
    try:
        ch.send({"type": "hello", "protocol": list(PROTOCOL_VERSION), "pid": os.getpid(),
                 "version": "test", "kind": "serve"})  # fmt: skip
        ch.recv(time.monotonic() + 30, ["plan"])
        ch.send({"type": "bogus"})  # not "ready": the old side gives up, and says why
        with pytest.raises(TakeoverError, match="gave up: expected ready, got 'bogus'"):
            ch.recv(time.monotonic() + 30, ["state"])
    finally:
        ch.close()
    assert guest.send(cmd="touch", all=True)["bad"] == 0  # and serves on
    guest.close()
    assert old.wait_for("fork_end")[0]["errors"] == 0
    assert old.stop() == 0


@needs_uffd
def test_a_serve_of_an_object_storage_template_is_taken_over(
    short_dir: Path, mem_file: Path, tmp_path: Path, vmms, s3_bucket: str, s3_endpoint: str
) -> None:
    from conftest import S3_ENV

    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    url = f"s3://{s3_bucket}/t"
    pushed = subprocess.run(
        [*PAGEFORK, "push", url, "--mem-file", str(mem_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert pushed.returncode == 0, pushed.stderr
    sock = short_dir / "h.sock"
    args = ["--mem-file", url, "--socket", str(sock), "--workers", "1",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    old = Serve(*args, env=env)
    old.wait_for("listening", timeout=60)
    guest = vmms(str(sock))
    assert guest.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    new = Serve(*args, "--takeover", env=env)
    assert new.wait_for("took_over", timeout=60)[0]["forks"] == 1
    assert old.proc.wait(60) == 0
    assert guest.send(cmd="touch", all=True)["bad"] == 0  # the rest fetched by the new side
    guest.close()
    assert new.wait_for("fork_end")[0]["errors"] == 0
    assert new.stop() == 0
