"""``pagefork daemon --takeover``: real daemons, real test VMMs, a client polling throughout."""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from procs import ALL_PAGES, PAGEFORK, DaemonProc, exited, go_on, setup_forks

from conftest import PAGE, needs_kvm, needs_uffd
from pagefork.daemon.client import DaemonClient
from pagefork.errors import VmmError
from pagefork.server import PageServer, ServerConfig
from pagefork.testing.fcdouble import TEST_PREFIX, FcDoubleProcess
from pagefork.vmm.base import AdoptedProcess, RestoreRequest, VmmDriver, VmmHandle, VmmHandover
from pagefork.vmm.firecracker import create_snapshot
from pagefork.vmm.kvm.driver import KvmDriver
from pagefork.vmm.kvm.template import TemplateSpec, build_template


class Poller:
    """A client asking the control API over and over, on its own thread, until stopped."""

    def __init__(self, control: Path, fork_ids: list[str]) -> None:
        self.client = DaemonClient(str(control), timeout=60)
        self.fork_ids = fork_ids
        self.ok = 0
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        # A daemon thread: a failed test must not leave the run waiting for it.
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                for fork_id in self.fork_ids:
                    assert self.client.fork(fork_id)["fork"] == fork_id
                listed = {f["fork"] for f in self.client.forks()}
                assert listed >= set(self.fork_ids)
                with self.cond:
                    self.ok += 1
                    self.cond.notify_all()
            except Exception as exc:
                self.errors.append(repr(exc))

    def answered_again(self, times: int = 3) -> bool:
        """Wait until ``times`` more rounds have been answered."""
        with self.cond:
            goal = self.ok + times
            return self.cond.wait_for(lambda: self.ok >= goal or bool(self.errors), 60)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)


def storm(vmm: Any, out: list[dict[str, Any]], seed: int) -> threading.Thread:
    t = threading.Thread(
        target=lambda: out.append(
            vmm.send(cmd="touch", all=True, order="random", seed=seed, threads=4)
        ),
        daemon=True,
    )
    t.start()
    return t


def _gone(pid: int) -> None:
    """Wait until process ``pid`` (not our child) has exited."""
    assert exited(pid, 60), f"pid {pid} still runs"


