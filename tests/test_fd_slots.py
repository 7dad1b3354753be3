"""Room in the fd table made ahead: a takeover's state then lands without growing it."""

from __future__ import annotations

import os
import resource

from pagefork.serving.sockets import reserve_fd_slots
from pagefork.takeover.new import _fds_expected


def _fd_table_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("FDSize:"):
                return int(line.split()[1])
    raise AssertionError("no FDSize in /proc/self/status")


def test_the_table_holds_that_many_more_fds_and_no_fd_is_left_open() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = sorted(os.listdir("/proc/self/fd"))
    highest = max(int(fd) for fd in before)
    count = min(3000, soft - highest - 2)
    reserve_fd_slots(count)
    assert _fd_table_size() > highest + count
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_the_old_sides_estimate_is_used_only_when_it_is_a_count() -> None:
    assert _fds_expected(72) == 72 + 64
    for junk in (None, "72", -1, True, 7.5):
        assert _fds_expected(junk) == 1024
    assert _fds_expected(10**9) == (1 << 20) + 64
