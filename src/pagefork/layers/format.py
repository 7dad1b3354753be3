"""The layer file: the pages a child template changed over its parent, and the pages now zero.

A layered template is a base mem-file plus an ordered list of layers, bottom first. Each layer
holds the 4 KiB pages that differ from everything below it, and *zero runs*: pages that must
read zero in the child (a range the guest removed, say), whatever the parent holds there.

The file (``PFLAYER2``; ``PFLAYER1`` files, which lack the page checksums, still load) is laid
out so each data page can be mapped where it belongs in guest memory: page *k* of the data area
starts at a page-aligned file offset.

====================  =======================================================================
offset                content
====================  =======================================================================
0                     header: magic ``PFLAYER2``, guest memory ``size``, data page count,
                      zero run count, index offset, parent name length, CRC-32 (of the
                      header with the CRC field zero, the parent name, the parent
                      fingerprint unless it is all zero, and the index)
48                    parent name (UTF-8, at most :data:`MAX_PARENT_BYTES`)
1072                  parent fingerprint: 32 bytes, all zero when the writer gave none
4096                  data area: data page *k* at ``4096 + k * 4096``
index offset          ``pages`` little-endian u64 page numbers (data page *k* is guest page
                      ``index[k]``), then ``zero_runs`` pairs of u64 (first page, count),
                      then (not in ``PFLAYER1``) ``pages`` little-endian u32: the CRC-32 of
                      each data page
====================  =======================================================================

The header's CRC covers the header, parent and index, so it is checked at every open for the
cost of the index alone. The data pages have their own CRC-32 each, in the index: a flipped
bit in a data page would otherwise reach a guest unnoticed. They are checked where a page is
read (:meth:`LayerFile.read_slot`) and, for the pages a page server maps, once when it opens the
chain (:meth:`LayerFile.verify_slots`, from :class:`~pagefork.layers.source.LayeredView`), so
the fault path never checks anything. A CRC catches accidents (a bad disk, a torn copy), not a
file forged to match: layer files live in the daemon's own directory.

The index sits after the data, so a writer streams pages without knowing their count first.
Zero runs are stored in page order and never touch each other or a data page.
The file ends exactly at the end of the index: a truncated file is refused, not misread. A data
page that is all zero is stored as a zero run instead (it costs no data). The same page may not
be both data and in a zero run, nor be data twice.

The *parent fingerprint* ties a layer to the memory it was taken over
(:func:`chain_fingerprint`): a SHA-256 over the memory size, a fixed sample of 64 pages of the
base mem-file, and the CRC-32 of the layer just below (whose own fingerprint that CRC covers,
so the whole chain is tied). A chain that opens a layer over other memory of the same size (a
wrong ``--mem-file``, a base rewritten in place) is refused with one line, not served as a
mix; sampling costs 64 page reads per layer, never a scan. A layer written without one (files
of older versions, or ``write_layer`` without ``parent_fingerprint``) is not checked: what a
snapshot captures always carries one.

Reading: :class:`LayerFile` opens and validates a layer (every error is one line naming the
file).
"""

from __future__ import annotations

import array
import bisect
import hashlib
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Protocol

from pagefork.errors import TemplateError
from pagefork.files import atomic_save, open_regular

#: The page size of layers: data pages and zero runs are counted in these.
LAYER_PAGE = 4096
#: The magic of the files written now; :data:`MAGIC_V1` files (no page checksums) still load.
MAGIC = b"PFLAYER2"
MAGIC_V1 = b"PFLAYER1"
#: The most bytes of a parent name stored in a layer.
MAX_PARENT_BYTES = 1024
_HEADER = struct.Struct("<8sQQQQHxxI")  # magic, size, pages, zero runs, index offset, parent, crc
#: Where the parent fingerprint sits in the header page, and its length (SHA-256).
_FINGERPRINT_AT = _HEADER.size + MAX_PARENT_BYTES
FINGERPRINT_BYTES = 32
_NO_FINGERPRINT = bytes(FINGERPRINT_BYTES)
#: Base pages sampled by a fingerprint.
_SAMPLE_PAGES = 64
_DATA_START = LAYER_PAGE
_ZERO_PAGE = bytes(LAYER_PAGE)
# A page in the writer's map: untouched, data, zero (stored as a zero run).
_NONE, _DATA, _ZERO = 0, 1, 2
_ZERO_RUN_RE = re.compile(b"\x02+")
# The index is stored little-endian; array("Q") and array("I") are native.
_SWAP = sys.byteorder != "little"
#: Data pages checked at once by :meth:`LayerFile.verify_slots` (one pread each).
_VERIFY_PAGES = 256


class LayerError(TemplateError):
    """A layer file is corrupt, truncated, does not fit its memory, or cannot be written."""


