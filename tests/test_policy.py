"""The fault policy and the fork state machine, without a kernel."""

from __future__ import annotations

import pytest

from pagefork.errors import ForkError
from pagefork.regions import Region, RegionMap
from pagefork.removed import RemovedRanges
from pagefork.serving.policy import Action, decide
from pagefork.serving.state import FINAL, ForkState, can_move, transition

P = 4096
H = 2 << 20
#: Two 4 KiB-page regions with a hole, and a hugepage region.
REGIONS = [
    Region(0x10000000, 16 * P, 0),
    Region(0x20000000, 8 * P, 16 * P),
    Region(0x40000000, 2 * H, 24 * P, H),
]
TABLE = RegionMap(REGIONS).table
#: Template page i of the file is all zero when i % 4 == 0 (4 KiB index).
ZEROS = bytes(1 if i % 4 == 0 else 0 for i in range(24 * P // P + 2 * H // P))


def _is_zero(offset: int, length: int) -> bool:
    return all(ZEROS[i] for i in range(offset // P, (offset + length) // P))


def test_a_fault_mid_page_copies_its_whole_page_from_the_right_file_offset() -> None:
    got = decide(0x20000000 + 3 * P + 123, TABLE, ZEROS, None, _is_zero)
    assert got == (Action.COPY, 0x20000000 + 3 * P, 19 * P, P, 1)


def test_an_all_zero_template_page_is_a_zeropage() -> None:
    assert decide(0x10000000 + 4 * P, TABLE, ZEROS, None, _is_zero)[0] == Action.ZEROPAGE


def test_a_removed_page_reads_zero_whatever_the_template_holds() -> None:
    removed = RemovedRanges()
    removed.add(0x10000000 + P, 0x10000000 + 3 * P)
    action, dst, *_ = decide(0x10000000 + 2 * P + 8, TABLE, ZEROS, removed.contains, _is_zero)
    assert (action, dst) == (Action.ZEROPAGE, 0x10000000 + 2 * P)
    assert decide(0x10000000 + 3 * P, TABLE, ZEROS, removed.contains, _is_zero)[0] == Action.COPY


def test_hugepages_copy_their_zeros_and_are_served_whole() -> None:
    # The hugepage at file offset 24*P+H is not all zero in the 4 KiB index: copied whole.
    got = decide(0x40000000 + H + 5 * P, TABLE, ZEROS, None, _is_zero)
    assert got == (Action.COPY, 0x40000000 + H, 24 * P + H, H, 2)
    removed = RemovedRanges()
    removed.add(0x40000000, 0x40000000 + H)
    zero = decide(0x40000000 + 7, TABLE, ZEROS, removed.contains, _is_zero)
    assert zero[0] == Action.COPY_ZEROS  # hugetlbfs has no UFFDIO_ZEROPAGE


@pytest.mark.parametrize("address", [0x0FFFFFFF, 0x10000000 + 16 * P, 0x20000000 + 8 * P, 0])
def test_an_address_outside_every_region_is_outside(address: int) -> None:
    assert decide(address, TABLE, ZEROS, None, _is_zero)[0] == Action.OUTSIDE
    assert RegionMap(REGIONS).index_of(address) == -1


def test_fork_states_move_only_as_the_table_allows() -> None:
    assert transition("f", ForkState.WAITING, ForkState.HANDSHAKE) is ForkState.HANDSHAKE
    assert can_move(ForkState.HANDSHAKE, ForkState.WAITING)  # a failed handshake may retry
    assert can_move(ForkState.SERVING, ForkState.ADOPTING)  # its worker died
    assert can_move(ForkState.ADOPTING, ForkState.SERVING)
    assert not can_move(ForkState.WAITING, ForkState.SERVING)  # no handshake, no serving
    for final in FINAL:
        assert not any(can_move(final, s) for s in ForkState)
    with pytest.raises(ForkError, match="fork f: cannot go from ended to serving"):
        transition("f", ForkState.ENDED, ForkState.SERVING)
