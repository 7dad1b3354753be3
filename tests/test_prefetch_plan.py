"""Prefetch planning (validation, coalescing, zero runs, order) and execution against a fake
uffd that applies the kernel's rules: EEXIST, EAGAIN with partial copies, removed ranges."""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import needs_uffd
from pagefork.copycost import MAX_BRIDGE_GAP, CopyCost, measure_copy_cost
from pagefork.errors import PrefetchError
from pagefork.hotpages import HotPage, HotPageList
from pagefork.memfile import MemFile
from pagefork.prefetch import (
    RUN_FIELDS,
    PrefetchPlan,
    Run,
    execute_plan,
    layout_key,
    plan_hot_set,
    plan_prefetch,
    prefetch,
)
from pagefork.regions import Region
from pagefork.uffd import (
    UFFDIO_COPY_MODE_DONTWAKE,
    UFFDIO_ZEROPAGE_MODE_DONTWAKE,
    UffdIoctls,
    open_userfaultfd,
    uffdio_api,
    uffdio_register,
)

P = 0x1000
H = 0x200000
SRC = 0x7F00_0000_0000
BASE0 = 0x1_0000_0000
BASE1 = 0x2_0000_0000

#: Two 4 KiB regions laid out back to back in the mem-file.
REGIONS = [Region(BASE0, 16 * P, 0), Region(BASE1, 8 * P, 16 * P)]


def plan_exact(
    pages: Sequence[tuple[int, int]], regions: Sequence[Region], is_zero: Callable[[int, int], bool]
) -> PrefetchPlan:
    """A plan that bridges no gap: its runs do not depend on this host's measured costs."""
    return plan_prefetch(pages, regions, is_zero, bridge_gap=0)


def never_zero(offset: int, length: int) -> bool:
    return False


def zero_at(*file_pages: int) -> Callable[[int, int], bool]:
    """An ``is_zero`` for a mem-file whose listed 4 KiB pages (by index) are all zero."""
    zeros = set(file_pages)

    def is_zero(offset: int, length: int) -> bool:
        return all(page in zeros for page in range(offset // P, (offset + length) // P))

    return is_zero


def hp(*pairs: tuple[int, int]) -> list[HotPage]:
    return [HotPage(r, o) for r, o in pairs]


def oserror(code: int, done: int) -> OSError:
    exc = OSError(code, "fake")
    exc.done = done  # type: ignore[attr-defined]
    return exc


@dataclass
class FakeUffd:
    """A fork's memory as the kernel sees it, one page size per fake.

    The kernel copies page by page; at a ``present`` page it stops. With nothing done that is
    EEXIST; after some pages it reports the partial copy as EAGAIN with ``done`` (Linux's
    ``userfaultfd_copy``), or as EEXIST with ``done`` when ``eexist_after_progress`` is set.
    ``eagain_on`` lists call numbers that fail with EAGAIN after ``eagain_done`` bytes (0: an
    unread event); ``removed_after_await`` ranges appear once await_events ran.
    """

    page_size: int = P
    present: set[int] = field(default_factory=set)
    removed: list[tuple[int, int]] = field(default_factory=list)
    removed_after_await: list[tuple[int, int]] = field(default_factory=list)
    eagain_on: set[int] = field(default_factory=set)
    eagain_done: int = 0
    eexist_after_progress: bool = False
    fail_with: dict[int, int] = field(default_factory=dict)
    calls: list[tuple[object, ...]] = field(default_factory=list)
    installed: dict[int, object] = field(default_factory=dict)
    ioctl_count: int = 0
    src_base: int = SRC

    def _fill(self, name: str, dst: int, length: int, source: Callable[[int], object]) -> int:
        call = self.ioctl_count
        self.ioctl_count += 1
        if call in self.fail_with:
            raise oserror(self.fail_with[call], 0)
        if call in self.eagain_on:
            for off in range(0, self.eagain_done, self.page_size):
                self._install(dst + off, source(off))
            raise oserror(errno.EAGAIN, self.eagain_done)
        for off in range(0, length, self.page_size):
            if dst + off in self.present or dst + off in self.installed:
                partial_errno = errno.EEXIST if self.eexist_after_progress else errno.EAGAIN
                raise oserror(errno.EEXIST if off == 0 else partial_errno, off)
            self._install(dst + off, source(off))
        return length

    def _install(self, addr: int, what: object) -> None:
        assert addr not in self.installed and addr not in self.present
        for lo, hi in self.removed:
            assert not lo <= addr < hi, f"template bytes installed in removed page {addr:#x}"
        self.installed[addr] = what

    def copy(self, dst: int, src: int, length: int, mode: int) -> int:
        self.calls.append(("copy", dst, src, length, mode))
        return self._fill("copy", dst, length, lambda off: src + off)

    def zeropage(self, dst: int, length: int, mode: int) -> int:
        self.calls.append(("zero", dst, length, mode))
        return self._fill("zero", dst, length, lambda off: "zero")

    def wake(self, start: int, length: int) -> None:
        self.calls.append(("wake", start, length))

    def removed_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        return [
            (max(lo, start), min(hi, end)) for lo, hi in self.removed if lo < end and hi > start
        ]

    def await_events(self, timeout: float) -> None:
        self.calls.append(("await",))
        self.removed.extend(self.removed_after_await)
        self.removed_after_await = []


C = UFFDIO_COPY_MODE_DONTWAKE
Z = UFFDIO_ZEROPAGE_MODE_DONTWAKE


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ((3, 0x2000), r"^entry 5: \(region 3, offset 0x2000\): no region 3 \(fork has 2\)$"),
        ((-1, 0), r"^entry 5: \(region -1, offset 0x0\): no region -1"),
        ((1, 0x1800), r"^entry 5: \(region 1, offset 0x1800\): not aligned to the region's 0x1000"),
        ((1, 8 * P), r"^entry 5: \(region 1, offset 0x8000\): beyond the end of region 1 \(size"),
        ((0, -P), r"^entry 5: .*: not aligned"),
    ],
)
def test_prefetch_rejects_a_bad_entry_before_installing_anything(
    bad: tuple[int, int], message: str
) -> None:
    pages = hp((0, 0), (0, P), (1, 0), (0, 2 * P), (1, P), bad, (0, 3 * P), (9, 9))
    uffd = FakeUffd()
    with pytest.raises(PrefetchError, match=message):
        prefetch(pages, REGIONS, never_zero, uffd)
    assert uffd.calls == []


