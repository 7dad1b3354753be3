"""``pagefork daemon --takeover``: a running daemon hands everything to a new one.

The old daemon listens on ``STATE_DIR/takeover.sock`` (0600). What moves, besides every page
server's forks (:mod:`pagefork.takeover.pageserver`):

- the control listening socket (clients queue in its backlog meanwhile: none fails);
- the state directory's lock (an ``flock`` belongs to the open file, so the new daemon holds
  it from the moment it has the fd, and the directory is never unowned);
- every fork the manager holds: template, role, phase, prefetch result, driver, and its VMM
  (pid, pidfd, and for the built-in microVM the pipes it is driven through);
- each template's hot-page loop (which fork records, whether a re-record is pending).

Templates are named by id and ``created`` stamp; the new daemon opens each from its state
directory the normal way. The old daemon drains its control requests before it takes the
state (so a fork being created is complete, or not begun), and exits 0 without releasing any
fork.

A VMM adopted this way is not a child of the new daemon: its exit is seen through its pidfd,
but its exit status is unknown (``exit_status`` stays null), and a Firecracker adopted in a
takeover is stopped with SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from typing import Any

from pagefork.daemon.api import ControlApi, ControlServer
from pagefork.daemon.manager import Fork, ManagerConfig, _TemplateState
from pagefork.daemon.service import Daemon
from pagefork.errors import PageforkError, VmmError
from pagefork.hotloop import HotSetLoop
from pagefork.server import PageServer
from pagefork.serving.state import ForkPhase
from pagefork.stats import ForkStats
from pagefork.takeover import pageserver
from pagefork.takeover.new import Target
from pagefork.takeover.old import Source, TakeoverListener
from pagefork.takeover.protocol import TakeoverError, close_all
from pagefork.vmm.base import VmmHandle, VmmSnapshot

log = logging.getLogger("pagefork")

#: Under the state directory: where a running daemon listens for its successor.
TAKEOVER_SOCKET = "takeover.sock"


def takeover_path(state_dir: str | os.PathLike[str]) -> str:
    """The takeover socket of the daemon running on ``state_dir``."""
    return os.path.join(os.path.abspath(state_dir), TAKEOVER_SOCKET)


class AdoptedHandle(VmmHandle):
    """A VMM another daemon started, adopted in a takeover: watched and stopped through its
    pidfd; the built-in microVM is resumed and waited for through its pipes."""

    def __init__(
        self,
        fork_id: str,
        pid: int | None,
        pidfd: int,
        stdin: int = -1,
        stdout: int = -1,
        *,
        resumed: bool = False,
        snapshots: bool = False,
    ) -> None:
        self.fork_id = fork_id
        self._pid = pid
        self._resumed = resumed
        self._snapshots = snapshots
        self._paused_by_snapshot = False
        self._command_lock = threading.Lock()
        self._pidfd: int | None = pidfd if pidfd >= 0 else None
        self._stdin = stdin
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._eof = stdout < 0
        if stdout >= 0:
            # Drained at once: a VMM whose stdout fills up would block.
            threading.Thread(
                target=self._read, args=(stdout,), name=f"pagefork-adopted-{fork_id}", daemon=True
            ).start()

    def _read(self, fd: int) -> None:
        with open(fd, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if isinstance(doc, dict):
                        with self._cond:
                            self._events.append(doc)
                            self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def pid(self) -> int | None:
        """The VMM's pid."""
        return self._pid

    @property
    def pidfd(self) -> int | None:
        """A pidfd of the VMM (readable once it has exited); None after :meth:`stop`."""
        return self._pidfd

    def exit_status(self) -> None:
        """Unknown: the VMM is not this daemon's child, so only its parent can read it."""
        return None

    @property
    def stays_after_run(self) -> bool:
        """A microVM restored with ``snapshots`` stays, stopped, after its walk."""
        return self._snapshots

    def resume(self) -> None:
        """The microVM: ``go`` on its stdin, as its own driver does: once, and again after a
        snapshot (the guest walks on). Other VMMs cannot be resumed after a takeover."""
        if self._stdin < 0:
            raise VmmError(f"fork {self.fork_id}: a VMM adopted in a takeover cannot be resumed")
        again = self._resumed and self._paused_by_snapshot
        self._paused_by_snapshot = False
        if self._resumed and not again:
            return
        self._resumed = True
        with contextlib.suppress(BrokenPipeError):
            os.write(self._stdin, b"go\n")

    def snapshot(self, out_dir: str, timeout: float) -> VmmSnapshot:
        """The microVM restored with ``snapshots``: its ``snapshot DIR`` command, as its own
        driver sends it. A Firecracker adopted in a takeover cannot be snapshotted (its API
        socket stays with the jail the previous daemon made)."""
        if self._stdin < 0 or not self._snapshots:
            raise VmmError(
                f"fork {self.fork_id}: this VMM cannot take snapshots (adopted in a takeover "
                "without the built-in microVM's 'snapshots' option)"
            )
        line = f"snapshot {out_dir}"
        if "\n" in line:
            raise VmmError(f"fork {self.fork_id}: a snapshot directory is one line")
        with self._command_lock:  # one command at a time: the answers come in order
            with contextlib.suppress(BrokenPipeError):
                os.write(self._stdin, (line + "\n").encode())
            doc = self._next_event("snapshot", line, timeout)
        self._paused_by_snapshot = True
        return VmmSnapshot(memory_diff=str(doc["memory_diff"]), vmstate=out_dir)

    def _next_event(self, want: str, command: str, timeout: float) -> dict[str, Any]:
        def take() -> dict[str, Any] | None:
            for i, doc in enumerate(self._events):
                event = doc.get("event")
                if event == want or (event == "error" and doc.get("command") in (None, command)):
                    return self._events.pop(i)
            return None

        deadline = time.monotonic() + timeout
        with self._cond:
            while (doc := take()) is None:
                left = deadline - time.monotonic()
                if self._eof:
                    raise VmmError(f"fork {self.fork_id}: its VMM exited before {want!r}")
                if left <= 0:
                    raise VmmError(f"fork {self.fork_id}: no {want!r} within {timeout:g}s")
                self._cond.wait(left)
        if doc.get("event") == "error":
            raise VmmError(f"fork {self.fork_id}: {doc.get('message')}")
        return doc

    def wait(self, timeout: float) -> dict[str, Any]:
        """The microVM's result line, when it reports after the takeover."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._eof or any(e.get("event") == "result" for e in self._events),
                timeout,
            )
            found = [e for e in self._events if e.get("event") == "result"][:1]
            if found:  # consumed, as the microVM's own driver does: the next walk reports anew
                self._events.remove(found[0])
        if not found:
            raise VmmError(
                f"fork {self.fork_id}: no result from its VMM (adopted in a takeover, it may "
                "have reported to the previous daemon)"
            )
        doc = found[0]
        return {
            "fork_id": self.fork_id,
            "pid": self._pid,
            "checksum_ok": doc.get("checksum_ok"),
            "checksums": doc.get("checksums"),
            "pages_ok": not doc.get("bad_pages"),
            "exits": doc.get("exits"),
        }

    def stop(self) -> None:
        """SIGKILL the VMM and wait for it to go; idempotent."""
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll(10_000)
            os.close(pidfd)
        if self._stdin >= 0:
            os.close(self._stdin)
            self._stdin = -1


def _servers(daemon: Daemon) -> list[_TemplateState]:
    with daemon.manager._lock:
        return list(daemon.manager._templates.values())


class DaemonSource(Source):
    """A running daemon, as the old side of a takeover."""

    kind = "daemon"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def plan(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.daemon.registry.state_dir.absolute()),
            "control": os.path.abspath(self.daemon.control_path),
            "templates": [[s.record.id, s.record.created] for s in _servers(self.daemon)],
            "store": _store_settings(self.daemon),
        }

    def quiesce(self, deadline: float) -> None:
        control = self.daemon.server
        control.stop_accepting()
        if not control.drain(max(0.0, deadline - time.monotonic())):
            raise TakeoverError("control requests in flight did not finish in time")
        for state in _servers(self.daemon):
            pageserver.quiesce(state.server, deadline)

    def release(self, deadline: float) -> None:
        for state in _servers(self.daemon):
            pageserver.release(state.server, deadline)

    def export(self) -> tuple[dict[str, Any], list[int]]:
        daemon = self.daemon
        manager = daemon.manager
        assert daemon._lock_fd is not None
        fds = [daemon._lock_fd, daemon.server.socket.fileno()]
        templates = []
        for state in _servers(daemon):
            exported, more = pageserver.export(state.server)
            base = len(fds)
            fds += more
            templates.append(
                {"id": state.record.id, "created": state.record.created, "base": base,
                 "count": len(more), "server": exported}
            )  # fmt: skip
        forks = []
        with manager._lock:
            loops = [[k[0], k[1], loop.snapshot()] for k, loop in manager._loops.items()]
            for fork in manager._forks.values():
                forks.append(_fork_state(fork, fds))
        with manager._feed_lock:  # latencies the metrics have counted already
            for f in forks:
                f["latencies_fed"] = manager._fed.get(f["fork"], 0)
        return {"lock": 0, "control": 1, "templates": templates, "forks": forks,
                "loops": loops}, fds  # fmt: skip

    def resume(self) -> None:
        for state in _servers(self.daemon):
            pageserver.readopt(state.server)
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
    handle = fork.handle
    if handle is not None:
        pidfd = getattr(handle, "pidfd", None)
        if pidfd is None:
            pidfd = getattr(handle, "_pidfd", None)  # Firecracker's
        proc = getattr(getattr(handle, "process", None), "_proc", None)  # the microVM's pipes
        vmm = {
            "pid": handle.pid,
            "pidfd": add(pidfd if isinstance(pidfd, int) else None),
            "stdin": add(proc.stdin.fileno() if proc is not None and proc.stdin else None),
            "stdout": add(proc.stdout.fileno() if proc is not None and proc.stdout else None),
            "resumed": bool(getattr(handle, "_resumed", False)),
            "snapshots": bool(getattr(handle, "stays_after_run", False)),
        }
    return {
        "fork": fork.fork_id,
        "template": fork.template_id,
        "template_created": fork.template_created,
        "socket": fork.socket_path,
        "role": fork.role,
        "created": fork.created,
        "driver": fork.driver,
        "prefetch": fork.prefetch,
        "phase": fork.phase.value,
        "exit_status": fork.exit_status,
        "vmm_exited": fork.vmm_exited,
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
            server = daemon.manager._open_server(record)  # maps and scans the mem-file
            self.servers[(record.id, record.created)] = server
        for server in self.servers.values():
            server.wait_ready()
            pids += pageserver.all_worker_pids(server)
        return pids

    def adopt(self, state: dict[str, Any], fds: list[int]) -> int:
        daemon = self.daemon
        manager = daemon.manager
        given: set[int] = set()  # fds whose ownership went to a page server
        try:
            lock_fd = os.dup(fds[state["lock"]])
            daemon._lock_fd = lock_fd
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
                    server = manager._open_server(record)
                    server.wait_ready()
                base, count = int(t["base"]), int(t["count"])
                given.update(range(base, base + count))
                pageserver.adopt(server, t["server"], fds[base : base + count])
                with manager._lock:
                    manager._templates[key] = _TemplateState(daemon.registry.get(key[0]), server)
            for template_id, created, snap in state.get("loops", []):
                loop = HotSetLoop()
                loop.restore(snap)
                with manager._lock:
                    manager._loops[(template_id, created)] = loop
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
        if vmm is not None:

            def dup(index: object) -> int:
                return os.dup(fds[index]) if isinstance(index, int) else -1

            handle = AdoptedHandle(
                spec["fork"], vmm.get("pid"), dup(vmm.get("pidfd")), dup(vmm.get("stdin")),
                dup(vmm.get("stdout")), resumed=bool(vmm.get("resumed")),
                snapshots=bool(vmm.get("snapshots")),
            )  # fmt: skip
        fork = Fork(
            spec["fork"],
            key[0],
            spec["socket"],
            spec["role"],
            float(spec["created"]),
            driver=spec.get("driver"),
            handle=handle,
            prefetch=spec.get("prefetch"),
            phase=ForkPhase(spec["phase"]),
            template_created=key[1],
            exit_status=spec.get("exit_status"),
            vmm_exited=bool(spec.get("vmm_exited")),
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
        with manager._feed_lock:
            manager._fed[fork.fork_id] = int(spec.get("latencies_fed", 0))
        with manager._lock:
            loop = manager._loops.get(key)
            if fork.role == "prefetch" and loop is not None:
                fork.hot = loop.hot
            manager._forks[fork.fork_id] = fork
            tstate = manager._templates.get(key)
            if tstate is not None:
                tstate.forks.add(fork.fork_id)
        if handle is not None and not fork.vmm_exited:
            manager._watch_exit(fork)


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
        daemon = self.daemon
        daemon._closed = True
        if daemon._thread is not None:
            daemon.server.shutdown()  # drained already: returns at once
            daemon._thread.join()
        daemon.server.server_close()  # our copy of the listening socket only
        for state in _servers(daemon):
            pageserver.abandon(state.server)
        daemon.manager._exits.close()
        if daemon._lock_fd is not None:
            os.close(daemon._lock_fd)  # the new daemon holds the lock through its own fd
            daemon._lock_fd = None


__all__ = [
    "TAKEOVER_SOCKET",
    "AdoptedHandle",
    "DaemonHandover",
    "DaemonSource",
    "DaemonTarget",
    "build_for_takeover",
    "takeover_path",
]
