"""What one ``UFFDIO_COPY`` costs on this host: a fixed part per ioctl and a part per page.

Prefetch joins two hot runs separated by a small gap into one copy when copying the gap's
pages costs less than the ioctl it saves. Whether it does depends on the machine (syscall
cost, memory bandwidth, mitigations), so the cost is measured here, once per process, on a
scratch region of this process registered with its own userfaultfd: nothing ever touches
that memory but the kernel's copies, so no fault is taken and no thread can block on it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import time
from dataclasses import dataclass

from pagefork.errors import PageforkError, UffdError
from pagefork.regions import PAGE_SIZE
from pagefork.uffd import (
    UFFDIO_COPY_MODE_DONTWAKE,
    UffdIoctls,
    open_userfaultfd,
    uffdio_api,
    uffdio_register,
)

#: Pages per ioctl in the bulk half of the measurement.
_BULK_PAGES = 16
#: Ioctls per sample: enough to outlast the clock's resolution, few enough to take ~ms.
_SAMPLE_IOCTLS = 32
_SAMPLES = 5
#: The widest gap ever bridged: a noisy measurement must not make runs swallow megabytes.
MAX_BRIDGE_GAP = 32


@dataclass(frozen=True, slots=True)
class CopyCost:
    """Seconds per ``UFFDIO_COPY`` (``per_ioctl``, the Python call included) and per 4 KiB
    page it copies (``per_page``)."""

    per_ioctl: float
    per_page: float

    @property
    def bridge_gap(self) -> int:
        """The widest gap (pages) whose copy costs less than one ioctl: ``g * per_page <
        per_ioctl``, at most :data:`MAX_BRIDGE_GAP`."""
        if self.per_ioctl <= 0:
            return 0
        if self.per_page <= 0:
            return MAX_BRIDGE_GAP
        ratio = self.per_ioctl / self.per_page
        gap = int(ratio) - 1 if ratio == int(ratio) else int(ratio)
        return max(0, min(MAX_BRIDGE_GAP, gap))


def measure_copy_cost() -> CopyCost:
    """Time ``UFFDIO_COPY`` of one page and of :data:`_BULK_PAGES` pages into a scratch region
    (best of a few samples each) and split the cost into its fixed and per-page parts.

    Raises :class:`~pagefork.errors.UffdError` when this process cannot use userfaultfd.
    """
    span = _SAMPLE_IOCTLS * _BULK_PAGES * PAGE_SIZE
    scratch = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(scratch)
    source = ctypes.create_string_buffer(b"\x5a" * (_BULK_PAGES * PAGE_SIZE))
    fd = open_userfaultfd()
    try:
        base = ctypes.addressof(anchor)
        uffdio_api(fd, 0)
        uffdio_register(fd, base, span)
        copy = UffdIoctls(fd).copy
        src = ctypes.addressof(source)

        def sample(pages: int) -> float:
            length = pages * PAGE_SIZE
            t0 = time.perf_counter()
            for i in range(_SAMPLE_IOCTLS):
                copy(base + i * length, src, length, UFFDIO_COPY_MODE_DONTWAKE)
            seconds = (time.perf_counter() - t0) / _SAMPLE_IOCTLS
            # Drop the pages again (no UFFD_FEATURE_EVENT_REMOVE: no event to read).
            scratch.madvise(mmap.MADV_DONTNEED)
            return seconds

        single = min(sample(1) for _ in range(_SAMPLES))
        bulk = min(sample(_BULK_PAGES) for _ in range(_SAMPLES))
    finally:
        os.close(fd)
        del anchor
        scratch.close()
    per_page = max(0.0, (bulk - single) / (_BULK_PAGES - 1))
    return CopyCost(per_ioctl=max(0.0, single - per_page), per_page=per_page)


@functools.cache
def host_copy_cost() -> CopyCost | None:
    """This host's :class:`CopyCost`, measured on first use and kept for the process; None
    when userfaultfd is not available to it (then nothing is bridged)."""
    try:
        return measure_copy_cost()
    except (UffdError, OSError):
        return None


def bridge_gap_for_host() -> int:
    """The bridge gap of :func:`host_copy_cost` (0 when it cannot be measured).

    ``PAGEFORK_BRIDGE_GAP=N`` fixes it instead (0 turns bridging off): a measurement taken
    while the host is busy can come out wide, and tests that count faults need it fixed.
    """
    fixed = os.environ.get("PAGEFORK_BRIDGE_GAP", "")
    if fixed:
        if not (fixed.isascii() and fixed.isdigit()):
            raise PageforkError(
                f"PAGEFORK_BRIDGE_GAP must be a whole number of pages, not {fixed!r}"
            )
        return min(int(fixed), MAX_BRIDGE_GAP)
    cost = host_copy_cost()
    return cost.bridge_gap if cost is not None else 0


__all__ = [
    "MAX_BRIDGE_GAP",
    "CopyCost",
    "bridge_gap_for_host",
    "host_copy_cost",
    "measure_copy_cost",
]
