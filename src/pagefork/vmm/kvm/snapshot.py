"""Diff snapshots of a running microVM fork, the way Firecracker takes them.

Firecracker restored with ``track_dirty_pages: true`` writes, on ``PUT /snapshot/create`` with
``snapshot_type: "Diff"``, a *sparse* memory file as big as guest RAM that holds data only at
the pages the guest wrote since the restore; every other page is a hole. The microVM does the
same from KVM's dirty log (``KVM_MEM_LOG_DIRTY_PAGES`` on every slot, ``KVM_GET_DIRTY_LOG``),
so :mod:`pagefork.layers.capture` turns either into a layer with the same code.

The pages are read from our own guest mapping. They are present (the guest wrote them), except
a page written and later removed (``MADV_DONTNEED``): reading that one faults through the page
server, which serves it zero, as it must. This process is not the page server, so such a fault
is only slow, never a deadlock.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pagefork import libc
from pagefork.errors import VmmError
from pagefork.regions import PAGE_SIZE
from pagefork.vmm.kvm import cpustate
from pagefork.vmm.kvm.memory import GuestMemory
from pagefork.vmm.kvm.template import TEMPLATE_FILE, VMSTATE_FILE, vmstate_doc
from pagefork.vmm.kvm.vm import VirtualMachine

#: The diff snapshot's memory file inside the snapshot directory (sparse; mem-file offsets).
MEMORY_DIFF_FILE = "memory.diff"
#: Dirty pages are copied out in runs of at most this many pages per ``pwrite``.
_MAX_RUN = 256


@dataclass(frozen=True)
class DiffSnapshot:
    """What :func:`write_diff_snapshot` wrote: the sparse memory file, the vmstate, and how
    many pages the guest had dirtied."""

    memory_diff: str
    vmstate: str
    dirty_pages: int


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page indexes as (first, count) runs of at most :data:`_MAX_RUN` pages."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p and runs[-1][1] < _MAX_RUN:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def write_diff_snapshot(
    vm: VirtualMachine,
    memory: GuestMemory,
    slots: list[int],
    out_dir: str | os.PathLike[str],
    template_meta: str | os.PathLike[str] | None = None,
) -> DiffSnapshot:
    """Write a diff snapshot of the stopped VM into the existing directory ``out_dir``.

    ``slots`` are the VM's memory slots, one per region of ``memory.layout``, each added with
    dirty logging. The vCPUs must not run: a page written during the copy would be torn.
    ``template_meta`` (the template's ``template.json``: where its traces sit) is copied in, so
    that ``out_dir`` is a template directory of its own once its memory is a layer.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise VmmError(f"snapshot directory {out}: not a directory")
    if template_meta is not None:
        try:
            shutil.copyfile(template_meta, out / TEMPLATE_FILE)
        except OSError as exc:
            raise VmmError(f"{out / TEMPLATE_FILE}: {exc.strerror}") from None
    diff_path = out / MEMORY_DIFF_FILE
    state_path = out / VMSTATE_FILE
    dirty = 0
    fd = os.open(diff_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory.size)  # all hole: pages the guest did not write
        for slot, addr, spec in zip(slots, memory.host_addrs, memory.layout, strict=True):
            pages = vm.dirty_pages(slot)
            dirty += len(pages)
            for first, count in _runs(pages):
                data = ctypes.string_at(addr + first * PAGE_SIZE, count * PAGE_SIZE)
                offset = spec.file_offset + first * PAGE_SIZE
                if os.pwrite(fd, data, offset) != len(data):
                    raise VmmError(f"{diff_path}: short write")
        # No fsync: the diff lives until it is captured; the layer made from it is durable.
    except OSError as exc:
        raise VmmError(f"{diff_path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    vmstate = vmstate_doc(
        memory.layout,
        [
            {
                "regs": cpustate.regs_to_dict(v.get_regs()),
                "sregs": cpustate.sregs_to_dict(v.get_sregs()),
            }
            for v in vm.vcpus
        ],
    )
    try:
        state_path.write_text(json.dumps(vmstate, indent=1))
    except OSError as exc:
        raise VmmError(f"{state_path}: {exc.strerror}") from None
    return DiffSnapshot(str(diff_path), str(state_path), dirty)


def remove_range(memory: GuestMemory, gpa: int, length: int) -> None:
    """Give ``[gpa, gpa + length)`` back, as a balloon does: ``MADV_DONTNEED`` on our mapping.

    The kernel hands the page server a ``UFFD_EVENT_REMOVE`` and waits until it is read. The
    first page is then read once: the server notes a REMOVE before it serves anything after
    it, so once this read returns the range is in the fork's ledger for a snapshot to see.
    """
    if gpa % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
        raise VmmError(f"remove {gpa:#x}+{length:#x}: not whole pages")
    addr = memory.host_address(gpa, length)
    try:
        libc.madvise(addr, length, libc.MADV_DONTNEED)
    except OSError as exc:
        raise VmmError(f"remove {gpa:#x}+{length:#x}: {exc.strerror}") from None
    ctypes.string_at(addr, 1)


def dump_memory(memory: GuestMemory, path: str | os.PathLike[str]) -> None:
    """Write all of guest RAM to ``path``, regions back to back as in the mem-file: what a
    full snapshot stores (every page not yet present faults through the page server)."""
    with open(path, "xb") as f:
        for addr, spec in zip(memory.host_addrs, memory.layout, strict=True):
            for off in range(0, spec.size, 1 << 20):
                f.write(ctypes.string_at(addr + off, min(1 << 20, spec.size - off)))
        f.flush()
        os.fsync(f.fileno())  # as durable as a snapshot: a full copy pays the same
