"""Snapshots through the daemon: ``POST /forks/{id}/snapshot``, the client, and the CLI verb.

The VMMs are built-in microVM processes; the child templates' forks are served their layers by
real page servers, and each guest checks its checksum against the memory it should see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import StartDaemon, needs_kvm, needs_uffd
from pagefork.cli import main
from pagefork.daemon.client import DaemonClient, DaemonError
from pagefork.errors import VmmError
from pagefork.server import PageServer, ServerConfig
from pagefork.testing.fcdouble import (
    TEST_PREFIX,
    VMGENID_OFFSET,
    VMGENID_SIZE,
    FcDoubleProcess,
)
from pagefork.vmm.base import RestoreRequest
from pagefork.vmm.firecracker import create_snapshot
from pagefork.vmm.kvm.driver import KvmDriver
from pagefork.vmm.kvm.template import TemplateSpec, build_template

TEMPLATE = {"mem_size_mib": 16, "variants": 2}


def _fork(client: DaemonClient, template: str, **options: Any) -> tuple[str, dict[str, Any]]:
    fork = client.create_fork(template, vmm="kvm", options={"fork_index": 0, **options})
    done = client.wait_fork(fork["fork"], timeout=60)
    assert done["vmm"]["checksum_ok"], done
    return fork["fork"], done["vmm"]


@needs_kvm
def test_a_snapshot_becomes_a_child_template_whose_forks_see_the_changed_state(
    start_daemon: StartDaemon,
) -> None:
    _daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    parent, parent_run = _fork(client, "vm", snapshots=True)

    snap = client.snapshot_fork(parent, "vm-b")
    child = snap["template"]
    assert (child["id"], child["parent"], len(child["layers"])) == ("vm-b", "vm", 1)
    assert snap["changed_pages"] > 0 and snap["layer_bytes"] > 0
    assert client.fork(parent)["phase"] == "live"  # resumed, not released

    # A branch of the snapshot walks memory as the parent left it: its checksum (checked
    # in the fork against the child's layers) differs from the template's; a fork of the
    # template itself still sees the template.
    branch, branch_run = _fork(client, "vm-b")
    base, base_run = _fork(client, "vm")
    assert base_run["checksums"] == parent_run["checksums"]
    assert branch_run["checksums"] != parent_run["checksums"]

    for f in (parent, branch, base):
        client.release_fork(f)
    with pytest.raises(DaemonError, match="vm-b"):  # the parent has a child
        client.delete_template("vm")


@needs_kvm
def test_snapshot_refusals_say_why_and_leave_the_fork_as_it_was(start_daemon: StartDaemon) -> None:
    _daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    plain = client.create_fork("vm")["fork"]  # no VMM the daemon could pause
    with pytest.raises(DaemonError, match="has no VMM the daemon drives") as info:
        client.snapshot_fork(plain, "child")
    assert info.value.status == 409
    assert all(t["id"] != "child" for t in client.templates()["templates"])

    snapper, _ = _fork(client, "vm", snapshots=True)
    with pytest.raises(DaemonError, match="template 'vm' already exists") as info:
        client.snapshot_fork(snapper, "vm")
    assert info.value.status == 409
    with pytest.raises(DaemonError, match="field 'template'") as info:
        client.snapshot_fork(snapper, "../x")
    assert info.value.status == 400
    with pytest.raises(DaemonError, match="unknown fork 'nope'") as info:
        client.snapshot_fork("nope", "x")
    assert info.value.status == 404

    assert client.fork(snapper)["phase"] == "live"
    # --release: the snapshot is taken, then the fork is gone.
    done = client.snapshot_fork(snapper, "vm-r", release=True)
    assert done["released"]["fork"] == snapper
    with pytest.raises(DaemonError, match="unknown fork"):
        client.fork(snapper)
    client.release_fork(plain)


@needs_kvm
def test_cli_forks_snapshot(start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    fork, _ = _fork(client, "vm", snapshots=True)
    control = ["--control", daemon.control_path]
    assert main(["forks", "snapshot", fork, "--as", "vm-c", *control]) == 0
    out = capsys.readouterr().out
    assert out.startswith("template vm-c: ") and out.rstrip().endswith(f"fork {fork} resumed")
    assert client.template("vm-c")["parent"] == "vm"
    assert main(["forks", "snapshot", fork, "--as", "vm-c", *control]) != 0
    err = capsys.readouterr().err
    assert "template 'vm-c' already exists" in err and "Traceback" not in err
    client.release_fork(fork)


@needs_kvm
def test_a_microvm_fork_restored_without_snapshots_refuses_one(tmp_path: Path) -> None:
    tpl = build_template(tmp_path / "t", TemplateSpec(mem_size=8 << 20, variants=1))
    tpl.close()
    config = ServerConfig(mem_file_path=str(tpl.mem_file), socket_dir=str(tmp_path), workers=1)
    with PageServer(config) as server:
        sock = server.register_fork("f")
        handle = KvmDriver().restore(RestoreRequest("f", sock, str(tpl.path), str(tpl.mem_file)))
        try:
            with pytest.raises(VmmError, match="restored without the 'snapshots' option"):
                handle.snapshot(str(tmp_path), timeout=10)
            assert handle.exit_status() is None  # still there, paused
        finally:
            handle.stop()


@needs_kvm
def test_a_child_is_prefetched_from_what_it_inherits_while_its_first_fork_records(
    start_daemon: StartDaemon,
) -> None:
    _daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    warm, _ = _fork(client, "vm")  # the template's hot set
    parent, _ = _fork(client, "vm", snapshots=True)
    snap = client.snapshot_fork(parent, "vm-b", release=True)
    # The child's first fork records (it stays, so its window stays open); the next one is
    # prefetched from the child's layer pages and the template's hot set.
    first = client.create_fork("vm-b", vmm="kvm", options={"snapshots": True})
    assert first["role"] == "warmup"
    second = client.create_fork("vm-b", vmm="kvm", options={"fork_index": 1})
    assert second["role"] == "demand"
    got = second["prefetch"]
    assert got["inherited"] is True
    hot = client.template("vm")["hot_pages"]
    assert got["hot_pages"] >= snap["changed_pages"] and got["hot_pages"] >= hot
    assert got["installed"] > 0
    done = client.wait_fork(second["fork"], timeout=60)
    assert done["vmm"]["checksum_ok"]
    for f in (warm, first["fork"], second["fork"]):
        client.release_fork(f)


@needs_kvm
def test_past_max_layer_depth_a_snapshot_is_flattened_at_once(start_daemon: StartDaemon) -> None:
    _daemon, client = start_daemon(max_layer_depth=1)
    client.create_template("vm", "kvm", **TEMPLATE)
    a, _ = _fork(client, "vm", snapshots=True)
    one = client.snapshot_fork(a, "one", release=True)["template"]
    assert (one["parent"], len(one["layers"])) == ("vm", 1)
    b, _ = _fork(client, "one", snapshots=True)
    two = client.snapshot_fork(b, "two", release=True)["template"]
    # Two layers would be past the limit: one mem-file of its own, no parent, no layers.
    assert (two["parent"], two["layers"]) == (None, [])
    assert two["mem_file"] != one["mem_file"] and "two" in Path(two["mem_file"]).parts
    c, run = _fork(client, "two")  # walks memory as b left it, checked against the flat file
    assert run["checksum_ok"]
    client.release_fork(c)


@needs_uffd
def test_a_firecracker_fork_snapshotted_through_the_daemon_is_forked_byte_for_byte(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    _, client = start_daemon()
    with FcDoubleProcess(str(short_dir / "source.api")) as source:
        source.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
        source.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        state, mem = str(tmp_path / "tpl.vmstate"), str(tmp_path / "tpl.mem")
        create_snapshot(source.api_sock, state, mem)
    client.create_template("fc", "firecracker", mem_file=mem, snapshot_path=state)
    with FcDoubleProcess(str(short_dir / "p.api"), "--fc-version", "1.14") as fc:
        opts = {"api_socket": fc.api_sock, "snapshots": True}
        parent = client.create_fork("fc", vmm="firecracker", options=opts)["fork"]
        assert fc.result(wait=30)["bad"] == 0
        fc.api.request("PUT", TEST_PREFIX + "write", {"region": 0, "offset": 40960,
                                                      "length": 3 * 4096, "seed": 9})  # fmt: skip
        snap = client.snapshot_fork(parent, "fc-b")
        assert snap["changed_pages"] == 3 and snap["template"]["parent"] == "fc"
        assert fc.api.request("GET", "/")["state"] == "Running"  # resumed
        fc.api.request("PATCH", "/vm", {"state": "Paused"})
        fc.api.request("PUT", TEST_PREFIX + "dump", {"path": str(tmp_path / "parent.dump")})
        client.release_fork(parent)
    with FcDoubleProcess(str(short_dir / "b.api"), "--fc-version", "1.14") as fc:
        branch = client.create_fork("fc-b", vmm="firecracker", options={"api_socket": fc.api_sock})
        fc.api.request("PATCH", "/vm", {"state": "Paused"})
        fc.api.request("PUT", TEST_PREFIX + "dump", {"path": str(tmp_path / "branch.dump")})
        client.release_fork(branch["fork"])
    parent_ram = (tmp_path / "parent.dump").read_bytes()
    branch_ram = (tmp_path / "branch.dump").read_bytes()
    # Every byte, but the VMGenID that each load (1.8+) writes anew, as Firecracker does.
    genid = slice(VMGENID_OFFSET, VMGENID_OFFSET + VMGENID_SIZE)
    assert branch_ram[genid] != parent_ram[genid]
    assert branch_ram[: genid.start] == parent_ram[: genid.start]
    assert branch_ram[genid.stop :] == parent_ram[genid.stop :]
    assert parent_ram[40960 : 40960 + 3 * 4096] != Path(mem).read_bytes()[40960 : 40960 + 12288]


@needs_uffd
def test_a_snapshot_the_vmm_refuses_leaves_nothing_and_the_fork_running(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    _, client = start_daemon(state_dir=state_dir)
    with FcDoubleProcess(str(short_dir / "source.api")) as source:
        source.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
        source.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        state, mem = str(tmp_path / "tpl.vmstate"), str(tmp_path / "tpl.mem")
        create_snapshot(source.api_sock, state, mem)
    client.create_template("fc", "firecracker", mem_file=mem, snapshot_path=state)
    with FcDoubleProcess(str(short_dir / "p.api"), "--fc-version", "1.12") as fc:
        # No 'snapshots' option: a 1.12 Firecracker has no dirty tracking and refuses a Diff.
        fork = client.create_fork("fc", vmm="firecracker", options={"api_socket": fc.api_sock})
        with pytest.raises(DaemonError, match="Diff snapshots are not enabled") as info:
            client.snapshot_fork(fork["fork"], "fc-b")
        assert info.value.status == 502
        assert fc.api.request("GET", "/")["state"] == "Running"  # resumed after the failure
        assert client.fork(fork["fork"])["phase"] == "live"
        client.release_fork(fork["fork"])
    assert [t["id"] for t in client.templates()["templates"]] == ["fc"]
    assert sorted(p.name for p in (state_dir / "templates").iterdir()) == ["fc"]


def test_a_snapshot_cut_short_by_a_crash_is_removed_when_the_daemon_starts(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    daemon, _ = start_daemon(state_dir=state_dir)
    daemon.close()
    # What a daemon killed mid-snapshot leaves: its work directory, the VMM's half-written diff.
    left = state_dir / "templates" / ".new-snapshot-k1ll3d" / "vm"
    left.mkdir(parents=True)
    (left / "memory.diff").write_bytes(b"\0" * 4096)
    start_daemon(state_dir=state_dir)
    assert not left.parent.exists()
