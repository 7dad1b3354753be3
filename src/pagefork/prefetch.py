"""Prefetch: install a hot-page list into a fork before (or while) its vCPUs run.

Two halves, as in the rest of pagefork. :func:`plan_prefetch` is pure: it validates the list
against the fork's regions, coalesces pages into contiguous runs, splits them into copy and
zero-page runs, and orders the runs by first touch. :func:`execute_plan` issues the ioctls
against a :class:`PrefetchTarget` (the fork's session, or a fake in tests) and applies the
kernel's rules at the place each one matters: EEXIST means a vCPU got there first, EAGAIN with
bytes done means a partial copy (retry the rest), EAGAIN with none done means an unread
``UFFD_EVENT_REMOVE``, and removed ranges must never get template bytes.
"""

from __future__ import annotations

import array
import builtins
import dataclasses
import errno
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pagefork import uffd
from pagefork.copycost import bridge_gap_for_host
from pagefork.errors import PrefetchError
from pagefork.regions import PAGE_SIZE, Region
from pagefork.uffd import UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_ZEROPAGE_MODE_DONTWAKE


@dataclass(frozen=True, slots=True)
class Run:
    """A contiguous range of one region installed with one ioctl (when nothing races it).

    ``zero`` runs are all-zero in the template and use ``UFFDIO_ZEROPAGE``; the others use
    ``UFFDIO_COPY`` from ``file_offset`` of the mem-file. ``page_size`` is the region's page
    size: the unit in which a run is split when part of it is already present or removed.
    """

    region: int
    host_start: int
    file_offset: int
    length: int
    zero: bool
    page_size: int = PAGE_SIZE

    @property
    def host_end(self) -> int:
        """One past the run's last host address."""
        return self.host_start + self.length

    @property
    def pages(self) -> int:
        """Pages (of the region's page size) in the run."""
        return self.length // self.page_size


