"""Shared fixtures: a template mem-file, a page server, test VMM processes, leak checks."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pagefork.daemon.client import DaemonClient
from pagefork.daemon.service import Daemon
from pagefork.errors import PageforkError, UffdError
from pagefork.server import PageServer, ServerConfig
from pagefork.testing.vmm import VmmProcess
from pagefork.uffd import open_userfaultfd

# Prefetch bridges small gaps between hot runs by a cost model measured on the host, so how many
# pages a prefetch installs would follow the machine's load. Tests count faults exactly: they
# run with bridging off (the processes they start inherit it); the tests of bridging itself
# give their gap explicitly.
os.environ["PAGEFORK_BRIDGE_GAP"] = "0"

PAGE = 4096


def _uffd_available() -> str | None:
    try:
        fd = open_userfaultfd()
    except UffdError as exc:
        return f"userfaultfd unavailable here: {exc}"
    os.close(fd)
    return None


UFFD_MISSING = _uffd_available()
needs_uffd = pytest.mark.skipif(UFFD_MISSING is not None, reason=UFFD_MISSING or "")


def _kvm_missing() -> str | None:
    from pagefork.demo import orchestrate

    try:
        orchestrate.check_environment()
    except PageforkError as exc:
        return str(exc)
    return None


#: Why the built-in microVM cannot run here (no /dev/kvm or userfaultfd), or None.
KVM_MISSING = _kvm_missing()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=KVM_MISSING or "")


def make_mem_file(path: Path, pages: int, seed: int = 1, zero_every: int = 4) -> Path:
    """A mem-file of ``pages`` pages: random bytes, every ``zero_every``-th page all zero."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(pages):
            f.write(bytes(PAGE) if i % zero_every == 0 else rng.randbytes(PAGE))
    return path


@pytest.fixture
def mem_file(tmp_path: Path) -> Path:
    """A 12 MiB template mem-file (fits an 8M + 4M two-region guest)."""
    return make_mem_file(tmp_path / "mem", 3072)


def open_fds() -> set[str]:
    """This process's open file descriptors."""
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves file descriptors or threads behind."""
    fds, threads = open_fds(), set(threading.enumerate())
    yield
    extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
    assert not extra_threads, f"threads leaked: {extra_threads}"
    leaked = open_fds() - fds
    # The fd listing itself may show one transient descriptor.
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"fds leaked: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked]}"


@pytest.fixture
def make_server(tmp_path: Path, mem_file: Path) -> Iterator[Callable[..., PageServer]]:
    """Build page servers on the test's mem-file; all are closed at the end."""
    servers: list[PageServer] = []

    def make(**kw: object) -> PageServer:
        kw.setdefault("mem_file_path", str(mem_file))
        kw.setdefault("socket_dir", str(tmp_path))
        server = PageServer(ServerConfig(**kw))  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def vmms(mem_file: Path) -> Iterator[Callable[..., VmmProcess]]:
    """Start test VMM processes; all are reaped at the end."""
    procs: list[VmmProcess] = []

    def start(socket_path: str, *extra: str, regions: tuple[str, ...] = ("8M", "4M")) -> VmmProcess:
        vmm = VmmProcess(socket_path, str(mem_file), regions, *extra)
        procs.append(vmm)
        return vmm

    yield start
    for p in procs:
        p.kill()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


StartDaemon = Callable[..., tuple[Daemon, DaemonClient]]


@pytest.fixture
def start_daemon(tmp_path: Path, short_dir: Path) -> Iterator[StartDaemon]:
    """Start daemons (state in ``tmp_path/state`` unless given, one at a time for restarts);
    all are closed at the end."""
    daemons: list[Daemon] = []

    def start(**kw: Any) -> tuple[Daemon, DaemonClient]:
        control = kw.pop("control", str(short_dir / "control.sock"))
        kw.setdefault("socket_dir", str(short_dir / "forks"))
        daemon = Daemon(kw.pop("state_dir", tmp_path / "state"), control, **kw)
        daemons.append(daemon)
        daemon.start()
        return daemon, DaemonClient(control, timeout=60)

    yield start
    for d in daemons:
        d.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` on a thread; the dict gets its ``result`` or its ``error``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


# --- a real S3 endpoint: moto's server mode on 127.0.0.1 --------------------------------------

#: Credentials for the local S3 server (moto accepts any); set for the session's clients.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "pagefork-test",
    "AWS_SECRET_ACCESS_KEY": "pagefork-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a ``moto_server`` started for the session (killed after);
    the AWS credentials the session's clients use are set meanwhile."""
    from pagefork.testing.s3proxy import MotoServer, environment

    with environment(S3_ENV), MotoServer() as server:
        yield server.url


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the session's S3 server (named after the test)."""
    import hashlib

    from pagefork.store.client import make_client

    name = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    make_client(s3_endpoint).create_bucket(Bucket=name)
    return name