def test_prefetch_rejects_offset_outside_a_hugepage_region_alignment() -> None:
    regions = [Region(BASE0, 4 * H, 0, page_size=H)]
    with pytest.raises(PrefetchError, match=r"entry 1: .*not aligned to the region's 0x200000"):
        plan_exact(hp((0, H), (0, P)), regions, never_zero)


# --- planning --------------------------------------------------------------------------------


def test_plan_coalesces_contiguous_pages_and_orders_runs_by_first_touch() -> None:
    pages = hp((0, 5 * P), (1, 2 * P), (0, P), (0, 6 * P), (0, 2 * P), (1, 3 * P), (0, 5 * P))
    plan = plan_exact(pages, REGIONS, never_zero)
    assert plan.runs == (
        Run(0, BASE0 + 5 * P, 5 * P, 2 * P, zero=False),  # touched first (entry 0)
        Run(1, BASE1 + 2 * P, 16 * P + 2 * P, 2 * P, zero=False),  # entry 1
        Run(0, BASE0 + P, P, 2 * P, zero=False),  # entry 2
    )
    assert plan.pages == 6
    assert plan.bytes == 6 * P
    assert plan.regions == frozenset({0, 1})
    assert plan.wake_ranges == ((BASE0, 16 * P), (BASE1, 8 * P))


def test_plan_splits_runs_into_zero_and_data_subruns() -> None:
    # File pages 2, 3 and 5 are zero; the list covers pages 0..6 of region 0.
    plan = plan_exact(hp(*[(0, i * P) for i in range(7)]), REGIONS, zero_at(2, 3, 5))
    assert [(r.host_start - BASE0, r.length, r.zero) for r in plan.runs] == [
        (0, 2 * P, False),
        (2 * P, 2 * P, True),
        (4 * P, P, False),
        (5 * P, P, True),
        (6 * P, P, False),
    ]


def test_plan_uses_one_zero_run_for_an_all_zero_group() -> None:
    plan = plan_exact(hp((1, 0), (1, P), (1, 2 * P)), REGIONS, zero_at(16, 17, 18))
    assert plan.runs == (Run(1, BASE1, 16 * P, 3 * P, zero=True),)


def test_plan_never_uses_zeropage_on_hugepage_regions() -> None:
    # hugetlbfs has no UFFDIO_ZEROPAGE: its zero pages are copied.
    regions = [Region(BASE0, 4 * H, 0, page_size=H)]
    plan = plan_exact(hp((0, 2 * H), (0, H)), regions, lambda off, n: True)
    assert plan.runs == (Run(0, BASE0 + H, H, 2 * H, zero=False, page_size=H),)
    assert plan.pages == 2
    assert plan.bytes == 2 * H


def test_plan_of_an_empty_list_is_empty() -> None:
    plan = plan_exact([], REGIONS, never_zero)
    assert plan == PrefetchPlan.from_runs((), 0, 0, frozenset(), (), tuple(REGIONS))
    assert plan.run_count == 0 and plan.bridged_pages == 0


