"""The fault policy: what to install for one faulting address. Pure: no I/O, no kernel.

The worker's loop reads a fault, asks :func:`decide`, and issues the ioctl it names. The
rules that decide which bytes a guest may see live here, where tests check them without a
kernel:

- an address outside every region is an error (the VMM sent mappings that do not cover it);
- a page the guest removed (balloon, ``UFFD_EVENT_REMOVE``) reads zero, never template bytes;
- an all-zero template page takes ``UFFDIO_ZEROPAGE`` (cheaper than copying zeros), except in
  hugetlbfs regions, which have no zero-page ioctl and copy from a zero buffer instead.
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Callable, Sequence

from pagefork.regions import PAGE_SIZE, region_at


class Action(enum.IntEnum):
    """What the loop installs."""

    #: ``UFFDIO_COPY`` from the mem-file at the decided file offset.
    COPY = 0
    #: ``UFFDIO_ZEROPAGE``: the template page is all zero.
    ZEROPAGE = 1
    #: ``UFFDIO_COPY`` from a zero buffer: a zero hugepage (hugetlbfs has no ZEROPAGE).
    COPY_ZEROS = 2
    #: The address lies outside every region: a fork-fatal error.
    OUTSIDE = 3


#: ``(base, end, file offset, page size, region index)`` per region: :class:`RegionMap.table`.
RegionTable = Sequence[tuple[int, int, int, int, int]]


def decide(
    address: int,
    table: RegionTable,
    zero_pages: bytes | bytearray | memoryview | mmap.mmap,
    is_removed: Callable[[int], bool] | None,
    is_zero: Callable[[int, int], bool],
) -> tuple[Action, int, int, int, int]:
    """Decide how to serve a fault at ``address``.

    Returns ``(action, dst, file_offset, page_size, region)``: ``dst`` is the page's host
    address, ``file_offset`` where its bytes are in the mem-file. ``zero_pages`` has one byte
    per 4 KiB page of the mem-file (1 = all zero); ``is_zero(offset, length)`` answers for
    larger pages; ``is_removed`` is None while the guest removed nothing.
    """
    row = region_at(table, address)
    if row is None:
        return (Action.OUTSIDE, address, -1, 0, -1)
    base, _end, offset, psize, idx = row
    page_offset = (address - base) & -psize
    dst = base + page_offset
    file_offset = offset + page_offset
    # hugepages ask the index over their whole size
    zero = zero_pages[file_offset >> 12] == 1 if psize == PAGE_SIZE else is_zero(file_offset, psize)
    if is_removed is not None and is_removed(dst):
        zero = True  # balloon: the template's bytes are stale here; the guest reads zeros
    if not zero:
        return (Action.COPY, dst, file_offset, psize, idx)
    action = Action.ZEROPAGE if psize == PAGE_SIZE else Action.COPY_ZEROS
    return (action, dst, file_offset, psize, idx)
