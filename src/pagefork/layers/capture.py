"""Capture a layer from a paused fork: the pages it changed, and the ranges it removed.

Both VMMs hand over the same thing, a *diff snapshot*: a sparse memory file as big as guest
RAM (mem-file offsets) that holds data only at the pages the guest wrote since its restore.
Firecracker writes one on ``PUT /snapshot/create`` with ``snapshot_type: "Diff"`` when it was
restored with ``track_dirty_pages: true``; the built-in microVM writes one from KVM's dirty log
(:mod:`pagefork.vmm.kvm.snapshot`). :func:`capture_layer` turns it into a layer:

1. the data extents only (``SEEK_DATA``/``SEEK_HOLE``): a 50 MiB diff of a 4 GiB guest is
   read as 50 MiB, and the holes (pages the guest never wrote) are never read;
2. minus the pages whose bytes equal what the parent chain reads there: a guest that wrote a
   page back as it was (or zeroed a zero page) costs nothing;
3. plus the fork's removed ranges (from the page server's ledger) as zero runs: a ballooned
   range is not "dirty", yet a fork of the child must read it zero, not the parent's bytes. A
   page the guest wrote after removing it is dirty, and its bytes win.

A fork of the resulting child template then reads, at every page, what the snapshotted fork
held: the parent's bytes where it wrote nothing, its writes, and zeros where it removed memory.
"""

from __future__ import annotations

import bisect
import errno
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pagefork.errors import VmmError
from pagefork.files import open_regular
from pagefork.layers.format import (
    LAYER_PAGE,
    LayerFile,
    LayerInfo,
    chain_fingerprint,
    check_parent,
    write_layer,
)

#: Data extents are read in slices of this many bytes.
_READ_CHUNK = 1 << 20
_ZERO_PAGE = bytes(LAYER_PAGE)
#: Extents at most this many pages apart are read in one span (reading a short hole costs
#: less than a syscall here).
_SPAN_GAP = 16


class CaptureError(VmmError):
    """A VMM's diff snapshot cannot be turned into a layer (unreadable, wrong size, torn)."""


@dataclass(frozen=True)
class CaptureResult:
    """What :func:`capture_layer` wrote: ``layer`` (its path and :class:`LayerInfo`),
    ``dirty_pages`` in the diff, how many of them really differ from the parent
    (``changed_pages``, zero pages included), ``zero_pages`` from removed ranges, and the
    ``seconds`` it took."""

    path: str
    info: LayerInfo
    dirty_pages: int
    changed_pages: int
    zero_pages: int
    seconds: float


def data_extents(fd: int, size: int, where: str) -> list[tuple[int, int]]:
    """The data extents of a sparse file as page runs ``(first page, end page)``, by
    ``SEEK_DATA``/``SEEK_HOLE``: the holes are never read."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise CaptureError(f"{where}: {exc.strerror}") from None
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start % LAYER_PAGE or (end % LAYER_PAGE and end != size):
            # A file system with blocks over 4 KiB cannot hold a hole per page: an extent
            # would take in pages the guest never wrote, read zero, and be taken for writes.
            raise CaptureError(
                f"{where}: data extent {start:#x}-{end:#x} is not page aligned (the file "
                "system's blocks are larger than 4 KiB?)"
            )
        if start >= end:
            break
        extents.append((start // LAYER_PAGE, -(-end // LAYER_PAGE)))
        pos = end
    return extents


def _spans(
    extents: Sequence[tuple[int, int]], gap: int, most: int
) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """Extents grouped into spans ``(first, end, extents)`` of at most ``most`` pages whose
    extents lie at most ``gap`` pages apart: one read of a span beats one per extent."""
    group: list[tuple[int, int]] = []
    for first, end in extents:
        while end > first:  # an extent longer than a span is cut
            piece = (first, min(end, first + most))
            if group and (piece[0] - group[-1][1] > gap or piece[1] - group[0][0] > most):
                yield group[0][0], group[-1][1], group
                group = []
            group.append(piece)
            first = piece[1]
    if group:
        yield group[0][0], group[-1][1], group


def _changed_pages(
    fd: int, extents: Sequence[tuple[int, int]], parent: ChainPages, where: str
) -> Iterator[tuple[int, memoryview]]:
    """The diff's data pages whose bytes differ from the parent's. Nearby extents are read
    together, from the diff and from the parent (one ``pread`` each per span; the holes
    between them read as zeros and are skipped): a page costs a comparison, not a syscall."""
    for first, end, group in _spans(extents, _SPAN_GAP, _READ_CHUNK // LAYER_PAGE):
        count = end - first
        data = os.pread(fd, count * LAYER_PAGE, first * LAYER_PAGE)
        if len(data) != count * LAYER_PAGE:
            raise CaptureError(f"{where}: shrank while it was read")
        view = memoryview(data)
        old = memoryview(parent.read_range(first, count))
        for lo, hi in group:
            for page in range(lo, hi):
                at = slice((page - first) * LAYER_PAGE, (page - first + 1) * LAYER_PAGE)
                if view[at] != old[at]:
                    yield page, view[at]


def zero_runs(
    removed: Sequence[tuple[int, int]], dirty: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Removed mem-file byte ranges ``[start, end)`` as page runs ``(first, count)``, minus the
    dirty page runs ``(first, end)`` (a page written after its removal holds data).

    A removed range covers whole pages: the kernel removes pages, never parts of one.
    """
    runs: list[tuple[int, int]] = []
    cuts = sorted(dirty)
    for start, end in sorted(removed):
        lo, hi = start // LAYER_PAGE, -(-end // LAYER_PAGE)
        for d_lo, d_hi in cuts:
            if d_hi <= lo or d_lo >= hi:
                continue
            if d_lo > lo:
                runs.append((lo, d_lo - lo))
            lo = max(lo, d_hi)
            if lo >= hi:
                break
        if lo < hi:
            runs.append((lo, hi - lo))
    return runs


