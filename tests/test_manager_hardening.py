"""The daemon's fork manager as a careless operator and a hostile disk would try it: slow page
server starts, full disks, shared socket directories, VMMs that exit, ill-fitting hot sets."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PAGE, StartDaemon, in_thread, make_mem_file, needs_kvm, needs_uffd
from pagefork.daemon import servers as servers_module
from pagefork.daemon.client import DaemonClient, DaemonError
from pagefork.daemon.journal import SocketJournal
from pagefork.daemon.manager import (
    MAX_SOCKET_PATH,
    ForkManager,
    ManagerConfig,
    fork_id_room,
    new_latency_samples,
)
from pagefork.daemon.service import SOCKET_JOURNAL_DIR, Daemon
from pagefork.errors import ForkError, MemFileError, PageforkError
from pagefork.hotpages import HotPageList
from pagefork.server import PageServer, ServerConfig
from pagefork.templates import TemplateRegistry, TemplateStorageError
from pagefork.testing.vmm import VmmProcess
from pagefork.vmm.base import RestoreRequest, VmmDriver, VmmHandle

MIB = 1 << 20


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount tmpfs file systems of a chosen size (a disk that fills up); unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounts)}"
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True
        )
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(directory: Path) -> None:
    """Write into ``directory`` until its file system is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (64 * 1024, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(size)):
                    pass
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        (directory / "probe").write_bytes(b"x")
    assert info.value.errno == errno.ENOSPC


def _fc_template(client: DaemonClient, where: Path, tid: str, pages: int = 3072) -> dict[str, Any]:
    """A snapshot template: a ``pages``-page mem-file (random, some zero pages)."""
    mem = make_mem_file(where / f"{tid}.mem", pages)
    snap = where / f"{tid}.snap"
    snap.write_bytes(b"state")
    return client.create_template(tid, "firecracker", mem_file=str(mem), snapshot_path=str(snap))


def _metric(text: str, name: str, template: str) -> float:
    prefix = f'{name}{{template="{template}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{name} for {template} not in metrics")


