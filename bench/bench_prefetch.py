"""Prefetch: install rate, cold-start speed-up from a recorded hot set, cost of recording.

Three comparisons, each measured side by side in one run with fresh test VMMs
(``pagefork.testing.vmm``, their own processes) and rounds alternating between the variants:

a. **Install rate.** A 64 MiB hot set scattered over a 256 MiB guest in runs of 1-3 pages (the
   shape REAP reports: random gaps between short runs) against a 64 MiB contiguous hot set (one
   bulk ``UFFDIO_COPY``), each prefetched into a fresh fork whose VMM touches nothing. The
   mem-file has no zero pages here, so both install the same bytes with ``UFFDIO_COPY``.
   Every round passes a fresh copy of the list, so the "with planning" rate pays for the plan
   (the server caches plans per list); planning alone is also timed in-process.
   The same runs are also issued by a bare loop of ioctls into this process's own memory: the
   machine's floor for one ioctl per run, without pagefork's planning or bookkeeping.
b. **Cold start from a recorded hot set.** A warm-up fork records the pages its guest touches
   (``register_fork(id, record=True)``); later forks touch the same working set with a little
   drift (a few pages swapped for others), either on demand or after ``server.prefetch`` of the
   recorded list. The prefetched fork's time includes the prefetch itself: with planning (a
   fresh copy of the list each round, as a template's first fork pays) or with the plan cached
   (later forks). Every fork records what it faults, so the hot set's precision and recall
   against the pages a fork touched, and the misses beyond the pages the hot set lacks, are
   taken from the server's own records.
c. **Recording overhead.** The same fault workload served to forks with and without recording.
d. **Hot sets that learn.** 32 forks whose traces drift from the warm-up's (pages going out of
   use, pages every later fork touches, pages one fork alone touches) are each prefetched from
   a learning hot set and feed their misses back; per fork, the set's precision and recall
   against what the fork touched, its misses against the pages no earlier fork touched, and
   the same figures for the recorded set left unchanged.

Reading it: every ``UFFDIO_COPY`` costs several µs in a VM, even from a bare loop, so one
ioctl per 1-3-page run cannot reach 0.8 of one bulk copy; the floor ratio is what the machine
allows, and pagefork's ratio is measured against it. Planning is the first fork's hidden cost:
the server caches plans per hot set, so only a template's first fork (or the first after
re-recording) pays it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from _common import (
    PAGE,
    Forks,
    MiB,
    alternating,
    console,
    fmt,
    header,
    make_mem_file,
    median,
    paired_ratio,
    scattered_runs,
    scratch_dir,
    standalone,
    table,
    verdict,
)

from pagefork import uffd
from pagefork.copycost import bridge_gap_for_host
from pagefork.hotlearn import LearnPolicy
from pagefork.hotloop import HotSetLoop
from pagefork.hotpages import HotPage, HotPageList
from pagefork.memfile import MemFile
from pagefork.prefetch import plan_prefetch
from pagefork.regions import Region

#: (a): guest and hot-set sizes.
INSTALL_GUEST = 256 * MiB
INSTALL_HOT = 64 * MiB
#: (b) and (c): a template with ~25% all-zero pages, like a guest's memory.
TEMPLATE_SIZE = 128 * MiB
ZERO_FRACTION = 0.25
#: (b): working set (25% of the guest, REAP reports 3-39%) and the share of it that changes
#: between the recording fork and the later ones.
WORKING_SET = 32 * MiB
DRIFT = 0.03
#: (c): every page of this guest, in random order.
RECORD_GUEST = 64 * MiB

SCATTERED, BULK = "scattered", "bulk"
FLOOR_SCATTERED, FLOOR_BULK = "floor scattered", "floor bulk"
DEMAND, PREFETCHED, CACHED = "demand", "prefetched", "plan cached"
RECORDING, PLAIN = "record=True", "record=False"

#: Figures with a goal, for run.py's summary: key -> (comparison, target).
TARGETS = {
    "install_ratio_scattered_over_bulk": (">=", 0.8),
    "install_planning_ms": ("<=", 2.0),
    "recording_overhead_pct": ("<=", 10.0),
    "learn_precision_min": (">=", 0.95),
}
#: The figures worth a row in run.py's summary, and what each means.
SUMMARY = {
    "install_ratio_scattered_over_bulk": "(a) install rate, scattered hot set / one bulk copy",
    "install_scattered_mib_s": "(a) install rate, scattered runs of 1-3 pages (MiB/s, ioctls only)",
    "install_bulk_mib_s": "(a) install rate, one contiguous bulk copy (MiB/s)",
    "install_floor_ratio_scattered_over_bulk": "(a) the same ratio from a bare loop of ioctls: "
    "the machine's floor",
    "install_ratio_with_planning": "(a) the ratio when each side also pays for its plan",
    "install_planning_ms": "(a) planning the scattered hot set (ms)",
    "install_planning_list_ms": "(a) planning the same pages from a plain list (ms)",
    "install_bridged_bytes": "(a) bytes installed beyond the hot set to bridge small gaps",
    "cold_speedup": "(b) touching a recorded hot set: on demand / prefetch + touch, planning paid",
    "cold_speedup_cached": "(b) the same, plan cached (every fork after a template's first)",
    "cold_demand_ms": "(b) the on-demand fork (ms)",
    "cold_prefetched_total_ms": "(b) the prefetched fork, prefetch + touch, planning paid (ms)",
    "cold_prefetch_ms": "(b) its prefetch call alone, planning paid (ms)",
    "cold_prefetch_cached_ms": "(b) the prefetch call with the plan cached (ms)",
    "cold_prefetch_ioctls_ms": "(b) the prefetch's ioctls alone (ms)",
    "cold_hot_precision": "(b) hot set against the pages a fork touched: precision",
    "cold_hot_recall": "(b) and recall",
    "cold_misses_beyond_unrecorded": "(b) faults of a prefetched fork beyond the touched pages the "
    "hot set lacks (0: prefetch installed every hot page)",
    "recording_overhead_pct": "(c) serving with recording against without, guest-visible (%)",
    "recording_overhead_server_p50_pct": "(c) the same, server-side p50 (%)",
    "learn_precision_min": "(d) a learning hot set's precision, lowest over the forks",
    "learn_recall_late_median": "(d) its recall, median over the second half of the forks",
    "static_recall_late_median": "(d) the recorded set's recall, left unchanged, the same forks",
    "learn_misses_late_median": "(d) misses per fork with the learning set, second half",
    "static_misses_late_median": "(d) the same with the recorded set",
    "learn_novel_late_median": "(d) pages per fork no earlier fork touched (misses no set avoids)",
    "learn_set_size_final": "(d) the learning set's size at the end (pages)",
    "learn_set_size_limit": "(d) the bound on its size (pages)",
}


def _pages(indices: list[int]) -> list[tuple[int, int]]:
    """Page indices of region 0 as ``(region, page_offset)`` entries."""
    return [(0, i * PAGE) for i in indices]


# --- a. install rate -------------------------------------------------------------------------


@dataclass
class Install:
    """One prefetch into an idle fork."""

    bytes: int
    runs: int
    ioctls: int
    seconds: float  # PrefetchResult.seconds: issuing the ioctls
    wall: float  # the whole server.prefetch() call, planning included
    bridged: int = 0  # PrefetchResult.bridged_bytes: installed beyond the hot set


class IoctlFloor:
    """Bare ``UFFDIO_COPY`` loops into memory of this process, from the mem-file's mapping.

    No fault is ever taken here (nothing reads the registered memory; a Python thread that did
    would deadlock), so this is the pure cost of the ioctls: what any handler, in any language,
    pays on this machine for one ioctl per run.
    """

    def __init__(self, mem_file: str, guest: int) -> None:
        self.source = MemFile(mem_file)
        self.guest = guest

    def install(self, runs: list[list[int]]) -> Install:
        """Copy ``runs`` (page indices) into a fresh registered mapping, then wake it once."""
        dst = mmap.mmap(-1, self.guest)
        view = ctypes.c_char.from_buffer(dst)
        fd = uffd.open_userfaultfd()
        try:
            base = ctypes.addressof(view)
            uffd.uffdio_api(fd, 0)
            uffd.uffdio_register(fd, base, self.guest)
            ioctls = uffd.UffdIoctls(fd)
            src = self.source.address
            copy = ioctls.copy
            done = 0
            t0 = time.perf_counter()
            for run in runs:
                offset = run[0] * PAGE
                done += copy(
                    base + offset, src + offset, len(run) * PAGE, uffd.UFFDIO_COPY_MODE_DONTWAKE
                )
            ioctls.wake(base, self.guest)
            seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
            del view
            dst.close()
        return Install(done, len(runs), len(runs) + 1, seconds, seconds)

    def close(self) -> None:
        """Unmap the source."""
        self.source.close()


def planning_ms(
    hot: HotPageList, regions: list[Region], mem: MemFile, repeats: int
) -> tuple[float, float]:
    """Milliseconds to plan ``hot`` for ``regions`` in this process (median of ``repeats``),
    from the hot set itself (as when it is recorded or loaded) and from a plain list of its
    pages (as a caller with a bare list pays)."""
    pages = hot.in_order()
    gap = bridge_gap_for_host()  # measured once, before timing
    times: dict[bool, list[float]] = {True: [], False: []}
    for _, packed in alternating(max(3, repeats), (True, False)):
        t0 = time.perf_counter()
        plan_prefetch(hot if packed else pages, regions, mem.is_zero, bridge_gap=gap)
        times[packed].append((time.perf_counter() - t0) * 1e3)
    return median(times[True]), median(times[False])


def bench_install(workdir: str, rounds: int) -> dict[str, Any]:
    """(a): scattered 1-3-page runs vs one contiguous run of the same size."""
    guest_pages, hot_pages = INSTALL_GUEST // PAGE, INSTALL_HOT // PAGE
    header(
        "prefetch a: install rate, scattered runs vs one bulk copy",
        f"{INSTALL_HOT // MiB} MiB hot set in a {INSTALL_GUEST // MiB} MiB guest (no zero pages): "
        f"runs of 1-3 pages with random gaps, first-touch order shuffled, vs {INSTALL_HOT // MiB} "
        f"MiB contiguous; fresh idle VMM per prefetch, {rounds} rounds each, interleaved; "
        "'floor' = the same ioctls from a bare loop.",
    )
    mem_file = os.path.join(workdir, "dense.mem")
    make_mem_file(mem_file, INSTALL_GUEST, 0.0, seed=2)
    runs = scattered_runs(guest_pages, hot_pages, seed=3)
    random.Random(4).shuffle(runs)
    lists = {
        SCATTERED: HotPageList.from_pages(_pages([p for run in runs for p in run])),
        BULK: HotPageList.from_pages(_pages(list(range(hot_pages)))),
    }
    floor_runs = {FLOOR_SCATTERED: runs, FLOOR_BULK: [list(range(hot_pages))]}
    forks = Forks(workdir, "install", mem_file)
    floor = IoctlFloor(mem_file, INSTALL_GUEST)
    variants = (SCATTERED, BULK, FLOOR_SCATTERED, FLOOR_BULK)
    results: dict[str, list[Install]] = {v: [] for v in variants}
    try:
        # Untimed warm-up: maps the server's side of the mem-file, and checks the bytes.
        sample = random.Random(5).sample(lists[SCATTERED].in_order(), 2048)
        with forks.fork(INSTALL_GUEST) as fork:
            regions = forks.server.wait_connected(fork.fork_id)
            forks.server.prefetch(fork.fork_id, lists[SCATTERED])
            check = fork.vm.send(cmd="touch", pages=[list(p) for p in sample], verify=True)
        assert fork.stats is not None
        demand = fork.stats.faults
        console.print(
            f"correctness: {len(sample)} prefetched pages read back, {check['bad']} bad, "
            f"{demand} demand faults (expect 0 and 0)"
        )
        with forks.fork(INSTALL_GUEST) as fork:
            forks.server.prefetch(fork.fork_id, lists[BULK])
        floor.install(floor_runs[FLOOR_SCATTERED])
        for _, which in alternating(rounds, variants):
            if which in floor_runs:
                results[which].append(floor.install(floor_runs[which]))
                continue
            fresh = HotPageList.from_pages(lists[which].in_order())  # not in the plan cache
            with forks.fork(INSTALL_GUEST) as fork:
                t0 = time.perf_counter()
                res = forks.server.prefetch(fork.fork_id, fresh)
                wall = time.perf_counter() - t0
            if res.installed != hot_pages:
                raise RuntimeError(f"{which}: installed {res.installed} of {hot_pages} pages")
            results[which].append(
                # Rates count the hot set's bytes: bridged ones are a cost, not progress.
                Install(
                    res.bytes - res.bridged_bytes,
                    res.runs,
                    res.ioctls,
                    res.seconds,
                    wall,
                    res.bridged_bytes,
                )
            )
        planning, planning_list = planning_ms(lists[SCATTERED], regions, floor.source, 3 * rounds)
    finally:
        forks.close()
        floor.close()

    def rate(which: str, wall: bool) -> list[float]:
        return [x.bytes / (x.wall if wall else x.seconds) / MiB for x in results[which]]

    ratio = paired_ratio(rate(SCATTERED, False), rate(BULK, False))
    ratio_wall = paired_ratio(rate(SCATTERED, True), rate(BULK, True))
    ratio_floor = paired_ratio(rate(FLOOR_SCATTERED, False), rate(FLOOR_BULK, False))
    vs_floor = paired_ratio(rate(SCATTERED, False), rate(FLOOR_SCATTERED, False))
    table(
        "install rate, MiB/s (median of rounds)",
        ["hot set", "runs", "ioctls", "ioctls only", "with planning (uncached)", "µs/ioctl"],
        [
            [
                w,
                results[w][0].runs,
                results[w][0].ioctls,
                fmt(median(rate(w, False)), 0),
                fmt(median(rate(w, True)), 0) if w in lists else "-",
                fmt(median([x.seconds / x.ioctls * 1e6 for x in results[w]]), 1),
            ]
            for w in variants
        ],
    )
    console.print(verdict("scattered/bulk install rate (ioctls)", ratio, ">=", 0.8))
    console.print(
        f"planning the scattered list ({len(lists[SCATTERED])} pages, {len(runs)} runs, "
        f"bridge gap {bridge_gap_for_host()} pages) in-process: {fmt(planning, 2)} ms from the "
        f"hot set, {fmt(planning_list, 2)} ms from a plain list; {len(runs)} hot runs became "
        f"{results[SCATTERED][0].runs} ioctl runs, {results[SCATTERED][0].bridged // 1024} KiB "
        "installed beyond the hot set"
    )
    console.print(
        f"planning the scattered list ({len(runs)} runs) in-process: {fmt(planning, 1)} ms; "
        f"scattered/bulk rate including planning {fmt(ratio_wall)}; floor scattered/bulk "
        f"{fmt(ratio_floor)}; pagefork scattered / floor scattered {fmt(vs_floor)}"
    )
    return {
        "install_rounds": rounds,
        "install_scattered_runs": results[SCATTERED][0].runs,
        "install_scattered_mib_s": median(rate(SCATTERED, False)),
        "install_bulk_mib_s": median(rate(BULK, False)),
        "install_ratio_scattered_over_bulk": ratio,
        "install_scattered_mib_s_with_planning": median(rate(SCATTERED, True)),
        "install_bulk_mib_s_with_planning": median(rate(BULK, True)),
        "install_ratio_with_planning": ratio_wall,
        "install_planning_ms": planning,
        "install_planning_list_ms": planning_list,
        "install_planned_pages": len(lists[SCATTERED]),
        "install_hot_runs": len(runs),
        "install_bridge_gap_pages": bridge_gap_for_host(),
        "install_bridged_bytes": results[SCATTERED][0].bridged,
        "install_floor_scattered_mib_s": median(rate(FLOOR_SCATTERED, False)),
        "install_floor_bulk_mib_s": median(rate(FLOOR_BULK, False)),
        "install_floor_ratio_scattered_over_bulk": ratio_floor,
        "install_scattered_over_floor": vs_floor,
        "install_bad_pages": int(check["bad"]),
    }


# --- b. cold start from a recorded hot set ---------------------------------------------------


@dataclass
class ColdStart:
    """One fork touching the working set: prefetch time (0 on demand; ``install`` is the part
    spent issuing ioctls, the rest is planning), touch time, counters."""

    prefetch: float
    install: float
    touch: float
    faults: int
    misses: int

    @property
    def total(self) -> float:
        """Prefetch plus touch: the fork's time to have touched its working set."""
        return self.prefetch + self.touch