def test_plan_uses_the_memfile_zero_index(tmp_path: Path) -> None:
    path = f"{tmp_path}/mem"
    with open(path, "wb") as f:
        f.write(b"\x01" * P + bytes(2 * P) + b"\x02" * P)
    with MemFile(path) as mem:
        plan = plan_exact(
            hp(*[(0, i * P) for i in range(4)]), [Region(BASE0, 4 * P, 0)], mem.is_zero
        )
    assert [r.zero for r in plan.runs] == [False, True, False]


# --- execution -------------------------------------------------------------------------------


def test_execute_issues_one_dontwake_ioctl_per_run_then_one_wake_per_region() -> None:
    pages = hp((0, 3 * P), (0, 4 * P), (1, 0), (0, 0), (0, 5 * P))
    plan = plan_exact(pages, REGIONS, zero_at(0))
    uffd = FakeUffd()
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0 + 3 * P, SRC + 3 * P, 3 * P, C),
        ("copy", BASE1, SRC + 16 * P, P, C),
        ("zero", BASE0, P, Z),
        ("wake", BASE0, 16 * P),
        ("wake", BASE1, 8 * P),
    ]
    assert result.requested == 5
    assert result.installed == 5
    assert result.already_present == 0
    assert result.skipped_removed == 0
    assert result.runs == 3
    assert result.ioctls == 5
    assert result.bytes == 5 * P
    assert result.seconds >= 0


def test_execute_counts_a_page_a_vcpu_installed_first_and_continues_after_it() -> None:
    plan = plan_exact(hp(*[(0, i * P) for i in range(5)]), REGIONS, never_zero)
    uffd = FakeUffd(present={BASE0 + 2 * P})
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0, SRC, 5 * P, C),  # installs pages 0-1, stops at 2: EAGAIN, done 2 pages
        ("copy", BASE0 + 2 * P, SRC + 2 * P, 3 * P, C),  # EEXIST, nothing done
        ("copy", BASE0 + 3 * P, SRC + 3 * P, 2 * P, C),
        ("wake", BASE0, 16 * P),
    ]
    assert (result.installed, result.already_present, result.ioctls) == (4, 1, 4)
    assert sorted(uffd.installed) == [BASE0, BASE0 + P, BASE0 + 3 * P, BASE0 + 4 * P]


def test_execute_handles_eexist_reported_after_partial_progress() -> None:
    plan = plan_exact(hp(*[(0, i * P) for i in range(5)]), REGIONS, never_zero)
    uffd = FakeUffd(present={BASE0 + 2 * P}, eexist_after_progress=True)
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0, SRC, 5 * P, C),  # EEXIST with done = 2 pages
        ("copy", BASE0 + 3 * P, SRC + 3 * P, 2 * P, C),
        ("wake", BASE0, 16 * P),
    ]
    assert (result.installed, result.already_present, result.ioctls) == (4, 1, 3)


def test_execute_handles_eexist_on_the_first_and_last_page() -> None:
    plan = plan_exact(hp(*[(0, i * P) for i in range(3)]), REGIONS, never_zero)
    uffd = FakeUffd(present={BASE0, BASE0 + 2 * P})
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0, SRC, 3 * P, C),
        ("copy", BASE0 + P, SRC + P, 2 * P, C),
        ("copy", BASE0 + 2 * P, SRC + 2 * P, P, C),
        ("wake", BASE0, 16 * P),
    ]
    assert (result.installed, result.already_present) == (1, 2)
    assert result.bytes == P


def test_execute_zero_run_eexist_splits_the_zeropage() -> None:
    plan = plan_exact(hp((1, 0), (1, P), (1, 2 * P)), REGIONS, zero_at(16, 17, 18))
    uffd = FakeUffd(present={BASE1 + P})
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("zero", BASE1, 3 * P, Z),
        ("zero", BASE1 + P, 2 * P, Z),
        ("zero", BASE1 + 2 * P, P, Z),
        ("wake", BASE1, 8 * P),
    ]
    assert (result.installed, result.already_present) == (2, 1)


def test_execute_waits_for_events_after_eagain_and_skips_pages_removed_meanwhile() -> None:
    plan = plan_exact(hp(*[(0, i * P) for i in range(6)]), REGIONS, never_zero)
    # A REMOVE of page 2 is pending: the copy fails with EAGAIN, nothing done.
    uffd = FakeUffd(eagain_on={0}, removed_after_await=[(BASE0 + 2 * P, BASE0 + 3 * P)])
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0, SRC, 6 * P, C),
        ("await",),
        ("copy", BASE0, SRC, 2 * P, C),
        ("copy", BASE0 + 3 * P, SRC + 3 * P, 3 * P, C),
        ("wake", BASE0, 16 * P),
    ]
    assert (result.installed, result.already_present, result.skipped_removed) == (5, 0, 1)
    assert result.requested == result.installed + result.already_present + result.skipped_removed
    assert BASE0 + 2 * P not in uffd.installed


