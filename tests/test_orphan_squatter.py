"""A restarted serve that cannot have its socket leaves the orphaned forks alone.

Real ``pagefork serve`` processes, real SIGKILL, test VMMs that fault real uffd memory.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from procs import ALL_PAGES, Serve, args_for, kill, orphans, rendezvous, serve_with_guests

from conftest import needs_uffd


@needs_uffd
def test_socket_held_by_another_process_no_orphan_is_adopted_and_ended(
    short_dir: Path, mem_file: Path, vmms
) -> None:
    sock = short_dir / "h.sock"
    old, guests = serve_with_guests(sock, mem_file, vmms, 2)
    waiting = orphans(sock, kill(old))
    assert len(waiting) == 2
    # Another process (a second supervisor started at the same time, say) holds the socket.
    os.unlink(sock)
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(str(sock))
    squatter.listen(8)
    new = Serve(*args_for(sock, mem_file))
    assert new.proc.wait(60) == 2
    new.wait_err(f"pagefork: error: {sock} is in use by a live server")
    assert not any(e["event"] in ("adopted", "fork_end") for e in new.events)
    assert not any("Traceback" in line for line in new.errors)
    # The orphans still serve their forks, every byte, and still wait to be adopted.
    for g in guests:
        assert g.send(cmd="touch", all=True)["bad"] == 0
    assert rendezvous(sock) == waiting
    squatter.close()
    os.unlink(sock)
    last = Serve(*args_for(sock, mem_file))
    (adopted,) = last.wait_for("adopted")
    assert adopted["forks"] == 2 and adopted["failed"] == 0
    last.wait_for("listening")
    for g in guests:
        g.close()
    ends = last.wait_for("fork_end", count=2)
    assert sorted(e["faults"] for e in ends) == [ALL_PAGES] * 2
    assert last.stop() == 0


@needs_uffd
def test_a_restart_with_another_mem_file_refuses_to_start_and_the_orphans_serve_on(
    short_dir: Path, mem_file: Path, tmp_path: Path, vmms
) -> None:
    from conftest import make_mem_file

    sock = short_dir / "h.sock"
    old = Serve(*args_for(sock, mem_file))
    old.wait_for("listening")
    guest = vmms(str(sock))
    assert guest.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    kill(old)
    waiting = rendezvous(sock)
    other = make_mem_file(tmp_path / "other", 3072, seed=9)
    new = Serve(*args_for(sock, other))
    assert new.proc.wait(60) == 2
    new.wait_err("could not be adopted")
    assert not any(e["event"] == "listening" for e in new.events)
    assert not any("Traceback" in line for line in new.errors)
    assert guest.send(cmd="touch", all=True)["bad"] == 0  # the orphans serve on
    # The worker that serves the fork still waits (one that served none may have gone).
    assert rendezvous(sock) and set(rendezvous(sock)) <= set(waiting)
    last = Serve(*args_for(sock, mem_file))
    (adopted,) = last.wait_for("adopted")
    assert adopted["forks"] == 1 and adopted["failed"] == 0
    last.wait_for("listening")
    guest.close()
    (end,) = last.wait_for("fork_end")
    assert end["faults"] == ALL_PAGES and end["errors"] == 0
    assert last.stop() == 0
