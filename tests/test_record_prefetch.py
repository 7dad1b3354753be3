"""Recording a warm-up fork's hot set and prefetching it into later forks (real uffd)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from conftest import PAGE, needs_uffd
from pagefork.errors import ForkError, PrefetchError
from pagefork.hotpages import HotPage, HotPageList, load

pytestmark = needs_uffd

MIB = 1 << 20


def _pages(n: int, seed: int) -> list[list[int]]:
    """``n`` distinct pages spread over the 8M + 4M guest, in a random (first-touch) order."""
    rng = random.Random(seed)
    every = [[0, off] for off in range(0, 8 * MIB, PAGE)] + [
        [1, off] for off in range(0, 4 * MIB, PAGE)
    ]
    return rng.sample(every, n)


def test_warmup_recording_then_prefetch_leaves_no_demand_faults(tmp_path: Path, make_server, vmms):
    server = make_server()
    warm = vmms(server.register_fork("warm", record=True))
    touched = _pages(400, seed=1)
    assert warm.send(cmd="touch", pages=touched)["bad"] == 0
    hot = server.hot_pages("warm")
    assert [list(p) for p in hot.in_order()] == touched  # first-touch order, per fork
    assert all(t is not None and t >= 0 for t in hot.times())
    hot.save(tmp_path / "hot.hpl")
    loaded = load(tmp_path / "hot.hpl")
    assert loaded.sorted_pages() == sorted(HotPage(r, o) for r, o in touched)

    fork = vmms(server.register_fork("b"))
    result = server.prefetch("b", loaded)
    assert result.requested == 400 and result.installed == 400 and result.already_present == 0
    assert result.runs <= 400 and result.ioctls >= result.runs
    assert fork.send(cmd="touch", pages=touched)["bad"] == 0  # bytes equal the template
    stats = server.stats("b")
    assert (stats.faults, stats.misses, stats.prefetched_pages) == (0, 0, 400)
    # A page outside the hot set is a miss, served on demand.
    outside = next(p for p in _pages(800, seed=2) if p not in touched)
    assert fork.send(cmd="touch", pages=[outside])["bad"] == 0
    assert server.stats("b").misses == 1


def test_recording_is_per_fork_and_off_by_default(make_server, vmms):
    server = make_server()
    a = vmms(server.register_fork("a", record=True))
    b = vmms(server.register_fork("b"))
    assert a.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
    assert b.send(cmd="touch", pages=[[1, 0]])["bad"] == 0
    assert server.hot_pages("a").sorted_pages() == [HotPage(0, 0), HotPage(0, PAGE)]
    with pytest.raises(ForkError, match="not recording"):
        server.hot_pages("b")


def test_prefetch_rejects_a_list_outside_the_regions_and_installs_nothing(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    bad = HotPageList.from_pages([HotPage(0, 0), HotPage(0, PAGE), HotPage(1, 4 * MIB)])
    with pytest.raises(PrefetchError, match=r"entry 2"):
        server.prefetch("a", bad)
    with pytest.raises(PrefetchError, match=r"region 3"):
        server.prefetch("a", [HotPage(3, 0)])
    assert vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
    stats = server.stats("a")
    assert stats.faults == 2 and stats.prefetched_pages == 0  # nothing had been installed


def test_prefetch_races_the_guests_own_faults(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    every = [HotPage(0, off) for off in range(0, 8 * MIB, PAGE)] + [
        HotPage(1, off) for off in range(0, 4 * MIB, PAGE)
    ]
    results = []
    t = threading.Thread(target=lambda: results.append(server.prefetch("a", every)))
    t.start()
    reply = vmm.send(cmd="touch", all=True, order="random", threads=4)
    t.join(30)
    assert reply["bad"] == 0
    (result,) = results
    stats = server.stats("a")
    # Every page came in exactly once: by prefetch, or by a fault, EEXIST absorbing the races.
    assert result.installed + result.already_present == 3072
    assert result.installed + stats.pages_copied + stats.zero_pages == 3072


def test_prefetch_skips_ranges_the_guest_removed(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    assert vmm.send(cmd="remove", region=0, offset=MIB, length=MIB) == {"ok": True}
    pages = [HotPage(0, off) for off in range(0, 4 * MIB, PAGE)]
    result = server.prefetch("a", pages)
    assert result.skipped_removed == 256 and result.installed == 768
    assert vmm.send(cmd="check_zero", region=0, offset=MIB, length=MIB)["zero"] is True
    assert vmm.send(cmd="touch", pages=[[0, o] for o in range(0, 4 * MIB, PAGE)])["bad"] == 0


def test_range_removed_during_prefetch_never_gets_template_bytes(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    pages = [HotPage(0, off) for off in range(0, 8 * MIB, PAGE)]
    done = threading.Event()
    results = []

    def prefetch() -> None:
        results.append(server.prefetch("a", pages))
        done.set()

    t = threading.Thread(target=prefetch)
    t.start()
    assert vmm.send(cmd="remove", region=0, offset=6 * MIB, length=2 * MIB) == {"ok": True}
    assert done.wait(30)
    t.join()
    # Whether prefetch got there before or after the REMOVE, the guest now reads zeros there.
    assert vmm.send(cmd="check_zero", region=0, offset=6 * MIB, length=2 * MIB)["zero"] is True
    assert vmm.send(cmd="touch", pages=[[0, o] for o in range(0, 6 * MIB, PAGE)])["bad"] == 0


def test_prefetch_before_the_handshake_waits_for_it(make_server, vmms):
    server = make_server()
    path = server.register_fork("a")
    results = []
    t = threading.Thread(target=lambda: results.append(server.prefetch("a", [HotPage(0, 0)])))
    t.start()
    vmm = vmms(path)
    t.join(15)
    assert results and results[0].installed == 1
    assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    assert server.stats("a").faults == 0


def test_recording_window_closes_after_max_pages(make_server, vmms):
    closed: list[tuple[str, int]] = []
    done = threading.Event()

    def on_closed(fork_id: str, hot: HotPageList) -> None:
        closed.append((fork_id, len(hot)))
        done.set()

    server = make_server(record_hot_pages=True, record_max_pages=10, on_window_closed=on_closed)
    vmm = vmms(server.register_fork("a"))
    assert vmm.send(cmd="touch", pages=_pages(50, seed=3))["bad"] == 0
    assert done.wait(10)
    assert closed == [("a", 10)]
    assert len(server.hot_pages("a")) == 10
    assert server.stats("a").faults == 50  # serving goes on after the window


def test_recording_window_closes_after_max_seconds_while_idle(make_server, vmms):
    done = threading.Event()
    server = make_server(
        record_hot_pages=True, record_max_seconds=0.3, on_window_closed=lambda f, h: done.set()
    )
    vmm = vmms(server.register_fork("a"))
    # The guest stays idle (no fault at all): only the server's own timer can close the window.
    assert done.wait(10)
    assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    assert server.stats("a").faults == 1  # served, after the window: not part of the hot set
    assert len(server.hot_pages("a")) == 0


def test_one_plan_serves_every_fork_of_the_template(make_server, vmms):
    server = make_server()
    hot = HotPageList.from_pages([HotPage(r, o) for r, o in _pages(300, seed=5)])
    forks = [vmms(server.register_fork(f"f{i}")) for i in range(3)]
    bases = [tuple(r.base for r in server.wait_connected(f"f{i}")) for i in range(3)]
    assert len(set(bases)) == 3  # each VMM mapped its memory elsewhere
    results = [server.prefetch(f"f{i}", hot) for i in range(3)]
    assert server.plans_cached() == 1  # planned once, relocated for the other forks
    for i, fork in enumerate(forks):
        assert results[i].installed == 300
        assert fork.send(cmd="touch", pages=[list(p) for p in hot])["bad"] == 0
        assert server.stats(f"f{i}").faults == 0


def test_a_plan_is_made_once_per_hot_set_and_reused_for_every_fork(make_server, vmms):
    server = make_server()
    server.prepare_prefetch()  # when a hot set is loaded or recorded: planning made ready
    server.prepare_prefetch()  # (again: a no-op)
    first = HotPageList.from_pages([HotPage(r, o) for r, o in _pages(200, seed=7)])
    second = HotPageList.from_pages([HotPage(r, o) for r, o in _pages(100, seed=8)])
    forks = [vmms(server.register_fork(f"f{i}")) for i in range(3)]
    assert server.plans_made() == 0
    for i in range(3):
        assert server.prefetch(f"f{i}", first).installed == 200
    assert server.plans_made() == 1  # the first fork's plan, reused by the other two
    for i in range(2):
        server.prefetch(f"f{i}", second)
    assert server.plans_made() == 2  # one more for the other hot set, and only one
    assert server.plans_cached() == 2
    for i, fork in enumerate(forks):
        assert fork.send(cmd="touch", pages=[list(p) for p in first])["bad"] == 0
        assert server.stats(f"f{i}").faults == 0  # every page was prefetched
