"""Snapshot a live fork into a child template: pause, capture the layer, register.

:func:`snapshot_fork` is what ``POST /forks/{id}/snapshot`` runs (through
:meth:`pagefork.daemon.manager.ForkManager.snapshot`):

1. the VMM pauses and writes a diff snapshot (:meth:`pagefork.vmm.base.VmmHandle.snapshot`)
   into a work directory under ``templates/`` (``.new-snapshot-*``: a crash leaves nothing
   the next daemon does not remove);
2. :func:`pagefork.layers.capture.capture_layer` turns it into a layer over ``parent``: the
   pages that really changed, and the ranges the page server saw removed since the fork's
   previous snapshot;
3. the registry registers the child (:meth:`~pagefork.templates.TemplateRegistry.create_child`),
   flattened before it appears if its chain would grow past ``max_layer_depth``, or past the
   most layers a chain may have (:attr:`~pagefork.templates.TemplateRegistry.max_depth`, 200)
   when no depth is set: a fork's snapshots never run into that limit once the VMM has
   written its diff (a refusal then would lose the diff, and with it every later snapshot of
   the fork). A failure leaves no child.

A diff snapshot holds only the pages written since the VMM's previous one (KVM's dirty log is
cleared as it is read; Firecracker's ``Diff`` is relative to its last snapshot). So ``parent``
is the fork's template for its first snapshot and its previous child for every later one, a
diff chain as Firecracker's own; the caller (:meth:`pagefork.daemon.manager.ForkManager.snapshot`)
keeps track, and ``on_taken`` tells it when the VMM has written its diff: from then on a
failure loses those writes for good.

The work directory is removed whatever happens. The caller resumes (or releases) the fork.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pagefork.errors import VmmError
from pagefork.layers.capture import capture_layer
from pagefork.server import PageServer
from pagefork.templates import TemplateRecord, TemplateRegistry
from pagefork.vmm.base import VmmHandle

#: The layer's file name inside the work directory (the registry places it as its own).
_LAYER = "layer.pfl"


@dataclass(frozen=True)
class SnapshotResult:
    """A child template registered from a fork, and what its snapshot cost."""

    template: TemplateRecord
    dirty_pages: int
    changed_pages: int
    zero_pages: int
    layer_bytes: int
    pause_seconds: float
    capture_seconds: float
    seconds: float
    #: Every mem-file range the fork had removed when paused (the next snapshot's starting point).
    removed: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The API's ``snapshot`` object."""
        return {
            "dirty_pages": self.dirty_pages,
            "changed_pages": self.changed_pages,
            "zero_pages": self.zero_pages,
            "layer_bytes": self.layer_bytes,
            "pause_seconds": self.pause_seconds,
            "capture_seconds": self.capture_seconds,
            "seconds": self.seconds,
        }


def _check_vmstate(path: str, work: str) -> None:
    """The VM state must be a regular file or a directory of regular files inside the work
    directory, none a link: the VMM wrote it, and the registry keeps what it finds there."""
    inside = os.path.realpath(path).startswith(os.path.realpath(work) + os.sep)
    entries = [path]
    if inside and stat.S_ISDIR(os.lstat(path).st_mode):
        entries += [os.path.join(path, name) for name in os.listdir(path)]
    for entry in entries:
        mode = os.lstat(entry).st_mode
        if not inside or not (stat.S_ISREG(mode) or (entry == path and stat.S_ISDIR(mode))):
            raise VmmError(f"snapshot: the VMM left {entry} as its VM state: not a regular file")


def ranges_minus(
    ranges: Sequence[tuple[int, int]], taken: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of ``ranges`` not in any of ``taken`` (both merged and in
    order, as :meth:`PageServer.removed_ranges` gives them)."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        for t_start, t_end in taken:
            if t_end <= start or t_start >= end:
                continue
            if t_start > start:
                out.append((start, t_start))
            start = max(start, t_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def snapshot_fork(
    *,
    fork_id: str,
    handle: VmmHandle,
    server: PageServer,
    parent: TemplateRecord,
    registry: TemplateRegistry,
    template_id: str,
    timeout: float,
    max_layer_depth: int | None = None,
    removed_before: Sequence[tuple[int, int]] = (),
    on_taken: Callable[[], None] | None = None,
) -> SnapshotResult:
    """Snapshot the fork served by ``server`` as ``template_id``, a layer over ``parent``
    (what the fork's memory was at its VMM's previous snapshot: see the module docstring).
    ``removed_before``: the removed ranges that ``parent`` already holds as zeros."""
    t0 = time.monotonic()
    registry.root.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(dir=registry.root, prefix=".new-snapshot-")
    try:
        # The VMM writes into a directory of its own; the layer goes beside it.
        vm_dir = os.path.join(work, "vm")
        os.mkdir(vm_dir, 0o700)
        snap = handle.snapshot(vm_dir, timeout)
        if on_taken is not None:
            on_taken()
        t_paused = time.monotonic()
        removed = server.removed_ranges(fork_id)
        captured = capture_layer(
            snap.memory_diff,
            parent_chain=[parent.mem_file, *parent.layers],
            # A range removed before the previous snapshot is zero (or rewritten) in the
            # parent already; only what was removed since is news. (A range removed again
            # after it was rewritten is indistinguishable in the ledger: it keeps its data.)
            removed=ranges_minus(removed, removed_before),
            out_path=os.path.join(work, _LAYER),
            parent_name=parent.id,
        )
        # The diff is in the layer now; a microVM's vmstate directory must not carry it on.
        os.unlink(snap.memory_diff)
        _check_vmstate(snap.vmstate, work)
        child = registry.create_child(
            template_id,
            parent.id,
            os.path.join(work, _LAYER),
            snap.vmstate,
            # Never refused for depth: past the limit the chain is flattened instead.
            flatten_past=registry.max_depth if max_layer_depth is None else max_layer_depth,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SnapshotResult(
        template=child,
        dirty_pages=captured.dirty_pages,
        changed_pages=captured.changed_pages,
        zero_pages=captured.zero_pages,
        layer_bytes=captured.info.bytes,
        pause_seconds=t_paused - t0,
        capture_seconds=captured.seconds,
        seconds=time.monotonic() - t0,
        removed=tuple(removed),
    )
