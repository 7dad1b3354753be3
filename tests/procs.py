"""Real ``pagefork`` child processes for the tests, and what the tests do with them.

``Serve`` runs ``pagefork serve``, ``Proc`` any ``pagefork`` command and ``DaemonProc``
``pagefork daemon``; each collects its child's stdout events (one JSON object a line) and stderr
lines on threads of its own and waits on them with a timeout. ``S3Servers`` makes page servers
on templates in S3-compatible storage, and the fixtures at the end serve the S3 test modules.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PAGE
from pagefork.daemon.client import DaemonClient
from pagefork.server import PageServer, ServerConfig
from pagefork.store.cache import ChunkCache
from pagefork.store.lazy import StoreOptions
from pagefork.testing.s3proxy import S3Proxy

#: ``pagefork`` with SIGHUP at its default disposition, whatever this test run inherited
#: (serve keeps an ignored SIGHUP ignored, as nohup asks).
PAGEFORK = [
    sys.executable,
    "-c",
    "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "from pagefork.cli import main; sys.exit(main(sys.argv[1:]))",
]
ALL_PAGES = 3072  # the 8M + 4M guest of the vmms fixture


def _spawn(argv: list[str], env: dict[str, str] | None) -> subprocess.Popen[str]:
    """``argv`` as a child with every standard stream a text pipe, ``env`` added to ours."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


