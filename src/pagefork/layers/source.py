"""A layered template as one composite view: what every worker maps, so faults cost the same.

A chain is a base mem-file and layers over it, bottom first. :class:`LayeredView` resolves the
chain once, in the supervisor, into:

- *segments*: (view offset, length, layer, file offset) runs of pages that come from a layer
  (the topmost layer that has a page wins; adjacent pages of one layer, stored adjacently,
  make one segment), and zero segments: pages in a zero run of a layer above any data;
- a composite zero-page index: base zero pages, minus pages a layer gives data, plus zero runs.

Each worker maps the base as for a plain mem-file and then maps every segment over it with
``MAP_FIXED`` (:func:`map_view`): the layer file's pages, or anonymous memory for zero
segments. The fault path reads ``view + offset`` as before: O(1), with no cost per layer. A
zero segment is mapped as zero memory and not only marked in the zero index, so a prefetch
copy that runs over it can never pick up the parent's bytes.

Every mapping costs the worker a kernel VMA, and a process may hold ``vm.max_map_count`` of
them (65530 by default). A chain with more segments than :func:`max_segments` allows is
*materialized* instead: the composite is written once into a memfd that workers map as a plain
mem-file (it costs the template's size in shared memory). ``pagefork templates flatten``
makes such a chain cheap again.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import re
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from pagefork import libc
from pagefork.errors import MemFileError
from pagefork.files import atomic_save
from pagefork.layers.format import LAYER_PAGE, LayerError, LayerFile, PageReader, check_parent
from pagefork.memfile import MemFile
from pagefork.regions import Region

#: The most layers in one chain (a layer index must fit a byte of the resolution map).
MAX_DEPTH = 200
_BASE, _ZERO = 255, 254
_ZERO_RE = re.compile(b"\xfe+")
#: In a segment record, the file number of a zero segment.
ZERO_FILE = (1 << 64) - 1
#: VMAs kept free for the worker's own mappings (interpreter, libraries, buffers).
_VMA_RESERVE = 4096
_COPY_CHUNK = 1 << 20


def max_segments() -> int:
    """How many segments a worker may map: each can split the base mapping, so it costs up to
    two VMAs, and the worker keeps :data:`_VMA_RESERVE` for itself."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = 65530
    return max(0, (limit - _VMA_RESERVE) // 2)


class LayeredView(MemFile):
    """The composite of a base mem-file and layers, as a :class:`~pagefork.memfile.MemFile`.

    ``fd``, ``size``, :meth:`zero_index_fd` and :meth:`is_zero` describe the composite, so the
    supervisor uses it as a mem-file; :meth:`layout_fds` is what a worker needs besides the
    base to map it. :meth:`read_page` reads a page as a fork would (a
    :class:`~pagefork.layers.format.PageReader`). With no layers it is the base mem-file.
    ``materialized`` is true when the chain had too many segments to map and was copied whole
    into a memfd. ``scan=False`` skips reading the whole base for its zero pages: for a reader
    that never serves faults (:func:`open_reader`, flatten). Every layer page the view maps
    is checked against its CRC-32 once, here, so that a corrupt page never reaches a guest and
    the fault path checks nothing; ``verify=False`` skips that, for a reader whose every read
    is checked anyway (:meth:`read_page`). Errors are one line naming the file
    (:class:`LayerError`, :class:`~pagefork.errors.MemFileError`).
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        layers: Sequence[str | os.PathLike[str]] = (),
        *,
        segment_limit: int | None = None,
        scan: bool = True,
        verify: bool = True,
    ) -> None:
        super().__init__(base, mapped=False, scan=scan)
        self.layers: list[LayerFile] = []
        self._view_fd = -1
        self.materialized = False
        try:
            if len(layers) > MAX_DEPTH:
                raise LayerError(
                    f"template over {self.path}: {len(layers)} layers, more than {MAX_DEPTH}"
                )
            for path in layers:
                layer = LayerFile(path)
                self.layers.append(layer)
                if layer.size != self.size:
                    raise LayerError(
                        f"layer {layer.path}: its memory is {layer.size} bytes, but the "
                        f"mem-file {self.path} has {self.size}"
                    )
                check_parent(
                    layer,
                    self.fd,
                    str(self.path),
                    self.layers[-2] if len(self.layers) > 1 else None,
                )
            if self.layers:
                self._resolve()
                limit = max_segments() if segment_limit is None else segment_limit
                if len(self.segments) > limit:
                    self._materialize()  # reads every page through read_page: checked
                elif verify:
                    self._verify_segments()
        except BaseException:
            self.close()
            raise

    def _resolve(self) -> None:
        npages = self.size // LAYER_PAGE
        owner = bytearray(b"\xff") * npages  # which layer a page comes from (or base / zero)
        slot = array.array("q", bytes(8 * npages))
        for n, layer in enumerate(self.layers):
            for k, page in enumerate(layer.index):
                owner[page] = n
                slot[page] = k
            for first, count in layer.zero_runs:
                owner[first : first + count] = b"\xfe" * count
        # Data segments: the surviving data pages in page order, coalesced where both the
        # pages and their places in the file are adjacent.
        pages = sorted({p for layer in self.layers for p in layer.index})
        segments: list[tuple[int, int, int, int]] = []  # (first page, count, layer, slot)
        zeros = self._zeros
        for page in pages:
            n = owner[page]
            if n >= _ZERO:
                continue
            zeros[page] = 0  # a layer's data page: whatever the base held there
            k = slot[page]
            if segments:
                first, count, ln, lk = segments[-1]
                if ln == n and first + count == page and lk + count == k:
                    segments[-1] = (first, count + 1, n, lk)
                    continue
            segments.append((page, 1, n, k))
        zero_segments = [(m.start(), m.end() - m.start()) for m in _ZERO_RE.finditer(owner)]
        for first, count in zero_segments:
            zeros[first : first + count] = b"\x01" * count
        self._owner = owner
        self._slot = slot
        #: (first page, count, layer number or None for zero, its first data page's slot in
        #: the layer), in page order.
        self.segments: list[tuple[int, int, int | None, int]] = sorted(
            [(f, c, n, k) for f, c, n, k in segments] + [(f, c, None, 0) for f, c in zero_segments]
        )

    def _verify_segments(self) -> None:
        """Check every layer page the view maps (pages a higher layer hides reach no guest)."""
        for _first, count, n, k in self.segments:
            if n is not None:
                self.layers[n].verify_slots(k, count)

    def _materialize(self) -> None:
        fd = os.memfd_create("pagefork-composite", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                _write_composite(self, f)
            os.fchmod(fd, 0o400)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd = fd
        self.materialized = True
        self.segments = []

    def layout_fds(self) -> tuple[int, ...]:
        """What a worker needs to map the view over the base: a memfd of segment records then
        every layer's fd (empty with no layers or when materialized)."""
        if not self.layers or self.materialized:
            return ()
        if self._view_fd < 0:
            records = array.array("Q")
            for first, count, n, k in self.segments:
                records.extend(
                    (
                        first * LAYER_PAGE,
                        count * LAYER_PAGE,
                        ZERO_FILE if n is None else n,
                        0 if n is None else LayerFile.data_offset(k),
                    )
                )
            fd = os.memfd_create("pagefork-view", os.MFD_CLOEXEC)
            try:
                _write_all(fd, records.tobytes())
                os.fchmod(fd, 0o400)
            except BaseException:
                os.close(fd)
                raise
            self._view_fd = fd
        return (self._view_fd, *(layer.fd for layer in self.layers))

    def read_page(self, index: int) -> bytes:
        """The 4096 bytes a fork of this chain reads at page ``index``."""
        if not 0 <= index < (self.size + LAYER_PAGE - 1) // LAYER_PAGE:
            raise LayerError(f"template over {self.path}: page {index} is outside the memory")
        if self.layers and not self.materialized:
            n = self._owner[index]
            if n == _ZERO:
                return bytes(LAYER_PAGE)
            if n != _BASE:
                return self.layers[n].read_slot(self._slot[index])
        data = os.pread(self.fd, LAYER_PAGE, index * LAYER_PAGE)
        if len(data) < LAYER_PAGE and (index + 1) * LAYER_PAGE <= self.size:
            raise MemFileError(f"mem-file {self.path}: shrank while being read")
        return data.ljust(LAYER_PAGE, b"\0")

    def __enter__(self) -> LayeredView:
        return self

    def close(self) -> None:
        """Close the base, the layers and the view's memfd; idempotent."""
        for layer in self.layers:
            layer.close()
        if self._view_fd >= 0:
            os.close(self._view_fd)
            self._view_fd = -1
        super().close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_composite(view: LayeredView, f: BinaryIO) -> None:
    """Write every byte a fork of ``view`` reads, in order (the size is kept exactly)."""
    npages = (view.size + LAYER_PAGE - 1) // LAYER_PAGE
    per_chunk = _COPY_CHUNK // LAYER_PAGE
    for start in range(0, npages, per_chunk):
        end = min(npages, start + per_chunk)
        chunk = b"".join(view.read_page(p) for p in range(start, end))
        f.write(chunk[: view.size - start * LAYER_PAGE])


def flatten(base: str, layers: Sequence[str], out: str) -> int:
    """Write the chain (``base`` and ``layers``, bottom first) as one mem-file at ``out``,
    atomically; returns its size. ``out`` must not be one of the chain's files."""
    names = {os.path.realpath(p) for p in (base, *layers)}
    if os.path.realpath(out) in names:
        raise LayerError(f"flatten: {out} is part of the chain it would replace")
    with LayeredView(base, layers, segment_limit=1 << 62, scan=False, verify=False) as view:
        atomic_save(out, lambda f: _write_composite(view, f), "mem-file", error=LayerError)
        return view.size


def open_reader(template_chain: Sequence[str]) -> PageReader:
    """A reader of what a fork of a chain reads: ``template_chain`` is the base mem-file path
    then the layer paths, bottom first (each page read is checked). Close it with
    ``close()`` when done."""
    return LayeredView(template_chain[0], template_chain[1:], scan=False, verify=False)


def removed_file_ranges(
    removed: Iterable[tuple[int, int]], regions: Sequence[Region]
) -> list[tuple[int, int]]:
    """Host address ranges a guest removed, as merged mem-file byte ranges ``[start, end)``
    (the parts outside every region are dropped)."""
    out: list[tuple[int, int]] = []
    for start, end in removed:
        for r in regions:
            a, b = max(start, r.base), min(end, r.end)
            if a < b:
                out.append((r.offset + a - r.base, r.offset + b - r.base))
    out.sort()
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def map_view(address: int, layout_fds: Sequence[int]) -> None:
    """In a worker: map the segments over the base mapped at ``address`` (``layout_fds`` as
    :meth:`LayeredView.layout_fds` gave them). Closes the fds. Raises ``OSError``."""
    try:
        view_fd, *files = layout_fds
        records = array.array("Q")
        records.frombytes(os.pread(view_fd, os.fstat(view_fd).st_size, 0))
        fixed = mmap.MAP_SHARED | _MAP_FIXED
        zero = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
        for i in range(0, len(records), 4):
            offset, length, n, file_offset = records[i : i + 4]
            if n == ZERO_FILE:
                # Anonymous memory never written reads zero: a prefetch copy over a zero run
                # then copies zeros, never the parent's bytes.
                _mmap_fixed(address + offset, length, zero, -1, 0)
            else:
                _mmap_fixed(address + offset, length, fixed, files[n], file_offset)
    finally:
        for fd in layout_fds:
            os.close(fd)


_MAP_FIXED = 0x10


def _mmap_fixed(address: int, length: int, flags: int, fd: int, offset: int) -> None:
    got = libc.LIBC.mmap(address, length, mmap.PROT_READ, flags, fd, offset)
    if got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a layer segment: {os.strerror(err)}")


__all__ = [
    "MAX_DEPTH",
    "LayeredView",
    "flatten",
    "map_view",
    "max_segments",
    "open_reader",
    "removed_file_ranges",
]
