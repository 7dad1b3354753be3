"""Guest memory regions: translation between a VMM's host addresses and mem-file offsets.

Pure data, no I/O. A :class:`Region` is one entry of Firecracker's handshake: a range of the
VMM's address space backed by a byte range of the template mem-file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Region:
    """One guest memory region as the VMM mapped it.

    ``base`` is the VMM's host virtual address, ``offset`` the region's byte offset in the
    mem-file, ``page_size`` the granule faults are served in (4 KiB, or 2 MiB for hugetlbfs).
    """

    base: int
    size: int
    offset: int
    page_size: int = PAGE_SIZE

    @property
    def end(self) -> int:
        """One past the region's last host address."""
        return self.base + self.size

    def contains(self, address: int) -> bool:
        """True when the host ``address`` lies inside this region."""
        return self.base <= address < self.base + self.size


@dataclass(frozen=True, slots=True)
class Location:
    """Where a host address lands: region index, its page's offset in the region, and file."""

    region: int
    page_offset: int
    file_offset: int
    page_size: int


class RegionMap:
    """Looks up which region a host address belongs to.

    ``table`` holds ``(base, end, offset, page_size, index)`` per region, largest first: the
    fault path scans it inline (a VMM has a handful of regions, and most faults land in the
    largest), and :meth:`index_of` / :meth:`locate` use the same table.
    """

    __slots__ = ("regions", "table")

    def __init__(self, regions: Iterable[Region]) -> None:
        self.regions: tuple[Region, ...] = tuple(regions)
        self.table: list[tuple[int, int, int, int, int]] = sorted(
            ((r.base, r.end, r.offset, r.page_size, i) for i, r in enumerate(self.regions)),
            key=lambda t: t[0] - t[1],
        )

    def __len__(self) -> int:
        return len(self.regions)

    def index_of(self, address: int) -> int:
        """The index (handshake order) of the region holding ``address``, or -1."""
        row = region_at(self.table, address)
        return -1 if row is None else row[4]

    def locate(self, address: int) -> Location | None:
        """Translate a faulting host address to its page, or None when outside every region."""
        idx = self.index_of(address)
        if idx < 0:
            return None
        r = self.regions[idx]
        page_offset = (address - r.base) & ~(r.page_size - 1)
        return Location(idx, page_offset, r.offset + page_offset, r.page_size)

    def total_size(self) -> int:
        """Bytes of guest memory across all regions."""
        return sum(r.size for r in self.regions)


def region_at(
    table: Sequence[tuple[int, int, int, int, int]], address: int
) -> tuple[int, int, int, int, int] | None:
    """The row ``(base, end, offset, page_size, index)`` of a :attr:`RegionMap.table` holding
    ``address``, or None: the one region lookup, for the fault path and everyone else."""
    for row in table:
        if row[0] <= address < row[1]:
            return row
    return None


def overlapping(regions: Sequence[Region]) -> tuple[int, int] | None:
    """Indices of the first pair of regions whose host ranges overlap, or None."""
    order = sorted(range(len(regions)), key=lambda i: regions[i].base)
    for a, b in itertools.pairwise(order):
        if regions[a].end > regions[b].base:
            return (a, b)
    return None
