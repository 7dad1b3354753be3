"""The warm-up-then-prefetch policy, without a kernel."""

from __future__ import annotations

from pagefork.hotloop import HotSetLoop
from pagefork.hotpages import HotPageList

HOT = HotPageList.from_pages([(0, 0), (0, 4096)])


def test_first_fork_records_the_ones_during_it_are_on_demand_the_later_ones_prefetched() -> None:
    loop = HotSetLoop()
    assert loop.role("a") == "warmup" and loop.role("a") == "warmup"
    assert loop.role("b") == "demand"  # the warm-up still records: no hot set yet
    assert loop.claim("a") and not loop.claim("b")
    loop.adopt("a", HOT)
    assert loop.hot is HOT and loop.role("c") == "prefetch"
    assert loop.role("b") == "demand"  # a fork's part is decided once


def test_a_warmup_that_never_recorded_hands_the_part_to_the_next_fork() -> None:
    loop = HotSetLoop()
    assert loop.role("a") == "warmup"
    loop.fork_gone("a")
    assert loop.role("b") == "warmup"


def test_an_empty_recording_or_a_failed_save_changes_no_hot_set() -> None:
    loop = HotSetLoop(HOT)
    loop.rerecord()
    assert loop.role("a") == "warmup" and loop.role("b") == "prefetch"  # the old set serves on
    loop.adopt("a", HotPageList())
    assert loop.hot is HOT and loop.role("c") == "warmup"  # still asked for: record again


def test_a_misfit_hot_set_is_dropped_and_recorded_again() -> None:
    loop = HotSetLoop(HOT)
    assert loop.role("a") == "prefetch"
    loop.misfit()
    assert loop.hot is None and loop.role("b") == "warmup" and loop.role("c") == "demand"


def test_recording_every_fork_prefetches_none_and_without_recording_none_records() -> None:
    every = HotSetLoop(HOT, record_every=True)
    assert [every.role(f) for f in "abc"] == ["warmup"] * 3
    assert every.claim("b")
    every.adopt("b", HotPageList.from_pages([(1, 0)]))
    assert every.hot is HOT  # each recording is its own list, not the template's hot set
    plain = HotSetLoop(None, record=False)
    assert plain.role("a") == "demand"
    assert HotSetLoop(HOT, record=False).role("a") == "prefetch"
