"""Branching: snapshot a running microVM fork and fork the snapshot, as ``pagefork demo --branch``
runs it.

1. A *parent* fork of the template, restored with dirty logging (``--snapshots``) and
   prefetched from the template's hot set, walks its trace: the write phase changes guest
   memory (each written page's last word becomes the walk's checksum).
2. At its halt it is snapshotted: KVM's dirty log gives the pages it wrote, and
   :func:`pagefork.layers.capture.capture_layer` turns them (minus pages equal to the template,
   plus the ranges it removed) into a layer. The snapshot time is the pause-and-write in the
   VMM plus the capture.
3. A page server serves the child (the template's mem-file plus that layer), and *branches*
   are forked from it, each prefetched from what a child inherits (its layer's pages, then the
   template's hot set: :class:`pagefork.layers.hotset.InheritedHotSet`). A branch resumes at
   the parent's halt and walks again over memory as the parent left it: its read phase reads
   the words the parent wrote, so its checksum (checked inside the fork against the child's
   memory) differs from the one a fork of the template reports on the same trace.
4. The check is independent of the chain the branches are served from: at its snapshot the
   parent itself answers, from its own memory, the checksums a walk of each branch's trace
   must report (:meth:`~pagefork.vmm.kvm.process.ForkProcess.own_checksums`), and then walks on
   from there, as a VM goes on after a snapshot: its walk must report what it answered for its
   own trace. A page the layer missed makes a branch's walk differ from what the parent said.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagefork.demo.orchestrate import ForkReport, percentile, run_forks
from pagefork.errors import VmmError
from pagefork.hotpages import HotPageList
from pagefork.layers.capture import capture_layer
from pagefork.layers.hotset import InheritedHotSet, chain_data_pages
from pagefork.regions import PAGE_SIZE, Region
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm.process import ForkProcess
from pagefork.vmm.kvm.template import Template, load_template

#: The layer file of the child, inside the snapshot directory.
LAYER_FILE = "layer.pfl"


@dataclass
class Snapshot:
    """A parent fork's snapshot: the child's template directory and layer, what it cost."""

    directory: Path
    layer: str
    parent_checksums: list[int]
    dirty_pages: int
    changed_pages: int
    layer_bytes: int
    pause_ms: float
    capture_ms: float
    #: By fork index: the checksums a branch walking that index's trace must report, as the
    #: parent answered them from its own memory at the snapshot.
    expected: dict[int, list[int]] = field(default_factory=dict)

    @property
    def snapshot_ms(self) -> float:
        """Pause and write in the VMM, plus the capture into a layer."""
        return self.pause_ms + self.capture_ms


@dataclass
class BranchRun:
    """The branches of one snapshot, beside forks of the template on the same traces."""

    snapshot: Snapshot
    branches: list[ForkReport]
    base: list[ForkReport]
    #: Per branch: its checksums differ from those of the template's fork on its trace.
    sees_change: list[bool] = field(default_factory=list)

    @property
    def matches_parent(self) -> list[bool]:
        """Per branch: it walked to the checksums the snapshotted parent said it must."""
        expected = self.snapshot.expected
        return [expected.get(r.fork_index) == r.checksums for r in self.branches]

    def to_dict(self) -> dict[str, Any]:
        """The demo's ``branch`` object. ``checksums_ok``: every branch walked to what the
        snapshotted parent said, from its own memory (not from the chain they are served
        from), and every fork of the template to the template's checksums."""
        s = self.snapshot
        return {
            "checksums_ok": all(r.checksum_ok for r in self.branches)
            and all(self.matches_parent)
            and all(r.checksum_ok for r in self.base),
            "forks": len(self.branches),
            "layer_bytes": s.layer_bytes,
            "snapshot_ms": s.snapshot_ms,
            "ready_ms_p50": percentile([r.ready_ms for r in self.branches], 50),
            "base_ready_ms_p50": percentile([r.ready_ms for r in self.base], 50),
            "dirty_pages": s.dirty_pages,
            "changed_pages": s.changed_pages,
            "snapshot_pause_ms": s.pause_ms,
            "snapshot_capture_ms": s.capture_ms,
            "sees_change": self.sees_change,
            "matches_parent": self.matches_parent,
            "per_fork": [r.to_dict() for r in self.branches],
        }