@needs_uffd
def test_daemon_takeover_mid_fault_storm_with_a_client_polling(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    client, forks, guests = setup_forks(control, mem_file, tmp_path, vmms)
    assert [f["role"] for f in forks] == ["warmup", "demand", "demand"]
    poller = Poller(control, [f["fork"] for f in forks])
    # Another client creates and releases forks all the while: writes cross the takeover too.
    churn_errors: list[str] = []
    churned = [0]
    churning = threading.Event()
    churn_cond = threading.Condition()

    def churn() -> None:
        own = DaemonClient(str(control), timeout=60)
        while not churning.is_set():
            try:
                fork = own.create_fork("t", f"c{churned[0]}")
                own.release_fork(fork["fork"])
            except Exception as exc:
                churn_errors.append(repr(exc))
                return
            with churn_cond:
                churned[0] += 1
                churn_cond.notify_all()

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    new = DaemonProc(tmp_path / "state", control, "--takeover",
                     env={"PAGEFORK_TAKEOVER_PAUSE_AT": "state"})  # fmt: skip
    new.wait_err("takeover: paused at state")
    replies: list[dict[str, Any]] = []
    threads = [storm(g, replies, seed=i) for i, g in enumerate(guests)]
    assert replies == []  # released by the old daemon, not yet adopted: every fault waits
    before = poller.ok
    go_on(new.proc)
    took = new.wait_for("took_over")
    assert took["from_pid"] == old.proc.pid
    assert old.proc.wait(60) == 0
    handed = old.events[-1]
    assert handed["event"] == "handed_over" and handed["to_pid"] == new.proc.pid
    # The three, and the churning client's fork if one was registered at that moment.
    assert handed["forks"] == took["forks"] in (3, 4)
    for t in threads:
        t.join(60)
    assert [r["bad"] for r in replies] == [0, 0, 0]
    assert poller.answered_again()  # the old daemon is gone: answered by the new one
    poller.finish()
    assert poller.errors == [] and poller.ok > before
    with churn_cond:  # forks are created and released by the new daemon too
        seen = churned[0]
        assert churn_cond.wait_for(lambda: churned[0] >= seen + 3 or bool(churn_errors), 60)
    churning.set()
    churner.join(60)
    assert churn_errors == []
    assert control.exists()
    # The new daemon has every fork, with its counters, and serves new ones.
    listed = {f["fork"]: f for f in client.forks()}
    assert set(listed) == {"f0", "f1", "f2"} and listed["f0"]["role"] == "warmup"
    # The warm-up's window (a quarter of its pages) filled in the storm, in the new daemon,
    # which saved it: the next fork is prefetched from it.
    assert client.template("t")["hot_pages"] == ALL_PAGES // 4
    late = client.create_fork("t", "late")
    assert late["role"] == "prefetch"
    assert vmms(late["socket"]).send(cmd="touch", all=True)["bad"] == 0
    for g in guests:
        g.close()
    stats = [client.release_fork(f"f{i}")["stats"] for i in range(3)]
    assert [s["faults"] for s in stats] == [ALL_PAGES] * 3
    client.release_fork("late")
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(60) == 0
    assert not control.exists()


@needs_uffd
@pytest.mark.parametrize("step", ["built", "adopted"])
def test_new_daemon_killed_mid_handover_old_serves_every_fork(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms, step: str
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    client, forks, guests = setup_forks(control, mem_file, tmp_path, vmms, n=2)
    poller = Poller(control, [f["fork"] for f in forks])
    new = DaemonProc(tmp_path / "state", control, "--takeover",
                     env={"PAGEFORK_TAKEOVER_STOP_AT": step})  # fmt: skip
    new.wait_err(f"takeover: stopped at {step}")
    replies: list[dict[str, Any]] = []
    threads = [storm(g, replies, seed=i) for i, g in enumerate(guests)]
    new.proc.kill()
    assert new.proc.wait(60) == -signal.SIGKILL
    for t in threads:
        t.join(60)
    assert [r["bad"] for r in replies] == [0, 0]
    assert poller.answered_again()  # by the old daemon, which serves on
    poller.finish()
    assert poller.errors == []
    stats = [client.release_fork(f["fork"])["stats"] for f in forks]
    assert [s["faults"] for s in stats] == [ALL_PAGES] * 2
    assert old.proc.poll() is None and old.events[-1]["event"] == "listening"
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(60) == 0


UNIT = Path(__file__).parent.parent / "contrib" / "systemd" / "pagefork.service"
#: The drop-in for an install in a virtual environment, and the environment it names.
VENV_DROP_IN = UNIT.parent / "venv.conf"
VENV_IN_DROP_IN = "/opt/pagefork/venv"


def _settings(text: str) -> dict[str, str]:
    # As systemd reads them: the last assignment wins (an empty ExecStart= clears it).
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line[:40])


def unit_commands(state: Path, control: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """The unit's ExecStart as the virtual-environment drop-in sets it, for this test's
    environment (state dir and control socket swapped for this test's), its ExecReload, and
    its [Service] settings."""
    settings = _settings(UNIT.read_text())
    # The unit itself runs the installed command, found on systemd's search path.
    assert shlex.split(settings["ExecStart"])[:2] == ["pagefork", "daemon"]
    venv = sys.prefix  # this test's environment, where `pagefork` is installed
    drop_in = VENV_DROP_IN.read_text().replace(VENV_IN_DROP_IN, venv)
    assert "ExecStart=\n" in drop_in  # clears the unit's, as a drop-in must
    settings.update(_settings(drop_in))
    start = shlex.split(settings["ExecStart"])
    assert start[0] == f"{venv}/bin/pagefork" and os.access(start[0], os.X_OK)
    start[start.index("--state-dir") + 1] = str(state)
    start[start.index("--control") + 1] = str(control)
    return start, shlex.split(settings["ExecReload"]), settings


@needs_uffd
def test_the_systemd_units_reload_hands_over_to_a_new_daemon_which_tells_systemd(
    short_dir: Path, tmp_path: Path, mem_file: Path, vmms
) -> None:
    control = short_dir / "c.sock"
    start, reload, settings = unit_commands(short_dir / "state", control)
    assert (settings["Type"], settings["NotifyAccess"]) == ("notify", "all")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.settimeout(60)
    old = subprocess.Popen(
        start, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")},
    )  # fmt: skip
    assert old.stdout is not None
    try:
        assert notify.recv(4096) == b"READY=1"
        client, _, guests = setup_forks(control, mem_file, tmp_path, vmms, n=1)
        # ExecReload, as systemd runs it: $MAINPID is the daemon's pid.
        subprocess.run([a.replace("$MAINPID", str(old.pid)) for a in reload], check=True)
        message = notify.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in message.splitlines())
        new_pid = int(fields["MAINPID"])
        assert fields["READY"] == "1" and new_pid != old.pid
        assert old.wait(60) == 0
        # The new daemon shares this stdout (as it shares the journal under systemd): its
        # two lines and the old daemon's last one come in either order.
        events = {}
        for _ in range(4):
            event = json.loads(old.stdout.readline())
            events.setdefault(event.pop("event"), event)
        assert events["took_over"] == {"from_pid": old.pid, "forks": 1}
        assert events["handed_over"] == {"to_pid": new_pid, "forks": 1}
        assert set(events) == {"listening", "took_over", "handed_over"}
        assert guests[0].send(cmd="touch", all=True)["bad"] == 0
        guests[0].close()
        assert client.release_fork("f0")["stats"]["faults"] == ALL_PAGES
        os.kill(new_pid, signal.SIGTERM)  # systemctl stop
        _gone(new_pid)
        assert not control.exists()
    finally:
        if old.poll() is None:
            old.kill()
        old.wait()
        old.stdout.close()
        notify.close()


def test_daemon_takeover_refuses_a_wrong_control_socket(tmp_path: Path, short_dir: Path) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    proc = subprocess.run(
        [*PAGEFORK, "daemon", "--state-dir", str(tmp_path / "state"), "--control",
         str(short_dir / "other.sock"), "--takeover"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--control {short_dir}/other.sock is not the running daemon's" in proc.stderr
    assert DaemonClient(str(control)).templates()["templates"] == []
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(60) == 0


def test_daemon_takeover_refuses_another_cache_dir_or_endpoint(
    tmp_path: Path, short_dir: Path
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    cache = tmp_path / "other-cache"
    for option, value, theirs in (
        ("--cache-dir", str(cache), str(tmp_path / "state" / "chunk-cache")),
        ("--endpoint-url", "http://127.0.0.1:9", "not given"),
    ):
        proc = subprocess.run(
            [*PAGEFORK, "daemon", "--state-dir", str(tmp_path / "state"), "--control",
             str(control), "--takeover", option, value],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{option} {value} is not the running daemon's ({theirs})" in proc.stderr
    assert not cache.exists()  # made by the refused start, and removed again
    assert DaemonClient(str(control)).templates()["templates"] == []
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(60) == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_the_unit_with_the_virtual_environment_drop_in(tmp_path: Path) -> None:
    (tmp_path / "pagefork.service").write_text(UNIT.read_text())
    (tmp_path / "pagefork.service.d").mkdir()
    drop_in = VENV_DROP_IN.read_text().replace(VENV_IN_DROP_IN, sys.prefix)
    (tmp_path / "pagefork.service.d" / "venv.conf").write_text(drop_in)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "pagefork.service")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def _microvm_daemon(tmp_path: Path, short_dir: Path) -> tuple[Path, DaemonProc, DaemonClient]:
    """A daemon with the built-in microVM template "vm" (16 MiB): its control socket, its
    process and a client."""
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    client = DaemonClient(str(control), timeout=120)
    client.create_template("vm", "kvm", mem_size_mib=16, variants=2)
    return control, old, client


@needs_kvm
def test_daemon_takeover_adopts_microvm_forks(tmp_path: Path, short_dir: Path) -> None:
    control, old, client = _microvm_daemon(tmp_path, short_dir)
    assert client.create_fork("vm", "warm", vmm="kvm")["role"] == "warmup"
    assert client.wait_fork("warm", timeout=60)["vmm"]["checksum_ok"]
    later = client.create_fork("vm", "later", vmm="kvm", options={"fork_index": 1})
    assert later["role"] == "prefetch" and later["prefetch"]["installed"] > 0
    # The warm-up's VMM exits after its run; its status is known only to the daemon that
    # reaps it (an adopted VMM is not the new daemon's child): let the old one reap it first.
    deadline = time.monotonic() + 60
    while client.fork("warm")["exit_status"] is None:
        assert time.monotonic() < deadline, "the warm-up's VMM exit was never reaped"
        time.sleep(0.05)
    new = DaemonProc(tmp_path / "state", control, "--takeover")
    assert new.wait_for("took_over")["forks"] == 2
    assert old.proc.wait(60) == 0
    forks = {f["fork"]: f for f in client.forks()}
    assert forks["warm"]["phase"] == "exited" and forks["warm"]["exit_status"] == 0
    assert forks["later"]["driver"] == "kvm" and forks["later"]["pid"] == later["pid"]
    assert forks["later"]["prefetch"] == later["prefetch"]
    stats = client.release_fork("later")["stats"]
    assert stats["errors"] == 0 and stats["prefetched_pages"] == later["prefetch"]["installed"]
    _gone(later["pid"])  # released: its VMM is stopped, whether its guest had finished or not
    assert client.release_fork("warm")["stats"]["errors"] == 0
    assert client.template("vm")["live_forks"] == 0
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(60) == 0


@needs_kvm
def test_a_fork_snapshotted_before_a_takeover_goes_on_with_its_diff_chain_after_it(
    tmp_path: Path, short_dir: Path
) -> None:
    control, old, client = _microvm_daemon(tmp_path, short_dir)
    fid = client.create_fork("vm", vmm="kvm", options={"fork_index": 0, "snapshots": True})["fork"]
    assert client.wait_fork(fid, timeout=60)["vmm"]["checksum_ok"]
    client.snapshot_fork(fid, "s1")  # a layer over vm; the fork then walks on
    walk1 = client.wait_fork(fid, timeout=60)["vmm"]

    new = DaemonProc(tmp_path / "state", control, "--takeover")
    assert new.wait_for("took_over")["forks"] == 1
    assert old.proc.wait(60) == 0

    # The new daemon snapshots the adopted VMM through its pipes, and the layer goes over s1:
    # the VMM's dirty log holds only what changed since s1.
    s2 = client.snapshot_fork(fid, "s2")["template"]
    assert (s2["parent"], len(s2["layers"])) == ("s1", 2)
    walk2 = client.wait_fork(fid, timeout=60)["vmm"]  # over the memory s2 holds
    branch = client.create_fork("s2", vmm="kvm", options={"fork_index": 0})["fork"]
    run = client.wait_fork(branch, timeout=60)["vmm"]
    assert run["checksums"] == walk2["checksums"] != walk1["checksums"]
    for f in (branch, fid):
        client.release_fork(f)
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(60) == 0


@needs_kvm
def test_a_daemons_microvm_does_not_outlive_a_daemon_that_dies_without_a_successor(
    tmp_path: Path, short_dir: Path
) -> None:
    # Forks of a daemon may outlive it for a successor (no PR_SET_PDEATHSIG), so without one
    # they must go by themselves: one stopped after its walk (snapshots) at the end of its
    # stdin. (One still walking goes when its page server does: see
    # test_fork_exits_with_an_error_when_its_page_server_goes_away.)
    _control, old, client = _microvm_daemon(tmp_path, short_dir)
    kept = client.create_fork("vm", vmm="kvm", options={"fork_index": 0, "snapshots": True})
    assert client.wait_fork(kept["fork"], timeout=60)["vmm"]["checksum_ok"]
    pidfd = os.pidfd_open(kept["pid"])
    try:
        old.proc.kill()
        old.proc.wait(60)
        ready, _, _ = select.select([pidfd], [], [], 60)
        assert ready == [pidfd], "the daemon's microVM outlived it"
    finally:
        os.close(pidfd)


def _daemons_on(state: Path) -> list[int]:
    """Processes whose command line runs ``pagefork daemon`` on ``state``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"daemon" in argv and str(state).encode() in argv:
                found.append(int(entry))
    return found


@needs_uffd
def test_a_stop_right_after_a_reload_still_stops_the_service(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms
) -> None:
    # systemctl reload, then systemctl stop: the SIGTERM must not be taken for the reload's.
    control = short_dir / "c.sock"
    state = tmp_path / "state"
    old = DaemonProc(state, control, "--on-sighup", "takeover")
    old.wait_for("listening")
    setup_forks(control, mem_file, tmp_path, vmms, n=1)
    os.kill(old.proc.pid, signal.SIGHUP)
    os.kill(old.proc.pid, signal.SIGTERM)
    assert old.proc.wait(120) == 0
    for event in old.events:
        if event["event"] == "handed_over":  # the TERM came during the handover: passed on
            try:
                pidfd = os.pidfd_open(event["to_pid"])
            except ProcessLookupError:
                continue
            try:
                assert select.select([pidfd], [], [], 60)[0] == [pidfd], "the successor runs on"
            finally:
                os.close(pidfd)
    assert _daemons_on(state) == []
    assert not control.exists()


@needs_uffd
def test_a_template_whose_page_server_starts_during_the_build_is_taken_over_too(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms
) -> None:
    control = short_dir / "c.sock"
    old = DaemonProc(tmp_path / "state", control)
    old.wait_for("listening")
    client, _, guests = setup_forks(control, mem_file, tmp_path, vmms, n=1)
    client.create_template(
        "t2", "firecracker", mem_file=str(mem_file), snapshot_path=str(tmp_path / "t.snap")
    )
    new = DaemonProc(
        tmp_path / "state", control, "--takeover", env={"PAGEFORK_TAKEOVER_PAUSE_AT": "built"}
    )
    new.wait_err("takeover: paused at built")
    late = client.create_fork("t2", "late")  # not in the plan: its page server starts now
    go_on(new.proc)
    assert new.wait_for("took_over")["forks"] == 2
    assert old.proc.wait(60) == 0
    g2 = vmms(late["socket"])
    assert g2.send(cmd="touch", all=True)["bad"] == 0
    assert guests[0].send(cmd="touch", all=True)["bad"] == 0
    for g in [g2, *guests]:
        g.close()
    assert client.release_fork("late")["stats"]["errors"] == 0
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(60) == 0


def _hop(tmp_path: Path, control: Path, old: DaemonProc, forks: int) -> DaemonProc:
    """One takeover of ``old`` by a new daemon, which it hands ``forks`` forks."""
    new = DaemonProc(tmp_path / "state", control, "--takeover")
    assert new.wait_for("took_over")["forks"] == forks
    assert old.proc.wait(60) == 0
    return new


@needs_kvm
@needs_uffd
def test_every_fork_kind_survives_three_takeovers_in_a_row_with_its_options(
    tmp_path: Path, short_dir: Path, mem_file: Path, vmms
) -> None:
    control, daemon, client = _microvm_daemon(tmp_path, short_dir)
    # The built-in microVM, kept after its walk for snapshots.
    micro = client.create_fork("vm", "m", vmm="kvm", options={"fork_index": 1, "snapshots": True})
    assert client.wait_fork("m", timeout=60)["vmm"]["checksum_ok"]
    # The test VMM, which connects by itself.
    _, [plain], [guest] = setup_forks(control, mem_file, tmp_path, vmms, n=1)
    # Firecracker (the double), kept for snapshots and stopped with Ctrl-Alt-Del.
    with FcDoubleProcess(str(short_dir / "src.api")) as source:
        source.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
        source.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        create_snapshot(source.api_sock, str(tmp_path / "fc.state"), str(tmp_path / "fc.mem"))
    client.create_template("fc", "firecracker", mem_file=str(tmp_path / "fc.mem"),
                           snapshot_path=str(tmp_path / "fc.state"))  # fmt: skip
    with FcDoubleProcess(str(short_dir / "fc.api"), "--fc-version", "1.14") as fc:
        opts = {"api_socket": fc.api_sock, "snapshots": True, "stop": "ctrl-alt-del"}
        fcfork = client.create_fork("fc", "f", vmm="firecracker", options=opts)
        assert fc.result(wait=30)["bad"] == 0
        for _ in range(3):
            daemon = _hop(tmp_path, control, daemon, forks=3)
        listed = {f["fork"]: f for f in client.forks()}
        assert {k: (f["phase"], f["pid"]) for k, f in listed.items()} == {
            "m": ("live", micro["pid"]), "f": ("live", fcfork["pid"]), plain["fork"]: ("live", None)
        }  # fmt: skip
        # The microVM answers through the pipes its first daemon made: a snapshot (its
        # 'snapshots' option held), then a walk on over the memory the snapshot holds.
        assert client.snapshot_fork("m", "m1")["template"]["parent"] == "vm"
        walk = client.wait_fork("m", timeout=60)["vmm"]
        branch = client.create_fork("m1", vmm="kvm", options={"fork_index": 1})["fork"]
        assert client.wait_fork(branch, timeout=60)["vmm"]["checksums"] == walk["checksums"]
        # Firecracker is driven through its API as before: a diff snapshot of its writes.
        write = {"region": 0, "offset": 40960, "length": 3 * PAGE, "seed": 9}
        fc.api.request("PUT", TEST_PREFIX + "write", write)
        assert client.snapshot_fork("f", "f1")["changed_pages"] == 3
        # The test VMM's every page is still served right.
        assert guest.send(cmd="touch", all=True)["bad"] == 0
        # Released: each VMM stopped the way its options said.
        client.release_fork("f")
        assert fc.wait(30) == 0  # it shut down on Ctrl-Alt-Del, not SIGKILLed
    for fork in (branch, "m"):
        assert client.release_fork(fork)["stats"]["errors"] == 0
    _gone(micro["pid"])
    guest.close()
    assert client.release_fork(plain["fork"])["stats"]["errors"] == 0
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0


@needs_kvm
def test_a_line_a_microvm_writes_while_it_is_handed_over_reaches_the_next_daemon(
    tmp_path: Path,
) -> None:
    tpl = build_template(tmp_path / "t", TemplateSpec(mem_size=8 << 20, variants=1))
    tpl.close()
    config = ServerConfig(mem_file_path=str(tpl.mem_file), socket_dir=str(tmp_path), workers=1)
    driver = KvmDriver()
    with PageServer(config) as server:
        request = RestoreRequest("f", server.register_fork("f"), str(tpl.path), str(tpl.mem_file),
                                 options={"snapshots": True})  # fmt: skip
        handle = driver.restore(request)
        adopted = None
        try:
            handle.resume()
            assert handle.wait(60)["checksum_ok"]

            dirs = [tmp_path / f"s{i}" for i in range(5)]
            for d in dirs:
                d.mkdir()

            def ask(fds: dict[str, int], i: int) -> None:  # answered on the VMM's stdout
                os.write(fds["stdin"], f"snapshot {dirs[i]}\n".encode())

            def answered(doc: dict[str, object], i: int) -> bool:
                return Path(str(doc["memory_diff"])).parent == dirs[i]

            # A handover that fails: this side reads on, the answer written meanwhile first.
            ask(handle.handover().fds, 0)
            handle.handover_cancelled()
            assert answered(handle.process.snapshot(str(dirs[1])), 0)
            # One that succeeds: the answer this side has not taken yet, and the one the VMM
            # writes after this side let go, both reach the adopting side, in order.
            given = handle.handover()
            ask(given.fds, 2)
            adopted = driver.adopt("f", given)
            assert adopted.stays_after_run and adopted.pid == handle.pid
            assert answered(adopted.process.snapshot(str(dirs[3])), 1)
            assert answered(adopted.process.snapshot(str(dirs[4])), 2)
            assert adopted.exit_status() is None  # not its child: only the parent can tell
        finally:
            if adopted is not None:
                adopted.stop()
            handle.stop()


class _RestoreOnly(VmmDriver):
    """A driver with only what a driver must have: every other method is the default."""

    name = "restore-only"

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> VmmHandle:
        raise VmmError("not used here")


def test_a_vmm_adopted_by_a_driver_that_cannot_drive_it_is_watched_and_stopped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    pidfd = os.pidfd_open(child.pid)
    try:
        driver = _RestoreOnly()
        driver.check_options({"anything": 1})  # accepted by default
        handle = driver.adopt("f", VmmHandover({"pid": child.pid}, {"pidfd": pidfd}))
        assert isinstance(handle, AdoptedProcess) and handle.pid == child.pid
        assert handle.pidfd is not None and handle.pidfd != pidfd  # its own copy
        assert handle.exit_status() is None and not handle.stays_after_run
        assert handle.handover().state == {"pid": child.pid}  # and hands over again
        with pytest.raises(VmmError, match="cannot be resumed"):
            handle.resume()
        handle.stop()
        assert child.wait(60) == -signal.SIGKILL and handle.pidfd is None
        handle.stop()  # idempotent
    finally:
        os.close(pidfd)
        child.kill()
        child.wait()
        assert child.stdin is not None
        child.stdin.close()


def test_a_microvm_handover_without_its_pipes_is_refused_in_one_line() -> None:
    with pytest.raises(VmmError, match=r"fork f: .* needs its pid, pidfd, stdin and stdout "
                                       r"\(missing: stdin, stdout\)"):  # fmt: skip
        KvmDriver().adopt("f", VmmHandover({"pid": 1}, {"pidfd": 0}))
