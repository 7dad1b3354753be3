"""A supervisor that starts where another one died: adopt the forks its workers kept serving.

Workers outlive a supervisor that was killed (:mod:`pagefork.takeover.orphan`): each waits on
its rendezvous socket next to the dead supervisor's takeover socket. A new supervisor on the
same socket (a restarted ``serve``) or state directory (a restarted daemon), or a successor
whose old side died in the middle of a takeover, calls :func:`adopt_orphans` before it accepts
new forks: it takes over from each orphaned worker in turn, with the very protocol and
:class:`~pagefork.takeover.new.Target` a takeover of a running supervisor uses. Rendezvous
sockets nobody listens on any more (their worker died too) are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field

from pagefork.takeover.new import Target, take_over
from pagefork.takeover.orphan import rendezvous_paths
from pagefork.takeover.protocol import NoPeerError, TakeoverError

log = logging.getLogger("pagefork")

#: Seconds each step with one orphaned worker may take (it answers from memory, at once).
STEP_TIMEOUT = 10.0


@dataclass
class Recovery:
    """What :func:`adopt_orphans` did."""

    #: Orphaned workers whose forks this supervisor now serves.
    workers: int = 0
    #: Forks adopted from them.
    forks: int = 0
    #: From the start of the adoption to the last fork adopted.
    seconds: float = 0.0
    #: One line per orphaned worker that could not be adopted from (it serves on until its
    #: deadline, then applies the failure policy).
    failed: list[str] = field(default_factory=list)
    #: Forks the dead supervisor had recorded that no orphaned worker served (the daemon's
    #: journal): a fork whose VMM had not connected yet, or one that ended meanwhile.
    lost: list[str] = field(default_factory=list)


def supervisor_alive(takeover_path: str) -> bool:
    """True if a supervisor listens on ``takeover_path`` (its workers are not orphans)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(takeover_path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def adopt_orphans(takeover_path: str, target: Target, *, cancel_fd: int = -1) -> Recovery:
    """Take over every orphaned worker waiting next to ``takeover_path`` into ``target``.

    Call it only when no supervisor runs on ``takeover_path`` (see :func:`supervisor_alive`):
    a running supervisor's workers wait on theirs too, and never answer.
    """
    t0 = time.monotonic()
    done = Recovery()
    for path in rendezvous_paths(takeover_path):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            continue  # not ours: leave it
        if _is_my_child(int(path.rpartition(".")[2])):
            continue  # a worker of this very supervisor: it waits for our death, not its own
        try:
            took = take_over(
                path, target, ready_timeout=STEP_TIMEOUT, step_timeout=STEP_TIMEOUT,
                cancel_fd=cancel_fd,
            )  # fmt: skip
        except TakeoverError as exc:
            if isinstance(exc, NoPeerError):
                _remove_if_same(path, st)  # its worker died too: nothing waits there
                continue
            log.warning("cannot adopt the forks of the orphaned worker at %s: %s", path, exc)
            done.failed.append(f"{path}: {exc}")
            continue
        if took.listener is not None:
            took.listener.close()  # the worker's own rendezvous: it removes it as it exits
        done.workers += 1
        done.forks += took.forks
        log.warning("adopted %d forks of orphaned worker %d (%s)", took.forks, took.from_pid, path)
    done.seconds = time.monotonic() - t0
    return done


def _is_my_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


def _remove_if_same(path: str, st: os.stat_result) -> None:
    with contextlib.suppress(OSError):
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)


__all__ = ["STEP_TIMEOUT", "Recovery", "adopt_orphans", "supervisor_alive"]
