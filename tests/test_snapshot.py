"""Snapshots of running forks: KVM dirty logging, capture into a layer, and forks of the child.

The correctness check is byte for byte: a fork of the child template reads, at every page of
guest RAM, exactly what the snapshotted fork held when it was paused: template bytes it never
touched, its own writes, and zeros where it removed memory. Both sides are real microVM
processes, their RAM served over real uffds by real page servers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import KVM_MISSING, open_fds
from pagefork.errors import VmmError
from pagefork.layers.capture import CaptureError, capture_layer, data_extents, zero_runs
from pagefork.layers.format import LayerFile
from pagefork.regions import PAGE_SIZE
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm import guest
from pagefork.vmm.kvm.process import ForkProcess
from pagefork.vmm.kvm.snapshot import MEMORY_DIFF_FILE
from pagefork.vmm.kvm.template import MEM_FILE, Template, TemplateSpec, build_template
from pagefork.vmm.kvm.trace import TraceSpec

SMALL = TemplateSpec(mem_size=8 << 20, variants=2, trace=TraceSpec(working_set=0.10, seed=11))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    if KVM_MISSING is not None:
        pytest.skip(KVM_MISSING)
    tpl = build_template(tmp_path_factory.mktemp("kvm") / "template", SMALL)
    yield tpl
    tpl.close()


def _server(mem_file: Path, socket_dir: Path, layers: tuple[str, ...] = ()) -> PageServer:
    config = ServerConfig(
        mem_file_path=str(mem_file), socket_dir=str(socket_dir), layers=layers, workers=1
    )
    return PageServer(config)


# --- pure parts -------------------------------------------------------------------------------


def test_zero_runs_leave_out_pages_written_after_their_removal() -> None:
    removed = [(0, 8 * PAGE_SIZE), (20 * PAGE_SIZE, 22 * PAGE_SIZE)]
    dirty = [(2, 4), (7, 9), (21, 30)]
    assert zero_runs(removed, dirty) == [(0, 2), (4, 3), (20, 1)]


def test_data_extents_skip_holes(tmp_path: Path) -> None:
    path = tmp_path / "diff"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 64 * PAGE_SIZE)
        os.pwrite(fd, b"x" * PAGE_SIZE, 3 * PAGE_SIZE)
        os.pwrite(fd, bytes(2 * PAGE_SIZE), 40 * PAGE_SIZE)  # written zeros are data too
        assert data_extents(fd, 64 * PAGE_SIZE, str(path)) == [(3, 4), (40, 42)]
    finally:
        os.close(fd)


def test_capture_refuses_a_diff_of_another_size(template: Template, tmp_path: Path) -> None:
    diff = tmp_path / "diff"
    with open(diff, "wb") as f:
        f.truncate(template.mem_size + PAGE_SIZE)
    with pytest.raises(CaptureError, match=r"diff snapshot .*diff: \d+ bytes, but the template"):
        capture_layer(
            str(diff),
            parent_chain=[str(template.mem_file)],
            removed=[],
            out_path=str(tmp_path / "layer"),
        )
    assert not (tmp_path / "layer").exists()


def test_capture_refuses_a_diff_that_is_a_link_or_a_fifo(
    template: Template, tmp_path: Path
) -> None:
    link, fifo = tmp_path / "link", tmp_path / "fifo"
    link.symlink_to(template.mem_file)  # the right size, yet not the VMM's to hand over
    os.mkfifo(fifo)
    for path, why in ((link, "is a symbolic link"), (fifo, "FIFO")):
        with pytest.raises(CaptureError, match=why):
            capture_layer(
                str(path),
                parent_chain=[str(template.mem_file)],
                removed=[],
                out_path=str(tmp_path / "layer"),
            )
    assert not (tmp_path / "layer").exists()


# --- KVM: dirty logging, capture, and forks of the child ----------------------------------------


def _written_and_read(template: Template, variant: int) -> tuple[list[int], list[int]]:
    (reads, writes), *_ = template.slice_pages(variant)
    return reads, writes


def test_a_fork_of_the_snapshot_reads_every_page_as_the_paused_fork_held_it(
    template: Template, tmp_path: Path
) -> None:
    mem = template.path / MEM_FILE
    reads, writes = _written_and_read(template, 0)
    rewritten = sorted(set(reads) & set(writes))
    assert rewritten, "the trace must rewrite pages it read (the state a branch sees)"
    # A range to remove: a written page and three non-zero template pages after it that the
    # fork never touched.
    touched = template.touched_pages(0)
    remove_len = 4 * PAGE_SIZE
    victim = next(
        w
        for w in sorted(writes)
        if all(
            w + k * PAGE_SIZE not in touched
            and template.read_bytes(w + k * PAGE_SIZE, PAGE_SIZE) != bytes(PAGE_SIZE)
            for k in (1, 2, 3)
        )
    )
    removed_template = template.read_bytes(victim, remove_len)
    assert removed_template != bytes(remove_len)
    fds = open_fds()  # the template's own view of its mem-file is open from here on

    snap_dir = tmp_path / "child"
    snap_dir.mkdir()
    with _server(mem, tmp_path) as base:
        sock = base.register_fork("parent")
        parent = ForkProcess(str(template.path), sock, 0, snapshots=True)
        try:
            parent.wait_restored()
            parent.go()
            result = parent.wait_result()
            assert result.checksum_ok
            parent.command(f"remove {victim:#x} {remove_len:#x}", "removed")
            snap = parent.snapshot(str(snap_dir))
            removed = base.removed_ranges("parent")
            parent.command(f"dump {tmp_path / 'parent.dump'}", "dumped")
        finally:
            parent.close()
    # KVM logged exactly the pages the guest wrote (the write phase), not the served ones.
    assert snap["dirty_pages"] == len(set(writes))
    off = template.file_offset(victim)
    assert removed == [(off, off + remove_len)]

    layer_path = str(tmp_path / "child.layer")
    captured = capture_layer(
        snap["memory_diff"], parent_chain=[str(mem)], removed=removed, out_path=layer_path
    )
    assert captured.dirty_pages == len(set(writes))
    # The removed range: three zero runs from the ledger, and the written page in it, dirty,
    # captured as the zeros it now holds (a zero page costs no data in a layer).
    assert captured.zero_pages == 3
    assert captured.changed_pages == len(set(writes))
    with LayerFile(layer_path) as layer:
        assert (layer.pages, layer.zero_pages) == (len(set(writes)) - 1, 4)

    with _server(mem, tmp_path, layers=(layer_path,)) as child_server:
        sock = child_server.register_fork("branch")
        branch = ForkProcess(str(snap_dir), sock, 0, snapshots=True, memory=[str(mem), layer_path])
        try:
            branch.wait_restored()
            branch.command(f"dump {tmp_path / 'branch.dump'}", "dumped")
            branch.go()
            branched = branch.wait_result()
        finally:
            branch.close()

    parent_ram = (tmp_path / "parent.dump").read_bytes()
    branch_ram = (tmp_path / "branch.dump").read_bytes()
    assert len(branch_ram) == len(parent_ram) == template.mem_size
    bad = [
        p for p in range(0, len(parent_ram), PAGE_SIZE)
        if parent_ram[p : p + PAGE_SIZE] != branch_ram[p : p + PAGE_SIZE]
    ]  # fmt: skip
    assert bad == []
    base_ram = mem.read_bytes()
    # Its writes, the removed range as zeros, and template bytes where it did nothing.
    w = template.file_offset(rewritten[0]) + guest.WRITE_OFFSET
    assert branch_ram[w : w + 4] != base_ram[w : w + 4]
    assert branch_ram[off : off + remove_len] == bytes(remove_len)
    untouched = template.file_offset(guest.SCRATCH_GPA)
    assert branch_ram[untouched : untouched + PAGE_SIZE] == base_ram[untouched : untouched + 4096]
    # The branch resumed at the parent's halt and walked memory as the parent left it: its
    # checksum is the one over the child (checked in the fork), not the template's.
    assert branched.checksum_ok and branched.pages_ok
    assert branched.checksums != result.checksums
    # Servers, fork processes, the diff, the layers: every fd they took is closed again.
    left = {fd for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert [os.readlink(f"/proc/self/fd/{fd}") for fd in left] == []


def test_a_failed_snapshot_command_leaves_the_fork_as_it_was(
    template: Template, tmp_path: Path
) -> None:
    with _server(template.path / MEM_FILE, tmp_path) as server:
        sock = server.register_fork("f")
        fork = ForkProcess(str(template.path), sock, 0, snapshots=True)
        try:
            fork.wait_restored()
            (tmp_path / "nodir").write_text("a file")
            with pytest.raises(VmmError, match=r"snapshot directory .*nodir: not a directory"):
                fork.snapshot(str(tmp_path / "nodir"))
            # The fork stays as it was: a later snapshot works (into a path with a space),
            # with nothing dirty yet.
            (tmp_path / "s p").mkdir()
            snap = fork.snapshot(str(tmp_path / "s p"))
            assert snap["dirty_pages"] == 0
            assert os.path.getsize(tmp_path / "s p" / MEMORY_DIFF_FILE) == template.mem_size
            with pytest.raises(VmmError, match="unknown command 'bogus'"):
                fork.command("bogus", "snapshot")
        finally:
            fork.close()


def test_a_snapshot_of_a_branch_stacks_a_second_layer_read_byte_for_byte(
    template: Template, tmp_path: Path
) -> None:
    """A fork of a child, snapshotted: its layer sits over the child's (the capture reads the
    parent chain through both), and a fork of the grandchild reads what that fork held."""
    mem = str(template.path / MEM_FILE)
    chain = [mem]
    directory = template.path
    for depth in (1, 2):
        out = tmp_path / f"gen{depth}"
        out.mkdir()
        with _server(Path(mem), tmp_path, layers=tuple(chain[1:])) as server:
            sock = server.register_fork(f"g{depth}")
            fork = ForkProcess(str(directory), sock, 1, snapshots=True, memory=chain)
            try:
                fork.wait_restored()
                fork.go()
                assert fork.wait_result().checksum_ok  # against the chain it was forked from
                snap = fork.snapshot(str(out))
                fork.command(f"dump {tmp_path / f'held{depth}.dump'}", "dumped")
                removed = server.removed_ranges(f"g{depth}")
            finally:
                fork.close()
        layer = str(out / "layer.pfl")
        captured = capture_layer(
            snap["memory_diff"], parent_chain=chain, removed=removed, out_path=layer
        )
        assert captured.changed_pages > 0
        chain = [*chain, layer]
        directory = out
    with _server(Path(mem), tmp_path, layers=tuple(chain[1:])) as server:
        sock = server.register_fork("reader")
        reader = ForkProcess(str(directory), sock, 1, snapshots=True, memory=chain)
        try:
            reader.wait_restored()
            reader.command(f"dump {tmp_path / 'read.dump'}", "dumped")
        finally:
            reader.close()
    held = (tmp_path / "held2.dump").read_bytes()
    assert (tmp_path / "read.dump").read_bytes() == held
    # The second walk rewrote what the first wrote: the layers really stack.
    assert held != (tmp_path / "held1.dump").read_bytes()


def test_capture_over_a_layered_chain_keeps_exactly_the_pages_that_differ(
    tmp_path: Path,
) -> None:
    """No KVM: a diff over a base plus one layer. Pages equal to what the chain reads (the
    layer's data, its zeros, or the base beneath) are dropped; the rest, and the removed
    ranges, make a layer that reads back as the diff's owner held memory."""
    import random

    from pagefork.layers.format import write_layer
    from pagefork.layers.source import open_reader

    npages = 512
    rng = random.Random(7)
    base = tmp_path / "base"
    base.write_bytes(rng.randbytes(npages * PAGE_SIZE))
    lower = str(tmp_path / "lower.pfl")
    lower_pages = {p: rng.randbytes(PAGE_SIZE) for p in range(0, 200, 3)}
    write_layer(lower, size=npages * PAGE_SIZE, pages=lower_pages.items(), zero_runs=[(300, 20)])
    parent = open_reader([str(base), lower])
    held = {p: parent.read_page(p) for p in range(npages)}
    # What the fork wrote: dense runs, a sparse tail, some pages rewritten as they were.
    written = {p: rng.randbytes(PAGE_SIZE) for p in [*range(10, 90), *range(295, 330, 2), 500]}
    same = [12, 31, 302, 305]  # a layer page, a base page, two zero pages: written unchanged
    for p in same:
        written[p] = held[p]
    diff = tmp_path / "diff"
    with open(diff, "wb") as f:
        f.truncate(npages * PAGE_SIZE)
        for p, data in written.items():
            f.seek(p * PAGE_SIZE)
            f.write(data)
    removed = [(400 * PAGE_SIZE, 410 * PAGE_SIZE), (500 * PAGE_SIZE, 502 * PAGE_SIZE)]
    out = str(tmp_path / "top.pfl")
    got = capture_layer(str(diff), parent_chain=[str(base), lower], removed=removed, out_path=out)
    assert got.dirty_pages == len(written)
    assert got.changed_pages == len(written) - len(same)
    assert got.zero_pages == 10 + 1  # page 500 was written after its removal: data
    held.update(written)
    held.update({p: bytes(PAGE_SIZE) for p in [*range(400, 410), 501]})
    child = open_reader([str(base), lower, out])
    try:
        assert [p for p in range(npages) if child.read_page(p) != held[p]] == []
    finally:
        for reader in (parent, child):
            getattr(reader, "close", lambda: None)()


def test_a_snapshot_asked_for_during_the_walk_is_taken_at_its_halt(
    template: Template, tmp_path: Path
) -> None:
    """One thread waits for the fork's result while another asks for a snapshot: the command
    waits for the halt, and each thread gets its own answer."""
    import threading

    _reads, writes = _written_and_read(template, 0)
    with _server(template.path / MEM_FILE, tmp_path) as server:
        fork = ForkProcess(str(template.path), server.register_fork("f"), 0, snapshots=True)
        try:
            fork.wait_restored()
            fork.go()
            results: list[object] = []
            waiter = threading.Thread(target=lambda: results.append(fork.wait_result()))
            waiter.start()
            snap = fork.snapshot(str(tmp_path))
            waiter.join(60)
            assert not waiter.is_alive()
        finally:
            fork.close()
    assert snap["dirty_pages"] == len(set(writes))  # the whole walk: taken at the halt
    assert len(results) == 1 and getattr(results[0], "checksum_ok", False)


def test_a_chain_whose_layer_is_for_another_memory_size_is_refused(tmp_path: Path) -> None:
    from pagefork.layers.capture import ChainPages
    from pagefork.layers.format import write_layer

    base = tmp_path / "base"
    base.write_bytes(bytes(8 * PAGE_SIZE))
    layer = str(tmp_path / "l.pfl")
    write_layer(layer, size=16 * PAGE_SIZE, pages=[(9, b"x" * PAGE_SIZE)])
    with pytest.raises(CaptureError, match=r"layer .*l\.pfl is for 65536 bytes of memory, but"):
        ChainPages([str(base), layer])
