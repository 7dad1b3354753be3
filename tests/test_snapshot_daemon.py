"""Snapshots through the daemon: ``POST /forks/{id}/snapshot``, the client, and the CLI verb.

The VMMs are built-in microVM processes; the child templates' forks are served their layers by
real page servers, and each guest checks its checksum against the memory it should see.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import StartDaemon, in_thread, needs_kvm, needs_uffd
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
from pagefork.vmm.kvm.driver import KvmDriver, KvmHandle
from pagefork.vmm.kvm.process import ForkProcess
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

    # Resumed, the parent walks on over the memory it left: what a branch must walk to (an
    # oracle independent of the child's layers). A fork of the template still sees the template.
    walk_on = client.wait_fork(parent, timeout=60)["vmm"]
    branch, branch_run = _fork(client, "vm-b")
    base, base_run = _fork(client, "vm")
    assert base_run["checksums"] == parent_run["checksums"]
    assert branch_run["checksums"] == walk_on["checksums"] != parent_run["checksums"]

    for f in (parent, branch, base):
        client.release_fork(f)
    with pytest.raises(DaemonError, match="vm-b"):  # the parent has a child
        client.delete_template("vm")


def _branch_memory(record: dict[str, Any], socket_dir: Path, out: Path) -> bytes:
    """All guest RAM of a fork of the child ``record`` (fork index 0), restored and not yet
    run: its own page server over the child's chain, the fork a microVM process."""
    chain = [record["mem_file"], *record["layers"]]
    config = ServerConfig(
        mem_file_path=chain[0], layers=tuple(chain[1:]), socket_dir=str(socket_dir), workers=1
    )
    with PageServer(config) as server:
        sock = server.register_fork("branch")
        branch = ForkProcess(record["snapshot_path"], sock, 0, snapshots=True, memory=chain)
        try:
            branch.wait_restored()
            branch.command(f"dump {out}", "dumped")
        finally:
            branch.close()
    return out.read_bytes()


def _differing_pages(a: bytes, b: bytes) -> list[int]:
    assert len(a) == len(b)
    return [p for p in range(0, len(a), 4096) if a[p : p + 4096] != b[p : p + 4096]]


