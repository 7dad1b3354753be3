"""``pagefork daemon --takeover``: a running daemon hands everything to a new one.

The old daemon listens on ``STATE_DIR/takeover.sock`` (0600). What moves, besides every page
server's forks (:mod:`pagefork.takeover.pageserver`):

- the control listening socket (clients queue in its backlog meanwhile: none fails);
- the state directory's lock (an ``flock`` belongs to the open file, so the new daemon holds
  it from the moment it has the fd, and the directory is never unowned);
- every fork the manager holds: template, role, phase, prefetch result, driver, and its VMM
  as its handle hands it over (:meth:`pagefork.vmm.base.VmmHandle.handover`: pid, pidfd, and
  for the built-in microVM the pipes it is driven through, the old daemon no longer reading
  them, so a line the microVM writes meanwhile waits in the pipe for the new one; for
  Firecracker its API socket and stop settings); the new daemon's driver of the same name
  adopts it (:meth:`pagefork.vmm.base.VmmDriver.adopt`), so it is driven as before and hands
  over again at the next takeover;
- each template's hot-page loop (which fork records, whether a re-record is pending).

Templates are named by id and ``created`` stamp; the new daemon opens each from its state
directory the normal way. The old daemon drains its control requests before it takes the
state (so a fork being created is complete, or not begun), and exits 0 without releasing any
fork.

A VMM adopted this way is not a child of the new daemon: its exit is seen through its pidfd,
but its exit status is unknown (``exit_status`` stays null).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Any

from pagefork.daemon.api import ControlApi, ControlServer
from pagefork.daemon.fork import journal_record
from pagefork.daemon.lifecycle import ForkPhase, stage_of
from pagefork.daemon.manager import Fork, ManagerConfig
from pagefork.daemon.service import Daemon
from pagefork.errors import PageforkError, VmmError
from pagefork.server import PageServer
from pagefork.stats import ForkStats
from pagefork.takeover import pageserver
from pagefork.takeover.new import Target
from pagefork.takeover.old import Source, TakeoverListener
from pagefork.takeover.protocol import TakeoverError, close_all
from pagefork.vmm.base import AdoptedProcess, VmmHandover

log = logging.getLogger("pagefork")

#: Under the state directory: where a running daemon listens for its successor.
TAKEOVER_SOCKET = "takeover.sock"


def takeover_path(state_dir: str | os.PathLike[str]) -> str:
    """The takeover socket of the daemon running on ``state_dir``."""
    return os.path.join(os.path.abspath(state_dir), TAKEOVER_SOCKET)


def _servers(daemon: Daemon) -> list[PageServer]:
    return [server for _, server in daemon.manager.template_servers()]


class DaemonSource(Source):
    """A running daemon, as the old side of a takeover."""

    kind = "daemon"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def plan(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.daemon.registry.state_dir.absolute()),
            "control": os.path.abspath(self.daemon.control_path),
            "templates": [
                [record.id, record.created] for record, _ in self.daemon.manager.template_servers()
            ],
            "store": _store_settings(self.daemon),
        }

    def quiesce(self, deadline: float) -> None:
        control = self.daemon.server
        control.stop_accepting()
        if not control.drain(max(0.0, deadline - time.monotonic())):
            raise TakeoverError("control requests in flight did not finish in time")
        for server in _servers(self.daemon):
            pageserver.quiesce(server, deadline)

    def release(self, deadline: float) -> None:
        for server in _servers(self.daemon):
            pageserver.release(server, deadline)

    def export(self) -> tuple[dict[str, Any], list[int]]:
        daemon = self.daemon
        manager = daemon.manager
        assert daemon.lock_fd is not None
        fds = [daemon.lock_fd, daemon.server.socket.fileno()]
        templates = []
        for record, server in manager.template_servers():
            exported, more = pageserver.export(server)
            base = len(fds)
            fds += more
            templates.append(
                {"id": record.id, "created": record.created, "base": base,
                 "count": len(more), "server": exported}
            )  # fmt: skip
        held, loop_states, fed = manager.export_state()
        loops = [[key[0], key[1], snap] for key, snap in loop_states]
        forks = [_fork_state(fork, fds) for fork in held]
        for f in forks:  # latencies the metrics have counted already
            f["latencies_fed"] = fed.get(f["fork"], 0)
        return {"lock": 0, "control": 1, "templates": templates, "forks": forks,
                "loops": loops}, fds  # fmt: skip

    def resume(self) -> None:
        for fork in self.daemon.manager.forks():
            if fork.handle is not None:
                fork.handle.handover_cancelled()
        for server in _servers(self.daemon):
            pageserver.readopt(server)
        self.daemon.server.resume_accepting()


def _store_settings(daemon: Daemon) -> dict[str, str | None]:
    """Where the daemon's templates in object storage come from: its chunk cache directory
    and its endpoint (``$AWS_ENDPOINT_URL`` when not given), which a successor must share."""
    store = daemon.manager.config.store
    cache = store.cache if store is not None else None
    default_cache = str(daemon.registry.state_dir.absolute() / "chunk-cache")
    endpoint = store.endpoint_url if store is not None else None
    return {
        "cache_dir": os.path.realpath(cache.path if cache is not None else default_cache),
        "endpoint_url": endpoint or os.environ.get("AWS_ENDPOINT_URL") or None,
    }


def _fork_state(fork: Fork, fds: list[int]) -> dict[str, Any]:
    def add(fd: int | None) -> int | None:
        if fd is None or fd < 0:
            return None
        fds.append(fd)
        return len(fds) - 1

    vmm: dict[str, Any] | None = None
    if fork.handle is not None:
        given = fork.handle.handover()
        fd_index = {name: add(fd) for name, fd in given.fds.items()}
        vmm = {"state": given.state, "fds": {k: v for k, v in fd_index.items() if v is not None}}
    return {
        **journal_record(fork),  # what a restarted daemon would know of it, and more:
        "prefetch": fork.prefetch,
        "phase": fork.phase.value,
        "exit_status": fork.exit_status,
        "vmm_exited": fork.vmm_exited,
        "session_ended": fork.state == "exited",
        "vmm": vmm,
        # The fork's diff chain: its next snapshot is a layer over its last one.
        "last_snapshot": list(fork.last_snapshot) if fork.last_snapshot is not None else None,
        "removed_at_snapshot": [list(r) for r in fork.removed_at_snapshot],
        "snapshot_lost": fork.snapshot_lost,
        # A session that ended here is in no page server's state: its figures go with it.
        "final_stats": fork.final_stats.to_dict() if fork.final_stats is not None else None,
    }


class DaemonTarget(Target):
    """A new ``daemon --takeover``: builds the page servers the old one runs, then adopts."""

    kind = "daemon"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.servers: dict[tuple[str, float], PageServer] = {}

    def build(self, plan: dict[str, Any]) -> list[int]:
        daemon = self.daemon
        mine = str(daemon.registry.state_dir.absolute())
        if plan.get("state_dir") != mine:
            raise TakeoverError(f"--state-dir {mine} is not the running daemon's")
        if plan.get("control") != os.path.abspath(daemon.control_path):
            raise TakeoverError(
                f"--control {daemon.control_path} is not the running daemon's "
                f"({plan.get('control')})"
            )
        theirs, ours = plan.get("store"), _store_settings(daemon)
        if isinstance(theirs, dict):  # an older daemon sends none
            for key, option in (("cache_dir", "--cache-dir"), ("endpoint_url", "--endpoint-url")):
                if theirs.get(key) != ours[key]:
                    raise TakeoverError(
                        f"{option} {ours[key] or '(not given)'} is not the running daemon's "
                        f"({theirs.get(key) or 'not given'}): a successor must use the same"
                    )
        pids: list[int] = []
        for template_id, created in plan.get("templates", []):
            record = daemon.registry.get(str(template_id))
            if record.created != created:
                raise TakeoverError(f"template {template_id!r} changed on disk meanwhile")
            server = daemon.manager.open_server(record)  # maps and scans the mem-file
            self.servers[(record.id, record.created)] = server
        for server in self.servers.values():
            server.wait_ready()
            pids += pageserver.all_worker_pids(server)
        return pids

    def discard(self) -> None:
        """A takeover that failed, on this new side: stop what was built without releasing a
        fork or stopping a VMM (they are the old daemon's, which serves on)."""
        daemon = self.daemon
        servers = list(self.servers.values())
        self.servers.clear()
        for server in servers + daemon.abandon():
            pageserver.abandon(server)

    def adopt(self, state: dict[str, Any], fds: list[int]) -> int:
        daemon = self.daemon
        manager = daemon.manager
        given: set[int] = set()  # fds whose ownership went to a page server
        try:
            lock_fd = os.dup(fds[state["lock"]])
            daemon.adopt_lock(lock_fd)
            with contextlib.suppress(OSError):  # for a human wondering who holds it
                os.pwrite(lock_fd, f"{os.getpid()}\n".encode().ljust(16), 0)
            control = socket.socket(fileno=os.dup(fds[state["control"]]))
            daemon.server = ControlServer.from_socket(
                control, ControlApi(daemon.registry, manager, daemon.metrics)
            )
            daemon.server.path = daemon.control_path
            for t in state["templates"]:
                key = (str(t["id"]), float(t["created"]))
                server = self.servers.pop(key, None)
                if server is None:
                    # Its page server started after the plan (a fork was created while this
                    # side built): start it now, as the old side's was.
                    record = daemon.registry.get(key[0])
                    if record.created != key[1]:
                        raise TakeoverError(f"template {key[0]!r} changed on disk meanwhile")
                    server = manager.open_server(record)
                    server.wait_ready()
                base, count = int(t["base"]), int(t["count"])
                given.update(range(base, base + count))
                pageserver.adopt(server, t["server"], fds[base : base + count])
                manager.adopt_template(daemon.registry.get(key[0]), server)
            for template_id, created, snap in state.get("loops", []):
                manager.adopt_loop((str(template_id), float(created)), snap)
            for spec in state["forks"]:
                self._adopt_fork(spec, fds)
            for server in self.servers.values():  # planned, but its forks are gone: stop it
                server.close()
            self.servers.clear()
        finally:
            close_all([fd for i, fd in enumerate(fds) if i not in given])
        return len(state["forks"])  # the forks the daemon holds, live or exited

    def _adopt_fork(self, spec: dict[str, Any], fds: list[int]) -> None:
        manager = self.daemon.manager
        key = (str(spec["template"]), float(spec["template_created"]))
        handle = None
        vmm = spec.get("vmm")
        if isinstance(vmm, dict):
            handover = VmmHandover(
                state=dict(vmm.get("state") or {}),
                fds={str(k): fds[int(v)] for k, v in (vmm.get("fds") or {}).items()},
            )
            driver = manager.drivers.get(str(spec.get("driver")))
            try:
                if driver is not None:
                    handle = driver.adopt(spec["fork"], handover)
                else:  # a driver this daemon lacks: its VMM is at least watched and stopped
                    handle = AdoptedProcess.from_handover(spec["fork"], handover)
            except VmmError as exc:
                log.warning("fork %s: %s; its VMM is only watched and stopped", spec["fork"], exc)
                handle = AdoptedProcess.from_handover(spec["fork"], handover)
        fork = Fork(
            spec["fork"],
            key[0],
            spec["socket"],
            spec["role"],
            float(spec["created"]),
            driver=spec.get("driver"),
            handle=handle,
            prefetch=spec.get("prefetch"),
            stage=stage_of(
                ForkPhase(spec["phase"]),
                vmm_exited=bool(spec.get("vmm_exited")),
                session_ended=bool(spec.get("session_ended"))
                or isinstance(spec.get("final_stats"), dict),
            ),
            template_created=key[1],
            exit_status=spec.get("exit_status"),
        )
        last = spec.get("last_snapshot")
        if isinstance(last, list) and len(last) == 2:
            fork.last_snapshot = (str(last[0]), float(last[1]))
        fork.removed_at_snapshot = tuple(
            (int(a), int(b)) for a, b in spec.get("removed_at_snapshot") or ()
        )
        lost = spec.get("snapshot_lost")
        fork.snapshot_lost = str(lost) if lost is not None else None
        final = spec.get("final_stats")
        if isinstance(final, dict):
            known = {f.name for f in dataclasses.fields(ForkStats)}
            fork.final_stats = ForkStats(**{k: v for k, v in final.items() if k in known})
        manager.adopt_fork(fork, int(spec.get("latencies_fed", 0)))


def build_for_takeover(
    state_dir: str, control: str, settings: ManagerConfig, socket_dir: str | None
) -> Daemon:
    """A new daemon for ``state_dir``, built without touching what the running one owns."""
    return Daemon.for_takeover(state_dir, control, settings, socket_dir=socket_dir)


class DaemonHandover:
    """The old daemon's listener; ``handed`` once a takeover succeeded."""

    def __init__(self, daemon: Daemon, on_done: Any, sock: socket.socket | None = None) -> None:
        self.daemon = daemon
        self.handed = False

        def done(pid: int, forks: int) -> None:
            self.handed = True
            on_done(pid, forks)

        path = takeover_path(daemon.registry.state_dir)
        self.listener: TakeoverListener | None = None
        try:
            self.listener = TakeoverListener(path, DaemonSource(daemon), done, sock=sock)
        except PageforkError as exc:
            log.warning("cannot listen for a takeover (serving without): %s", exc)

    def close(self) -> None:
        """Stop listening; after a takeover, drop everything without releasing a fork or
        removing a socket (they are the new daemon's), else close the daemon as usual."""
        if self.listener is not None:
            self.listener.close()
        if not self.handed:
            self.daemon.close()
            return
        for server in self.daemon.abandon():
            pageserver.abandon(server)


__all__ = [
    "TAKEOVER_SOCKET",
    "DaemonHandover",
    "DaemonSource",
    "DaemonTarget",
    "build_for_takeover",
    "takeover_path",
]