def snapshot_parent(
    server: PageServer,
    template: Template,
    fork_index: int,
    out_dir: Path,
    hot: HotPageList | None = None,
    timeout: float = 60.0,
    branch_indices: Sequence[int] = (),
) -> Snapshot:
    """Run a parent fork of ``template`` to its halt (prefetched from ``hot`` if given) and
    snapshot it into ``out_dir`` (created), which becomes the child's template directory.
    The parent then answers what branches of ``branch_indices`` must walk to, and walks on
    itself: :class:`VmmError` if that walk disagrees with its own answer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"parent-{fork_index}-{time.monotonic_ns() % 1_000_000_000}"
    sock = server.register_fork(name)
    parent = ForkProcess(str(template.path), sock, fork_index, snapshots=True)
    try:
        server.wait_connected(name, timeout=timeout)
        if hot is not None:
            server.prefetch(name, hot)
        parent.wait_restored(timeout=timeout)
        parent.go()
        result = parent.wait_result(timeout=timeout)
        if not result.checksum_ok:
            raise VmmError(f"parent fork {fork_index}: its walk read wrong bytes")
        t0 = time.monotonic()
        doc = parent.snapshot(str(out_dir), timeout=timeout)
        t1 = time.monotonic()
        captured = capture_layer(
            str(doc["memory_diff"]),
            parent_chain=template.memory_chain,
            removed=server.removed_ranges(name),
            out_path=str(out_dir / LAYER_FILE),
        )
        t2 = time.monotonic()
        os.unlink(doc["memory_diff"])  # in the layer now
        expected = {i: parent.own_checksums(i, timeout) for i in {*branch_indices, fork_index}}
        parent.go()  # walks on: a real walk over the memory it answered from
        walked = parent.wait_result(timeout=timeout)
        if walked.checksums != expected[fork_index]:
            raise VmmError(
                f"parent fork {fork_index}: its walk after the snapshot reported "
                f"{walked.checksums}, but its memory says {expected[fork_index]}"
            )
    finally:
        parent.close()
        server.unregister_fork(name)
    return Snapshot(
        directory=out_dir,
        layer=str(out_dir / LAYER_FILE),
        parent_checksums=result.checksums,
        dirty_pages=captured.dirty_pages,
        changed_pages=captured.changed_pages,
        layer_bytes=captured.info.bytes,
        pause_ms=(t1 - t0) * 1e3,
        capture_ms=(t2 - t1) * 1e3,
        expected=expected,
    )


def child_hot_set(
    template: Template, layers: Sequence[str], hot: HotPageList | None
) -> HotPageList:
    """What a branch is prefetched from before the child has a hot set of its own: the pages
    its layers give data, then the template's hot set (the regions of ``template``'s layout)."""
    regions = [Region(0, r.size, r.file_offset, PAGE_SIZE) for r in template.layout]
    return InheritedHotSet(hot, chain_data_pages(layers)).for_regions(regions)


def run_branches(
    template: Template,
    snapshot: Snapshot,
    indices: Sequence[int],
    base_reports: Sequence[ForkReport],
    socket_dir: str,
    hot: HotPageList | None,
    on_done: Callable[[ForkReport], None] | None = None,
) -> BranchRun:
    """Fork the snapshot once per fork index (prefetched from the inherited hot set), each
    beside ``base_reports``: forks of the template on the same indices, in the same order."""
    memory = (*template.memory_chain, snapshot.layer)
    child = load_template(snapshot.directory, memory)
    config = ServerConfig(
        mem_file_path=memory[0],
        layers=tuple(memory[1:]),
        socket_dir=socket_dir,
        on_failure="kill",
    )
    try:
        child_hot = child_hot_set(template, memory[1:], hot)
        with PageServer(config) as server:
            branches = run_forks(server, child, indices, "prefetch", hot=child_hot, on_done=on_done)
    finally:
        child.close()
    sees = [b.checksums != a.checksums for b, a in zip(branches, base_reports, strict=True)]
    return BranchRun(snapshot, branches, list(base_reports), sees)


def temp_snapshot_dir(workdir: Path) -> Path:
    """A fresh directory for a snapshot under ``workdir``."""
    return Path(tempfile.mkdtemp(prefix="snapshot-", dir=workdir))
