"""Host address ranges a guest gave back (``UFFD_EVENT_REMOVE``): served zero from then on.

After a balloon inflation (``madvise(MADV_DONTNEED)``) the template's bytes are stale for that
range: a later fault there must get a zero page, never template bytes.
"""

from __future__ import annotations

import bisect
import threading


class RemovedRanges:
    """Sorted, merged, disjoint ``[start, end)`` ranges; safe to share between threads."""

    __slots__ = ("_ends", "_lock", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, start: int, end: int) -> int:
        """Add ``[start, end)``, merging with neighbours it touches or overlaps; returns how
        many bytes were not removed before."""
        if end <= start:
            return 0
        with self._lock:
            lo = bisect.bisect_left(self._ends, start)
            hi = bisect.bisect_right(self._starts, end)
            known = sum(
                max(0, min(end, self._ends[i]) - max(start, self._starts[i])) for i in range(lo, hi)
            )
            fresh = end - start - known
            if lo < hi:
                start = min(start, self._starts[lo])
                end = max(end, self._ends[hi - 1])
            self._starts[lo:hi] = [start]
            self._ends[lo:hi] = [end]
            return fresh

    def contains(self, address: int) -> bool:
        """True when ``address`` lies in a removed range."""
        with self._lock:
            i = bisect.bisect_right(self._starts, address) - 1
            return i >= 0 and address < self._ends[i]

    def overlaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that were removed, in address order."""
        with self._lock:
            i = max(0, bisect.bisect_right(self._starts, start) - 1)
            out = []
            while i < len(self._starts) and self._starts[i] < end:
                lo, hi = max(start, self._starts[i]), min(end, self._ends[i])
                if lo < hi:
                    out.append((lo, hi))
                i += 1
            return out

    def ranges(self) -> list[tuple[int, int]]:
        """All removed ranges."""
        with self._lock:
            return list(zip(self._starts, self._ends, strict=True))