def test_execute_retries_a_partial_copy_without_waiting_for_events() -> None:
    plan = plan_exact(hp(*[(0, i * P) for i in range(4)]), REGIONS, never_zero)
    uffd = FakeUffd(eagain_on={0}, eagain_done=P)
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0, SRC, 4 * P, C),
        ("copy", BASE0 + P, SRC + P, 3 * P, C),
        ("wake", BASE0, 16 * P),
    ]
    assert (result.installed, result.ioctls) == (4, 3)


def test_execute_skips_removed_ranges_widened_to_whole_pages() -> None:
    plan = plan_exact(hp(*[(0, i * P) for i in range(8)]), REGIONS, never_zero)
    # Pages 1 and 4-5 were removed (one range given unaligned: any byte removes the page).
    uffd = FakeUffd(removed=[(BASE0 + P, BASE0 + 2 * P), (BASE0 + 4 * P + 8, BASE0 + 5 * P + 1)])
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0, SRC, P, C),
        ("copy", BASE0 + 2 * P, SRC + 2 * P, 2 * P, C),
        ("copy", BASE0 + 6 * P, SRC + 6 * P, 2 * P, C),
        ("wake", BASE0, 16 * P),
    ]
    assert (result.installed, result.skipped_removed) == (5, 3)


def test_execute_run_entirely_removed_issues_no_copy_but_still_wakes() -> None:
    plan = plan_exact(hp((1, 0), (1, P)), REGIONS, never_zero)
    uffd = FakeUffd(removed=[(BASE1, BASE1 + 8 * P)])
    result = execute_plan(plan, uffd)
    assert uffd.calls == [("wake", BASE1, 8 * P)]
    assert (result.installed, result.skipped_removed, result.ioctls) == (0, 2, 1)


def test_execute_other_errno_names_the_run_and_still_wakes() -> None:
    plan = plan_exact(hp((0, 0), (1, P)), REGIONS, never_zero)
    uffd = FakeUffd(fail_with={1: errno.ENOMEM})
    with pytest.raises(
        PrefetchError,
        match=rf"^run at {BASE1 + P:#x} \(region 1, 0x1000 bytes\): UFFDIO_COPY at "
        rf"{BASE1 + P:#x} failed: ENOMEM",
    ):
        execute_plan(plan, uffd)
    assert uffd.calls[-2:] == [("wake", BASE0, 16 * P), ("wake", BASE1, 8 * P)]


def test_execute_gives_up_when_eagain_outlasts_the_timeout() -> None:
    plan = plan_exact(hp((0, 0)), REGIONS, never_zero)
    uffd = FakeUffd(eagain_on=set(range(100)))
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    with pytest.raises(PrefetchError, match=r"timed out waiting for the fault loop"):
        execute_plan(plan, uffd, timeout=5.0, clock=clock)
    assert uffd.calls.count(("await",)) < 5
    assert uffd.calls[-1] == ("wake", BASE0, 16 * P)


def test_execute_propagates_an_await_timeout_from_the_target() -> None:
    class StuckUffd(FakeUffd):
        def await_events(self, timeout: float) -> None:
            raise PrefetchError("fault loop did not read events within 1.0 s")

    plan = plan_exact(hp((0, 0)), REGIONS, never_zero)
    with pytest.raises(PrefetchError, match="fault loop did not read events"):
        execute_plan(plan, StuckUffd(eagain_on={0}))


def test_execute_hugepage_region_copies_in_2mib_units() -> None:
    regions = [Region(BASE0, 4 * H, 0, page_size=H)]
    plan = plan_exact(hp((0, 0), (0, H), (0, 2 * H)), regions, never_zero)
    uffd = FakeUffd(page_size=H, present={BASE0 + H})
    result = execute_plan(plan, uffd)
    assert uffd.calls == [
        ("copy", BASE0, SRC, 3 * H, C),
        ("copy", BASE0 + H, SRC + H, 2 * H, C),
        ("copy", BASE0 + 2 * H, SRC + 2 * H, H, C),
        ("wake", BASE0, 4 * H),
    ]
    assert (result.installed, result.already_present, result.bytes) == (2, 1, 2 * H)


def test_execute_empty_plan_does_nothing() -> None:
    uffd = FakeUffd()
    result = execute_plan(plan_exact([], REGIONS, never_zero), uffd)
    assert uffd.calls == []
    assert (result.requested, result.installed, result.ioctls) == (0, 0, 0)


# --- against the real kernel -----------------------------------------------------------------


