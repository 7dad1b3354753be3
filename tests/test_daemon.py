"""The daemon end to end through its control API, with the built-in microVM as the VMM."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import StartDaemon, in_thread, needs_kvm, needs_uffd
from pagefork.cli import main
from pagefork.daemon.client import DaemonClient, DaemonError
from pagefork.daemon.manager import ForkManager, ManagerConfig
from pagefork.daemon.metrics import DaemonMetrics
from pagefork.daemon.service import Daemon
from pagefork.errors import PageforkError, VmmError
from pagefork.hotloop import HotSetLoop
from pagefork.hotpages import HotPageList
from pagefork.stats import ForkStats
from pagefork.templates import TemplateRegistry
from pagefork.testing.fcdouble import FcDoubleProcess
from pagefork.vmm.base import RestoreRequest, VmmDriver, VmmHandle
from pagefork.vmm.firecracker import create_snapshot
from pagefork.vmm.kvm.process import ForkProcess

#: A small microVM template: 16 MiB, a few trace variants.
TEMPLATE = {"mem_size_mib": 16, "variants": 4}


def _run_fork(client: DaemonClient, template: str, index: int) -> tuple[dict[str, Any], Any]:
    """One fork with the KVM driver: create (restore, prefetch, resume), wait, release."""
    fork = client.create_fork(template, vmm="kvm", options={"fork_index": index})
    done = client.wait_fork(fork["fork"], timeout=30)
    released = client.release_fork(fork["fork"])
    assert done["vmm"]["checksum_ok"], done
    return fork, released["stats"]


def _metric(text: str, name: str, template: str) -> float:
    prefix = f'{name}{{template="{template}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{name} for {template} not in metrics")


@needs_kvm
def test_warmup_fork_records_and_later_forks_prefetch_with_few_misses(
    start_daemon: StartDaemon,
) -> None:
    daemon, client = start_daemon()
    created = client.create_template("vm", "kvm", **TEMPLATE)
    assert created["kind"] == "kvm" and not created["has_hot_pages"]

    warm, warm_stats = _run_fork(client, "vm", 0)
    assert warm["role"] == "warmup" and warm["driver"] == "kvm"
    assert warm_stats["faults"] > 100 and warm_stats["prefetched_pages"] == 0
    shown = client.template("vm")
    assert shown["has_hot_pages"] and shown["hot_pages"] == warm_stats["faults"]
    assert shown["live_forks"] == 0

    for index in (1, 2):
        fork, stats = _run_fork(client, "vm", index)
        assert fork["role"] == "prefetch"
        assert fork["prefetch"]["installed"] == shown["hot_pages"]
        assert stats["prefetched_pages"] == shown["hot_pages"]
        # Only the pages this fork's trace has and the warm-up's did not: a few percent.
        assert stats["misses"] == stats["faults"] < warm_stats["faults"] // 10

    metrics = client.metrics()
    assert _metric(metrics, "pagefork_prefetched_pages_total", "vm") == 2 * shown["hot_pages"]
    assert _metric(metrics, "pagefork_forks_ended_total", "vm") == 3
    assert _metric(metrics, "pagefork_hot_pages", "vm") == shown["hot_pages"]
    assert 'pagefork_fault_latency_seconds_bucket{le="+Inf",template="vm"}' in metrics
    # The forks' timed demand faults fed the histogram (the warm-up's alone are this many).
    assert _metric(metrics, "pagefork_fault_latency_seconds_count", "vm") >= warm_stats["faults"]
    names = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("pagefork_") for n in names)
    # The template's page server stopped with its last fork.
    assert daemon.manager.forks() == [] and not daemon.manager.live_stats()


@needs_kvm
def test_fork_driven_by_the_caller_over_the_returned_socket(start_daemon: StartDaemon) -> None:
    _, client = start_daemon()
    template = client.create_template("vm", "kvm", **TEMPLATE)
    _run_fork(client, "vm", 0)  # the warm-up

    fork = client.create_fork("vm", fork_id="mine-1")
    assert fork["fork"] == "mine-1" and fork["driver"] is None and fork["role"] == "prefetch"
    assert stat.S_IMODE(os.stat(fork["socket"]).st_mode) == 0o600
    process = ForkProcess(template["snapshot_path"], fork["socket"], 3)
    try:
        result = client.prefetch("mine-1", timeout=30)  # waits for the VMM's handshake
        assert result["installed"] == result["hot_pages"] > 0
        process.wait_restored(timeout=30)
        process.go()
        assert process.wait_result(timeout=30).checksum_ok
    finally:
        process.close()
    stats = client.fork("mine-1")["stats"]
    assert stats["prefetched_pages"] == result["installed"]
    assert stats["misses"] == stats["faults"]
    assert [f["fork"] for f in client.forks()] == ["mine-1"]
    client.release_fork("mine-1")
    assert client.forks() == []


@needs_kvm
def test_concurrent_forks_and_releases(start_daemon: StartDaemon) -> None:
    daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    _run_fork(client, "vm", 0)
    results: list[tuple[dict[str, Any], Any]] = []
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            results.append(_run_fork(client, "vm", index))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 4 and len({f["fork"] for f, _ in results}) == 4
    assert all(f["role"] == "prefetch" and s["prefetched_pages"] > 0 for f, s in results)
    assert client.template("vm")["live_forks"] == 0
    assert daemon.manager.forks() == []


@needs_kvm
def test_only_one_warmup_records_while_others_are_served_on_demand(
    start_daemon: StartDaemon,
) -> None:
    _, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    first = client.create_fork("vm")
    second = client.create_fork("vm")
    assert (first["role"], second["role"]) == ("warmup", "demand")
    client.release_fork(first["fork"])  # never connected: no hot set, the next fork records
    third = client.create_fork("vm")
    assert third["role"] == "warmup"
    for f in (second, third):
        client.release_fork(f["fork"])


@needs_kvm
def test_recording_window_bounds_the_hot_set_and_rerecord_replaces_it(
    start_daemon: StartDaemon,
) -> None:
    _, client = start_daemon(record_max_share=0.002)  # 16 MiB: at most 8 pages
    client.create_template("vm", "kvm", **TEMPLATE)
    _run_fork(client, "vm", 0)
    assert client.template("vm")["hot_pages"] == 8
    client.rerecord("vm")
    fork, stats = _run_fork(client, "vm", 1)
    assert fork["role"] == "warmup" and stats["prefetched_pages"] == 0
    fork, _ = _run_fork(client, "vm", 2)
    assert fork["role"] == "prefetch"


@needs_kvm
def test_deleting_a_template_in_use_is_refused(start_daemon: StartDaemon) -> None:
    _, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    fork = client.create_fork("vm")
    with pytest.raises(DaemonError, match="'vm' is in use by 1 live fork") as info:
        client.delete_template("vm")
    assert info.value.status == 409
    client.release_fork(fork["fork"])
    client.delete_template("vm")
    with pytest.raises(DaemonError, match="unknown template 'vm'") as info:
        client.template("vm")
    assert info.value.status == 404


@needs_kvm
def test_restart_brings_templates_and_hot_sets_back(start_daemon: StartDaemon) -> None:
    daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    _, warm_stats = _run_fork(client, "vm", 0)
    client.create_fork("vm", fork_id="left-over")  # live when the daemon goes away
    daemon.close()

    _, client = start_daemon()
    [record] = client.templates()["templates"]
    assert record["id"] == "vm" and record["has_hot_pages"] and record["live_forks"] == 0
    assert client.forks() == []
    fork, stats = _run_fork(client, "vm", 1)
    assert fork["role"] == "prefetch" and stats["prefetched_pages"] == warm_stats["faults"]


def _raw(control: str, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """One HTTP request with an arbitrary body; status and decoded JSON answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(control)
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header, _, payload = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(payload)


