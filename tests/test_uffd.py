"""The kernel-interface module: ioctl numbers, uffd_msg decoding, and a real uffd."""

from __future__ import annotations

import os
import struct

import pytest

from conftest import needs_uffd
from pagefork import uffd
from pagefork.errors import UffdError
from pagefork.regions import Region, RegionMap
from pagefork.removed import RemovedRanges
from pagefork.stats import percentiles_us


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    # Values as the C preprocessor computes them from <linux/userfaultfd.h> on x86_64/arm64.
    assert uffd.UFFDIO_API == 0xC018AA3F
    assert uffd.UFFDIO_REGISTER == 0xC020AA00
    assert uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert uffd.UFFDIO_WAKE == 0x8010AA02
    assert uffd.UFFDIO_COPY == 0xC028AA03
    assert uffd.UFFDIO_ZEROPAGE == 0xC020AA04


def test_uffd_msg_events_decode() -> None:
    fault = uffd.encode_pagefault(0x7F0000001234, uffd.UFFD_PAGEFAULT_FLAG_WRITE, ptid=42)
    assert len(fault) == uffd.UFFD_MSG_SIZE
    pf = uffd.decode_msg(fault)
    assert pf == uffd.PageFault(0x7F0000001234, uffd.UFFD_PAGEFAULT_FLAG_WRITE, 42) and pf.write
    remove = struct.pack("=B3xIQQQ", uffd.UFFD_EVENT_REMOVE, 0, 0x1000, 0x3000, 0)
    remap = struct.pack("=B3xIQQQ", uffd.UFFD_EVENT_REMAP, 0, 0x1000, 0x9000, 0x2000)
    unmap = struct.pack("=B3xIQQQ", uffd.UFFD_EVENT_UNMAP, 0, 0x1000, 0x2000, 0)
    fork = struct.pack("=B3xIQQQ", uffd.UFFD_EVENT_FORK, 0, 7, 0, 0)
    odd = struct.pack("=B3xIQQQ", 0x7F, 0, 0, 0, 0)
    assert uffd.decode_msgs(fault + remove + remap + unmap + fork + odd) == [
        pf,
        uffd.Remove(0x1000, 0x3000),
        uffd.Remap(0x1000, 0x9000, 0x2000),
        uffd.Unmap(0x1000, 0x2000),
        uffd.ForkEvent(7),
        uffd.UnknownEvent(0x7F),
    ]


@needs_uffd
def test_a_real_uffd_is_recognised_and_api_twice_fails() -> None:
    fd = uffd.open_userfaultfd()
    try:
        assert uffd.is_userfaultfd(fd)
        features, ioctls = uffd.uffdio_api(fd, uffd.UFFD_FEATURE_EVENT_REMOVE)
        assert features & uffd.UFFD_FEATURE_EVENT_REMOVE and ioctls
        # Why the server never calls UFFDIO_API on a VMM's uffd: the second call fails.
        with pytest.raises(UffdError, match="UFFDIO_API"):
            uffd.uffdio_api(fd)
    finally:
        os.close(fd)
    r, w = os.pipe()
    assert not uffd.is_userfaultfd(r)
    os.close(r)
    os.close(w)


def test_region_map_finds_regions_across_a_hole() -> None:
    rm = RegionMap([Region(0x10000, 0x4000, 0), Region(0x2000, 0x2000, 0x4000)])
    assert rm.index_of(0x10000) == 0 and rm.index_of(0x13FFF) == 0
    assert rm.index_of(0x14000) == -1 and rm.index_of(0x1FFF) == -1
    loc = rm.locate(0x3123)
    assert loc is not None and (loc.region, loc.page_offset, loc.file_offset) == (1, 0x1000, 0x5000)


def test_removed_ranges_merge_and_overlap() -> None:
    rr = RemovedRanges()
    assert rr.add(0x3000, 0x5000) == 0x2000
    assert rr.add(0x1000, 0x2000) == 0x1000
    assert rr.add(0x2000, 0x3000) == 0x1000  # touches both neighbours: one range
    assert rr.add(0x8000, 0x9000) == 0x1000
    assert rr.add(0x1000, 0x4000) == 0  # removed twice: counted once
    assert rr.ranges() == [(0x1000, 0x5000), (0x8000, 0x9000)]
    assert rr.contains(0x4FFF) and not rr.contains(0x5000)
    assert rr.overlaps(0x4000, 0x8800) == [(0x4000, 0x5000), (0x8000, 0x8800)]


def test_latency_percentiles_use_nearest_rank() -> None:
    got = percentiles_us([4000, 1000, 3000, 2000])
    assert got == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "max": 4.0}
    assert percentiles_us([]) == {}