#: Integers per run in :attr:`PrefetchPlan.table`: region, host_start, file_offset, length,
#: zero, page_size, hot (pages of the run that are in the hot set; the rest bridge gaps).
RUN_FIELDS = 7
_PLAN_BLOB_VERSION = 1


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    """The runs to install, in first-touch order, and what they add up to.

    ``table`` holds :data:`RUN_FIELDS` int64s per run (see :meth:`rows`): a plan for a large
    hot set stays one buffer, cheap to build, pickle to a worker and store in a hot-page file.
    ``pages`` counts the distinct hot pages (in each region's page size), ``bytes`` their
    total size, ``bridged_pages`` the pages the runs install beyond them (gaps between hot
    runs bridged because one larger copy is cheaper than two ioctls), ``regions`` the region
    indices touched and ``wake_ranges`` the ``(base, size)`` of each, woken once at the end.
    """

    table: array.array[int]
    pages: int
    bytes: int
    regions: frozenset[int]
    wake_ranges: tuple[tuple[int, int], ...]
    #: The regions planned against: a plan applies to any fork with the same sizes, offsets
    #: and page sizes (every fork of one template), relocated by each region's base.
    planned_for: tuple[Region, ...] = ()
    bridged_pages: int = 0
    #: The widest gap (in 4 KiB pages) the planner would bridge; 0: no bridging.
    bridge_gap: int = 0

    @classmethod
    def from_runs(
        cls,
        runs: Sequence[Run],
        pages: int,
        bytes: int,
        regions: frozenset[int],
        wake_ranges: tuple[tuple[int, int], ...],
        planned_for: tuple[Region, ...] = (),
    ) -> PrefetchPlan:
        """A plan from :class:`Run` objects whose pages are all hot (no bridged pages)."""
        table = array.array(
            "q",
            [
                v
                for r in runs
                for v in (
                    r.region,
                    r.host_start,
                    r.file_offset,
                    r.length,
                    r.zero,
                    r.page_size,
                    r.pages,
                )
            ],
        )
        return cls(table, pages, bytes, regions, wake_ranges, planned_for)

    @property
    def run_count(self) -> int:
        """How many runs the plan has."""
        return len(self.table) // RUN_FIELDS

    def rows(self) -> Iterator[tuple[int, int, int, int, int, int, int]]:
        """``(region, host_start, file_offset, length, zero, page_size, hot)`` per run."""
        it = iter(self.table)
        return zip(it, it, it, it, it, it, it, strict=True)

    @property
    def runs(self) -> tuple[Run, ...]:
        """The runs as :class:`Run` objects, in install order (built on each call)."""
        return tuple(
            Run(region, host, offset, length, bool(zero), page_size)
            for region, host, offset, length, zero, page_size, _ in self.rows()
        )

    def deltas_for(self, regions: Sequence[Region]) -> list[int]:
        """Per region, how far ``regions`` sit from the planned ones (for relocation).

        Raises :class:`PrefetchError` when ``regions`` are laid out differently.
        """
        if len(regions) != len(self.planned_for) or any(
            (a.size, a.offset, a.page_size) != (b.size, b.offset, b.page_size)
            for a, b in zip(regions, self.planned_for, strict=True)
        ):
            raise PrefetchError("the fork's regions differ from those the plan was made for")
        return [a.base - b.base for a, b in zip(regions, self.planned_for, strict=True)]

    def to_bytes(self) -> builtins.bytes:
        """The plan as bytes (native int64s), for keeping with its hot set in a file."""
        head = [
            _PLAN_BLOB_VERSION,
            self.pages,
            self.bytes,
            self.bridged_pages,
            self.bridge_gap,
            len(self.planned_for),
        ]
        for r in self.planned_for:
            head += [r.base, r.size, r.offset, r.page_size]
        head.append(self.run_count)
        return array.array("q", head).tobytes() + self.table.tobytes()

    @classmethod
    def from_bytes(cls, data: builtins.bytes, name: str = "<bytes>") -> PrefetchPlan:
        """Read :meth:`to_bytes`; a plan that is malformed or installs anything outside its
        regions (or a zero run in a hugetlbfs region) raises :class:`PrefetchError`."""
        values = array.array("q")
        if len(data) % values.itemsize:
            raise PrefetchError(f"{name}: stored plan: {len(data)} bytes is not whole int64s")
        values.frombytes(data)
        try:
            version, pages, nbytes, bridged, gap, nregions = values[:6]
            if version != _PLAN_BLOB_VERSION:
                raise PrefetchError(f"{name}: stored plan: unknown version {version}")
            if not 0 <= nregions <= 4096:
                raise PrefetchError(f"{name}: stored plan: {nregions} regions")
            regions = tuple(Region(*values[6 + 4 * i : 10 + 4 * i]) for i in range(nregions))
            pos = 6 + 4 * nregions
            nruns = values[pos]
        except (ValueError, IndexError):
            raise PrefetchError(f"{name}: stored plan: truncated header") from None
        table = values[pos + 1 :]
        if nruns < 0 or len(table) != nruns * RUN_FIELDS:
            raise PrefetchError(
                f"{name}: stored plan: {len(table)} values for {nruns} runs of {RUN_FIELDS}"
            )
        if min(pages, nbytes, bridged, gap) < 0:
            raise PrefetchError(f"{name}: stored plan: negative totals")
        for r in regions:
            if r.size <= 0 or r.offset < 0 or r.page_size <= 0 or r.page_size & (r.page_size - 1):
                raise PrefetchError(f"{name}: stored plan: bad region {r}")
        touched = _checked_regions(table, regions)
        if touched is None:
            _check_table(table, regions, name)  # names the first bad run
            raise AssertionError("no bad run found")  # pragma: no cover - it found one
        return cls(
            table,
            pages,
            nbytes,
            frozenset(touched),
            tuple((regions[i].base, regions[i].size) for i in touched),
            regions,
            bridged,
            gap,
        )

    def __reduce__(self) -> tuple[Callable[..., PrefetchPlan], tuple[object, ...]]:
        # Plans go to worker processes: the table pickles as one buffer.
        fields = (
            self.pages,
            self.bytes,
            self.regions,
            self.wake_ranges,
            self.planned_for,
            self.bridged_pages,
            self.bridge_gap,
        )
        return (_unpack_plan, (self.table.tobytes(), *fields))


def _unpack_plan(packed: bytes, *fields: object) -> PrefetchPlan:
    table = array.array("q")
    table.frombytes(packed)
    return PrefetchPlan(table, *fields)  # type: ignore[arg-type]


#: Values below this bound add and subtract in int64 without overflow.
_SANE = 1 << 61


