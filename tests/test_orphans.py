"""A supervisor killed while its forks fault: its workers serve on and the next one adopts.

Real ``pagefork serve`` processes, real SIGKILL, test VMMs that fault real uffd memory and
check every byte against the template.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
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
    storm,
)

from conftest import PAGE, needs_uffd
from pagefork.hotpages import load

REGION0 = [[0, o] for o in range(0, 8 << 20, PAGE)]
REGION1 = [[1, o] for o in range(0, 4 << 20, PAGE)]


@needs_uffd
def test_serve_killed_mid_storm_forks_are_served_on_and_adopted(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old, guests = serve_with_guests(sock, mem_file, vmms, 3)
    replies: list[dict[str, Any]] = []
    threads = [storm_pages(g, REGION0, replies, seed=i) for i, g in enumerate(guests)]
    workers = kill(old)  # mid-storm
    for t in threads:
        t.join(60)
    # No supervisor runs now: the workers serve a second storm on their own.
    assert old.proc.poll() is not None
    threads = [storm_pages(g, REGION1, replies, seed=i) for i, g in enumerate(guests)]
    for t in threads:
        t.join(60)
    assert old.proc.poll() is not None
    assert [r["bad"] for r in replies] == [0] * 6
    assert sum(r["touched"] for r in replies) == 3 * ALL_PAGES
    assert len(orphans(sock, workers)) == 2  # one per worker that has forks; the spare exits
    new = Serve(*args_for(sock, mem_file))
    (adopted,) = new.wait_for("adopted")
    assert adopted["forks"] == 3 and adopted["workers"] == 2 and adopted["failed"] == 0
    new.wait_for("listening")
    for pid in workers:
        assert exited(pid, 30), f"orphaned worker {pid} did not exit"
    # Each orphaned worker removed its rendezvous socket as it exited.
    assert not [n for n in rendezvous(sock) if int(n.rpartition(".")[2]) in workers]
    late = vmms(str(sock))  # and it accepts new forks
    assert late.send(cmd="touch", all=True)["bad"] == 0
    for g in [*guests, late]:
        assert g.send(cmd="touch", all=True)["bad"] == 0
        g.close()
    ends = new.wait_for("fork_end", count=4)
    # Every fault of every fork, counted across both supervisors (the ledgers moved).
    assert sorted(e["faults"] for e in ends) == [ALL_PAGES] * 4
    assert all(e["errors"] == 0 and e["state"] == "ended" for e in ends)
    assert new.stop() == 0
    assert orphans(sock, []) == []  # the spare, too, removed its own


def storm_pages(
    vmm: Any, pages: list[list[int]], out: list[dict[str, Any]], seed: int
) -> threading.Thread:
    """Touch ``pages`` of ``vmm`` from 4 threads in random order; the reply goes to ``out``."""

    def run() -> None:
        out.append(vmm.send(cmd="touch", pages=pages, order="random", seed=seed, threads=4))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@needs_uffd
def test_nobody_adopts_in_time_the_vmms_are_killed_and_the_workers_exit(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file), env={"PAGEFORK_ORPHAN_DEADLINE": "0.5"})
    old.wait_for("listening")
    guests = [vmms(str(sock)) for _ in range(2)]
    for g in guests:
        assert g.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    workers = kill(old)
    for g in guests:  # the failure policy: SIGKILL through the pidfd
        assert g.proc.wait(30) == -signal.SIGKILL
    for pid in workers:
        assert exited(pid, 30), f"orphaned worker {pid} did not exit"
    old.wait_err("no supervisor adopted it within 0.5s of its supervisor's death; killing VMM")
    assert orphans(sock, []) == []  # the spare, too, removed its own
    # The next supervisor finds nothing to adopt and starts clean.
    new = Serve(*args_for(sock, mem_file))
    new.wait_for("listening")
    assert not any(e["event"] == "adopted" for e in new.events)
    assert new.stop() == 0


@needs_uffd
@pytest.mark.parametrize("step", ["hello", "built"])
def test_old_side_killed_while_the_successor_is_at_a_step_no_fork_is_lost(
    short_dir: Path, mem_file: Path, vmms, step: str
) -> None:
    sock = short_dir / "h.sock"
    old, guests = serve_with_guests(sock, mem_file, vmms, 2)
    new = Serve(*args_for(sock, mem_file, "--takeover"), env={"PAGEFORK_TAKEOVER_PAUSE_AT": step})
    new.wait_err(f"takeover: paused at {step}")
    replies: list[dict[str, Any]] = []
    threads = [storm(g, replies, seed=i) for i, g in enumerate(guests)]
    kill(old)
    # On: the takeover fails, and the successor then takes over from each orphaned worker
    # with the same steps (it pauses at this one again for each).
    for _ in range(3):
        go_on(new.proc)
    (adopted,) = new.wait_for("adopted")
    assert adopted["forks"] == 2
    new.wait_for("listening")
    for t in threads:
        t.join(60)
    assert [r["bad"] for r in replies] == [0, 0]
    for g in guests:
        g.close()
    ends = new.wait_for("fork_end", count=2)
    assert sorted(e["faults"] for e in ends) == [ALL_PAGES] * 2
    assert all(e["errors"] == 0 for e in ends)
    assert new.stop() == 0


@needs_uffd
def test_daemon_killed_mid_storm_its_forks_come_back_with_their_records(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    client, forks, guests = setup_forks(control, mem_file, tmp_path, vmms)
    replies: list[dict[str, Any]] = []
    threads = [storm_pages(g, REGION0, replies, seed=i) for i, g in enumerate(guests)]
    old.proc.kill()  # mid-storm
    assert old.proc.wait(30) == -signal.SIGKILL
    for t in threads:
        t.join(60)
    # No daemon runs: the workers serve a second storm on their own.
    threads = [storm_pages(g, REGION1, replies, seed=i) for i, g in enumerate(guests)]
    for t in threads:
        t.join(60)
    assert old.proc.poll() is not None
    assert [r["bad"] for r in replies] == [0] * 6
    new = DaemonProc(tmp_path / "state", control)
    adopted = new.wait_for("adopted")
    assert adopted["forks"] == 3 and adopted["failed"] == 0
    new.wait_for("listening")
    # The daemon's own records came back from its journal.
    listed = {f["fork"]: f for f in client.forks()}
    assert sorted(listed) == ["f0", "f1", "f2"]
    assert [listed[f["fork"]]["role"] for f in forks] == [f["role"] for f in forks]
    assert all(listed[f["fork"]]["socket"] == f["socket"] for f in forks)
    for f, g in zip(forks, guests, strict=True):
        assert g.send(cmd="touch", all=True)["bad"] == 0
        stats = client.release_fork(f["fork"])["stats"]
        # Every fault, counted across both daemons (the ledgers moved).
        assert stats["faults"] == ALL_PAGES and stats["errors"] == 0
    assert client.forks() == []
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(60) == 0


@needs_uffd
def test_a_lazy_template_fault_waits_for_the_next_supervisor_to_fetch_its_chunk(
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
    # Page 0 is a zero page (no fetch); page 1 is not: its chunk (the first 2 MiB) is fetched.
    assert guest.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
    kill(old)
    # Orphaned: a page of a fetched chunk is served; one of a chunk never fetched waits.
    assert guest.send(cmd="touch", pages=[[0, 2 * PAGE]])["bad"] == 0
    replies: list[dict[str, Any]] = []
    waiting = storm_pages(guest, [[1, (4 << 20) - PAGE]], replies, seed=0)
    new = Serve(*args, env=env)
    assert new.wait_for("adopted", timeout=60)[0]["forks"] == 1
    waiting.join(60)
    assert replies and replies[0]["bad"] == 0  # fetched by the new supervisor
    assert guest.send(cmd="touch", all=True)["bad"] == 0
    guest.close()
    (end,) = new.wait_for("fork_end")
    assert end["errors"] == 0 and end["faults"] == ALL_PAGES
    assert new.stop() == 0


@needs_uffd
@pytest.mark.parametrize("step", ["hello", "built"])
def test_old_daemon_killed_while_the_successor_is_at_a_step_no_fork_is_lost(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms, step: str
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    client, forks, guests = setup_forks(control, mem_file, tmp_path, vmms, n=2)
    new = DaemonProc(
        tmp_path / "state", control, "--takeover", env={"PAGEFORK_TAKEOVER_PAUSE_AT": step}
    )
    new.wait_err(f"takeover: paused at {step}")
    replies: list[dict[str, Any]] = []
    threads = [storm(g, replies, seed=i) for i, g in enumerate(guests)]
    old.proc.kill()
    assert old.proc.wait(30) == -signal.SIGKILL
    for _ in range(4):  # the takeover, then one per orphaned worker, pause at this step
        go_on(new.proc)
    assert new.wait_for("adopted")["forks"] == 2
    new.wait_for("listening")
    for t in threads:
        t.join(60)
    assert [r["bad"] for r in replies] == [0, 0]
    assert sorted(f["fork"] for f in client.forks()) == ["f0", "f1"]
    stats = [client.release_fork(f["fork"])["stats"] for f in forks]
    assert [s["faults"] for s in stats] == [ALL_PAGES] * 2
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(60) == 0


@needs_uffd
def test_an_adopter_killed_mid_adoption_leaves_the_orphans_serving_for_the_next(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old, guests = serve_with_guests(sock, mem_file, vmms, 2, "--workers", "1")
    kill(old)
    # Its workers serve the forks, then it dies before saying "done": the orphaned worker
    # kills its workers and serves the forks again itself (never two workers on one fork).
    adopter = Serve(*args_for(sock, mem_file), env={"PAGEFORK_TAKEOVER_STOP_AT": "adopted"})
    adopter.wait_err("takeover: stopped at adopted")
    adopter.proc.kill()
    assert adopter.proc.wait(30) == -signal.SIGKILL
    replies: list[dict[str, Any]] = []
    threads = [storm(g, replies, seed=i) for i, g in enumerate(guests)]
    for t in threads:
        t.join(60)
    assert [r["bad"] for r in replies] == [0, 0]
    new = Serve(*args_for(sock, mem_file))
    assert new.wait_for("adopted")[0]["forks"] == 2
    for g in guests:
        g.close()
    ends = new.wait_for("fork_end", count=2)
    assert sorted(e["faults"] for e in ends) == [ALL_PAGES] * 2
    assert all(e["errors"] == 0 for e in ends)
    assert new.stop() == 0


@pytest.mark.parametrize("command", ["serve", "daemon"])
def test_a_bad_orphan_deadline_is_a_one_line_error(
    short_dir: Path, mem_file: Path, tmp_path: Path, command: str
) -> None:
    args = (
        args_for(short_dir / "h.sock", mem_file)
        if command == "serve"
        else ["--state-dir", str(tmp_path / "state"), "--control", str(short_dir / "c.sock")]
    )
    proc = subprocess.run(
        [*PAGEFORK, command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PAGEFORK_ORPHAN_DEADLINE": "soon"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pagefork: error: PAGEFORK_ORPHAN_DEADLINE='soon': expected a number of seconds >= 0"
    ]
    assert not (short_dir / "h.sock").exists() and not (short_dir / "c.sock").exists()


@needs_uffd
def test_a_rendezvous_whose_worker_died_too_is_removed_by_the_next_supervisor(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old, _ = serve_with_guests(sock, mem_file, vmms, 1, "--workers", "1")
    (worker,) = kill(old)
    (left,) = orphans(sock, [worker])
    assert left == f"h.sock.takeover.orphan.{worker}"
    os.kill(worker, signal.SIGKILL)  # nobody is left to serve the fork: it is lost
    assert exited(worker, 30)
    new = Serve(*args_for(sock, mem_file, "--workers", "1"))
    new.wait_for("listening")
    assert left not in rendezvous(sock)
    assert not any(e["event"] == "adopted" for e in new.events)
    assert new.stop() == 0


@needs_uffd
def test_a_warmup_recording_goes_on_under_the_adopter_and_is_saved(
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
    kill(old)
    new = Serve(*args_for(sock, mem_file, *rec))
    assert new.wait_for("adopted")[0]["forks"] == 1
    after = [[0, 5 * PAGE], [1, 0], [1, PAGE]]
    assert warm.send(cmd="touch", pages=after)["bad"] == 0  # fills the window, adopted
    (saved,) = new.wait_for("hot_pages_saved")
    assert saved["fork"] == "fork-1" and saved["pages"] == 6
    assert sorted(load(hot).in_order()) == sorted(tuple(p) for p in before + after)
    later = vmms(str(sock))  # prefetched from that hot set, not a second warm-up
    (done,) = new.wait_for("prefetch_done")
    assert done["fork"] != "fork-1" and done["pages"] == 6
    for g in (warm, later):
        g.close()
    new.wait_for("fork_end", count=2)
    assert len(new.wait_for("hot_pages_saved")) == 1
    assert new.stop() == 0