def test_bad_requests_get_4xx_naming_what_was_wrong(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, client = start_daemon()
    control = client.control_path
    cases: list[tuple[str, str, bytes, int, str]] = [
        ("POST", "/templates", b"{oops", 400, "not valid JSON"),
        ("POST", "/templates", b"[1]", 400, "must be a JSON object"),
        ("POST", "/templates", b"", 400, "a JSON object is required"),
        ("POST", "/templates", b'{"kind": "kvm"}', 400, "field 'id' is required"),
        ("POST", "/templates", b'{"id": "../x", "kind": "kvm"}', 400, "field 'id'"),
        ("POST", "/templates", b'{"id": "x", "kind": "qemu"}', 400, "field 'kind'"),
        (
            "POST",
            "/templates",
            b'{"id": "x", "kind": "kvm", "mem_size_mib": "8"}',
            400,
            "field 'mem_size_mib' must be of type int",
        ),
        (
            "POST",
            "/templates",
            b'{"id": "x", "kind": "kvm", "vcpus": 0}',
            400,
            "field 'vcpus' must be within",
        ),
        (
            "POST",
            "/templates",
            b'{"id": "x", "kind": "firecracker"}',
            400,
            "field 'mem_file' is required",
        ),
        ("POST", "/forks", b'{"template": 5}', 400, "field 'template' must be of type str"),
        ("POST", "/forks", b'{"template": "nope"}', 404, "unknown template 'nope'"),
        ("GET", "/templates/nope", b"", 404, "unknown template 'nope'"),
        ("DELETE", "/templates/nope", b"", 404, "unknown template 'nope'"),
        ("GET", "/forks/nope", b"", 404, "unknown fork 'nope'"),
        ("DELETE", "/forks/nope", b"", 404, "unknown fork 'nope'"),
        ("POST", "/forks/nope/prefetch", b"", 404, "unknown fork 'nope'"),
        ("GET", "/nowhere", b"", 404, "no such route"),
        ("PUT", "/forks", b"", 405, "PUT is not allowed on /forks"),
    ]
    for method, path, body, status, message in cases:
        got_status, doc = _raw(control, method, path, body)
        assert (got_status, message in doc.get("error", "")) == (status, True), (
            method,
            path,
            body,
            doc,
        )
    mem = tmp_path / "mem"
    mem.write_bytes(bytes(8192))
    (tmp_path / "snap").write_bytes(b"state")
    client.create_template(
        "fc", "firecracker", mem_file=str(mem), snapshot_path=str(tmp_path / "snap")
    )
    # A VMM that fails to restore: 502 with the driver's message, and the fork is gone again.
    with pytest.raises(DaemonError, match="needs api_socket") as info:
        client.create_fork("fc", vmm="firecracker")
    assert info.value.status == 502
    assert client.forks() == [] and client.template("fc")["live_forks"] == 0
    status, doc = _raw(control, "POST", "/forks", b'{"template": "fc", "fork": "a/b"}')
    assert status == 400 and "field 'fork'" in doc["error"]
    status, doc = _raw(control, "POST", "/forks", b'{"template": "fc", "vmm": "qemu"}')
    assert status == 400 and "field 'vmm': unknown VMM driver 'qemu'" in doc["error"]
    status, doc = _raw(
        control,
        "POST",
        "/templates",
        b'{"id": "fc", "kind": "firecracker", '
        + f'"mem_file": "{mem}", "snapshot_path": "{mem}"}}'.encode(),
    )
    assert status == 409 and "already exists" in doc["error"]


def test_control_socket_is_private_to_its_owner(start_daemon: StartDaemon) -> None:
    _, client = start_daemon()
    st = os.stat(client.control_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    if os.getuid() != 0:
        pytest.skip("connecting as another user needs root to switch uids")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, try to connect, report the errno
        code = 0
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(client.control_path)
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os.write(write_end, str(code).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        reported = f.read()
    os.waitpid(pid, 0)
    assert int(reported) == errno.EACCES
    assert client.templates() == {"templates": [], "errors": []}  # the owner still can


def test_a_second_daemon_on_a_live_control_socket_is_refused(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, client = start_daemon()
    with pytest.raises(PageforkError, match="in use by a live server"):
        Daemon(tmp_path / "other", client.control_path)


def test_cli_verbs_talk_to_the_daemon(
    start_daemon: StartDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = start_daemon()
    ctl = ["--control", client.control_path]
    mem = tmp_path / "mem"
    mem.write_bytes(bytes(16384))
    (tmp_path / "snap").write_bytes(b"state")
    create = ["templates", "create", "fc", "--mem-file", str(mem), "--snapshot"]
    assert main([*create, str(tmp_path / "snap"), *ctl, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mem_size"] == 16384
    assert main(["templates", "list", *ctl]) == 0
    assert "fc" in capsys.readouterr().out
    assert main(["forks", "create", "fc", "--id", "f1", *ctl]) == 0
    fork_id, sock = capsys.readouterr().out.split()
    assert fork_id == "f1" and os.path.exists(sock)
    assert main(["forks", "list", *ctl, "--json"]) == 0
    assert [f["fork"] for f in json.loads(capsys.readouterr().out)["forks"]] == ["f1"]
    assert main(["forks", "show", "f1", *ctl]) == 0
    assert "waiting" in capsys.readouterr().out
    assert main(["templates", "delete", "fc", *ctl]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by 1 live fork" in err[0]
    assert main(["forks", "delete", "f1", *ctl]) == 0
    assert main(["templates", "delete", "fc", *ctl]) == 0
    assert main(["templates", "show", "fc", *ctl]) == 2
    assert "unknown template 'fc'" in capsys.readouterr().err


def test_cli_without_a_daemon_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pagefork.daemon.client.START_WAIT", 0.2)  # no daemon is starting
    assert main(["templates", "list", "--control", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the daemon" in err[0]
    assert "no daemon came up within 0.2 s" in err[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_daemon_command_stops_cleanly_on_sigterm(
    tmp_path: Path, short_dir: Path, sig: signal.Signals
) -> None:
    control = str(short_dir / "control.sock")
    # SIGHUP at its default disposition, whatever this test run inherited.
    cmd = [
        sys.executable,
        "-c",
        "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
        "from pagefork.cli import main; sys.exit(main(sys.argv[1:]))",
        "daemon",
        "--state-dir",
        str(tmp_path / "s"),
    ]
    proc = subprocess.Popen([*cmd, "--control", control], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "listening"
        assert DaemonClient(control).templates()["templates"] == []
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert json.loads(proc.stdout.readline())["event"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert not os.path.exists(control)


@needs_uffd
def test_firecracker_fork_is_loaded_paused_prefetched_then_resumed(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    _, client = start_daemon()
    with FcDoubleProcess(str(short_dir / "source.api")) as source:
        source.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
        source.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        snap, mem = str(tmp_path / "tpl.vmstate"), str(tmp_path / "tpl.mem")
        create_snapshot(source.api_sock, snap, mem)
    client.create_template("fc", "firecracker", mem_file=mem, snapshot_path=snap)
    pages = (8 << 20) // 4096
    window = pages // 4  # the default recording window: a quarter of guest memory

    runs = []
    for i in range(2):
        with FcDoubleProcess(str(short_dir / f"fc{i}.api")) as fc:
            fork = client.create_fork("fc", vmm="firecracker", options={"api_socket": fc.api_sock})
            result = fc.result(wait=30)  # the double's guest reads every page once
            assert (result["touched"], result["bad"]) == (pages, 0)
            requests = [(r["method"], r["path"], r["body"]) for r in fc.requests()]
            stats = client.release_fork(fork["fork"])["stats"]
        runs.append((fork, stats))
        assert requests[0][:2] == ("GET", "/")  # the driver checks for a fresh Firecracker
        load, resume = requests[1], requests[2]
        assert load[:2] == ("PUT", "/snapshot/load") and load[2]["resume_vm"] is False
        assert load[2]["mem_backend"] == {"backend_type": "Uffd", "backend_path": fork["socket"]}
        assert resume == ("PATCH", "/vm", {"state": "Resumed"})
    (warm, warm_stats), (later, later_stats) = runs
    assert warm["role"] == "warmup" and warm_stats["faults"] == pages
    assert client.template("fc")["hot_pages"] == window
    # Installed before the resume: the guest faults only on the pages beyond the window.
    # Firecracker 1.8+ writes the VMGenID while it loads, and the prefetch starts at the
    # handshake, during that load: the page is either installed first, or faulted in first
    # (the prefetch then finds it present).
    prefetched = later["prefetch"]
    vmgenid_faulted = window - prefetched["installed"]
    assert later["role"] == "prefetch" and vmgenid_faulted in (0, 1)
    assert prefetched["already_present"] == vmgenid_faulted
    assert later_stats["prefetched_pages"] == prefetched["installed"]
    assert later_stats["faults"] == pages - window + vmgenid_faulted
    assert pages - window <= later_stats["misses"] <= later_stats["faults"]


def test_metrics_add_ended_and_live_forks_and_bucket_latencies() -> None:
    metrics = DaemonMetrics()
    metrics.fork_ended("a", ForkStats(fork="f1", faults=10, prefetched_pages=5, misses=2))
    metrics.observe_fault_latencies("a", [3_000, 15_000, 15_000, 2_000_000_000])
    live = {"a": [ForkStats(fork="f2", faults=4)], "b": [ForkStats(fork="f3", faults=1)]}
    text = metrics.render(live, ["a", "b", "c"], {"a": 7}).decode()
    assert _metric(text, "pagefork_faults_total", "a") == 14
    assert _metric(text, "pagefork_faults_total", "b") == 1
    assert _metric(text, "pagefork_faults_total", "c") == 0
    assert _metric(text, "pagefork_misses_total", "a") == 2
    assert _metric(text, "pagefork_live_forks", "a") == 1
    assert _metric(text, "pagefork_hot_pages", "a") == 7
    assert 'pagefork_fault_latency_seconds_bucket{le="5e-06",template="a"} 1.0' in text
    assert 'pagefork_fault_latency_seconds_bucket{le="2e-05",template="a"} 3.0' in text
    assert 'pagefork_fault_latency_seconds_bucket{le="0.1",template="a"} 3.0' in text
    assert 'pagefork_fault_latency_seconds_bucket{le="+Inf",template="a"} 4.0' in text
    assert _metric(text, "pagefork_fault_latency_seconds_count", "a") == 4
    assert "pagefork_templates 3.0" in text


# --- races, ownership of the state directory, validation ---------------------------------------


class _FakeHandle(VmmHandle):
    """A VMM handle that counts stops; ``stop`` can be held at a barrier."""

    def __init__(self, fork_id: str, hold_stop: bool = False) -> None:
        self.fork_id = fork_id
        self.stops = 0
        self.hold_stop = hold_stop
        self.stopping = threading.Event()
        self.proceed = threading.Event()

    @property
    def pid(self) -> int | None:
        return None

    def resume(self) -> None:
        pass

    def wait(self, timeout: float) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        self.stops += 1
        self.stopping.set()
        if self.hold_stop:
            assert self.proceed.wait(10)


class _GatedDriver(VmmDriver):
    """A driver whose ``restore`` signals ``entered`` and blocks until ``proceed``; then it
    returns a :class:`_FakeHandle`, or raises ``fail`` if set."""

    name = "gated"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self.fail: BaseException | None = None
        self.handles: list[_FakeHandle] = []

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> VmmHandle:
        self.entered.set()
        assert self.proceed.wait(10)
        if self.fail is not None:
            raise self.fail
        handle = _FakeHandle(request.fork_id)
        self.handles.append(handle)
        return handle


class _SignallingEvent(threading.Event):
    """An Event that reports when somebody starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def _fc_template(client: DaemonClient, tmp_path: Path, tid: str, pages: int = 4) -> dict[str, Any]:
    mem = tmp_path / f"{tid}-{pages}.mem"
    mem.write_bytes(bytes(pages * 4096))
    snap = tmp_path / f"{tid}.snap"
    snap.write_bytes(b"state")
    return client.create_template(tid, "firecracker", mem_file=str(mem), snapshot_path=str(snap))


def test_a_fork_released_twice_at_once_is_counted_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon, client = start_daemon(drivers={})
    _fc_template(client, tmp_path, "t")
    client.create_fork("t", "keep")
    client.create_fork("t", "dup")
    handle = _FakeHandle("dup", hold_stop=True)
    daemon.manager.fork("dup").handle = handle  # the first release stops at its VMM's stop

    first, out = in_thread(lambda: client.release_fork("dup"))
    assert handle.stopping.wait(10)
    with pytest.raises(DaemonError, match="unknown fork 'dup'") as info:
        client.release_fork("dup")  # the first release has claimed it
    assert info.value.status == 404
    handle.proceed.set()
    first.join(10)
    assert out["result"]["released"] == "dup" and handle.stops == 1
    assert client.template("t")["live_forks"] == 1
    with pytest.raises(DaemonError, match="in use by 1 live fork") as info:
        client.delete_template("t")
    assert info.value.status == 409
    client.release_fork("keep")
    client.delete_template("t")


def test_delete_is_refused_while_the_daemon_serves_forks_whatever_the_record_says(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon, client = start_daemon(drivers={})
    _fc_template(client, tmp_path, "t")
    client.create_fork("t", "f")
    record = daemon.registry.directory("t") / "template.json"  # a stale stored count is ignored
    record.write_text(record.read_text().replace('"owns_files"', '"live_forks": 0, "owns_files"'))
    assert client.template("t")["live_forks"] == 1
    with pytest.raises(DaemonError, match="in use by 1 live fork") as info:
        client.delete_template("t")
    assert info.value.status == 409
    client.release_fork("f")
    client.delete_template("t")


def test_a_template_created_again_never_gets_the_old_page_server(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon, client = start_daemon(drivers={})
    old = _fc_template(client, tmp_path, "t", pages=4)
    client.create_fork("t", "old-fork")
    # Deleted behind the daemon's back (by hand, as an operator might).
    shutil.rmtree(daemon.registry.directory("t"))
    new = _fc_template(client, tmp_path, "t", pages=8)
    assert new["created"] != old["created"]
    client.create_fork("t", "new-fork")
    manager = daemon.manager
    old_server = manager.holdings.state_of(manager.fork("old-fork"))
    new_server = manager.holdings.state_of(manager.fork("new-fork"))
    assert old_server is not new_server
    assert new_server.record.mem_file == new["mem_file"] != old["mem_file"]
    client.release_fork("old-fork")  # does not count down the new template's forks
    assert client.template("t")["live_forks"] == 1
    client.release_fork("new-fork")
    assert client.template("t")["live_forks"] == 0


def test_a_hot_set_cached_for_a_deleted_template_is_not_served_to_its_successor(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon, client = start_daemon(drivers={})
    record = _fc_template(client, tmp_path, "s")
    HotPageList.from_pages([(0, 0), (0, 4096)]).save(record["hot_pages_path"])
    stale_record = daemon.registry.get("s")  # a GET /metrics read the record, loaded ...
    stale = daemon.manager.hot_sets.hot_set_of(stale_record)
    assert stale is not None
    client.delete_template("s")
    # ... and cached the deleted template's hot set only after the delete forgot it.
    daemon.manager.holdings.loops[("s", stale_record.created)] = HotSetLoop(stale)
    _fc_template(client, tmp_path, "s")
    assert client.template("s")["hot_pages"] == 0
    fork = client.create_fork("s")
    assert fork["role"] == "warmup"
    client.release_fork(fork["fork"])


def test_release_during_the_vmm_start_is_carried_out_by_the_creator(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    driver = _GatedDriver()
    daemon, client = start_daemon(drivers={"gated": driver})
    _fc_template(client, tmp_path, "t")
    creator, created = in_thread(lambda: client.create_fork("t", "s", vmm="gated"))
    assert driver.entered.wait(10)  # the fork is registered, its VMM restoring
    fork = daemon.manager.fork("s")
    assert fork.phase == "starting" and client.fork("s")["phase"] == "starting"
    released_event = _SignallingEvent()
    fork.released = released_event
    releaser, released = in_thread(lambda: client.release_fork("s"))
    assert released_event.waiting.wait(10)  # the release waits for the creator
    with pytest.raises(DaemonError, match="unknown fork 's'"):
        client.release_fork("s")  # only one release claims it
    driver.proceed.set()
    creator.join(10)
    releaser.join(10)
    error = created["error"]
    assert isinstance(error, DaemonError) and error.status == 409
    assert "was released while its VMM was starting" in str(error)
    assert released["result"]["released"] == "s"
    [handle] = driver.handles
    assert handle.stops == 1  # the handle the release could not see is stopped
    assert client.forks() == [] and client.template("t")["live_forks"] == 0


def test_a_failed_vmm_start_reports_its_own_error_even_when_released_meanwhile(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    driver = _GatedDriver()
    driver.fail = VmmError("restore exploded")
    daemon, client = start_daemon(drivers={"gated": driver})
    _fc_template(client, tmp_path, "t")
    creator, created = in_thread(lambda: client.create_fork("t", "s", vmm="gated"))
    assert driver.entered.wait(10)
    released_event = _SignallingEvent()
    daemon.manager.fork("s").released = released_event
    releaser, released = in_thread(lambda: client.release_fork("s"))
    assert released_event.waiting.wait(10)
    driver.proceed.set()
    creator.join(10)
    releaser.join(10)
    error = created["error"]
    assert isinstance(error, DaemonError) and error.status == 502
    assert "restore exploded" in str(error)  # not "unknown fork"
    assert released["result"]["released"] == "s"
    assert client.forks() == [] and client.template("t")["live_forks"] == 0


class _HandshakeDriver(VmmDriver):
    """A driver whose ``restore`` connects a test VMM (the handshake, as a VMM sends it while
    it loads its snapshot), then does not return until the manager's prefetch step for the
    fork has run: a manager that prefetches only after the restore makes it time out."""

    name = "handshake"

    def __init__(self, manager: list[ForkManager], mem_file: Path) -> None:
        self.manager = manager
        self.mem_file = mem_file
        self.vmms: list[Any] = []

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> VmmHandle:
        from pagefork.testing.vmm import VmmProcess

        self.vmms.append(VmmProcess(request.uffd_socket, str(self.mem_file), ("16K",)))
        fork = self.manager[0].fork(request.fork_id)
        deadline = time.monotonic() + 10
        while fork.prefetch is None:
            if time.monotonic() > deadline:
                raise VmmError("the prefetch did not start during the restore")
            time.sleep(0.005)
        return _FakeHandle(request.fork_id)


@needs_uffd
def test_the_prefetch_starts_at_the_handshake_during_the_restore(tmp_path: Path) -> None:
    registry = TemplateRegistry(tmp_path / "state")
    mem = tmp_path / "mem"
    mem.write_bytes(os.urandom(4 * 4096))
    (tmp_path / "snap").write_bytes(b"state")
    registry.create_from_snapshot("t", mem, tmp_path / "snap")
    holder: list[ForkManager] = []
    driver = _HandshakeDriver(holder, mem)
    manager = ForkManager(registry, ManagerConfig(socket_dir=str(tmp_path / "f")), {"h": driver})
    holder.append(manager)
    try:
        fork = manager.create_fork("t", "f", "h")
        assert fork.prefetch == {"role": "warmup", "hot_pages": 0, "installed": 0}
        [vmm] = driver.vmms
        assert vmm.send(cmd="touch", pages=[[0, 0], [0, 4096]])["bad"] == 0
    finally:
        for vmm in driver.vmms:
            vmm.kill()
        manager.close()


def test_a_failure_after_the_restore_stops_the_vmm_and_keeps_its_error(tmp_path: Path) -> None:
    registry = TemplateRegistry(tmp_path / "state")
    mem = tmp_path / "mem"
    mem.write_bytes(bytes(4 * 4096))
    (tmp_path / "snap").write_bytes(b"state")
    registry.create_from_snapshot("t", mem, tmp_path / "snap")
    driver = _GatedDriver()
    driver.proceed.set()
    config = ManagerConfig(socket_dir=str(tmp_path / "forks"), prefetch_timeout=0.05)
    manager = ForkManager(registry, config, {"gated": driver})
    try:
        # Nobody connects to the fork's socket: the prefetch after the restore fails.
        with pytest.raises(PageforkError) as info:
            manager.create_fork("t", "f", "gated")
        assert "unknown fork" not in str(info.value)
        [handle] = driver.handles
        assert handle.stops == 1
        assert manager.forks() == [] and registry.get("t").live_forks == 0
    finally:
        manager.close()


def test_a_second_daemon_on_the_same_state_dir_is_refused_before_it_touches_anything(
    start_daemon: StartDaemon,
    tmp_path: Path,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon, client = start_daemon(drivers={})
    _fc_template(client, tmp_path, "t")
    fork = client.create_fork("t", "f")
    leftover = daemon.registry.root / ".new-x-123"
    leftover.mkdir()
    other = str(short_dir / "other.sock")
    # The holder is this very process: named by its pid.
    with pytest.raises(PageforkError, match=f"in use by another daemon pid {os.getpid()} "):
        Daemon(tmp_path / "state", other, socket_dir=str(short_dir / "forks"))
    state = ["--state-dir", str(tmp_path / "state"), "--socket-dir", str(short_dir / "forks")]
    assert main(["daemon", *state, "--control", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another daemon" in err[0]
    # The running daemon is untouched: its fork's socket, its counts, its control socket.
    assert os.path.exists(fork["socket"]) and not os.path.exists(other)
    assert client.template("t")["live_forks"] == 1 and leftover.exists()
    assert [f["fork"] for f in client.forks()] == ["f"]
    client.release_fork("f")
    daemon.close()
    # Once it is gone the state directory is free, and the new owner cleans up.
    start_daemon(drivers={})
    assert not leftover.exists()


def test_invalid_template_requests_get_400_naming_the_field(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, client = start_daemon(drivers={})
    control = client.control_path
    odd = tmp_path / "odd"
    odd.write_bytes(bytes(5000))
    good = tmp_path / "good"
    good.write_bytes(bytes(8192))

    def fc(mem: Path | str, snap: Path | str, **extra: Any) -> bytes:
        doc = {"id": "x", "kind": "firecracker", "mem_file": str(mem), "snapshot_path": str(snap)}
        return json.dumps({**doc, **extra}).encode()

    cases = [
        (fc(tmp_path / "nope", good), "field 'mem_file'"),
        (fc(good, tmp_path / "nope"), "field 'snapshot_path'"),
        (fc(odd, good), "field 'mem_file'"),
        (fc(good, good, page_size=5000), "field 'page_size'"),
        (
            b'{"id": "x", "kind": "kvm", "mem_size_mib": 4, "variants": 1024}',
            "'mem_size_mib'",
        ),
    ]
    for body, message in cases:
        status, doc = _raw(control, "POST", "/templates", body)
        assert (status, message in doc["error"]) == (400, True), (body, doc)
    assert client.templates()["templates"] == []


def test_invalid_driver_options_get_400_and_start_nothing(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    from pagefork.vmm.firecracker import FirecrackerDriver
    from pagefork.vmm.kvm.driver import KvmDriver

    drivers = {"firecracker": FirecrackerDriver(), "kvm": KvmDriver()}
    _, client = start_daemon(drivers=drivers)
    _fc_template(client, tmp_path, "fc")
    cases = [
        ("firecracker", {"api_socket": "/x.sock", "api_timeout": "soon"}, "'api_timeout'"),
        ("firecracker", {"api_socket": "/x.sock", "stop_timeout": "soon"}, "'stop_timeout'"),
        ("firecracker", {"api_socket": "/x.sock", "load_fields": [1]}, "'load_fields'"),
        ("firecracker", {"api_socket": "/x.sock", "stop": "halt"}, "'stop'"),
        ("kvm", {"fork_index": -1}, "'fork_index'"),
        ("kvm", {"fork_index": "one"}, "'fork_index'"),
    ]
    for vmm, options, message in cases:
        with pytest.raises(DaemonError, match=message) as info:
            client.create_fork("fc", vmm=vmm, options=options)
        assert info.value.status == 400, (vmm, options)
    assert client.forks() == [] and client.template("fc")["live_forks"] == 0


def test_a_template_deleted_before_the_fork_acquires_it_is_404(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, client = start_daemon(drivers={})
    _fc_template(client, tmp_path, "t")
    client.delete_template("t")
    # The route's existence check passed just before the delete.
    monkeypatch.setattr(daemon.registry, "exists", lambda _tid: True)
    status, doc = _raw(client.control_path, "POST", "/forks", b'{"template": "t"}')
    assert (status, doc["error"]) == (404, "unknown template 't'")
    status, doc = _raw(client.control_path, "DELETE", "/templates/t", b"")
    assert (status, doc["error"]) == (404, "unknown template 't'")
