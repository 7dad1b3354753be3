"""A daemon restarted after a crash: adopt the forks its predecessor's workers kept serving.

The workers of every page server of a daemon outlive it (:mod:`pagefork.takeover.orphan`),
each with the identity of its template (id and ``created`` stamp) as its plan. A daemon
started on the same state directory takes over from each of them before it answers its first
request (:func:`adopt_orphans_into`): it opens the template's page server the normal way, its
workers adopt the forks, and the daemon's own record of each fork (template, socket, role,
driver) comes back from its :class:`~pagefork.daemon.journal.ForkJournal`.

A fork the daemon started a VMM for is watched and stopped through a pidfd of that VMM
(:class:`~pagefork.vmm.base.AdoptedProcess`): what its driver drove it through (the built-in
microVM's pipes, Firecracker's API socket) died with the old daemon, and the VMM's exit status
is unknown.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from pagefork.daemon.journal import ForkJournal
from pagefork.daemon.lifecycle import DaemonStage
from pagefork.daemon.manager import Fork, journal_record
from pagefork.daemon.service import Daemon
from pagefork.server import PageServer
from pagefork.takeover import pageserver
from pagefork.takeover.daemon import takeover_path
from pagefork.takeover.new import Target
from pagefork.takeover.orphan import setup
from pagefork.takeover.protocol import TakeoverError
from pagefork.takeover.recover import Recovery, adopt_orphans, supervisor_alive
from pagefork.vmm.base import AdoptedProcess

log = logging.getLogger("pagefork")

#: Under the state directory: the daemon's record of each fork.
FORK_JOURNAL = "fork-journal"


def keep_forks_if_killed(daemon: Daemon) -> None:
    """Journal every fork and have every page server's workers outlive this daemon."""
    state_dir = str(daemon.registry.state_dir.absolute())
    manager = daemon.manager
    manager.fork_journal = ForkJournal(Path(state_dir) / FORK_JOURNAL)
    manager.orphan_setup = lambda record: setup(
        takeover_path(state_dir),
        "daemon",
        {"state_dir": state_dir, "template": record.id, "created": record.created},
    )
    for record, server in manager.template_servers():  # opened before (a takeover's)
        server.keep_forks_if_killed(manager.orphan_setup(record))
    forks, _, _ = manager.export_state()
    for fork in forks:
        manager.fork_journal.write(fork.fork_id, journal_record(fork))


class DaemonOrphanTarget(Target):
    """The new side of a takeover from one orphaned worker of a dead daemon."""

    kind = "daemon"

    def __init__(self, daemon: Daemon, records: dict[str, dict[str, Any]]) -> None:
        self.daemon = daemon
        self.records = records
        self.adopted: set[str] = set()
        self._server: PageServer | None = None
        self._key: tuple[str, float] = ("", 0.0)

    def build(self, plan: dict[str, Any]) -> list[int]:
        daemon = self.daemon
        manager = daemon.manager
        mine = str(daemon.registry.state_dir.absolute())
        if plan.get("state_dir") != mine:
            raise TakeoverError(f"--state-dir {mine} is not the dead daemon's")
        record = daemon.registry.get(str(plan.get("template")))
        if record.created != plan.get("created"):
            raise TakeoverError(f"template {record.id!r} changed on disk meanwhile")
        key = (record.id, record.created)
        running = {(r.id, r.created): s for r, s in manager.template_servers()}
        server = running.get(key)
        if server is None:  # its first orphan: start its page server, as a takeover does
            server = manager.open_server(record)
            manager.adopt_template(record, server)
        self._server, self._key = server, key
        server.wait_ready()
        return pageserver.all_worker_pids(server)

    def adopt(self, state: dict[str, Any], fds: list[int]) -> int:
        assert self._server is not None
        manager = self.daemon.manager
        n = pageserver.adopt(self._server, state, fds)
        for spec in state["forks"]:
            fork_id = str(spec["fork"])
            rec = self.records.get(fork_id, {})
            driver = rec.get("driver")
            handle = None
            pid = spec.get("pid")
            if driver is not None and isinstance(pid, int):
                with contextlib.suppress(OSError):
                    handle = AdoptedProcess(fork_id, pid, os.pidfd_open(pid))
            role = rec.get("role", "demand")
            fork = Fork(
                fork_id,
                self._key[0],
                str(rec.get("socket") or spec.get("socket") or ""),
                role if role in ("warmup", "prefetch", "demand") else "demand",
                float(rec.get("created", 0.0)),
                driver=str(driver) if driver is not None else None,
                handle=handle,
                stage=DaemonStage.LIVE,
                template_created=self._key[1],
            )
            manager.adopt_fork(fork, 0)
            if manager.fork_journal is not None:
                manager.fork_journal.write(fork_id, journal_record(fork))
            self.adopted.add(fork_id)
        return n


def adopt_orphans_into(daemon: Daemon, cancel_fd: int = -1) -> Recovery:
    """Adopt every orphaned worker of a daemon that died on this state directory; records of
    forks nobody serves any more are dropped."""
    journal = daemon.manager.fork_journal
    records = journal.load() if journal is not None else {}
    path = takeover_path(daemon.registry.state_dir)
    target = DaemonOrphanTarget(daemon, records)
    found = Recovery()
    if not supervisor_alive(path):
        # Not cancelled by a stop signal (``cancel_fd`` is kept for callers' sake): a stop in
        # the middle would leave some forks adopted and others orphaned. Every step is
        # bounded; the stop that follows treats every fork alike.
        found = adopt_orphans(path, target)
    # A fork recorded but served by no orphan is reported, never dropped in silence.
    for fork_id in sorted(set(records) - target.adopted):
        rec = records[fork_id]
        found.lost.append(fork_id)
        log.warning(
            "fork %s (template %s, socket %s) is lost: no worker of the daemon that died "
            "served it (its VMM had not connected yet, or it ended while no daemon ran); "
            "its record is dropped",
            fork_id,
            rec.get("template", "?"),
            rec.get("socket", "?"),
        )
    if journal is not None:
        journal.keep_only(target.adopted)
    return found


__all__ = ["FORK_JOURNAL", "DaemonOrphanTarget", "adopt_orphans_into", "keep_forks_if_killed"]