def _checked_regions(table: array.array[int], regions: Sequence[Region]) -> list[int] | None:
    """The sorted region indices of a run table that :func:`_check_table` accepts, checked
    as whole arrays (a stored plan is read on a template's first fork: no Python per run);
    None when some run is bad, or a value is too large to check without overflow (then
    :func:`_check_table` decides, and names the run)."""
    import numpy as np  # the supervisor reads stored plans; workers get plans over their channel

    if not len(table):
        return []
    if any(not (0 <= v < _SANE) for r in regions for v in (r.base, r.size, r.offset)):
        return None
    t = np.frombuffer(table, dtype=np.int64).reshape(-1, RUN_FIELDS)
    region, host, offset, length, zero, ps, hot = t.T
    if (t < 0).any() or (t[:, 1:4] >= _SANE).any() or (region >= len(regions)).any():
        return None
    base = np.array([r.base for r in regions], dtype=np.int64)[region]
    size = np.array([r.size for r in regions], dtype=np.int64)[region]
    r_off = np.array([r.offset for r in regions], dtype=np.int64)[region]
    r_ps = np.array([r.page_size for r in regions], dtype=np.int64)[region]
    rel = host - base
    ok = (
        (ps == r_ps)
        & (zero <= 1)
        & ((zero == 0) | (ps == PAGE_SIZE))
        & (length > 0)
        & (rel >= 0)
        & (rel % r_ps == 0)
        & (length % r_ps == 0)
        & (length <= size)
        & (rel <= size - length)
        & (offset == r_off + rel)
        & (hot <= length // r_ps)
    )
    if not ok.all():
        return None
    return [int(i) for i in np.flatnonzero(np.bincount(region, minlength=len(regions)))]


def _check_table(table: array.array[int], regions: Sequence[Region], name: str) -> None:
    """Refuse a run table that would install anything outside its regions: every run lies in
    its region, in whole pages of it, at the file offset its address maps to."""
    for index, (region, host, offset, length, zero, ps, hot) in enumerate(
        zip(*([iter(table)] * RUN_FIELDS), strict=True)
    ):
        where = f"{name}: stored plan: run {index}"
        if not 0 <= region < len(regions):
            raise PrefetchError(f"{where}: no region {region} (plan has {len(regions)})")
        r = regions[region]
        rel = host - r.base
        if ps != r.page_size or zero not in (0, 1) or (zero and ps != PAGE_SIZE):
            raise PrefetchError(f"{where}: page size or zero flag does not fit region {region}")
        if length <= 0 or rel < 0 or rel % ps or length % ps or rel + length > r.size:
            raise PrefetchError(f"{where}: {host:#x}+{length:#x} is outside region {region}")
        if offset != r.offset + rel or not 0 <= hot <= length // ps:
            raise PrefetchError(f"{where}: file offset or hot pages do not match its address")


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    """What one prefetch did.

    ``requested == installed + already_present + skipped_removed``, in hot pages (of each
    region's page size). ``ioctls`` counts every ``UFFDIO_COPY``/``UFFDIO_ZEROPAGE`` issued
    (failed ones included) and the final ``UFFDIO_WAKE``s. ``bytes`` is every byte this
    prefetch installed; ``bridged_bytes`` the part of it beyond the hot set (gaps between hot
    runs that one larger copy installed; per run, the pages installed beyond its hot ones).
    """

    requested: int
    installed: int
    already_present: int
    skipped_removed: int
    runs: int
    ioctls: int
    bytes: int
    seconds: float
    #: A template in object storage: bytes its chunks brought from the store before the
    #: install, and the seconds that fetch took (both 0 for a local mem-file).
    fetched_bytes: int = 0
    fetch_seconds: float = 0.0
    bridged_bytes: int = 0
    #: A streamed prefetch (``head`` given): hot pages installed after the head was reported
    #: (while the guest ran), and of those reached by the stream, how many the guest had
    #: faulted in first (a fault that raced the stream). Both 0 when nothing was streamed.
    streamed: int = 0
    raced: int = 0
    #: Seconds from the start until the head was installed (all of ``seconds`` unstreamed).
    head_seconds: float = 0.0
    #: When the install started, on the execution's clock (``time.perf_counter``: the
    #: system-wide monotonic clock on Linux, so comparable across processes).
    started_at: float = 0.0


class PrefetchTarget(Protocol):
    """The fork a plan is installed into; the session implements it over its uffd.

    ``copy`` and ``zeropage`` return the bytes installed and raise ``OSError`` with the kernel's
    errno; the exception carries ``done``, the bytes installed before the error (may be 0).
    """

    @property
    def src_base(self) -> int:
        """Address of the mem-file mapping in this process: copy source = src_base + offset."""
        ...

    def copy(self, dst: int, src: int, length: int, mode: int) -> int:
        """``UFFDIO_COPY`` ``length`` bytes from our ``src`` to the fork's ``dst``."""
        ...

    def zeropage(self, dst: int, length: int, mode: int) -> int:
        """``UFFDIO_ZEROPAGE`` over ``[dst, dst+length)``."""
        ...

    def wake(self, start: int, length: int) -> None:
        """``UFFDIO_WAKE`` threads blocked on faults in ``[start, start+length)``."""
        ...

    def removed_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Host subranges of ``[start, end)`` the guest removed (balloon, UFFD_EVENT_REMOVE)."""
        ...

    def await_events(self, timeout: float) -> None:
        """Block until the fault loop has read the uffd's pending events.

        Raises :class:`PrefetchError` when that takes longer than ``timeout`` seconds.
        """
        ...


# --- planning --------------------------------------------------------------------------------
#
# Planning runs once per hot set and template layout, off the fault path (the workers never
# import numpy), and is vectorised: a hot set of tens of thousands of scattered pages plans in
# a couple of milliseconds instead of tens. The steps, each one array operation:
#   key      = region << 44 | page number        one int64 per entry, ordered as the runs are
#   unique   = sorted distinct keys, with the index of each key's first touch (one sort)
#   breaks   = where a run must end: the next page is not adjacent (or, for copies, further
#              than the bridge gap), its zero-ness differs, or it is in another region
#   runs     = segments between breaks, each keyed by its earliest first touch
#   order    = runs by that key (a scatter, no sort): the guest's first touches come first

#: Bits of a key below the region index: page numbers of regions up to 2**44 pages.
_KEY_SHIFT = 44


class ZeroIndex(Protocol):
    """A template whose all-zero 4 KiB pages are known (a mem-file, a lazy template)."""

    @property
    def zero_pages(self) -> bytes | bytearray:
        """One byte per 4 KiB page of the template, 1 where the page is all zero."""
        ...


def _zero_index(is_zero: Callable[[int, int], bool]) -> bytes | bytearray | None:
    """The one-byte-per-page zero index behind ``is_zero`` when it is a template's own
    ``is_zero`` method (one array lookup per page instead of one call per run)."""
    owner = getattr(is_zero, "__self__", None)
    zeros = getattr(owner, "zero_pages", None)
    return zeros if isinstance(zeros, (bytes, bytearray)) else None


def _check_entry(index: int, region: int, offset: int, regions: Sequence[Region]) -> None:
    where = f"entry {index}: (region {region}, offset {offset:#x})"
    if not 0 <= region < len(regions):
        raise PrefetchError(f"{where}: no region {region} (fork has {len(regions)})")
    r = regions[region]
    if offset < 0 or offset % r.page_size:
        raise PrefetchError(f"{where}: not aligned to the region's {r.page_size:#x}-byte pages")
    if offset >= r.size:
        raise PrefetchError(f"{where}: beyond the end of region {region} (size {r.size:#x})")


def _first_bad(pages: Sequence[tuple[int, int]], regions: Sequence[Region]) -> None:
    """Raise for the first entry :func:`_check_entry` refuses (the slow path of validation)."""
    for index, (region, offset) in enumerate(pages):
        _check_entry(index, region, offset, regions)
    raise AssertionError("no bad entry found")  # pragma: no cover - callers found one


def _packed(pages: Sequence[tuple[int, int]] | PackedPages) -> Any:
    """``(region, offset)`` pairs as one int64 array (numpy), or None when a value cannot be
    one (then validation names the entry)."""
    import numpy as np

    packed = getattr(pages, "packed", None)
    if callable(packed):
        return np.frombuffer(packed(), dtype=np.int64)
    try:
        # fromiter: about 35 ns a value, several times faster than building a list first.
        return np.fromiter(
            itertools.chain.from_iterable(pages),
            dtype=np.int64,
            count=2 * len(pages),
        )
    except (OverflowError, ValueError, TypeError):
        return None


class PackedPages(Protocol):
    """A hot-page list that keeps its pages packed (``HotPageList``): planning reads them
    without a Python object per page."""

    def packed(self) -> array.array[int]:
        """``region, offset`` int64 pairs in first-touch order."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[int, int]]: ...


def prepare_planner() -> int:
    """Load what planning needs (numpy) and measure the host's copy costs now, off any fork's
    path; returns the bridge gap. A supervisor calls it at start, or when a hot set is
    recorded or loaded, so that the first fork it plans for does not pay for either."""
    import numpy  # noqa: F401  (the import is the point: it takes tens of ms the first time)

    return bridge_gap_for_host()


def plan_prefetch(
    pages: Sequence[tuple[int, int]] | PackedPages,
    regions: Sequence[Region],
    is_zero: Callable[[int, int], bool],
    *,
    bridge_gap: int | None = None,
) -> PrefetchPlan:
    """Plan the ioctls that install ``pages`` (first-touch order) into a fork's ``regions``.

    The whole list is validated first, so a list from another template fails with a
    :class:`PrefetchError` naming its first bad entry before a single page is installed.
    ``is_zero(file_offset, length)`` tells whether a mem-file range is all zero; a template's
    own ``is_zero`` is recognised and its zero-page index read directly.

    Contiguous pages coalesce into one run, split where their zero-ness changes: all-zero
    runs of 4 KiB pages become ``UFFDIO_ZEROPAGE`` runs. ``bridge_gap`` joins two copy runs of
    one 4 KiB region separated by at most that many pages into one copy (the gap's template
    bytes are installed too); None asks the host's measured cost model
    (:func:`bridge_gap_for_host`).
    """
    import numpy as np  # planning only: the fault path (workers) stays standard library

    gap = bridge_gap_for_host() if bridge_gap is None else max(0, bridge_gap)
    nregions = len(regions)
    npages = len(pages)
    if npages == 0:
        return PrefetchPlan(array.array("q"), 0, 0, frozenset(), (), tuple(regions), 0, gap)
    flat = _packed(pages)
    if flat is None or len(flat) != 2 * npages or nregions == 0:
        _first_bad(list(pages), regions)
    assert flat is not None
    entries = flat.reshape(-1, 2)
    reg, off = entries[:, 0], entries[:, 1]

    # Validation: region index, bounds, alignment, all at once; the slow path names the entry.
    sizes = np.array([r.size for r in regions], dtype=np.int64)
    psizes = np.array([r.page_size for r in regions], dtype=np.int64)
    no_region = (reg < 0) | (reg >= nregions)
    safe = np.where(no_region, 0, reg)
    bad = no_region | (off < 0) | (off >= sizes[safe]) | ((off & (psizes[safe] - 1)) != 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        _check_entry(index, int(reg[index]), int(off[index]), regions)

    shifts = np.array([r.page_size.bit_length() - 1 for r in regions], dtype=np.int64)
    keys = (reg << _KEY_SHIFT) | (off >> shifts[reg])
    # Sorted distinct keys and each one's first touch, from one sort of key and index packed
    # in one int64 when they fit (the usual case), else a stable argsort.
    index_bits = max(1, (npages - 1).bit_length())
    if int(keys.max()) < 1 << (62 - index_bits):
        both = np.sort((keys << index_bits) | np.arange(npages, dtype=np.int64))
        head = np.concatenate(([True], (both[1:] >> index_bits) != (both[:-1] >> index_bits)))
        uniq = both[head] >> index_bits
        first = both[head] & ((1 << index_bits) - 1)
    else:
        uniq, first = np.unique(keys, return_index=True)
    m = len(uniq)
    ureg = uniq >> _KEY_SHIFT
    upage = uniq & ((1 << _KEY_SHIFT) - 1)

    # Zero-ness per page: 4 KiB regions only (hugetlbfs has no UFFDIO_ZEROPAGE).
    small = np.array([r.page_size == PAGE_SIZE for r in regions], dtype=bool)[ureg]
    file_page = np.array([r.offset // PAGE_SIZE for r in regions], dtype=np.int64)[ureg] + upage
    zero = np.zeros(m, dtype=bool)
    if small.any():
        index_bytes = _zero_index(is_zero)
        if index_bytes is not None:
            zi = np.frombuffer(index_bytes, dtype=np.uint8)
            inside = small & (file_page < len(zi))
            zero[inside] = zi[file_page[inside]] == 1
        else:
            for i in np.flatnonzero(small).tolist():
                zero[i] = is_zero(int(file_page[i]) * PAGE_SIZE, PAGE_SIZE)
    step = np.diff(uniq)
    adjacent = step == 1
    # Only copy runs of 4 KiB regions bridge; every other pair must be adjacent and alike.
    plain = small & ~zero
    bridgeable = plain[1:] & plain[:-1] & (step <= gap + 1)
    joined = (adjacent & (zero[1:] == zero[:-1])) | bridgeable
    starts = np.flatnonzero(np.concatenate(([True], ~joined)))
    ends = np.concatenate((starts[1:], [m]))
    # Runs in order of their first touch: the touches are distinct indices below npages, so
    # scattering each run to its own index orders them without a sort.
    slot = np.full(npages, -1, dtype=np.int64)
    slot[np.minimum.reduceat(first, starts)] = np.arange(len(starts))
    order = slot[slot >= 0]
    starts, ends = starts[order], ends[order]

    run_region = ureg[starts]
    run_ps = np.array([r.page_size for r in regions], dtype=np.int64)[run_region]
    first_page = upage[starts]
    run_pages = upage[ends - 1] - first_page + 1
    hot = ends - starts
    rel = first_page * run_ps
    table = np.empty((len(starts), RUN_FIELDS), dtype=np.int64)
    table[:, 0] = run_region
    table[:, 1] = np.array([r.base for r in regions], dtype=np.int64)[run_region] + rel
    table[:, 2] = np.array([r.offset for r in regions], dtype=np.int64)[run_region] + rel
    table[:, 3] = run_pages * run_ps
    table[:, 4] = zero[starts]
    table[:, 5] = run_ps
    table[:, 6] = hot
    packed = array.array("q")
    packed.frombytes(table.data.cast("B"))  # one copy, no intermediate bytes
    touched = np.flatnonzero(np.bincount(ureg, minlength=nregions)).tolist()
    hot_bytes = int((np.array([r.page_size for r in regions], dtype=np.int64)[ureg]).sum())
    return PrefetchPlan(
        packed,
        pages=m,
        bytes=hot_bytes,
        regions=frozenset(touched),
        wake_ranges=tuple((regions[i].base, regions[i].size) for i in touched),
        planned_for=tuple(regions),
        bridged_pages=int((run_pages - hot).sum()),
        bridge_gap=gap,
    )


class StoredPlans(PackedPages, Protocol):
    """A hot-page list that keeps the plans made for it (``HotPageList``)."""

    def plan_data(self, layout: str) -> bytes | None:
        """The stored plan for ``layout``, or None."""
        ...

    def set_plan_data(self, layout: str, data: bytes) -> None:
        """Keep a plan for ``layout``."""
        ...


def layout_key(regions: Sequence[Region]) -> str:
    """Names what a plan depends on in ``regions``: sizes, file offsets and page sizes (not
    the bases, which differ per fork and are relocated)."""
    return ";".join(f"{r.size:x},{r.offset:x},{r.page_size:x}" for r in regions)


def _zero_runs_still_zero(plan: PrefetchPlan, is_zero: Callable[[int, int], bool]) -> bool:
    """True when every ``UFFDIO_ZEROPAGE`` run of ``plan`` is all zero in this template (a
    copy run is right whatever the bytes are; a stale zero run would lose data)."""
    import numpy as np

    table = np.frombuffer(plan.table, dtype=np.int64).reshape(-1, RUN_FIELDS)
    zero_runs = table[table[:, 4] == 1]
    if not len(zero_runs):
        return True
    index = _zero_index(is_zero)
    if index is None:
        return all(is_zero(int(off), int(length)) for off, length in zero_runs[:, 2:4])
    first = zero_runs[:, 2] // PAGE_SIZE
    count = zero_runs[:, 3] // PAGE_SIZE
    if int((first + count).max()) > len(index):
        return False
    pages = np.arange(int(count.sum())) + np.repeat(first - np.cumsum(count) + count, count)
    return bool((np.frombuffer(index, dtype=np.uint8)[pages] == 1).all())


def plan_hot_set(
    hot: StoredPlans,
    regions: Sequence[Region],
    is_zero: Callable[[int, int], bool],
    *,
    bridge_gap: int | None = None,
) -> PrefetchPlan:
    """The plan for ``hot`` on ``regions``: the one kept with the list when it fits, else
    planned now (:func:`plan_prefetch`) and kept with it.

    Call it when a hot set is recorded or loaded, so that no fork pays for planning; a saved
    HPL3 file carries the plan to a restarted server or a successor. A stored plan that is
    malformed, or whose zero runs are no longer zero in this template, is planned anew.
    ``bridge_gap`` only matters when planning (None: the host's measured cost model).
    """
    layout = layout_key(regions)
    data = hot.plan_data(layout)
    if data is not None:
        try:
            stored = PrefetchPlan.from_bytes(data)
        except PrefetchError:
            stored = None
        if (
            stored is not None
            and layout_key(stored.planned_for) == layout
            and _zero_runs_still_zero(stored, is_zero)
        ):
            return stored
    plan = plan_prefetch(hot, regions, is_zero, bridge_gap=bridge_gap)
    hot.set_plan_data(layout, plan.to_bytes())
    return plan


# --- execution -------------------------------------------------------------------------------


class _Tally:
    """Mutable counters while a plan executes."""

    __slots__ = (
        "already_present",
        "check_removed",
        "installed",
        "installed_bytes",
        "ioctls",
        "skipped_removed",
    )

    def __init__(self, check_removed: bool = True) -> None:
        self.check_removed = check_removed
        self.installed = 0
        self.installed_bytes = 0
        self.already_present = 0
        self.skipped_removed = 0
        self.ioctls = 0


def _removed_pages(
    target: PrefetchTarget, start: int, end: int, page_size: int
) -> list[tuple[int, int]]:
    """The removed subranges of ``[start, end)``, widened to whole pages, sorted and merged:
    a page any byte of which was removed is skipped."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(target.removed_ranges(start, end)):
        lo = max(start, lo - lo % page_size)
        hi = min(end, -(-hi // page_size) * page_size)
        if lo >= hi:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _errno_name(code: int | None) -> str:
    if code is None:
        return "no errno"
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


def _install_run(
    run: Run,
    delta: int,
    target: PrefetchTarget,
    src_base: int,
    tally: _Tally,
    deadline: float,
    clock: Callable[[], float],
    first_error: OSError | None = None,
) -> None:
    """Install one run, splitting it around removed ranges and pages already present.

    ``first_error`` is what a first ioctl over the whole run (already counted) raised: it is
    handled as if this function had issued that ioctl.
    """
    ps = run.page_size
    start = run.host_start + delta
    end = start + run.length
    cursor = start
    removed = _removed_pages(target, cursor, end, ps) if tally.check_removed else []
    ri = 0
    pending = first_error
    while cursor < end:
        while ri < len(removed) and removed[ri][1] <= cursor:
            ri += 1
        if ri < len(removed) and removed[ri][0] <= cursor:
            # The guest gave these pages back (balloon): they must read as zero from now on,
            # so template bytes must never land there. The fault loop serves them zero pages.
            tally.skipped_removed += (removed[ri][1] - cursor) // ps
            cursor = removed[ri][1]
            continue
        stop = removed[ri][0] if ri < len(removed) else end
        length = stop - cursor
        if pending is not None:
            exc, pending = pending, None
        else:
            tally.ioctls += 1
            try:
                # DONTWAKE: one UFFDIO_WAKE per region at the end instead of one per run.
                if run.zero:
                    done = target.zeropage(cursor, length, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
                else:
                    src = src_base + run.file_offset + (cursor - start)
                    done = target.copy(cursor, src, length, UFFDIO_COPY_MODE_DONTWAKE)
            except OSError as err:
                exc = err
            else:
                done -= done % ps
                if done <= 0:
                    raise PrefetchError(
                        f"run at {start:#x} (region {run.region}): ioctl at {cursor:#x} "
                        "installed nothing"
                    )
                done = min(done, length)
                tally.installed += done // ps
                tally.installed_bytes += done
                cursor += done
                continue
        # The kernel may have installed a prefix before failing; count it as ours.
        partial = getattr(exc, "done", 0) or 0
        partial = max(0, min(partial - partial % ps, length - ps))
        tally.installed += partial // ps
        tally.installed_bytes += partial
        cursor += partial
        outcome = uffd.copy_outcome(exc.errno)
        if outcome is uffd.CopyOutcome.PRESENT:
            # The page at cursor is present: a vCPU's fault got there first. That is
            # success for that page; carry on with the rest of the run after it.
            tally.already_present += 1
            cursor += ps
        elif outcome is uffd.CopyOutcome.RETRY:
            if partial == 0:
                # Nothing done: the mm is changing. While a UFFD_EVENT_REMOVE is unread
                # every copy fails with EAGAIN; let the fault loop read it first.
                remaining = deadline - clock()
                if remaining <= 0:
                    raise PrefetchError(
                        f"run at {cursor:#x} (region {run.region}): timed out waiting for "
                        "the fault loop to read pending uffd events (EAGAIN)"
                    ) from None
                target.await_events(remaining)
            # else: a partial copy. The kernel reports any copy that stopped early
            # (typically at a page that is already present) as EAGAIN with the bytes done;
            # retrying from where it stopped surfaces the real cause (EEXIST) at once.
            # Either way the guest may have removed pages meanwhile: re-read the ranges.
            tally.check_removed = True
            removed = _removed_pages(target, cursor, end, ps)
            ri = 0
        else:
            op = "UFFDIO_ZEROPAGE" if run.zero else "UFFDIO_COPY"
            raise PrefetchError(
                f"run at {start:#x} (region {run.region}, {run.length:#x} bytes): "
                f"{op} at {cursor:#x} failed: {_errno_name(exc.errno)}"
            ) from None


def _wake_regions(
    plan: PrefetchPlan, deltas: list[int], target: PrefetchTarget, tally: _Tally, *, quiet: bool
) -> None:
    # Threads may be blocked on pages we installed with DONTWAKE; without this they would
    # sleep until some unrelated wake.
    for region, (base, size) in zip(sorted(plan.regions), plan.wake_ranges, strict=True):
        base += deltas[region] if deltas else 0
        tally.ioctls += 1
        try:
            target.wake(base, size)
        except OSError as exc:
            if not quiet:
                raise PrefetchError(
                    f"UFFDIO_WAKE {base:#x}+{size:#x}: {_errno_name(exc.errno)}"
                ) from None


def execute_plan(
    plan: PrefetchPlan,
    target: PrefetchTarget,
    *,
    regions: Sequence[Region] | None = None,
    timeout: float = 10.0,
    clock: Callable[[], float] = time.perf_counter,
    head: int | None = None,
    on_head: Callable[[PrefetchResult], None] | None = None,
) -> PrefetchResult:
    """Install ``plan`` into ``target``: one ioctl per run, then one wake per touched region.

    The result's page counts are of the hot pages; bridged pages show in ``bridged_bytes``
    (and in ``bytes``, every byte installed).

    ``regions`` are the target fork's regions when they differ from those the plan was made
    for (another fork of the same template): runs are relocated by each region's base.
    ``timeout`` bounds, from the start, the time spent waiting for the fault loop after
    EAGAIN. The regions are woken even when a run fails with :class:`PrefetchError`.

    ``head`` streams the plan: once the runs holding the first ``head`` hot pages (in
    first-touch order) are in, the regions are woken and ``on_head`` is given the result so
    far (the caller resumes the guest then); the rest is installed after it, and the final
    result counts those pages in ``streamed`` and the ones the guest faulted in first in
    ``raced``. A ``head`` of the whole plan or more is no stream.
    """
    started = clock()
    deadline = started + timeout
    deltas = plan.deltas_for(regions) if regions is not None else [0] * len(plan.planned_for)
    # Looking up removed ranges per run costs more than the ioctl's own Python; skip it while
    # the guest has removed nothing (a later REMOVE shows up as EAGAIN, which re-checks).
    tally = _Tally(check_removed=bool(target.removed_ranges(0, 1 << 64)))
    src_base = target.src_base
    copy, zeropage = target.copy, target.zeropage
    bridged = 0
    streaming = head is not None and head < plan.pages
    stream_from: tuple[int, int] | None = None  # (installed, already present) at the head
    head_seconds = 0.0
    hot_done = 0
    try:
        for region, host, offset, length, zero, page_size, hot in plan.rows():
            if stream_from is None and streaming and head is not None and hot_done >= head:
                stream_from, head_seconds = _report_head(
                    plan, deltas, target, tally, bridged, started, clock, on_head
                )
            hot_done += hot
            delta = deltas[region] if deltas else 0
            first_error = None
            if not tally.check_removed:
                # The common case, kept lean: one ioctl installs the whole run. Anything
                # unusual (a race, a REMOVE) is handled by _install_run from that error.
                tally.ioctls += 1
                try:
                    if zero:
                        zeropage(host + delta, length, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
                    else:
                        copy(host + delta, src_base + offset, length, UFFDIO_COPY_MODE_DONTWAKE)
                except OSError as exc:
                    first_error = exc
                else:
                    pages = length // page_size
                    tally.installed += hot
                    tally.installed_bytes += length
                    bridged += (pages - hot) * page_size
                    continue
            before = (tally.installed, tally.already_present, tally.skipped_removed)
            run = Run(region, host, offset, length, bool(zero), page_size)
            _install_run(run, delta, target, src_base, tally, deadline, clock, first_error)
            # Count bridged pages apart: the run's installed pages beyond its hot ones, and
            # the bridged pages it did not install among those removed or already present.
            extra = length // page_size - hot
            done = tally.installed - before[0]
            bridge_done = min(extra, max(0, done - hot))
            bridged += bridge_done * page_size
            tally.installed -= bridge_done
            untouched = extra - bridge_done
            took = min(untouched, tally.skipped_removed - before[2])
            tally.skipped_removed -= took
            tally.already_present -= min(untouched - took, tally.already_present - before[1])
    except BaseException as exc:
        _wake_regions(plan, deltas, target, tally, quiet=True)
        if isinstance(exc, PrefetchError):
            exc.installed = tally.installed
        raise
    _wake_regions(plan, deltas, target, tally, quiet=False)
    seconds = clock() - started
    streamed = raced = 0
    if stream_from is not None:
        streamed = tally.installed - stream_from[0]
        raced = tally.already_present - stream_from[1]
    return dataclasses.replace(
        _result(plan, tally, bridged, seconds),
        streamed=streamed,
        raced=raced,
        head_seconds=head_seconds if stream_from is not None else seconds,
        started_at=started,
    )


def _result(plan: PrefetchPlan, tally: _Tally, bridged: int, seconds: float) -> PrefetchResult:
    return PrefetchResult(
        requested=plan.pages,
        installed=tally.installed,
        already_present=tally.already_present,
        skipped_removed=tally.skipped_removed,
        runs=plan.run_count,
        ioctls=tally.ioctls,
        bytes=tally.installed_bytes,
        seconds=seconds,
        bridged_bytes=bridged,
    )


def _report_head(
    plan: PrefetchPlan,
    deltas: list[int],
    target: PrefetchTarget,
    tally: _Tally,
    bridged: int,
    started: float,
    clock: Callable[[], float],
    on_head: Callable[[PrefetchResult], None] | None,
) -> tuple[tuple[int, int], float]:
    """The head is in: wake what it installed with DONTWAKE, and say so before the guest runs.
    Returns the counters the stream starts from and the head's seconds."""
    _wake_regions(plan, deltas, target, tally, quiet=False)
    seconds = clock() - started
    if on_head is not None:
        so_far = _result(plan, tally, bridged, seconds)
        on_head(dataclasses.replace(so_far, head_seconds=seconds, started_at=started))
    return (tally.installed, tally.already_present), seconds


def prefetch(
    pages: Sequence[tuple[int, int]],
    regions: Sequence[Region],
    is_zero: Callable[[int, int], bool],
    target: PrefetchTarget,
    *,
    timeout: float = 10.0,
    bridge_gap: int | None = None,
) -> PrefetchResult:
    """Plan and install ``pages`` in one call (see :func:`plan_prefetch`, :func:`execute_plan`)."""
    plan = plan_prefetch(pages, regions, is_zero, bridge_gap=bridge_gap)
    return execute_plan(plan, target, timeout=timeout)


__all__ = [
    "RUN_FIELDS",
    "PackedPages",
    "PrefetchPlan",
    "PrefetchResult",
    "PrefetchTarget",
    "Run",
    "StoredPlans",
    "ZeroIndex",
    "execute_plan",
    "layout_key",
    "plan_hot_set",
    "plan_prefetch",
    "prefetch",
    "prepare_planner",
]