@dataclass(frozen=True)
class LayerInfo:
    """What a layer holds: ``pages`` data pages, ``zero_pages`` pages that read zero, and
    ``bytes``, the file's size."""

    pages: int
    zero_pages: int
    bytes: int


class PageReader(Protocol):
    """Reads what a fork of a template reads at a page."""

    size: int

    def read_page(self, index: int) -> bytes:
        """The 4096 bytes a fork reads at page ``index``."""
        ...


def _u64_array(values: Iterable[int] = ()) -> array.array[int]:
    return array.array("Q", values)


def _u32_array(values: Iterable[int] = ()) -> array.array[int]:
    out = array.array("I", values)
    assert out.itemsize == 4
    return out


def write_layer(
    path: str,
    *,
    size: int,
    pages: Iterable[tuple[int, bytes | memoryview]],
    zero_runs: Iterable[tuple[int, int]] = (),
    parent: str | None = None,
    parent_fingerprint: bytes | None = None,
) -> LayerInfo:
    """Write a layer file atomically (a temp file renamed over ``path``).

    ``size`` is the guest memory size in bytes (a multiple of :data:`LAYER_PAGE`); ``pages`` are
    (page index, 4096 bytes) in any order; ``zero_runs`` are (first page, count) runs that must
    read zero. ``parent`` names what the layer was taken over (kept for people, not checked);
    ``parent_fingerprint`` (:func:`chain_fingerprint`) ties it to that memory (checked).
    Raises :class:`LayerError` naming the bad entry; the old file, if any, stays as it was.
    """
    if size <= 0 or size % LAYER_PAGE:
        raise LayerError(f"layer {path}: memory size {size} is not a positive multiple of 4096")
    parent_bytes = (parent or "").encode()
    if len(parent_bytes) > MAX_PARENT_BYTES:
        raise LayerError(f"layer {path}: parent name longer than {MAX_PARENT_BYTES} bytes")
    fingerprint = parent_fingerprint or _NO_FINGERPRINT
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise LayerError(f"layer {path}: a parent fingerprint has {FINGERPRINT_BYTES} bytes")
    npages = size // LAYER_PAGE
    kinds = bytearray(npages)
    index = _u64_array()
    runs = _u64_array()
    crcs = _u32_array()

    def write(f: BinaryIO) -> None:
        f.seek(_DATA_START)
        for n, (page, data) in enumerate(pages):
            if not 0 <= page < npages:
                raise LayerError(
                    f"layer {path}: page {page} (entry {n}) is outside the memory ({npages} pages)"
                )
            if len(data) != LAYER_PAGE:
                raise LayerError(
                    f"layer {path}: page {page} (entry {n}) has {len(data)} bytes, not 4096"
                )
            if kinds[page] != _NONE:
                raise LayerError(f"layer {path}: page {page} (entry {n}) is given twice")
            if data == _ZERO_PAGE:
                kinds[page] = _ZERO  # reads zero: a zero run costs no data
                continue
            kinds[page] = _DATA
            f.write(data)
            index.append(page)
            crcs.append(zlib.crc32(data))
        for n, (first, count) in enumerate(zero_runs):
            if count <= 0 or first < 0 or first + count > npages:
                raise LayerError(
                    f"layer {path}: zero run {n} (page {first}, {count} pages) is outside "
                    f"the memory ({npages} pages) or empty"
                )
            clash = kinds.find(_DATA, first, first + count)
            if clash >= 0:
                raise LayerError(
                    f"layer {path}: zero run {n} covers page {clash}, which is also a data page"
                )
            kinds[first : first + count] = b"\x02" * count
        for m in _ZERO_RUN_RE.finditer(kinds):
            runs.extend((m.start(), m.end() - m.start()))
        tail = _index_bytes(index, runs, crcs)
        index_offset = _DATA_START + len(index) * LAYER_PAGE
        f.write(tail)
        f.truncate(index_offset + len(tail))  # an empty layer still spans its header page
        f.seek(0)
        f.write(
            _header(size, len(index), len(runs) // 2, index_offset, parent_bytes, tail, fingerprint)
        )
        f.seek(_FINGERPRINT_AT)
        f.write(fingerprint)

    atomic_save(path, write, "layer", error=LayerError)
    zero_pages = sum(runs[1::2])
    return LayerInfo(
        pages=len(index),
        zero_pages=zero_pages,
        bytes=_DATA_START + len(index) * (LAYER_PAGE + 8 + 4) + len(runs) * 8,
    )


def _index_bytes(index: array.array[int], runs: array.array[int], crcs: array.array[int]) -> bytes:
    if _SWAP:
        index, runs, crcs = _u64_array(index), _u64_array(runs), _u32_array(crcs)
        index.byteswap()
        runs.byteswap()
        crcs.byteswap()
    return index.tobytes() + runs.tobytes() + crcs.tobytes()


def _crc(bare: bytes, parent: bytes, fingerprint: bytes, tail: bytes) -> int:
    crc = zlib.crc32(parent, zlib.crc32(bare))
    if fingerprint != _NO_FINGERPRINT:  # files without one keep the CRC they always had
        crc = zlib.crc32(fingerprint, crc)
    return zlib.crc32(tail, crc)


def _header(
    size: int,
    pages: int,
    zero_runs: int,
    index_offset: int,
    parent: bytes,
    tail: bytes,
    fingerprint: bytes,
) -> bytes:
    bare = _HEADER.pack(MAGIC, size, pages, zero_runs, index_offset, len(parent), 0)
    crc = _crc(bare, parent, fingerprint, tail)
    return _HEADER.pack(MAGIC, size, pages, zero_runs, index_offset, len(parent), crc) + parent


def chain_fingerprint(base_fd: int, size: int, below: LayerFile | None) -> bytes:
    """What a layer taken over a chain records of it: SHA-256 over ``size``, 64 pages of the
    base (open as ``base_fd``) spread evenly over its memory, and the CRC-32 of ``below``, the
    chain's top layer (None: the base alone)."""
    npages = size // LAYER_PAGE
    digest = hashlib.sha256(b"pagefork-parent-1" + size.to_bytes(8, "little"))
    for page in sorted({i * npages // _SAMPLE_PAGES for i in range(_SAMPLE_PAGES)}):
        digest.update(os.pread(base_fd, LAYER_PAGE, page * LAYER_PAGE))
    digest.update(b"" if below is None else below.crc.to_bytes(4, "little"))
    return digest.digest()


def check_parent(layer: LayerFile, base_fd: int, base: str, below: LayerFile | None) -> None:
    """Refuse ``layer`` over a chain (the base mem-file ``base`` open as ``base_fd``, and
    ``below`` its top layer) other than the one it was taken over (:class:`LayerError`). A
    layer without a parent fingerprint is not checked."""
    if layer.parent_fingerprint is None:
        return
    if chain_fingerprint(base_fd, layer.size, below) != layer.parent_fingerprint:
        over = base if below is None else f"{base} + ... + {below.path}"
        raise LayerError(
            f"layer {layer.path} was taken over other memory than {over} (its parent "
            "fingerprint differs: another base or layer of the same size?)"
        )


class LayerFile:
    """A layer file opened read-only and validated.

    ``index[k]`` is the guest page of data page *k* (at file offset :meth:`data_offset`);
    ``zero_runs`` holds (first page, count) runs. ``fd`` stays open (for mapping and reading)
    until :meth:`close`. Any defect raises :class:`LayerError` with a one-line message naming
    the file, and nothing stays open.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = open_regular(self.path, "layer", error=LayerError)
        try:
            self._load(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._closed = False

    def _fail(self, why: str) -> LayerError:
        return LayerError(f"layer {self.path}: {why}")

    def _read(self, fd: int, length: int, offset: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise self._fail(f"truncated (ends at byte {offset + len(data)})")
        return data

    def _load(self, fd: int) -> None:
        file_size = os.fstat(fd).st_size
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) < _HEADER.size or head[:8] not in (MAGIC, MAGIC_V1):
            raise self._fail("not a pagefork layer file (bad magic)")
        magic, size, pages, zero_runs, index_offset, parent_len, crc = _HEADER.unpack(head)
        checksums = magic == MAGIC
        if size <= 0 or size % LAYER_PAGE:
            raise self._fail(f"memory size {size} is not a positive multiple of 4096")
        npages = size // LAYER_PAGE
        if parent_len > MAX_PARENT_BYTES or pages > npages or zero_runs > npages:
            raise self._fail("corrupt header")
        if index_offset != _DATA_START + pages * LAYER_PAGE:
            raise self._fail("corrupt header (index offset)")
        end = index_offset + pages * 8 + zero_runs * 16 + (pages * 4 if checksums else 0)
        if file_size < end:
            raise self._fail(f"truncated ({file_size} bytes, the header says {end})")
        if file_size > end:
            raise self._fail(f"{file_size - end} bytes of trailing garbage")
        parent = self._read(fd, parent_len, _HEADER.size)
        fingerprint = self._read(fd, FINGERPRINT_BYTES, _FINGERPRINT_AT)
        tail = self._read(fd, end - index_offset, index_offset)
        bare = _HEADER.pack(magic, size, pages, zero_runs, index_offset, parent_len, 0)
        if _crc(bare, parent, fingerprint, tail) != crc:
            raise self._fail("checksum mismatch (corrupt header or index)")
        index = _u64_array()
        index.frombytes(tail[: pages * 8])
        runs = _u64_array()
        runs.frombytes(tail[pages * 8 : pages * 8 + zero_runs * 16])
        crcs = _u32_array()
        crcs.frombytes(tail[pages * 8 + zero_runs * 16 :])
        if _SWAP:
            index.byteswap()
            runs.byteswap()
            crcs.byteswap()
        # A CRC catches accidents; these catch a file built to lie (it is a peer's input).
        # Checked by sorting, not with a map of the memory: the header's size is not trusted
        # to be small.
        order = sorted(range(len(index)), key=index.__getitem__)
        for prev, k in zip([-1, *order], order, strict=False):
            page = index[k]
            if page >= npages:
                raise self._fail(f"data page {k} is page {page}, outside the memory")
            if prev >= 0 and index[prev] == page:
                raise self._fail(f"page {page} is stored twice")
        data_pages = [index[k] for k in order]
        self.zero_runs: list[tuple[int, int]] = []
        end_of_last = 0
        for n in range(zero_runs):
            first, count = runs[2 * n], runs[2 * n + 1]
            if count == 0 or first + count > npages:
                raise self._fail(
                    f"zero run {n} (page {first}, {count} pages) is outside the memory"
                )
            at = bisect.bisect_left(data_pages, first)
            if first < end_of_last or (at < len(data_pages) and data_pages[at] < first + count):
                raise self._fail(f"zero run {n} overlaps a data page or another zero run")
            end_of_last = first + count
            self.zero_runs.append((first, count))
        self.size = size
        self.index = index
        #: The CRC-32 of each data page; None in a ``PFLAYER1`` file (its pages are unchecked).
        self.page_crcs = crcs if checksums else None
        #: 2 for files with page checksums, 1 for ``PFLAYER1`` files.
        self.version = 2 if checksums else 1
        self.parent = parent.decode(errors="replace") or None
        #: What the layer was taken over (:func:`chain_fingerprint`), None if not recorded.
        self.parent_fingerprint = None if fingerprint == _NO_FINGERPRINT else fingerprint
        #: The header's CRC-32: a layer over this one records it in its fingerprint.
        self.crc = crc
        self.bytes = file_size

    @property
    def pages(self) -> int:
        """The number of data pages."""
        return len(self.index)

    @property
    def zero_pages(self) -> int:
        """The number of pages in zero runs."""
        return sum(count for _, count in self.zero_runs)

    @staticmethod
    def data_offset(slot: int) -> int:
        """The file offset of data page ``slot``."""
        return _DATA_START + slot * LAYER_PAGE

    def read_slot(self, slot: int) -> bytes:
        """The bytes of data page ``slot``, checked against its CRC-32 (a file cut short
        since open, or a page that does not match, is a :class:`LayerError`)."""
        data = self._read(self.fd, LAYER_PAGE, self.data_offset(slot))
        if self.page_crcs is not None and zlib.crc32(data) != self.page_crcs[slot]:
            raise self._corrupt(slot)
        return data

    def verify_slots(self, first: int, count: int) -> None:
        """Check data pages ``first`` to ``first + count - 1`` against their CRC-32s, reading
        them in large pieces; the first that does not match is a one-line :class:`LayerError`
        naming the file and the page. Nothing is checked in a ``PFLAYER1`` file."""
        crcs = self.page_crcs
        if crcs is None:
            return
        crc32 = zlib.crc32
        end = first + count
        while first < end:
            n = min(_VERIFY_PAGES, end - first)
            data = memoryview(self._read(self.fd, n * LAYER_PAGE, self.data_offset(first)))
            for i in range(n):
                if crc32(data[i * LAYER_PAGE : (i + 1) * LAYER_PAGE]) != crcs[first + i]:
                    raise self._corrupt(first + i)
            first += n

    def _corrupt(self, slot: int) -> LayerError:
        return self._fail(
            f"data page {slot} (memory page {self.index[slot]}, file offset "
            f"{self.data_offset(slot)}) does not match its checksum: the file is corrupt"
        )

    def info(self) -> LayerInfo:
        """What this layer holds."""
        return LayerInfo(pages=self.pages, zero_pages=self.zero_pages, bytes=self.bytes)

    def close(self) -> None:
        """Close the file; idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> LayerFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def diff_against(
    parent: PageReader, pages: Iterable[tuple[int, bytes | memoryview]]
) -> Iterator[tuple[int, bytes | memoryview]]:
    """Only the pages whose bytes differ from what ``parent`` reads at that page."""
    for page, data in pages:
        if parent.read_page(page) != data:
            yield page, data


__all__ = [
    "LAYER_PAGE",
    "LayerError",
    "LayerFile",
    "LayerInfo",
    "PageReader",
    "chain_fingerprint",
    "check_parent",
    "diff_against",
    "write_layer",
]