class RecordingUffd:
    """A PrefetchTarget over a real uffd, logging the calls as FakeUffd does."""

    def __init__(self, fd: int, src_base: int) -> None:
        self.ioctls = UffdIoctls(fd)
        self.src_base = src_base
        self.calls: list[tuple[object, ...]] = []

    def copy(self, dst: int, src: int, length: int, mode: int) -> int:
        self.calls.append(("copy", dst, src, length, mode))
        return self.ioctls.copy(dst, src, length, mode)

    def zeropage(self, dst: int, length: int, mode: int) -> int:
        self.calls.append(("zero", dst, length, mode))
        return self.ioctls.zeropage(dst, length, mode)

    def wake(self, start: int, length: int) -> None:
        self.calls.append(("wake", start, length))
        self.ioctls.wake(start, length)

    def removed_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        return []

    def await_events(self, timeout: float) -> None:
        raise AssertionError("no events expected")


@needs_uffd
def test_execute_against_a_real_uffd_matches_the_kernels_eexist_contract(tmp_path: Path) -> None:
    # The test process only reads pages that are present, so it never faults on its own uffd.
    path = tmp_path / "mem"
    content = [bytes([i + 1]) * P for i in range(8)]
    content[4] = bytes(P)
    path.write_bytes(b"".join(content))
    fd = open_userfaultfd()
    area = mmap.mmap(-1, 8 * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(area)
    base = ctypes.addressof(anchor)
    try:
        uffdio_api(fd)
        uffdio_register(fd, base, 8 * P)
        with MemFile(path) as mem:
            target = RecordingUffd(fd, mem.address)
            # A "vCPU" got page 2 first, with other bytes than the template's.
            target.ioctls.copy(base + 2 * P, mem.address + 7 * P, P)
            regions = [Region(base, 8 * P, 0)]
            plan = plan_exact(hp(*[(0, i * P) for i in range(6)]), regions, mem.is_zero)
            result = execute_plan(plan, target)
            assert target.calls == [
                ("copy", base, mem.address, 4 * P, C),  # EAGAIN: 2 pages done
                ("copy", base + 2 * P, mem.address + 2 * P, 2 * P, C),  # EEXIST
                ("copy", base + 3 * P, mem.address + 3 * P, P, C),
                ("zero", base + 4 * P, P, Z),
                ("copy", base + 5 * P, mem.address + 5 * P, P, C),
                ("wake", base, 8 * P),
            ]
            assert (result.installed, result.already_present, result.bytes) == (5, 1, 5 * P)
            got = [ctypes.string_at(base + i * P, P) for i in range(6)]
            assert got == [*content[:2], content[7], *content[3:6]]
    finally:
        del anchor
        area.close()
        os.close(fd)


def test_a_plan_crosses_to_a_worker_process_unchanged() -> None:
    regions = [Region(0x10000000, 64 * P, 0), Region(0x20000000, 32 * P, 64 * P)]
    pages = [(1, 3 * P), (0, 0), (0, P), (0, 9 * P), (1, 0)]
    plan = plan_exact(pages, regions, lambda off, n: off == P)
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and again.runs == plan.runs and again.runs[0].zero is plan.runs[0].zero


# --- the vectorised planner against the per-page one it replaced ------------------------------


def reference_plan(
    pages: Sequence[tuple[int, int]],
    regions: Sequence[Region],
    is_zero: Callable[[int, int], bool],
) -> tuple[list[Run], int, int]:
    """The planner as it was before it was vectorised, page by page: (runs, pages, bytes).
    Validation is left to the planner under test (``check_reference_validation``)."""
    first_touch: dict[tuple[int, int], int] = {}
    for index, page in enumerate(pages):
        first_touch.setdefault((page[0], page[1]), index)
    keys = sorted(first_touch)
    keyed: list[tuple[int, Run]] = []
    total = 0
    i = 0
    while i < len(keys):
        region, start = keys[i]
        r = regions[region]
        ps = r.page_size
        j = i + 1
        expect = start + ps
        while j < len(keys) and keys[j] == (region, expect):
            j += 1
            expect += ps
        total += expect - start
        if ps != P:
            flags = [False] * (j - i)
        elif is_zero(r.offset + start, (j - i) * ps):
            flags = [True] * (j - i)
        elif j - i == 1:
            flags = [False]
        else:
            flags = [is_zero(r.offset + keys[k][1], ps) for k in range(i, j)]
        a = i
        for b in range(i + 1, j + 1):
            if b == j or flags[b - i] != flags[a - i]:
                key = min(first_touch[keys[k]] for k in range(a, b))
                off = keys[a][1]
                run = Run(region, r.base + off, r.offset + off, (b - a) * ps, flags[a - i], ps)
                keyed.append((key, run))
                a = b
        i = j
    keyed.sort(key=lambda kr: kr[0])
    return [run for _, run in keyed], len(keys), total


class ZeroIndexed:
    """A template's zero-page index, read by the planner as a mem-file's would be."""

    def __init__(self, zero_pages: bytes) -> None:
        self.zero_pages = bytearray(zero_pages)

    def is_zero(self, offset: int, length: int = P) -> bool:
        return self.zero_pages.find(0, offset // P, (offset + length + P - 1) // P) < 0


MIXED = [
    Region(BASE0, 64 * P, 0),
    Region(BASE1, 4 * H, 64 * P, page_size=H),
    Region(0x3_0000_0000, 32 * P, 64 * P + 4 * H),
]


def random_case(seed: int) -> tuple[list[tuple[int, int]], ZeroIndexed]:
    rng = random.Random(seed)
    pages = []
    for _ in range(rng.randint(1, 120)):
        region = rng.randrange(len(MIXED))
        r = MIXED[region]
        pages.append((region, rng.randrange(r.size // r.page_size) * r.page_size))
    total = (64 * P + 4 * H + 32 * P) // P
    zeros = bytes(rng.random() < rng.choice((0.0, 0.3, 0.7, 1.0)) for _ in range(total))
    return pages, ZeroIndexed(zeros)


@pytest.mark.parametrize("seed", range(200))
def test_vectorised_plan_equals_the_per_page_planner_on_random_lists(seed: int) -> None:
    pages, mem = random_case(seed)
    runs, npages, nbytes = reference_plan(pages, MIXED, mem.is_zero)
    for is_zero in (mem.is_zero, lambda off, n: mem.is_zero(off, n)):  # index, then calls
        plan = plan_exact(pages, MIXED, is_zero)
        assert list(plan.runs) == runs
        assert (plan.pages, plan.bytes, plan.bridged_pages) == (npages, nbytes, 0)
        assert plan.regions == frozenset(p[0] for p in pages)


ADVERSARIAL: dict[str, list[tuple[int, int]]] = {
    "one page": [(0, 0)],
    "every page, reversed": [(0, i * P) for i in reversed(range(64))],
    "duplicates everywhere": [(0, (i % 5) * P) for i in range(50)],
    "last page of each region": [(0, 63 * P), (1, 3 * H), (2, 31 * P)],
    "regions' ends meet in the file": [(0, 63 * P), (1, 0), (2, 0), (1, 3 * H)],
    "alternating far ends": [(0, (i if i % 2 else 63 - i) * P) for i in range(64)],
    "every other page": [(0, i * P) for i in range(0, 64, 2)],
    "hugepages only": [(1, i * H) for i in (3, 0, 1, 2)],
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_vectorised_plan_equals_the_per_page_planner_on_adversarial_lists(case: str) -> None:
    pages = ADVERSARIAL[case]
    total = (64 * P + 4 * H + 32 * P) // P
    for zeros in (bytes(total), b"\x01" * total, bytes(i % 3 == 0 for i in range(total))):
        mem = ZeroIndexed(zeros)
        runs, npages, nbytes = reference_plan(pages, MIXED, mem.is_zero)
        plan = plan_exact(pages, MIXED, mem.is_zero)
        assert (list(plan.runs), plan.pages, plan.bytes) == (runs, npages, nbytes)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ((3, 0), r"^entry 2: \(region 3, offset 0x0\): no region 3 \(fork has 3\)$"),
        ((1, H + P), r"^entry 2: .*: not aligned to the region's 0x200000-byte pages$"),
        ((2, 32 * P), r"^entry 2: .*: beyond the end of region 2 \(size 0x20000\)$"),
        ((0, 1 << 63), r"^entry 2: .*: beyond the end of region 0"),  # beyond int64
    ],
)
def test_vectorised_plan_names_the_first_entry_outside_the_regions(
    bad: tuple[int, int], message: str
) -> None:
    pages = [(0, 0), (2, P), bad, (7, 0)]
    with pytest.raises(PrefetchError, match=message):
        plan_exact(pages, MIXED, never_zero)


# --- bridging gaps ----------------------------------------------------------------------------


def test_bridging_joins_copy_runs_across_small_gaps_only() -> None:
    # Runs at pages 0-1, 3, 7, 9-10: gaps of 1, 3 and 1 page.
    pages = hp(*[(0, i * P) for i in (9, 10, 0, 1, 3, 7)])
    plan = plan_prefetch(pages, REGIONS, never_zero, bridge_gap=2)
    assert plan.runs == (
        Run(0, BASE0 + 7 * P, 7 * P, 4 * P, zero=False),  # 7, [8], 9, 10: first touch 0
        Run(0, BASE0, 0, 4 * P, zero=False),  # 0, 1, [2], 3
    )
    assert (plan.pages, plan.bytes, plan.bridged_pages) == (6, 6 * P, 2)
    uffd = FakeUffd()
    result = execute_plan(plan, uffd)
    assert result.requested == 6 and result.installed == 6
    assert result.bridged_bytes == 2 * P and result.bytes == 8 * P


def test_bridging_never_crosses_a_region_or_a_zero_run_or_hugepages() -> None:
    regions = [Region(BASE0, 8 * P, 0), Region(BASE1, 8 * P, 8 * P), Region(0, 4 * H, 16 * P, H)]
    # Region 0 ends at page 7, region 1 starts right after it in the file; page 3 is zero.
    pages = [(0, 7 * P), (1, 0), (0, 1 * P), (0, 3 * P), (0, 5 * P), (2, 0), (2, 2 * H)]
    mem = ZeroIndexed(bytes(i == 3 for i in range(16 + 4 * 512)))
    plan = plan_prefetch(pages, regions, mem.is_zero, bridge_gap=8)
    assert sorted((r.region, r.host_start, r.length, r.zero) for r in plan.runs) == [
        (0, BASE0 + P, P, False),  # page 2 would bridge to 3, but 3 is a zero page
        (0, BASE0 + 3 * P, P, True),
        (0, BASE0 + 5 * P, 3 * P, False),  # 5, [6], 7: stops at the region's end
        (1, BASE1, P, False),
        (2, 0, H, False),  # hugetlbfs pages are never bridged
        (2, 2 * H, H, False),
    ]
    assert plan.bridged_pages == 1


def test_bridged_pages_the_guest_removed_never_get_template_bytes() -> None:
    pages = hp((0, 0), (0, 3 * P))  # bridged over pages 1 and 2
    plan = plan_prefetch(pages, REGIONS, never_zero, bridge_gap=2)
    assert plan.run_count == 1 and plan.bridged_pages == 2
    uffd = FakeUffd(removed=[(BASE0 + P, BASE0 + 2 * P)])  # page 1 was given back
    result = execute_plan(plan, uffd)
    copies = [c for c in uffd.calls if c[0] == "copy"]
    assert copies == [("copy", BASE0, SRC, P, C), ("copy", BASE0 + 2 * P, SRC + 2 * P, 2 * P, C)]
    assert (result.requested, result.installed, result.skipped_removed) == (2, 2, 0)
    assert result.bridged_bytes == P and result.bytes == 3 * P
    assert set(uffd.installed) == {BASE0, BASE0 + 2 * P, BASE0 + 3 * P}  # never page 1


def test_host_cost_model_bridges_only_gaps_cheaper_than_an_ioctl() -> None:
    assert CopyCost(per_ioctl=3.0, per_page=1.0).bridge_gap == 2  # 3 pages cost one ioctl
    assert CopyCost(per_ioctl=3.5, per_page=1.0).bridge_gap == 3
    assert CopyCost(per_ioctl=0.5, per_page=1.0).bridge_gap == 0
    assert CopyCost(per_ioctl=1e-3, per_page=0.0).bridge_gap == MAX_BRIDGE_GAP


@needs_uffd
def test_host_cost_model_is_measured_on_a_scratch_uffd() -> None:
    cost = measure_copy_cost()
    assert cost.per_ioctl >= 0 and cost.per_page >= 0
    assert cost.per_ioctl + cost.per_page > 0  # something was timed
    assert 0 <= cost.bridge_gap <= MAX_BRIDGE_GAP


# --- plans kept with their hot set ------------------------------------------------------------


def test_a_hot_sets_plan_is_made_once_and_kept_with_it(tmp_path: Path) -> None:
    mem = ZeroIndexed(bytes(i % 4 == 0 for i in range(160)))
    hot = HotPageList.from_pages([(0, i * P) for i in (5, 1, 2, 3, 9, 8)])
    calls = []

    def counting(off: int, n: int) -> bool:
        calls.append(off)
        return mem.is_zero(off, n)

    plan = plan_hot_set(hot, MIXED, counting, bridge_gap=1)
    assert calls  # planned (by calls: no index behind this callable)
    calls.clear()
    assert plan_hot_set(hot, MIXED, counting) == plan and len(calls) == 1  # its zero run checked
    path = tmp_path / "hot.hpl"
    hot.save(path, "hpl3")
    loaded = HotPageList.load(path)
    assert loaded.in_order() == hot.in_order() and loaded.source_format == "hpl3"
    relocated = [Region(r.base + 0x1000_0000, r.size, r.offset, r.page_size) for r in MIXED]
    again = plan_hot_set(loaded, relocated, never_zero_but(mem))
    assert again == plan  # read from the file, not planned: a different layout base is fine
    hot.add(0, 30 * P)  # a changed list drops its plans
    assert hot.plan_data(layout_key(MIXED)) is None


def never_zero_but(mem: ZeroIndexed) -> Callable[[int, int], bool]:
    """``mem.is_zero`` that fails the test when asked about a page that is not in a zero run
    of the stored plan (planning anew would ask about every page)."""

    def is_zero(off: int, n: int) -> bool:
        assert mem.is_zero(off, n), f"asked about {off:#x}+{n:#x}: the plan was made again"
        return True

    return is_zero


def test_a_stored_plan_whose_zero_runs_are_not_zero_any_more_is_made_again() -> None:
    hot = HotPageList.from_pages([(0, i * P) for i in range(4)])
    plan = plan_hot_set(hot, MIXED, ZeroIndexed(b"\x01" * 160).is_zero, bridge_gap=0)
    assert [r.zero for r in plan.runs] == [True]
    now = plan_hot_set(hot, MIXED, ZeroIndexed(bytes(160)).is_zero, bridge_gap=0)
    assert [r.zero for r in now.runs] == [False]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda t: t.__setitem__(1, BASE1), "outside region 0"),  # host address moved away
        (lambda t: t.__setitem__(2, 5 * P), "file offset"),  # copies another page's bytes
        (lambda t: t.__setitem__(3, 65 * P), "outside region 0"),  # past the region's end
        (lambda t: t.__setitem__(0, 7), "no region 7"),
        (lambda t: t.__setitem__(4, 2), "zero flag"),
        (lambda t: t.__setitem__(1, BASE0 + 1), "outside region 0"),  # not page aligned
        (lambda t: t.__setitem__(3, -P), "outside region 0"),  # negative length
        (lambda t: t.__setitem__(5, H), "page size"),  # another region's page size
        (lambda t: t.__setitem__(6, 3), "hot pages"),  # more hot pages than the run holds
        # Values that would overflow int64 arithmetic: judged one run at a time instead.
        (lambda t: t.__setitem__(1, (1 << 63) - 1), "outside region 0"),
        (lambda t: t.__setitem__(3, (1 << 63) - 1), "outside region 0"),
    ],
)
def test_a_stored_plan_that_installs_outside_its_regions_is_refused(
    tamper: Callable[[array.array[int]], None], message: str
) -> None:
    plan = plan_exact([(0, 0), (0, P)], MIXED, never_zero)
    blob = array.array("q")
    blob.frombytes(plan.to_bytes())
    table = blob[len(blob) - RUN_FIELDS :]
    tamper(table)
    blob[len(blob) - RUN_FIELDS :] = table
    with pytest.raises(PrefetchError, match=message):
        PrefetchPlan.from_bytes(blob.tobytes(), "hot.hpl")
    hot = HotPageList.from_pages([(0, 0), (0, P)])
    hot.set_plan_data(layout_key(MIXED), blob.tobytes())
    assert plan_hot_set(hot, MIXED, never_zero, bridge_gap=0) == plan  # planned anew


def test_a_stored_plan_is_read_without_python_work_per_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A template's first fork reads its hot set's stored plan: thousands of runs, checked as
    # whole arrays (the per-run check only runs to name a bad run).
    import pagefork.prefetch as prefetch_module

    pages = [(0, i * P) for i in range(0, 64, 2)] + [(2, i * P) for i in range(1, 32, 3)]
    plan = plan_exact(pages, MIXED, never_zero)
    assert plan.run_count == 43

    def per_run(*args: object) -> None:
        raise AssertionError("a good stored plan was checked run by run")

    monkeypatch.setattr(prefetch_module, "_check_table", per_run)
    again = PrefetchPlan.from_bytes(plan.to_bytes(), "hot.hpl")
    assert again == plan and again.regions == frozenset({0, 2})


def test_a_stored_plan_filed_under_another_layout_is_made_again() -> None:
    hot = HotPageList.from_pages([(0, 0), (0, P)])
    other = [Region(BASE0, 128 * P, 0), *MIXED[1:]]
    hot.set_plan_data(layout_key(MIXED), plan_exact([(0, 0)], other, never_zero).to_bytes())
    plan = plan_hot_set(hot, MIXED, never_zero, bridge_gap=0)
    assert plan.planned_for == tuple(MIXED) and plan.pages == 2


def test_the_bridge_gap_can_be_fixed_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagefork.copycost import MAX_BRIDGE_GAP, bridge_gap_for_host
    from pagefork.errors import PageforkError

    monkeypatch.setenv("PAGEFORK_BRIDGE_GAP", "3")
    assert bridge_gap_for_host() == 3
    monkeypatch.setenv("PAGEFORK_BRIDGE_GAP", str(MAX_BRIDGE_GAP + 100))
    assert bridge_gap_for_host() == MAX_BRIDGE_GAP
    for bad in ("-1", "two", " 2", "\u0661"):
        monkeypatch.setenv("PAGEFORK_BRIDGE_GAP", bad)
        with pytest.raises(PageforkError, match="PAGEFORK_BRIDGE_GAP"):
            bridge_gap_for_host()