class _SignallingEvent(threading.Event):
    """An Event that reports when somebody starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


class _GatedServers:
    """Page servers of one mem-file start only when ``proceed`` is set (or fail with ``fail``)."""

    def __init__(self, mem_file: str) -> None:
        self.mem_file = mem_file
        self.started = 0  # page servers of that mem-file constructed
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self.fail: BaseException | None = None
        gate = self

        class GatedPageServer(PageServer):
            def __init__(self, config: ServerConfig) -> None:
                if config.mem_file_path == gate.mem_file:
                    gate.started += 1
                    gate.entered.set()
                    assert gate.proceed.wait(30)
                    if gate.fail is not None:
                        raise gate.fail
                super().__init__(config)

        self.cls = GatedPageServer


# --- finding 4: slow work never holds the manager's lock ---------------------------------------


@needs_uffd
def test_a_slow_page_server_start_freezes_neither_the_api_nor_other_templates(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, client = start_daemon(drivers={})
    slow = _fc_template(client, tmp_path, "slow")
    _fc_template(client, tmp_path, "fast")
    gate = _GatedServers(slow["mem_file"])
    monkeypatch.setattr(servers_module, "PageServer", gate.cls)

    first, first_out = in_thread(lambda: client.create_fork("slow", "s1"))
    assert gate.entered.wait(30)  # s1's creator is loading the slow template's mem-file
    start = daemon.manager.holdings.starting[("slow", slow["created"])]
    start.ready = ready = _SignallingEvent()
    second, second_out = in_thread(lambda: client.create_fork("slow", "s2"))
    assert ready.waiting.wait(30)  # s2 waits for that start, not for the manager

    # Meanwhile every other request is answered, and another template's forks come and go.
    assert [t["id"] for t in client.templates()["templates"]] == ["fast", "slow"]
    fast = client.create_fork("fast", "f1")
    assert fast["role"] == "warmup" and os.path.exists(fast["socket"])
    assert [f["fork"] for f in client.forks()] == ["f1"]
    assert client.release_fork("f1")["released"] == "f1"
    assert "pagefork_templates 2.0" in client.metrics()
    with pytest.raises(DaemonError, match="page server is starting") as info:
        client.delete_template("slow")
    assert info.value.status == 409
    with pytest.raises(DaemonError, match="fork s1 already exists"):
        client.create_fork("fast", "s1")  # the id is taken while its fork waits
    assert first.is_alive() and second.is_alive()

    gate.proceed.set()
    first.join(30)
    second.join(30)
    s1, s2 = first_out["result"], second_out["result"]
    assert (s1["role"], s2["role"]) == ("warmup", "demand")
    assert os.path.exists(s1["socket"]) and os.path.exists(s2["socket"])
    assert client.template("slow")["live_forks"] == 2
    for f in (s1, s2):
        client.release_fork(f["fork"])
    client.delete_template("slow")


@needs_uffd
def test_a_page_server_that_fails_to_start_fails_each_waiting_fork_cleanly(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, client = start_daemon(drivers={})
    tpl = _fc_template(client, tmp_path, "t")
    gate = _GatedServers(tpl["mem_file"])
    gate.fail = MemFileError(f"mem-file {tpl['mem_file']}: it shrank")
    monkeypatch.setattr(servers_module, "PageServer", gate.cls)
    first, first_out = in_thread(lambda: client.create_fork("t", "a"))
    assert gate.entered.wait(30)
    daemon.manager.holdings.starting[("t", tpl["created"])].ready = ready = _SignallingEvent()
    second, second_out = in_thread(lambda: client.create_fork("t", "b"))
    assert ready.waiting.wait(30)
    gate.proceed.set()
    first.join(30)
    second.join(30)
    assert "it shrank" in str(first_out["error"])
    assert "its page server did not start" in str(second_out["error"])
    assert "it shrank" in str(second_out["error"])
    # Nothing is left held: the ids are free, the template deletable, the next start works.
    assert client.forks() == [] and client.template("t")["live_forks"] == 0
    assert not daemon.manager.holdings.starting and not daemon.manager.holdings.reserved
    gate.fail = None
    assert client.create_fork("t", "a")["role"] == "warmup"
    client.release_fork("a")
    client.delete_template("t")


# --- finding 6: live-fork counts are derived, so a full disk cannot strand them ------------------


@needs_uffd
def test_a_full_disk_at_release_leaves_the_template_deletable(
    start_daemon: StartDaemon,
    tmp_path: Path,
    small_tmpfs: Callable[[str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = small_tmpfs("512k")
    _daemon, client = start_daemon(drivers={}, state_dir=state)
    tpl = _fc_template(client, tmp_path, "t")  # the snapshot lives elsewhere: referenced
    warm = client.create_fork("t", "warm")
    assert warm["role"] == "warmup"
    vmm = VmmProcess(warm["socket"], tpl["mem_file"], ("8M", "4M"))
    try:
        client.prefetch("warm", timeout=30)  # waits for the handshake
        touched = [[0, i * PAGE] for i in range(64)]
        assert vmm.send(cmd="touch", pages=touched)["bad"] == 0
        fill(state)
        with caplog.at_level(logging.ERROR, logger="pagefork"):
            stats = client.release_fork("warm")["stats"]
    finally:
        vmm.kill()
    assert stats["faults"] == 64
    # The hot set could not be saved, and said so without a traceback ...
    [saving] = [r for r in caplog.records if "cannot save the hot set" in r.getMessage()]
    assert "No space left on device" in saving.getMessage() and saving.exc_info is None
    # ... but nothing is left counted, and the full disk does not keep the template.
    template = client.template("t")
    assert template["live_forks"] == 0 and not template["has_hot_pages"]
    assert not [p.name for p in (state / "templates" / "t").iterdir() if p.name.endswith(".tmp")]
    client.delete_template("t")
    assert client.templates()["templates"] == []
    assert sorted(p.name for p in (state / "templates").iterdir()) == []


# --- finding 7: a hot set that does not fit falls back to demand, then re-records ----------------


@needs_uffd
def test_a_hot_set_that_does_not_fit_is_served_on_demand_and_re_recorded(
    start_daemon: StartDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, client = start_daemon(drivers={})
    tpl = _fc_template(client, tmp_path, "t")
    # Well formed, but recorded on another layout: region 1 of this snapshot has only 4 MiB.
    HotPageList.from_pages([(0, 0), (0, PAGE), (1, 6 * MIB)]).save(tpl["hot_pages_path"])
    fork = client.create_fork("t", "p")
    assert fork["role"] == "prefetch"
    vmm = VmmProcess(fork["socket"], tpl["mem_file"], ("8M", "4M"))
    try:
        with caplog.at_level(logging.WARNING, logger="pagefork"):
            result = client.prefetch("p", timeout=30)
        assert result["role"] == "demand" and result["installed"] == 0
        assert "does not fit" in result["note"] and "entry 2" in result["note"]
        assert any("does not fit" in r.getMessage() for r in caplog.records)
        # Served on demand, byte for byte.
        assert vmm.send(cmd="touch", pages=[[0, 0], [1, 0], [1, MIB]])["bad"] == 0
        shown = client.fork("p")
        assert shown["role"] == "demand" and shown["stats"]["faults"] == 3
        assert shown["stats"]["prefetched_pages"] == 0
        nxt = client.create_fork("t", "next")
        assert nxt["role"] == "warmup"  # the next fork records a hot set that fits
    finally:
        vmm.kill()
    for f in ("p", "next"):
        client.release_fork(f)


# --- finding 2: a restart removes only the sockets it made -------------------------------------


def test_a_restart_removes_only_the_fork_sockets_the_daemon_made(
    tmp_path: Path, short_dir: Path, start_daemon: StartDaemon
) -> None:
    shared = short_dir / "shared"  # a socket dir other programs use too
    shared.mkdir()
    regular = shared / "notes.sock"
    regular.write_text("not a socket")
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(shared / "other.sock"))
    other.listen(1)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(shared / "dead.sock"))
    dead.close()  # another program's stale socket: not ours to remove either
    control = str(shared / "control.sock")  # the daemon's own control socket sits there too
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "pagefork", "daemon", "--state-dir", str(state)]
    cmd += ["--control", control, "--socket-dir", str(shared)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "listening"
        client = DaemonClient(control, timeout=30)
        _fc_template(client, tmp_path, "t", pages=4)
        left = client.create_fork("t", "left")["socket"]
        assert os.path.exists(left)
        proc.kill()  # a crash: the fork's socket stays behind
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert os.path.exists(left) and len(os.listdir(state / SOCKET_JOURNAL_DIR)) == 1
    try:
        _daemon, client = start_daemon(drivers={}, control=control, socket_dir=str(shared))
        assert not os.path.exists(left)  # ours: removed
        assert os.listdir(state / SOCKET_JOURNAL_DIR) == []
        assert regular.read_text() == "not a socket"
        assert (shared / "dead.sock").exists()
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(shared / "other.sock"))  # still live
        assert client.templates()["templates"][0]["id"] == "t"  # its control socket works
        fork = client.create_fork("t", "again")
        journal = os.listdir(state / SOCKET_JOURNAL_DIR)
        assert journal == ["again"]
        client.release_fork(fork["fork"])
        assert os.listdir(state / SOCKET_JOURNAL_DIR) == [] and not os.path.exists(fork["socket"])
    finally:
        other.close()


def test_the_socket_journal_never_removes_a_socket_someone_else_put_in_its_place(
    tmp_path: Path, short_dir: Path
) -> None:
    journal = SocketJournal(tmp_path / "journal")
    path = str(short_dir / "f.sock")
    mine = socket.socket(socket.AF_UNIX)
    mine.bind(path)
    journal.add("f", path)
    mine.close()
    os.unlink(path)
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(path)  # another inode at the same path
    try:
        (tmp_path / "journal" / "torn").write_text("12 nonsense")
        assert journal.clean() == []
        assert os.path.exists(path) and os.listdir(tmp_path / "journal") == []
    finally:
        theirs.close()


# --- socket paths: room for the longest fork id ------------------------------------------------


def test_a_socket_dir_without_room_for_fork_ids_is_refused_or_warned(
    tmp_path: Path, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = TemplateRegistry(tmp_path / "state")
    base = str(short_dir)

    def deep(room: int) -> str:
        # A directory whose fork sockets leave exactly ``room`` bytes for the id.
        length = MAX_SOCKET_PATH - len("/") - len(".sock") - room
        path = base + "/" + "d" * (length - len(base) - 1)
        assert fork_id_room(path) == room
        return path

    with pytest.raises(PageforkError, match="is too long: a fork socket in it would exceed 107"):
        ForkManager(registry, ManagerConfig(socket_dir=deep(9)))
    assert not os.path.exists(deep(9))
    with caplog.at_level(logging.WARNING, logger="pagefork"):
        manager = ForkManager(registry, ManagerConfig(socket_dir=deep(30)))
    try:
        [warning] = [r.getMessage() for r in caplog.records]
        assert "fork ids of at most 30 characters (64 are allowed)" in warning
        assert "\n" not in warning
        generated = manager.new_fork_id("a-template-id-of-forty-characters-long-x")
        assert len(generated) == 30
        with pytest.raises(ForkError, match=r"'x{31}' is too long .*: at most 30 characters"):
            manager.create_fork("none-needed", "x" * 31)  # refused before anything is looked up
        manager.close()
        manager = ForkManager(registry, ManagerConfig(socket_dir=str(short_dir / "s")))
        assert len(manager.new_fork_id("x" * 64)) == 49
    finally:
        manager.close()


# --- VMM exits: noticed through a pidfd, reaped, shown ------------------------------------------


class _ProcessHandle(VmmHandle):
    """A VMM handle over a real child process (``sleep``) with a pidfd, as KvmHandle has."""

    def __init__(self, fork_id: str) -> None:
        self.fork_id = fork_id
        self.proc = subprocess.Popen(["sleep", "600"])
        self.fd = os.pidfd_open(self.proc.pid)
        self.stopped = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def pidfd(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def resume(self) -> None:
        pass

    def wait(self, timeout: float) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        self.stopped += 1
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _ProcessDriver(VmmDriver):
    name = "proc"

    def __init__(self) -> None:
        self.handles: list[_ProcessHandle] = []

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> VmmHandle:
        handle = _ProcessHandle(request.fork_id)
        self.handles.append(handle)
        return handle


def _exits_seen(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set once the manager has handled a VMM's exit."""
    seen = threading.Event()
    handled = daemon.manager.releaser.vmm_exited

    def wrapped(fork: Any) -> None:
        handled(fork)
        seen.set()

    monkeypatch.setattr(daemon.manager.releaser, "vmm_exited", wrapped)
    return seen