class ChainPages:
    """What a fork of a chain (a base mem-file, then layers, bottom first) reads at a page:
    the topmost layer that has the page (data or zero), else the base by ``pread``. Opening it
    reads only the layers' indexes, never the base: a capture costs the diff, not the guest,
    and a check of a few pages costs those pages. Close it with :meth:`close`."""

    def __init__(self, chain: Sequence[str]) -> None:
        self._base = open_regular(chain[0], "mem-file", error=CaptureError)
        self.size = os.fstat(self._base).st_size
        self._layers: list[tuple[LayerFile, dict[int, int], list[int], list[int]]] = []
        try:
            for path in chain[1:]:
                layer = LayerFile(path)
                if layer.size != self.size:
                    layer.close()
                    raise CaptureError(
                        f"layer {path} is for {layer.size} bytes of memory, but the mem-file "
                        f"{chain[0]} holds {self.size}"
                    )
                below = self._layers[-1][0] if self._layers else None
                try:
                    check_parent(layer, self._base, chain[0], below)
                except BaseException:
                    layer.close()
                    raise
                self._layers.append(
                    (
                        layer,
                        {page: slot for slot, page in enumerate(layer.index)},
                        [first for first, _ in layer.zero_runs],
                        [first + count for first, count in layer.zero_runs],
                    )
                )
        except BaseException:
            self.close()
            raise

    def fingerprint(self) -> bytes:
        """What a layer taken over this chain records of it (its parent fingerprint)."""
        top = self._layers[-1][0] if self._layers else None
        return chain_fingerprint(self._base, self.size, top)

    def _from_layers(self, index: int) -> bytes | None:
        """The page from the topmost layer that has it (data or zero), or None."""
        for layer, slots, firsts, ends in reversed(self._layers):
            slot = slots.get(index)
            if slot is not None:
                return layer.read_slot(slot)
            at = bisect.bisect_right(firsts, index) - 1
            if at >= 0 and index < ends[at]:
                return _ZERO_PAGE
        return None

    def read_page(self, index: int) -> bytes:
        """The 4096 bytes a fork of the chain reads at page ``index``."""
        return self.read_range(index, 1)

    def read_range(self, first: int, count: int) -> bytes:
        """What a fork reads at ``count`` pages from ``first``: one ``pread`` of the base,
        then the pages the layers hold laid over it."""
        data = os.pread(self._base, count * LAYER_PAGE, first * LAYER_PAGE)
        if len(data) != count * LAYER_PAGE:
            raise CaptureError(f"mem-file: shrank below page {first + count}")
        if not self._layers:
            return data
        out = bytearray(data)
        for i in range(count):
            page = self._from_layers(first + i)
            if page is not None:
                out[i * LAYER_PAGE : (i + 1) * LAYER_PAGE] = page
        return bytes(out)

    def close(self) -> None:
        for layer, *_ in self._layers:
            layer.close()
        self._layers.clear()
        if self._base >= 0:
            os.close(self._base)
            self._base = -1


def capture_layer(
    memory_diff: str,
    *,
    parent_chain: Sequence[str],
    removed: Sequence[tuple[int, int]],
    out_path: str,
    parent_name: str | None = None,
) -> CaptureResult:
    """Write the layer of a fork of the template ``parent_chain`` (its base mem-file, then its
    layers, bottom first) at ``out_path`` (atomically) from the fork's diff snapshot
    ``memory_diff`` and its ``removed`` mem-file byte ranges."""
    t0 = time.monotonic()
    # A regular file only (no link, FIFO or device): the VMM that wrote it is a peer.
    if os.path.islink(memory_diff):
        raise CaptureError(f"diff snapshot {memory_diff}: is a symbolic link")
    fd = open_regular(memory_diff, "diff snapshot", error=CaptureError)
    try:
        reader = ChainPages(parent_chain)
    except BaseException:
        os.close(fd)
        raise
    try:
        size = os.fstat(fd).st_size
        if size != reader.size:
            raise CaptureError(
                f"diff snapshot {memory_diff}: {size} bytes, but the template's memory has "
                f"{reader.size}"
            )
        extents = data_extents(fd, size, f"diff snapshot {memory_diff}")
        runs = zero_runs(removed, extents)
        counted = {"changed": 0}

        def changed() -> Iterator[tuple[int, bytes | memoryview]]:
            for page, data in _changed_pages(fd, extents, reader, memory_diff):
                counted["changed"] += 1
                yield page, data

        info = write_layer(
            out_path,
            size=size,
            pages=changed(),
            zero_runs=runs,
            parent=parent_name,
            parent_fingerprint=reader.fingerprint(),
        )
    finally:
        os.close(fd)
        reader.close()
    return CaptureResult(
        path=out_path,
        info=info,
        dirty_pages=sum(end - first for first, end in extents),
        changed_pages=counted["changed"],
        zero_pages=sum(count for _, count in runs),
        seconds=time.monotonic() - t0,
    )


__all__ = [
    "CaptureError",
    "CaptureResult",
    "ChainPages",
    "capture_layer",
    "data_extents",
    "zero_runs",
]