class Serve:
    """A ``pagefork serve`` child; its stdout events and stderr lines are collected."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = _spawn([*PAGEFORK, "serve", *args], env)
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        #: Set once every writer of its stderr (its workers too) has closed it.
        self.stderr_closed = threading.Event()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append({**json.loads(line), "_at": time.monotonic()})
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.errors.append(line)
                self._cond.notify_all()
        self.stderr_closed.set()

    def wait_for(self, event: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until ``count`` ``event`` events have come; every one of them so far."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len([e for e in self.events if e["event"] == event]) >= count, timeout
            )
        assert ok, f"no {count} {event} events; got {self.events}; stderr {self.errors}"
        return [e for e in self.events if e["event"] == event]

    def wait_err(self, text: str, timeout: float = 30) -> None:
        """Wait until a stderr line holds ``text``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(text in line for line in self.errors), timeout)
        assert ok, f"no {text!r} on stderr; got {self.errors}"

    def stop(self) -> int:
        """SIGTERM it; its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


class Proc:
    """A pagefork child process whose stdout events are collected."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = _spawn(argv, env)
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()

    def _pump(self, stream: Any, events: bool) -> None:
        for line in stream:
            with self._cond:
                if events:
                    self.events.append(json.loads(line))
                else:
                    self.errors.append(line)
                self._cond.notify_all()

    def wait_for(self, event: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for the first ``event`` event; it."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(e["event"] == event for e in self.events), timeout)
        assert ok, f"no {event}; got {self.events}; stderr {self.errors}"
        return next(e for e in self.events if e["event"] == event)

    def wait_err(self, text: str, timeout: float = 60) -> None:
        """Wait until a stderr line holds ``text``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(text in line for line in self.errors), timeout)
        assert ok, f"no {text!r} on stderr; got {self.errors}"

    def kill(self) -> None:
        """SIGKILL it if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


class DaemonProc(Proc):
    """A ``pagefork daemon`` child with its fork sockets beside ``control``."""

    def __init__(
        self,
        state: Path,
        control: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        workers: int = 2,
    ) -> None:
        super().__init__(
            [*PAGEFORK, "daemon", "--state-dir", str(state), "--control", str(control),
             "--socket-dir", str(control.parent / "forks"), "--workers", str(workers), *extra],
            env=env,
        )  # fmt: skip


def go_on(proc: subprocess.Popen[str]) -> None:
    """Let a process paused by PAGEFORK_TAKEOVER_PAUSE_AT go on."""
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


def args_for(sock: Path, mem_file: Path, *extra: str) -> list[str]:
    """``pagefork serve``'s arguments: ``mem_file`` on ``sock`` with 2 workers, then ``extra``."""
    return ["--mem-file", str(mem_file), "--socket", str(sock), "--workers", "2", *extra]


def serve_with_guests(
    sock: Path, mem_file: Path, vmms: Any, n: int, *extra: str
) -> tuple[Serve, list[Any]]:
    """A listening serve on ``sock`` (``args_for`` with ``extra``) with ``n`` guests that have
    each faulted one page."""
    serve = Serve(*args_for(sock, mem_file, *extra))
    serve.wait_for("listening")
    guests = [vmms(str(sock)) for _ in range(n)]
    for g in guests:
        assert g.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    return serve, guests


def storm(vmm: Any, out: list[dict[str, Any]], seed: int) -> threading.Thread:
    """Touch every page of ``vmm`` from 4 threads in random order; the reply goes to ``out``."""

    def run() -> None:
        reply = vmm.send(cmd="touch", all=True, order="random", seed=seed, threads=4)
        out.append({**reply, "_at": time.monotonic()})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def setup_forks(
    control: Path, mem_file: Path, tmp_path: Path, vmms: Any, n: int = 3
) -> tuple[DaemonClient, list[dict[str, Any]], list[Any]]:
    """Template "t" (``mem_file``) on the daemon at ``control`` and forks f0.. of it, each with
    a guest that has faulted two pages: a client, the forks and the guests."""
    client = DaemonClient(str(control), timeout=60)
    snap = tmp_path / "t.snap"
    snap.write_bytes(b"state")
    client.create_template("t", "firecracker", mem_file=str(mem_file), snapshot_path=str(snap))
    forks = [client.create_fork("t", f"f{i}") for i in range(n)]
    guests = [vmms(f["socket"]) for f in forks]
    for g in guests:
        assert g.send(cmd="touch", pages=[[0, 0], [1, PAGE]])["bad"] == 0
    return client, forks, guests


def exited(pid: int, timeout: float) -> bool:
    """True once process ``pid`` (not our child) has exited, waiting up to ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


def kill(serve: Serve) -> list[int]:
    """SIGKILL a serve; its worker pids."""
    workers: list[int] = serve.wait_for("listening")[0]["worker_pids"]
    serve.proc.kill()
    assert serve.proc.wait(30) == -signal.SIGKILL
    return workers


def rendezvous(sock: Path) -> list[str]:
    """The names of the orphaned workers' rendezvous sockets beside ``sock``."""
    return sorted(p.name for p in sock.parent.iterdir() if ".orphan." in p.name)


def orphans(sock: Path, workers: list[int], timeout: float = 30.0) -> list[str]:
    """The rendezvous sockets beside ``sock`` once only ``workers``' are left: the spare (a
    worker with no fork) removes its own when it sees its supervisor gone, a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        names = rendezvous(sock)
        if all(int(n.rpartition(".")[2]) in workers for n in names):
            return names
        assert time.monotonic() < deadline, f"the spare's rendezvous stays: {names}"
        time.sleep(0.01)


class S3Servers:
    """Makes page servers on S3 templates, reached through ``endpoint_url``; ``close`` closes
    them all."""

    def __init__(self, tmp_path: Path, endpoint_url: str) -> None:
        self.tmp_path = tmp_path
        self.endpoint_url = endpoint_url
        self.servers: list[PageServer] = []

    def __call__(self, url: str, cache_dir: Path | None = None, **kw: object) -> PageServer:
        cache = ChunkCache(str(cache_dir or self.tmp_path / "cache"), 1 << 30)
        kw.setdefault("socket_dir", str(self.tmp_path))
        kw.setdefault("workers", 2)
        server = PageServer(
            ServerConfig(
                mem_file_path=url,
                store=StoreOptions(cache=cache, endpoint_url=self.endpoint_url),
                **kw,  # type: ignore[arg-type]
            )
        )
        self.servers.append(server)
        return server

    def close(self) -> None:
        for s in self.servers:
            s.close()


# Fixtures for the S3 test modules, which import them: an imported fixture serves (and an autouse
# one applies to) the importing module alone. Named apart from their fixture names so that a
# test's parameter never redefines the imported name.


@pytest.fixture(name="_endpoint", autouse=True)
def s3_env_fixture(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients made without an endpoint reach the test's S3 server (AWS_ENDPOINT_URL)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)


@pytest.fixture(name="proxy")
def proxy_fixture(s3_endpoint: str) -> Iterator[S3Proxy]:
    """The fault-injecting proxy in front of the test's S3 server."""
    with S3Proxy(s3_endpoint) as p:
        yield p


@pytest.fixture(name="s3_server")
def s3_server_fixture(tmp_path: Path, proxy: S3Proxy) -> Iterator[S3Servers]:
    """Page servers on S3 templates, reached through the proxy; closed at the end."""
    make = S3Servers(tmp_path, proxy.url)
    yield make
    make.close()


@contextlib.contextmanager
def host_lock(name: str) -> Iterator[None]:
    """Hold the host-wide lock ``name`` (a file under /tmp): a setting that is the host's
    (KSM's, the hugetlb pool) is changed by one test run at a time, so two runs on one host
    (two CI jobs) never take each other's values for the ones they found and must restore."""
    path = f"/tmp/pagefork-tests-{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fd_targets(pid: int | str = "self") -> list[str]:
    """What each open fd of process ``pid`` is (its /proc link: a path or an anon inode)."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            found.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return found


def uffds_held(pid: int) -> int:
    """How many userfaultfds process ``pid`` holds."""
    return fd_targets(pid).count("anon_inode:[userfaultfd]")