def _is_reaped(pid: int) -> bool:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # no such child any more: reaped
    return False


def test_a_vmm_killed_under_a_live_fork_is_reaped_and_the_fork_says_exited(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = _ProcessDriver()
    daemon, client = start_daemon(drivers={"proc": driver})
    _fc_template(client, tmp_path, "t", pages=4)
    seen = _exits_seen(daemon, monkeypatch)
    # No VMM connects, so the prefetch in the start times out: give it a short one.
    monkeypatch.setattr(daemon.manager, "prefetch", lambda fork_id, timeout=None: {})
    fork = client.create_fork("t", "f", vmm="proc")
    assert fork["phase"] == "live" and fork["exit_status"] is None
    [handle] = driver.handles
    os.kill(handle.proc.pid, signal.SIGKILL)
    assert seen.wait(30)
    shown = client.fork("f")
    assert (shown["phase"], shown["exit_status"]) == ("exited", -signal.SIGKILL)
    assert _is_reaped(handle.proc.pid)  # no zombie, though the fork is still registered
    record = client.template("t")  # held until released, and counted as exited
    assert (shown["state"], record["live_forks"], record["exited_forks"]) == ("exited", 0, 1)
    with pytest.raises(DaemonError) as info:  # a snapshot says why, and what would have done
        client.snapshot_fork("f", "child")
    assert info.value.status == 409
    assert "fork f is exited: its VMM has exited (status -9), and only a live fork can be " \
        "snapshotted; a built-in microVM fork stays after its guest's run only when created " \
        "with --option snapshots=true" in str(info.value)  # fmt: skip
    released = client.release_fork("f")
    assert released["released"] == "f" and handle.stopped == 1
    assert daemon.manager.releaser.exits._watched == {}  # the watcher's pidfd is closed too
    client.delete_template("t")


def test_releasing_a_running_vmm_stops_watching_it_without_reporting_an_exit(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = _ProcessDriver()
    daemon, client = start_daemon(drivers={"proc": driver})
    _fc_template(client, tmp_path, "t", pages=4)
    monkeypatch.setattr(daemon.manager, "prefetch", lambda fork_id, timeout=None: {})
    before = _pidfds()
    for i in range(5):
        client.create_fork("t", f"f{i}", vmm="proc")
    assert len(daemon.manager.releaser.exits._watched) == 5
    assert _pidfds() == before + 10  # each handle's, and the watcher's duplicate
    for i in range(5):
        client.release_fork(f"f{i}")
    assert daemon.manager.releaser.exits._watched == {}
    assert all(h.stopped == 1 and h.proc.returncode == -signal.SIGKILL for h in driver.handles)
    assert _pidfds() == before


def _pidfds() -> int:
    """pidfds this process holds, not counting those watching page-server workers."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"pagefork.serving.worker" in f.read():
                    continue
            count += 1
    return count


@needs_kvm
def test_a_kvm_fork_whose_guest_finished_is_exited_with_status_0_and_reaped(
    start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, client = start_daemon()
    client.create_template("vm", "kvm", mem_size_mib=16, variants=2)
    seen = _exits_seen(daemon, monkeypatch)
    fork = client.create_fork("vm", "k", vmm="kvm", options={"fork_index": 0})
    assert seen.wait(60)  # the fork process exits once its guest has reported
    shown = client.fork("k")
    assert (shown["phase"], shown["exit_status"]) == ("exited", 0)
    assert _is_reaped(fork["pid"])
    # Its summary is still there for the asking, and the release is clean.
    assert client.wait_fork("k", timeout=30)["vmm"]["checksum_ok"] is True
    assert client.release_fork("k")["stats"]["faults"] > 0


# --- metrics: the latency histogram moves while forks are live ---------------------------------


@needs_uffd
def test_fault_latencies_reach_the_histogram_while_the_fork_is_live_and_only_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, client = start_daemon(drivers={})
    tpl = _fc_template(client, tmp_path, "t")
    fork = client.create_fork("t", "f")
    vmm = VmmProcess(fork["socket"], tpl["mem_file"], ("8M", "4M"))
    count = "pagefork_fault_latency_seconds_count"
    try:
        client.prefetch("f", timeout=30)
        assert _metric(client.metrics(), count, "t") == 0
        assert vmm.send(cmd="touch", pages=[[0, i * PAGE] for i in range(40)])["bad"] == 0
        # The server notes a fault's latency right after the ioctl that wakes the guest, so
        # the last fault's may land just after the guest's answer: 39 or 40, never 0.
        assert _metric(client.metrics(), count, "t") in (39, 40)
        assert vmm.send(cmd="touch", pages=[[1, i * PAGE] for i in range(25)])["bad"] == 0
        assert _metric(client.metrics(), count, "t") in (64, 65)
        assert client.fork("f")["phase"] == "live"
    finally:
        vmm.kill()
    client.wait_fork("f", timeout=30)  # the session has ended: every latency is noted
    client.release_fork("f")
    # Each fault counted exactly once: by the scrapes while live, the rest at release.
    assert _metric(client.metrics(), count, "t") == 65


# --- full disks while creating templates -------------------------------------------------------


def test_a_full_disk_while_copying_a_snapshot_is_a_storage_error_and_leaves_nothing(
    tmp_path: Path, small_tmpfs: Callable[[str], Path]
) -> None:
    state = small_tmpfs("1m")
    registry = TemplateRegistry(state)
    mem = make_mem_file(tmp_path / "mem", 512)  # 2 MiB: does not fit
    (tmp_path / "snap").write_bytes(b"state")
    with pytest.raises(TemplateStorageError, match="cannot copy the snapshot: No space left"):
        registry.create_from_snapshot("t", mem, tmp_path / "snap", copy=True)
    assert list((state / "templates").iterdir()) == []


@needs_kvm
def test_a_full_disk_while_building_a_microvm_template_is_a_clean_5xx_and_leaves_nothing(
    start_daemon: StartDaemon,
    small_tmpfs: Callable[[str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = small_tmpfs("4m")  # a 16 MiB template's mem-file needs about 10 MiB
    _, client = start_daemon(drivers={}, state_dir=state)
    with caplog.at_level(logging.DEBUG, logger="pagefork"), pytest.raises(DaemonError) as info:
        client.create_template("vm", "kvm", mem_size_mib=16, variants=2)
    assert info.value.status == 500
    assert "template 'vm': cannot write" in str(info.value)
    assert "No space left on device" in str(info.value)
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere
    assert list((state / "templates").iterdir()) == []  # not even a hidden build directory
    assert client.templates()["templates"] == []


def test_release_with_the_journal_on_a_full_disk_still_releases(
    tmp_path: Path, small_tmpfs: Callable[[str], Path], short_dir: Path
) -> None:
    # The journal lives in the state directory; if it cannot be written the fork still works.
    journal_dir = small_tmpfs("64k")
    journal = SocketJournal(journal_dir / "j")
    fill(journal_dir)
    registry = TemplateRegistry(tmp_path / "state")
    mem = make_mem_file(tmp_path / "mem", 4)
    (tmp_path / "snap").write_bytes(b"s")
    registry.create_from_snapshot("t", mem, tmp_path / "snap")
    manager = ForkManager(
        registry, ManagerConfig(socket_dir=str(short_dir / "f")), socket_journal=journal
    )
    try:
        fork = manager.create_fork("t", "a")
        assert os.path.exists(fork.socket_path)
        assert not (journal_dir / "j" / "a").exists()  # no torn entry left either
        manager.release("a")
        assert not os.path.exists(fork.socket_path)
        assert registry.get("t").live_forks == 0
    finally:
        manager.close()
    with pytest.raises(ForkError, match="unknown fork"):
        manager.fork("a")


def test_new_latency_samples_take_each_sample_once_before_and_after_the_ring_wraps() -> None:
    # Not wrapped: what the ring holds is every sample so far, in order.
    assert new_latency_samples([5, 6, 7], 0, 2, window=4) == ([5, 6, 7], 3)
    assert new_latency_samples([5, 6, 7], 3, 3, window=4) == ([], 3)
    # Wrapped (window 4, samples 0..5 written: ring = [s4, s5, s2, s3]).
    ring = [40, 50, 20, 30]
    assert new_latency_samples(ring, 3, 6, window=4) == ([30, 40, 50], 6)
    # Only what is surely written (the fault in flight comes next time) ...
    assert new_latency_samples(ring, 3, 5, window=4) == ([30, 40], 5)
    # ... and never samples the ring has already overwritten.
    assert new_latency_samples(ring, 0, 6, window=4) == ([20, 30, 40, 50], 6)
    assert new_latency_samples(ring, 6, 6, window=4) == ([], 6)


@needs_uffd
def test_a_fork_waiting_too_long_for_its_page_server_gives_up_cleanly(
    tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = TemplateRegistry(tmp_path / "state")
    mem = make_mem_file(tmp_path / "mem", 4)
    (tmp_path / "snap").write_bytes(b"s")
    registry.create_from_snapshot("t", mem, tmp_path / "snap")
    gate = _GatedServers(str(mem))
    monkeypatch.setattr(servers_module, "PageServer", gate.cls)
    config = ManagerConfig(socket_dir=str(short_dir / "f"), server_start_timeout=0.05)
    manager = ForkManager(registry, config)
    try:
        first, out = in_thread(lambda: manager.create_fork("t", "a"))
        assert gate.entered.wait(30)
        with pytest.raises(ForkError, match=r"'t': its page server is still starting after 0.05s"):
            manager.create_fork("t", "b")
        assert manager.holdings.reserved == {"a"}  # b's id is free again
        gate.proceed.set()
        first.join(30)
        assert out["result"].role == "warmup"
        assert manager.create_fork("t", "b").role == "demand"
    finally:
        gate.proceed.set()
        manager.close()


def test_a_socket_journal_anyone_else_could_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PageforkError, match="is not a private directory of this user"):
        SocketJournal(shared)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(PageforkError, match="is not a private directory"):
        SocketJournal(tmp_path / "link")
    assert SocketJournal(tmp_path / "own").directory.stat().st_mode & 0o777 == 0o700


def test_a_daemon_whose_socket_dir_is_too_long_refuses_before_creating_it(
    tmp_path: Path, short_dir: Path
) -> None:
    too_long = str(short_dir / ("d" * (MAX_SOCKET_PATH - len(str(short_dir)) - 10)))
    with pytest.raises(PageforkError, match="is too long"):
        Daemon(tmp_path / "state", str(short_dir / "c.sock"), socket_dir=too_long)
    assert not os.path.exists(too_long) and not os.path.exists(short_dir / "c.sock")
    # The state directory is free for the next daemon: the lock was let go.
    Daemon(tmp_path / "state", str(short_dir / "c.sock")).close()


class _LinkingDriver(_ProcessDriver):
    """Hard-links the fork's uffd socket during the restore, as the jailer driver does."""

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> VmmHandle:
        os.link(request.uffd_socket, request.uffd_socket + ".jail")
        return super().restore(request, timeout)


def test_a_socket_a_driver_linked_into_a_jail_is_still_known_after_a_crash(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, client = start_daemon(drivers={"link": _LinkingDriver()})
    _fc_template(client, tmp_path, "t", pages=4)
    monkeypatch.setattr(daemon.manager, "prefetch", lambda fork_id, timeout=None: {})
    fork = client.create_fork("t", "j", vmm="link")
    # What a restart after a crash right now would find: the entry still names this file.
    journal = tmp_path / "state" / SOCKET_JOURNAL_DIR
    shutil.copytree(journal, tmp_path / "copy")
    assert SocketJournal(tmp_path / "copy").clean() == [fork["socket"]]
    os.unlink(fork["socket"] + ".jail")


@needs_uffd
def test_a_burst_of_first_forks_starts_one_page_server_and_one_warm_up(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, client = start_daemon(drivers={})
    tpl = _fc_template(client, tmp_path, "t")
    gate = _GatedServers(tpl["mem_file"])
    monkeypatch.setattr(servers_module, "PageServer", gate.cls)
    first, first_out = in_thread(lambda: client.create_fork("t", "f0"))
    assert gate.entered.wait(30)
    daemon.manager.holdings.starting[("t", tpl["created"])].ready = ready = _SignallingEvent()

    def create(fork_id: str) -> Callable[[], Any]:
        return lambda: client.create_fork("t", fork_id)

    burst = [in_thread(create(f"f{i}")) for i in range(1, 12)]
    assert ready.waiting.wait(30)
    gate.proceed.set()
    for t, _ in [(first, first_out), *burst]:
        t.join(60)
    results = [out["result"] for _, out in [(first, first_out), *burst]]
    assert gate.started == 1  # one mem-file load for the whole burst
    roles = sorted(r["role"] for r in results)
    assert roles == ["demand"] * 11 + ["warmup"]
    assert client.template("t")["live_forks"] == 12
    for r in results:
        client.release_fork(r["fork"])
    assert client.template("t")["live_forks"] == 0 and daemon.manager.in_use("t") == (0, False)


@needs_uffd
def test_a_dead_worker_is_replaced_counted_in_metrics_and_its_fork_served_on(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, client = start_daemon(workers=1)
    _fc_template(client, tmp_path, "t")
    fork = client.create_fork("t", "f1")
    vmm = VmmProcess(fork["socket"], str(tmp_path / "t.mem"), ("8M", "4M"))
    try:
        assert vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
        before = client.fork("f1")["stats"]
        os.kill(before["worker_pid"], signal.SIGKILL)
        reply = vmm.send(cmd="touch", all=True)  # served by the replacement, byte for byte
        assert reply["bad"] == 0 and reply["touched"] == 3072
        after = client.fork("f1")["stats"]
        assert after["worker_pid"] != before["worker_pid"] and after["faults"] == 3072
        text = client.metrics()
        assert 'pagefork_worker_restarts_total{template="t"} 1.0' in text
    finally:
        vmm.close()