def _drifted(working_set: list[int], guest_pages: int, share: float, seed: int) -> list[int]:
    """The working set with ``share`` of its pages swapped for pages outside it."""
    rng = random.Random(seed)
    inside = set(working_set)
    outside = rng.sample([p for p in range(guest_pages) if p not in inside], k=len(working_set))
    out = list(working_set)
    for n, i in enumerate(rng.sample(range(len(out)), k=int(len(out) * share))):
        out[i] = outside[n]
    return out


def bench_cold_start(forks: Forks, rounds: int) -> dict[str, Any]:
    """(b): a recorded hot set touched on demand vs after prefetch (planned anew, or cached)."""
    guest_pages, ws_pages = TEMPLATE_SIZE // PAGE, WORKING_SET // PAGE
    header(
        "prefetch b: touching a recorded hot set, on demand vs after prefetch",
        f"{WORKING_SET // MiB} MiB working set ({ws_pages} pages, runs of 1-3) in a "
        f"{TEMPLATE_SIZE // MiB} MiB guest (~{ZERO_FRACTION:.0%} zero pages), recorded once; "
        f"later forks touch it with {DRIFT:.0%} of pages swapped; prefetched time = prefetch + "
        f"touch, the plan made anew ('{PREFETCHED}') or cached ('{CACHED}'); every fork records "
        f"its faults; {rounds} rounds each, interleaved.",
    )
    runs = scattered_runs(guest_pages, ws_pages, seed=6)
    random.Random(7).shuffle(runs)
    working_set = [p for run in runs for p in run]
    with forks.fork(TEMPLATE_SIZE, record=True) as fork:
        fork.vm.send(cmd="touch", pages=[list(p) for p in _pages(working_set)], verify=False)
    hot = fork.hot
    assert hot is not None
    if [p.page_offset // PAGE for p in hot.in_order()] != working_set:
        raise RuntimeError(
            f"recorded hot set ({len(hot)} pages) is not the {ws_pages} pages touched, in order"
        )
    console.print(f"recorded {len(hot)} pages in first-touch order")
    replay = [list(p) for p in _pages(_drifted(working_set, guest_pages, DRIFT, seed=8))]
    # Untimed: puts the hot set's plan in the server's cache for the CACHED forks.
    with forks.fork(TEMPLATE_SIZE) as fork:
        forks.server.prefetch(fork.fork_id, hot)
    hot_set = set(hot.in_order())
    results: dict[str, list[ColdStart]] = {DEMAND: [], PREFETCHED: [], CACHED: []}
    touched_sets: list[set[HotPage]] = []  # what each demand fork faulted: all it touched
    missed_sets: list[set[HotPage]] = []  # what each prefetched fork still faulted
    for r, which in alternating(rounds, (DEMAND, PREFETCHED, CACHED)):
        with forks.fork(TEMPLATE_SIZE, record=True) as fork:
            prefetch = install = 0.0
            if which != DEMAND:
                # A fresh copy is not in the plan cache: the fork pays for planning.
                pages = hot if which == CACHED else HotPageList.from_pages(hot.in_order())
                t0 = time.perf_counter()
                install = forks.server.prefetch(fork.fork_id, pages).seconds
                prefetch = time.perf_counter() - t0
            touched = fork.vm.send(cmd="touch", pages=replay, verify=r == 0)
        stats = fork.stats
        assert stats is not None and fork.hot is not None
        if touched["bad"]:
            raise RuntimeError(f"{which} fork read {touched['bad']} wrong pages")
        (touched_sets if which == DEMAND else missed_sets).append(set(fork.hot.in_order()))
        results[which].append(
            ColdStart(prefetch, install, touched["seconds"], stats.faults, stats.misses)
        )

    d, p, c = results[DEMAND], results[PREFETCHED], results[CACHED]
    speedup = paired_ratio([x.total for x in d], [x.total for x in p])
    speedup_cached = paired_ratio([x.total for x in d], [x.total for x in c])
    # Against the pages a fork really touched, as the server recorded them.
    touched_all = touched_sets[0]
    if any(t != touched_all for t in touched_sets):
        raise RuntimeError("demand forks replaying one trace faulted different pages")
    common = len(touched_all & hot_set)
    precision, recall = common / len(hot_set), common / len(touched_all)
    unrecorded = touched_all - hot_set
    # A perfect prefetch leaves exactly the touched pages the hot set lacks to fault.
    beyond = max(len(m - unrecorded) for m in missed_sets)
    not_faulted = max(len(unrecorded - m) for m in missed_sets)
    table(
        "ms (median of rounds)",
        ["fork", "prefetch", "(ioctls)", "touch", "total", "faults", "misses"],
        [
            [
                w,
                fmt(median([x.prefetch for x in results[w]]) * 1e3),
                fmt(median([x.install for x in results[w]]) * 1e3),
                fmt(median([x.touch for x in results[w]]) * 1e3),
                fmt(median([x.total for x in results[w]]) * 1e3),
                int(median([x.faults for x in results[w]])),
                int(median([x.misses for x in results[w]])) if w != DEMAND else "-",
            ]
            for w in (DEMAND, PREFETCHED, CACHED)
        ],
    )
    console.print(
        f"speed-up on demand -> prefetched [bold]{fmt(speedup)}x[/] paying planning, "
        f"{fmt(speedup_cached)}x with the plan cached (REAP: 3.7x)"
    )
    console.print(
        f"hot set ({len(hot_set)} pages) against the {len(touched_all)} pages a fork touched "
        f"(server-recorded): precision {precision:.3f}, recall {recall:.3f}; prefetched forks "
        f"faulted {beyond} pages beyond the {len(unrecorded)} the hot set lacks, and left "
        f"{not_faulted} of those unfaulted (expect 0 and 0)"
    )
    return {
        "cold_rounds": rounds,
        "cold_working_set_pages": ws_pages,
        "cold_demand_ms": median([x.total for x in d]) * 1e3,
        "cold_prefetch_ms": median([x.prefetch for x in p]) * 1e3,
        "cold_prefetch_cached_ms": median([x.prefetch for x in c]) * 1e3,
        "cold_prefetch_ioctls_ms": median([x.install for x in p + c]) * 1e3,
        "cold_touch_after_prefetch_ms": median([x.touch for x in p + c]) * 1e3,
        "cold_prefetched_total_ms": median([x.total for x in p]) * 1e3,
        "cold_prefetched_cached_total_ms": median([x.total for x in c]) * 1e3,
        "cold_speedup": speedup,
        "cold_speedup_cached": speedup_cached,
        "cold_demand_faults": median([x.faults for x in d]),
        "cold_misses": median([x.misses for x in p + c]),
        "cold_unrecorded_pages": len(unrecorded),
        "cold_misses_beyond_unrecorded": beyond,
        "cold_hot_precision": precision,
        "cold_hot_recall": recall,
    }


# --- c. recording overhead -------------------------------------------------------------------


def bench_recording(forks: Forks, rounds: int) -> dict[str, Any]:
    """(c): the same fault workload served with and without recording."""
    pages = RECORD_GUEST // PAGE
    header(
        "prefetch c: serving with recording vs without",
        f"every page of a {RECORD_GUEST // MiB} MiB guest ({pages} faults) in random order, "
        f"record=True vs record=False forks, {rounds} rounds each, interleaved.",
    )
    seconds: dict[bool, list[float]] = {True: [], False: []}
    p50: dict[bool, list[float]] = {True: [], False: []}
    for r, record in alternating(rounds, (True, False)):
        with forks.fork(RECORD_GUEST, record=record) as fork:
            touched = fork.vm.send(cmd="touch", all=True, order="random", seed=r, verify=False)
        stats = fork.stats
        assert stats is not None
        if stats.faults != pages:
            raise RuntimeError(f"fork {fork.fork_id}: {stats.faults} faults, expected {pages}")
        if record and (fork.hot is None or len(fork.hot) != pages):
            got = "none" if fork.hot is None else len(fork.hot)
            raise RuntimeError(f"fork {fork.fork_id} recorded {got} pages, expected {pages}")
        seconds[record].append(touched["seconds"])
        p50[record].append(stats.latency_us.get("p50", float("nan")))

    overhead = (paired_ratio(seconds[True], seconds[False]) - 1) * 100
    p50_overhead = (paired_ratio(p50[True], p50[False]) - 1) * 100
    plain_fault_us = median(seconds[False]) / pages * 1e6
    table(
        "µs per fault (median of rounds)",
        ["fork", "guest-visible", "server p50"],
        [
            [
                RECORDING if rec else PLAIN,
                fmt(median(seconds[rec]) / pages * 1e6),
                fmt(median(p50[rec])),
            ]
            for rec in (True, False)
        ],
    )
    console.print(
        "per round record/plain: "
        + ", ".join(fmt(a / b) for a, b in zip(seconds[True], seconds[False], strict=True))
    )
    console.print(verdict("recording overhead % (guest-visible)", overhead, "<=", 10.0))
    console.print(f"recording overhead % (server p50) {fmt(p50_overhead, 1)}")
    return {
        "record_rounds": rounds,
        "record_us_per_fault": median(seconds[True]) / pages * 1e6,
        "plain_us_per_fault": plain_fault_us,
        "recording_overhead_pct": overhead,
        "record_server_p50_us": median(p50[True]),
        "plain_server_p50_us": median(p50[False]),
        "recording_overhead_server_p50_pct": p50_overhead,
    }


# --- d. hot sets that learn ------------------------------------------------------------------

#: (d): forks in the run, the working set, and how the traces drift.
LEARN_FORKS = 32
LEARN_WORKING_SET = 4096
LEARN_FADING = 0.02  # share of the working set later forks stop touching
LEARN_EMERGING = 0.05  # share that every fork from LEARN_EMERGE_AT on touches (new code paths)
LEARN_EMERGE_AT = 8
LEARN_ONE_OFF = 0.02  # share of pages each fork touches that no other fork does
LEARN_POLICY = LearnPolicy(window=8, join=3, max_growth=0.10, per_fork=0.05)


def _learning_traces(guest_pages: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """The warm-up's trace and ``LEARN_FORKS`` later ones drifting from it."""
    rng = random.Random(seed)
    runs = scattered_runs(guest_pages // 2, LEARN_WORKING_SET, seed=seed)
    rng.shuffle(runs)
    base = [p for run in runs for p in run]
    upper = list(range(guest_pages // 2, guest_pages))
    rng.shuffle(upper)
    fading = set(base[: int(len(base) * LEARN_FADING)])
    emerging = upper[: int(len(base) * LEARN_EMERGING)]
    one_off_pool = iter(upper[len(emerging) :])
    traces = []
    for f in range(LEARN_FORKS):
        keep_fading = f < LEARN_FORKS // 4  # the fading pages go out of use a quarter in
        trace = [p for p in base if keep_fading or p not in fading]
        if f >= LEARN_EMERGE_AT:
            trace += emerging
        trace += [next(one_off_pool) for _ in range(int(len(base) * LEARN_ONE_OFF))]
        traces.append(trace)
    return base, traces


def bench_learning(forks: Forks) -> dict[str, Any]:
    """(d): a learning hot set against the recorded one over forks whose traces drift."""
    guest_pages = TEMPLATE_SIZE // PAGE
    header(
        "prefetch d: hot sets that learn, over forks whose traces drift",
        f"{LEARN_FORKS} forks after a warm-up of {LEARN_WORKING_SET} pages: "
        f"{LEARN_FADING:.0%} of them go out of use after {LEARN_FORKS // 4} forks, "
        f"{LEARN_EMERGING:.0%} more are touched by every fork from fork {LEARN_EMERGE_AT} on, "
        f"and each fork touches {LEARN_ONE_OFF:.0%} pages no other fork does; policy "
        f"join {LEARN_POLICY.join} of {LEARN_POLICY.window}, growth <= "
        f"{LEARN_POLICY.max_growth:.0%}. Each fork is prefetched from the learning set, "
        "records its misses, and feeds them back; 'recorded' is the warm-up's set, unchanged.",
    )
    warm_trace, traces = _learning_traces(guest_pages, seed=11)
    with forks.fork(TEMPLATE_SIZE, record=True) as fork:
        fork.vm.send(cmd="touch", pages=[list(p) for p in _pages(warm_trace)], verify=False)
    assert fork.hot is not None
    recorded = fork.hot
    loop = HotSetLoop(recorded, learn=LEARN_POLICY)
    seen: set[HotPage] = set(recorded.in_order())
    rows = []
    for f, trace in enumerate(traces):
        touched = {HotPage(0, p * PAGE) for p in trace}
        hot = loop.hot
        assert hot is not None
        with forks.fork(TEMPLATE_SIZE, record=True) as fork:
            fork_id = f"learn-{f}"
            loop.role(fork_id)
            forks.server.prefetch(fork.fork_id, hot)
            fork.vm.send(cmd="touch", pages=[list(p) for p in _pages(trace)], verify=f == 0)
        assert fork.stats is not None and fork.hot is not None
        loop.fork_missed(fork_id, fork.hot)
        loop.fork_gone(fork_id)
        hot_set = set(hot.in_order())
        static = set(recorded.in_order())
        rows.append(
            {
                "fork": f,
                "size": len(hot_set),
                "precision": len(hot_set & touched) / len(hot_set),
                "recall": len(hot_set & touched) / len(touched),
                "static_precision": len(static & touched) / len(static),
                "static_recall": len(static & touched) / len(touched),
                "misses": fork.stats.misses,
                "static_misses": len(touched - static),
                "novel": len(touched - seen),  # pages no earlier fork (or the warm-up) touched
            }
        )
        seen |= touched
    late = rows[LEARN_FORKS // 2 :]
    table(
        "per fork (every 4th)",
        ["fork", "set size", "precision", "recall", "misses", "never seen", "recorded set: misses"],
        [
            [
                r["fork"],
                r["size"],
                fmt(r["precision"], 3),
                fmt(r["recall"], 3),
                r["misses"],
                r["novel"],
                r["static_misses"],
            ]
            for r in rows
            if r["fork"] % 4 == 3
        ],
    )
    learner = loop.learner
    assert learner is not None
    figures = {
        "learn_forks": LEARN_FORKS,
        "learn_precision_min": min(r["precision"] for r in rows),
        "learn_precision_late_median": median([r["precision"] for r in late]),
        "learn_recall_late_median": median([r["recall"] for r in late]),
        "static_recall_late_median": median([r["static_recall"] for r in late]),
        "learn_misses_late_median": median([r["misses"] for r in late]),
        "static_misses_late_median": median([r["static_misses"] for r in late]),
        "learn_novel_late_median": median([r["novel"] for r in late]),
        "learn_set_size_final": len(learner.hot),
        "learn_set_size_limit": learner.limit,
        "learn_set_size_recorded": len(recorded),
        "learn_generations": len(learner.history()),
    }
    console.print(
        f"learning: precision >= {fmt(figures['learn_precision_min'], 3)} over all forks; in "
        f"the second half, recall {fmt(figures['learn_recall_late_median'], 3)} (recorded set "
        f"{fmt(figures['static_recall_late_median'], 3)}), misses "
        f"{figures['learn_misses_late_median']:.0f} per fork (recorded set "
        f"{figures['static_misses_late_median']:.0f}) against "
        f"{figures['learn_novel_late_median']:.0f} pages no earlier fork touched; set size "
        f"{figures['learn_set_size_final']} (recorded {len(recorded)}, bound "
        f"{learner.limit}), {figures['learn_generations']} generations"
    )
    return figures


def main(quick: bool = False) -> dict[str, Any]:
    """Run (a), (b) and (c); returns their figures in one dict."""
    figures: dict[str, Any] = {}
    with scratch_dir() as workdir:
        figures.update(bench_install(workdir, rounds=3 if quick else 11))
        mem_file = os.path.join(workdir, "template.mem")
        make_mem_file(mem_file, TEMPLATE_SIZE, ZERO_FRACTION, seed=9)
        forks = Forks(workdir, "template", mem_file)
        try:
            figures.update(bench_cold_start(forks, rounds=3 if quick else 11))
            figures.update(bench_recording(forks, rounds=10 if quick else 30))
            figures.update(bench_learning(forks))
        finally:
            forks.close()
    return figures


if __name__ == "__main__":
    standalone(main)
