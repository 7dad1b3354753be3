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
import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    """The runs to install, in first-touch order, and what they add up to.

    ``pages`` counts distinct pages (in each region's page size), ``bytes`` their total size,
    ``regions`` the region indices touched and ``wake_ranges`` the ``(base, size)`` of each,
    woken once at the end.
    """

    runs: tuple[Run, ...]
    pages: int
    bytes: int
    regions: frozenset[int]
    wake_ranges: tuple[tuple[int, int], ...]
    #: The regions planned against: a plan applies to any fork with the same sizes, offsets
    #: and page sizes (every fork of one template), relocated by each region's base.
    planned_for: tuple[Region, ...] = ()

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

    def __reduce__(self) -> tuple[Callable[..., PrefetchPlan], tuple[object, ...]]:
        # Plans go to worker processes: six int64s per run pickle ~5x faster than the objects.
        packed = array.array(
            "q",
            [
                v
                for r in self.runs
                for v in (r.region, r.host_start, r.file_offset, r.length, r.zero, r.page_size)
            ],
        )
        fields = (self.pages, self.bytes, self.regions, self.wake_ranges, self.planned_for)
        return (_unpack_plan, (packed.tobytes(), *fields))


def _unpack_plan(packed: bytes, *fields: object) -> PrefetchPlan:
    values = array.array("q")
    values.frombytes(packed)
    it = iter(values)
    runs = tuple(
        Run(region, host, offset, length, bool(zero), page_size)
        for region, host, offset, length, zero, page_size in zip(
            it, it, it, it, it, it, strict=True
        )
    )
    return PrefetchPlan(runs, *fields)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    """What one prefetch did.

    ``requested == installed + already_present + skipped_removed`` (all in pages of each
    region's page size). ``ioctls`` counts every ``UFFDIO_COPY``/``UFFDIO_ZEROPAGE`` issued
    (failed ones included) and the final ``UFFDIO_WAKE``s; ``bytes`` is what this prefetch
    installed.
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


def _check_entry(index: int, region: int, offset: int, regions: Sequence[Region]) -> None:
    where = f"entry {index}: (region {region}, offset {offset:#x})"
    if not 0 <= region < len(regions):
        raise PrefetchError(f"{where}: no region {region} (fork has {len(regions)})")
    r = regions[region]
    if offset < 0 or offset % r.page_size:
        raise PrefetchError(f"{where}: not aligned to the region's {r.page_size:#x}-byte pages")
    if offset >= r.size:
        raise PrefetchError(f"{where}: beyond the end of region {region} (size {r.size:#x})")


def plan_prefetch(
    pages: Sequence[tuple[int, int]],
    regions: Sequence[Region],
    is_zero: Callable[[int, int], bool],
) -> PrefetchPlan:
    """Plan the ioctls that install ``pages`` (first-touch order) into a fork's ``regions``.

    The whole list is validated first, so a list from another template fails with a
    :class:`PrefetchError` naming its first bad entry before a single page is installed.
    ``is_zero(file_offset, length)`` tells whether a mem-file range is all zero. This runs once
    per hot set and template (the server caches plans), but it is still kept lean: a few
    operations per page.
    """
    nregions = len(regions)
    limits = [(r.size, r.page_size - 1) for r in regions]
    first_touch: dict[tuple[int, int], int] = {}
    setdefault = first_touch.setdefault
    for index, (region, offset) in enumerate(pages):
        if not 0 <= region < nregions:
            _check_entry(index, region, offset, regions)
        size, mask = limits[region]
        if offset < 0 or offset >= size or offset & mask:
            _check_entry(index, region, offset, regions)
        setdefault((region, offset), index)

    keys = sorted(first_touch)
    keyed: list[tuple[int, Run]] = []
    total_bytes = 0
    n = len(keys)
    i = 0
    while i < n:
        region, start = keys[i]
        r = regions[region]
        ps = r.page_size
        j = i + 1
        expect = start + ps
        while j < n and keys[j] == (region, expect):
            j += 1
            expect += ps
        total_bytes += expect - start
        keyed.extend(_split_zero(region, r, keys, i, j, first_touch, is_zero))
        i = j

    # Earliest-touched run first: a guest resumed while prefetch is still going finds the
    # pages it needs first already installed.
    keyed.sort(key=lambda kr: kr[0])
    touched = sorted({region for region, _ in keys})
    return PrefetchPlan(
        runs=tuple(run for _, run in keyed),
        pages=n,
        bytes=total_bytes,
        regions=frozenset(touched),
        wake_ranges=tuple((regions[i].base, regions[i].size) for i in touched),
        planned_for=tuple(regions),
    )


def _split_zero(
    region: int,
    r: Region,
    keys: list[tuple[int, int]],
    lo: int,
    hi: int,
    first_touch: dict[tuple[int, int], int],
    is_zero: Callable[[int, int], bool],
) -> list[tuple[int, Run]]:
    """Split the contiguous pages ``keys[lo:hi]`` into maximal all-zero / non-zero runs, each
    keyed by its earliest first-touch position."""
    ps = r.page_size
    start = keys[lo][1]
    # hugetlbfs does not support UFFDIO_ZEROPAGE (the kernel returns EINVAL): copy its zeros.
    if ps != PAGE_SIZE:
        flags = [False] * (hi - lo)
    elif is_zero(r.offset + start, (hi - lo) * ps):  # the common all-zero group: one check
        flags = [True] * (hi - lo)
    elif hi - lo == 1:
        flags = [False]
    else:
        flags = [is_zero(r.offset + keys[k][1], ps) for k in range(lo, hi)]
    out: list[tuple[int, Run]] = []
    a = lo
    for b in range(lo + 1, hi + 1):
        if b == hi or flags[b - lo] != flags[a - lo]:
            key = (
                min(first_touch[keys[k]] for k in range(a, b))
                if b - a > 1
                else first_touch[keys[a]]
            )
            off = keys[a][1]
            out.append(
                (key, Run(region, r.base + off, r.offset + off, (b - a) * ps, flags[a - lo], ps))
            )
            a = b
    return out


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
        if exc.errno == errno.EEXIST:
            # The page at cursor is present: a vCPU's fault got there first. That is
            # success for that page; carry on with the rest of the run after it.
            tally.already_present += 1
            cursor += ps
        elif exc.errno == errno.EAGAIN:
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
) -> PrefetchResult:
    """Install ``plan`` into ``target``: one ioctl per run, then one wake per touched region.

    ``regions`` are the target fork's regions when they differ from those the plan was made
    for (another fork of the same template): runs are relocated by each region's base.
    ``timeout`` bounds, from the start, the time spent waiting for the fault loop after
    EAGAIN. The regions are woken even when a run fails with :class:`PrefetchError`.
    """
    started = clock()
    deadline = started + timeout
    deltas = plan.deltas_for(regions) if regions is not None else [0] * len(plan.planned_for)
    # Looking up removed ranges per run costs more than the ioctl's own Python; skip it while
    # the guest has removed nothing (a later REMOVE shows up as EAGAIN, which re-checks).
    tally = _Tally(check_removed=bool(target.removed_ranges(0, 1 << 64)))
    src_base = target.src_base
    copy, zeropage = target.copy, target.zeropage
    try:
        for run in plan.runs:
            delta = deltas[run.region] if deltas else 0
            first_error = None
            if not tally.check_removed:
                # The common case, kept lean: one ioctl installs the whole run. Anything
                # unusual (a race, a REMOVE) is handled by _install_run from that error.
                dst = run.host_start + delta
                tally.ioctls += 1
                try:
                    if run.zero:
                        zeropage(dst, run.length, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
                    else:
                        copy(dst, src_base + run.file_offset, run.length, UFFDIO_COPY_MODE_DONTWAKE)
                except OSError as exc:
                    first_error = exc
                else:
                    tally.installed += run.length // run.page_size
                    tally.installed_bytes += run.length
                    continue
            _install_run(run, delta, target, src_base, tally, deadline, clock, first_error)
    except BaseException as exc:
        _wake_regions(plan, deltas, target, tally, quiet=True)
        if isinstance(exc, PrefetchError):
            exc.installed = tally.installed
        raise
    _wake_regions(plan, deltas, target, tally, quiet=False)
    return PrefetchResult(
        requested=plan.pages,
        installed=tally.installed,
        already_present=tally.already_present,
        skipped_removed=tally.skipped_removed,
        runs=len(plan.runs),
        ioctls=tally.ioctls,
        bytes=tally.installed_bytes,
        seconds=clock() - started,
    )


def prefetch(
    pages: Sequence[tuple[int, int]],
    regions: Sequence[Region],
    is_zero: Callable[[int, int], bool],
    target: PrefetchTarget,
    *,
    timeout: float = 10.0,
) -> PrefetchResult:
    """Plan and install ``pages`` in one call (see :func:`plan_prefetch`, :func:`execute_plan`)."""
    return execute_plan(plan_prefetch(pages, regions, is_zero), target, timeout=timeout)


__all__ = [
    "PrefetchPlan",
    "PrefetchResult",
    "PrefetchTarget",
    "Run",
    "execute_plan",
    "plan_prefetch",
    "prefetch",
]