@needs_kvm
def test_a_later_snapshot_of_a_fork_is_a_layer_over_its_previous_one(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM's dirty log is cleared as it is read: a later snapshot holds only the writes since
    the one before, so its child is a layer over that one's child. A branch of it holds, at
    every page, what the fork held when paused (its writes before the earlier snapshots too),
    and walks to what the fork itself reported walking on from there."""
    daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    parent, _ = _fork(client, "vm", snapshots=True)
    handle = daemon.manager.fork(parent).handle
    assert isinstance(handle, KvmHandle)
    held: list[bytes] = []
    resume = handle.resume
    # The first snapshot leaves the fork paused (a platform snapshotting twice in a row): the
    # second one's diff is empty. After that the fork resumes and walks on each time.
    resumes = iter([False, True, True])

    def dump_then_resume() -> None:  # what the fork holds while its snapshot pauses it
        path = tmp_path / f"held{len(held)}.dump"
        handle.process.command(f"dump {path}", "dumped")
        held.append(path.read_bytes())
        if next(resumes):
            resume()

    monkeypatch.setattr(handle, "resume", dump_then_resume)
    client.snapshot_fork(parent, "s1")
    two = client.snapshot_fork(parent, "s2")
    # Resumed after the snapshot, the guest walks on: a walk over the memory s2 holds.
    walk_on_s2 = client.wait_fork(parent, timeout=60)["vmm"]
    three = client.snapshot_fork(parent, "s3")
    walk_on_s3 = client.wait_fork(parent, timeout=60)["vmm"]
    assert walk_on_s2["checksum_ok"] and walk_on_s3["checksum_ok"]  # over the fork's own RAM
    s2, s3 = two["template"], three["template"]
    assert (s2["parent"], s3["parent"], len(s3["layers"])) == ("s1", "s2", 3)
    assert two["dirty_pages"] == 0 and three["dirty_pages"] > 0
    assert _differing_pages(held[1], held[2])  # the walk between really changed memory

    for record, memory in ((s2, held[1]), (s3, held[2])):
        branch = _branch_memory(record, short_dir, tmp_path / f"{record['id']}.dump")
        assert _differing_pages(branch, memory) == [], record["id"]
    # The independent oracle: a branch walks to the checksums the fork itself walked to.
    for child, walk in (("s2", walk_on_s2), ("s3", walk_on_s3)):
        fork, run = _fork(client, child)
        assert run["checksums"] == walk["checksums"], child
        client.release_fork(fork)
    client.release_fork(parent)


@needs_kvm
def test_snapshots_of_a_fork_wait_for_each_other_and_stack(start_daemon: StartDaemon) -> None:
    _daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    parent, _ = _fork(client, "vm", snapshots=True)
    runs = [in_thread(lambda c=c: client.snapshot_fork(parent, c)) for c in ("a", "b")]
    for thread, _ in runs:
        thread.join()
    done = [out["result"]["template"] for _, out in runs]
    # Whichever ran second is a layer over the first.
    first, second = sorted(done, key=lambda t: len(t["layers"]))
    assert (first["parent"], second["parent"]) == ("vm", first["id"])
    assert second["layers"][:1] == first["layers"]
    client.release_fork(parent)


@needs_kvm
def test_a_fork_whose_previous_snapshot_was_deleted_refuses_another(
    start_daemon: StartDaemon,
) -> None:
    _daemon, client = start_daemon()
    client.create_template("vm", "kvm", **TEMPLATE)
    parent, _ = _fork(client, "vm", snapshots=True)
    client.snapshot_fork(parent, "s1")
    client.delete_template("s1")
    with pytest.raises(DaemonError, match="previous snapshot, template 's1', was deleted") as info:
        client.snapshot_fork(parent, "s2")
    assert info.value.status == 409
    assert [t["id"] for t in client.templates()["templates"]] == ["vm"]
    assert client.fork(parent)["phase"] == "live"
    client.release_fork(parent)


@contextlib.contextmanager
def _small_tmpfs(point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``point`` (root only): a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@needs_kvm
def test_a_flatten_past_the_depth_that_fails_leaves_no_child(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    with _small_tmpfs(tmp_path / "disk", "40m") as disk:
        daemon, client = start_daemon(state_dir=disk / "state", max_layer_depth=1)
        client.create_template("vm", "kvm", **TEMPLATE)
        a, _ = _fork(client, "vm", snapshots=True)
        one = client.snapshot_fork(a, "one", release=True)
        b, _ = _fork(client, "one", snapshots=True)
        # Room for the snapshot's layer and VM state, none for a flat mem-file of 16 MiB.
        filler = disk / "filler"
        with open(filler, "wb") as f:
            f.write(bytes(os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize))
        os.truncate(filler, os.path.getsize(filler) - 4 * one["layer_bytes"] - (1 << 20))
        with pytest.raises(DaemonError, match=r"template 'two': cannot flatten.*No space") as info:
            client.snapshot_fork(b, "two")
        assert "\n" not in str(info.value)
        # Nothing half made: no child, no work directory; the fork runs on.
        assert [t["id"] for t in client.templates()["templates"]] == ["one", "vm"]
        assert sorted(p.name for p in (disk / "state" / "templates").iterdir()) == ["one", "vm"]
        assert client.fork(b)["phase"] == "live"
        # The VMM's diff is gone with the failed child: a retry would miss those writes.
        filler.unlink()
        with pytest.raises(DaemonError, match="failed after the VMM had written its diff") as info:
            client.snapshot_fork(b, "two")
        assert info.value.status == 409
        client.release_fork(b)
        daemon.close()


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


@needs_kvm
def test_a_snapshot_at_the_layer_limit_is_flattened_and_the_next_one_works(
    start_daemon: StartDaemon,
) -> None:
    """With no --max-layer-depth, a fork's snapshot whose chain would pass the most layers a
    chain may have (2 here, 200 in use) is flattened, not refused after the VMM wrote its
    diff; the fork's later snapshots go on as layers over it."""
    daemon, client = start_daemon()
    daemon.registry.max_depth = 2
    client.create_template("vm", "kvm", **TEMPLATE)
    a, _ = _fork(client, "vm", snapshots=True)
    one = client.snapshot_fork(a, "one")["template"]
    two = client.snapshot_fork(a, "two")["template"]
    assert (len(one["layers"]), len(two["layers"])) == (1, 2)
    three = client.snapshot_fork(a, "three")["template"]
    assert (three["parent"], three["layers"]) == (None, [])  # flattened: one mem-file
    four = client.snapshot_fork(a, "four", release=True)["template"]
    assert (four["parent"], len(four["layers"])) == ("three", 1)
    b, run = _fork(client, "four")  # walks memory as a left it, over the flat file + a layer
    assert run["checksum_ok"]
    client.release_fork(b)


def _fc_template(client: DaemonClient, short_dir: Path, tmp_path: Path) -> str:
    """Template "fc": a snapshot of a started Firecracker double (8 MiB); its mem-file."""
    with FcDoubleProcess(str(short_dir / "source.api")) as source:
        source.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
        source.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        state, mem = str(tmp_path / "tpl.vmstate"), str(tmp_path / "tpl.mem")
        create_snapshot(source.api_sock, state, mem)
    client.create_template("fc", "firecracker", mem_file=mem, snapshot_path=state)
    return mem


@needs_uffd
def test_a_firecracker_fork_snapshotted_through_the_daemon_is_forked_byte_for_byte(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    _, client = start_daemon()
    mem = _fc_template(client, short_dir, tmp_path)
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
def test_a_firecracker_fork_snapshotted_twice_is_forked_byte_for_byte_from_the_second(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    """Firecracker's second Diff holds only the pages written since the first: the second
    child is a layer over the first, and a branch of it holds the first writes too."""
    _, client = start_daemon()
    mem = _fc_template(client, short_dir, tmp_path)
    with FcDoubleProcess(str(short_dir / "p.api"), "--fc-version", "1.14") as fc:
        opts = {"api_socket": fc.api_sock, "snapshots": True}
        parent = client.create_fork("fc", vmm="firecracker", options=opts)["fork"]
        assert fc.result(wait=30)["bad"] == 0
        for seed, offset, child in ((9, 40960, "fc-1"), (10, 1 << 20, "fc-2")):
            write = {"region": 0, "offset": offset, "length": 3 * 4096, "seed": seed}
            fc.api.request("PUT", TEST_PREFIX + "write", write)
            snap = client.snapshot_fork(parent, child)
            assert snap["changed_pages"] == 3  # only the pages written since the last one
        assert snap["template"]["parent"] == "fc-1"
        fc.api.request("PATCH", "/vm", {"state": "Paused"})
        fc.api.request("PUT", TEST_PREFIX + "dump", {"path": str(tmp_path / "parent.dump")})
        client.release_fork(parent)
    with FcDoubleProcess(str(short_dir / "b.api"), "--fc-version", "1.14") as fc:
        branch = client.create_fork("fc-2", vmm="firecracker", options={"api_socket": fc.api_sock})
        fc.api.request("PATCH", "/vm", {"state": "Paused"})
        fc.api.request("PUT", TEST_PREFIX + "dump", {"path": str(tmp_path / "branch.dump")})
        client.release_fork(branch["fork"])
    parent_ram = bytearray((tmp_path / "parent.dump").read_bytes())
    branch_ram = bytearray((tmp_path / "branch.dump").read_bytes())
    # Every byte, but the VMGenID that each load writes anew, as Firecracker does.
    genid = slice(VMGENID_OFFSET, VMGENID_OFFSET + VMGENID_SIZE)
    parent_ram[genid] = branch_ram[genid] = bytes(VMGENID_SIZE)
    assert _differing_pages(bytes(branch_ram), bytes(parent_ram)) == []
    template = Path(mem).read_bytes()
    assert parent_ram[40960 : 40960 + 12288] != template[40960 : 40960 + 12288]


@needs_uffd
def test_a_snapshot_the_vmm_refuses_leaves_nothing_and_the_fork_running(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    _, client = start_daemon(state_dir=state_dir)
    _fc_template(client, short_dir, tmp_path)
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
