"""Fork-ready time of the built-in KVM microVM: prefetch vs on demand vs all memory present.

Measured side by side in one run against one page server, after a recording warm-up fork:

a. **Paired rounds on one trace variant.** Each round picks a variant the warm-up did not walk
   and runs four forks of it, in an order that reverses every other round:

   - ``demand``: served on demand;
   - ``prefetch``: prefetched from a fresh copy of the hot set, so the plan is made anew and
     the fork pays for planning, as the first fork of a template does;
   - ``cached``: prefetched from the hot set whose plan the server has cached (later forks);
   - ``late``: the same, but the prefetch is asked for once the orchestrator sees the fork's
     handshake, where the other modes arm it when the fork is registered, so that its worker
     starts installing the moment the handshake is in (``PageServer.prefetch_at_handshake``):
     the A/B of starting at the handshake;
   - ``stream``: resumed early: the first quarter of the hot set (in first-touch order) is
     installed before resume and the fork's worker streams the rest while the guest runs,
     serving its faults first (cached plan);
   - ``present``: every page of guest RAM installed before the vCPUs resume, the population
     not counted: the physical limit, a fork that takes no fault at all.

   Fork-ready = restore + prefetch (wall clock of the whole ``server.prefetch`` call) + run to
   guest ready; ``present`` leaves its population out. The ratios to the limit are given for a
   template's first prefetched fork (``prefetch``, which plans) and for later ones (``cached``).
   Speed-ups are medians of per-round ratios.
   After the timed rounds, the template's account of each round's trace gives the pages a fork
   of it touches (checked once against the server's record of an untimed recording fork): the
   reference for the hot set's precision and recall, and for the prefetched forks' misses
   beyond the pages the hot set does not hold.

   The machine is shared and busy: a fork now and then stalls for tens or hundreds of ms, and
   whichever mode it hits gets a wild ratio in that round. So the figures are medians of the
   per-round ratios of many rounds, each given with its quartiles (the middle half of the
   rounds) and its min-max, and the load average before and after. Even so, on a busy 2-core
   host a median moves by a few tenths from one run to the next: compare figures of one run.
   A second table splits each mode's fork-ready into its parts from each fork's
   timeline (handshake, the prefetch's install, restore, set to go, run) and sets them against
   the limit's in the same round: the wait after restore is the prefetch's tail, the run's
   excess is the misses' round trips (with the cost per miss). Planning, and reading a plan
   stored with its hot set, are timed in this process.
b. **Fan-out.** Bursts of forks restored together (prefetched in parallel, from the cached plan)
   and resumed at once, against single forks of the same mode, the four kinds interleaved round
   by round: p50/p99 ready against single.

Reading it: fork-ready has a floor (``present``): a fork with all its memory present still
runs its trace, and guest instructions are emulated. The traces are synthetic, so precision and
recall come out near 1 minus the trace's fork-specific share; what the server's records show is
that prefetch installs every hot page (misses beyond the pages the hot set lacks: 0; a fork
may miss fewer, when a fork-specific page sat in a gap that a copy bridged).

Run: ``python bench/bench_fork_ready.py [--quick]``. Prints figures and ratios; no assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import alternating, median, paired_ratio
from rich.console import Console
from rich.table import Table

from pagefork.demo import orchestrate
from pagefork.demo.orchestrate import ForkReport, percentile
from pagefork.errors import PageforkError
from pagefork.hotpages import HotPageList
from pagefork.memfile import MemFile
from pagefork.prefetch import PrefetchPlan, plan_prefetch
from pagefork.prefetch import _check_table as check_runs_one_by_one
from pagefork.regions import PAGE_SIZE, Region
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm.template import MEM_FILE, Template, TemplateSpec, build_template

console = Console(highlight=False, width=120)  # tables wider than a pipe's 80 columns

DEMAND, PREFETCH, CACHED, LIMIT = "demand", "prefetch", "cached", "present"
STREAM, LATE = "stream", "late"
PAIRED_MODES = (DEMAND, PREFETCH, CACHED, LATE, STREAM, LIMIT)
#: ``stream``: the share of the hot set (first touches first) installed before resume; the
#: fork's worker streams the rest while the guest runs.
STREAM_HEAD = 0.25


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios ``a[i] / b[i]`` of paired rounds."""
    return [x / y for x, y in zip(a, b, strict=True) if y > 0]


def quartiles(values: list[float]) -> tuple[float, float]:
    """The lower and upper quartiles of ``values``: the middle half of the rounds, which
    rounds a stall hit do not move as they move the min and the max."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def spread(values: list[float]) -> str:
    """``median (quartiles) [min-max]`` of per-round values, for a report line."""
    lo, hi = quartiles(values)
    return f"{median(values):.2f}x ({lo:.2f}-{hi:.2f}) [{min(values):.2f}-{max(values):.2f}]"


def _row(table: Table, label: str, reports: list[ForkReport], ready: list[float]) -> None:
    table.add_row(
        label,
        str(len(reports)),
        f"{percentile(ready, 50):.1f}",
        f"{percentile(ready, 99):.1f}",
        f"{statistics.median(r.restore_ms for r in reports):.1f}",
        f"{statistics.median(r.prefetch_ms for r in reports):.1f}",
        f"{statistics.median(r.run_ms for r in reports):.1f}",
        f"{statistics.fmean(r.faults for r in reports):.0f}",
        f"{statistics.fmean(r.prefetched_pages for r in reports):.0f}",
        f"{statistics.median(r.fault_latency_us.get('p50', 0.0) for r in reports):.1f}",
        "yes" if all(r.checksum_ok for r in reports) else "NO",
    )


def _table(title: str) -> Table:
    table = Table(title=title)
    for col in ("forks", "n", "ready p50 ms", "ready p99 ms", "restore ms", "prefetch ms",
                "run ms", "faults", "prefetched", "fault p50 us", "checksums"):  # fmt: skip
        table.add_column(col, justify="left" if col == "forks" else "right")
    return table


TARGETS = {
    "speedup": (">=", 8.0),
    "misses_beyond_unrecorded": ("<=", 0.0),
    "prefetch_over_present": ("<=", 1.3),
    "cached_over_present": ("<=", 1.3),
}
SUMMARY = {
    "speedup": "(a) fork-ready, on demand / prefetched, planning paid",
    "speedup_cached": "(a) the same with the plan cached",
    "demand_ready_ms_p50": "(a) on-demand fork-ready, p50 (ms)",
    "prefetch_ready_ms_p50": "(a) prefetched fork-ready, planning paid, p50 (ms)",
    "cached_ready_ms_p50": "(a) prefetched fork-ready, plan cached, p50 (ms)",
    "present_ready_ms_p50": "(a) every page present before resume (the physical limit), p50 (ms)",
    "prefetch_over_present": "(a) a template's first prefetched fork (it plans) / the limit",
    "cached_over_present": "(a) a later prefetched fork (plan cached) / the limit",
    "late_over_cached": "(a) plan cached, prefetch asked for after the handshake is seen / "
    "armed to start at the handshake",
    "stream_over_present": "(a) resumed early, the rest of the hot set streamed / the limit",
    "speedup_stream": "(a) on demand / resumed early and streamed",
    "stream_raced_mean": "(a) faults that raced the stream, per streamed fork",
    "planning_ms": "(a) planning the hot set anew (a template's first fork, when no plan is "
    "stored with its hot set), in process, ms",
    "stored_plan_read_ms": "(a) reading the plan stored with the hot set instead, ms",
    "cached_wait_after_restore_ms": "(a) plan cached: the prefetch's tail after the VMM's "
    "restore, ms",
    "cached_run_excess_ms": "(a) plan cached: run time beyond the limit's (the misses), ms",
    "cached_us_per_miss": "(a) plan cached: that excess per miss, us",
    "prefetch_over_present_min": "(a) first fork / the limit: the lowest per-round ratio",
    "prefetch_over_present_max": "(a) and the highest",
    "cached_over_present_min": "(a) later fork / the limit: the lowest per-round ratio",
    "cached_over_present_max": "(a) and the highest",
    "speedup_min": "(a) on demand / first fork: the lowest per-round ratio",
    "speedup_max": "(a) and the highest",
    "load_1min_start": "load average (1 min) when the benchmark started",
    "load_1min_end": "and when it ended",
    "hot_set_precision": "(a) hot set against the pages a fork of its trace touched: precision",
    "hot_set_recall": "(a) and recall",
    "misses_beyond_unrecorded": "(a) faults of prefetched forks beyond the touched pages the "
    "hot set lacks (largest over the forks; fewer: pages in bridged gaps)",
    "present_faults": "(a) faults of the all-present forks (must be 0)",
    "prefetch_burst_p50_over_single": "(b) a burst of prefetched forks at once: p50 ready / a "
    "single fork's p50",
    "prefetch_burst_p99_over_single": "(b) the same, p99",
    "demand_burst_p50_over_single": "(b) a burst of on-demand forks: p50 ready / one fork's p50",
    "demand_burst_p99_over_single": "(b) the same, p99",
}


def touched_hot_pages(template: Template, variant: int) -> set[tuple[int, int]]:
    """The pages a fork walking ``variant`` touches, as (region, offset) hot pages."""
    out: set[tuple[int, int]] = set()
    for gpa in template.touched_pages(variant):
        for i, spec in enumerate(template.layout):
            if spec.guest_phys_addr <= gpa < spec.end:
                out.add((i, gpa - spec.guest_phys_addr))
                break
    return out


def paired_rounds(
    server: PageServer, template: Template, warm: ForkReport, hot: HotPageList, pairs: int
) -> dict[str, float]:
    """(a): ``pairs`` rounds of the four paired modes on one variant each."""
    every_page = orchestrate.every_page(template)
    stream = orchestrate.Stream(hot, int(len(hot) * STREAM_HEAD))
    # Untimed: fills the plan cache for ``cached`` (and warms the page cache for all modes).
    idx0 = orchestrate.fork_index(template, 0, warm.variant)
    orchestrate.run_forks(server, template, [idx0], "prefetch", hot=hot)
    orchestrate.run_forks(server, template, [idx0], "prefetch", stream=stream)
    got: dict[str, list[ForkReport]] = {m: [] for m in PAIRED_MODES}
    precision: list[float] = []
    recall: list[float] = []
    beyond: list[int] = []
    hot_set: set[tuple[int, int]] = set(hot.in_order())
    unrecorded: dict[int, int] = {}  # fork index -> touched pages the hot set lacks

    def record(index: int) -> None:
        """What a fork of this trace touches: from the template's own account of its trace,
        checked once against the server's record of a fork (the first round's)."""
        touched_set = touched_hot_pages(template, template.variant_of(index))
        if not unrecorded:
            _, touched = orchestrate.warm_up(server, template, fork_index=index)
            recorded = set(touched.in_order())
            console.print(
                "the server's record of a fork of round 0's trace "
                f"{'matches' if recorded == touched_set else '[red]DIFFERS from[/]'} "
                f"the template's account of it ({len(recorded)} pages)"
            )
            touched_set = recorded
        common = len(touched_set & hot_set)
        precision.append(common / len(hot_set))
        recall.append(common / len(touched_set))
        unrecorded[index] = len(touched_set - hot_set)

    def run(mode: str, index: int) -> ForkReport:
        if mode == DEMAND:
            [report] = orchestrate.run_forks(
                server, template, [index], "demand", warmup_variant=warm.variant
            )
            return report
        if mode == LATE:
            [report] = orchestrate.run_forks(
                server,
                template,
                [index],
                "prefetch",
                hot=hot,
                warmup_variant=warm.variant,
                at_handshake=False,
            )
            return report
        if mode == STREAM:
            [report] = orchestrate.run_forks(
                server, template, [index], "prefetch", warmup_variant=warm.variant, stream=stream
            )
            return report
        lists = {PREFETCH: HotPageList.from_pages(hot.in_order()), CACHED: hot, LIMIT: every_page}
        [report] = orchestrate.run_forks(
            server,
            template,
            [index],
            "present" if mode == LIMIT else "prefetch",
            hot=lists[mode],
            warmup_variant=warm.variant,
        )
        return report

    for r, mode in alternating(pairs, PAIRED_MODES):
        index = orchestrate.fork_index(template, 1 + r, warm.variant)
        got[mode].append(run(mode, index))
    for r in range(pairs):
        record(orchestrate.fork_index(template, 1 + r, warm.variant))
    for mode in (PREFETCH, CACHED):
        for report in got[mode]:
            # A perfect prefetch misses exactly the touched pages the hot set does not hold.
            beyond.append(report.misses - unrecorded[report.fork_index])

    ready = {m: [x.ready_ms for x in got[m]] for m in PAIRED_MODES}  # present: no population
    table = _table(
        f"a. fork-ready, {template.mem_size >> 20} MiB guest, {pairs} paired rounds "
        "(present: every page installed before resume, population not counted)"
    )
    for mode in PAIRED_MODES:
        _row(table, mode, got[mode], ready[mode])
    console.print(table)
    per_round = {
        "speedup": ratios(ready[DEMAND], ready[PREFETCH]),
        "speedup_cached": ratios(ready[DEMAND], ready[CACHED]),
        "speedup_present": ratios(ready[DEMAND], ready[LIMIT]),
        # A template's first prefetched fork (it plans) and later ones, to the limit.
        "prefetch_over_present": ratios(ready[PREFETCH], ready[LIMIT]),
        "cached_over_present": ratios(ready[CACHED], ready[LIMIT]),
        "late_over_present": ratios(ready[LATE], ready[LIMIT]),
        "late_over_cached": ratios(ready[LATE], ready[CACHED]),
        "stream_over_present": ratios(ready[STREAM], ready[LIMIT]),
        "speedup_stream": ratios(ready[DEMAND], ready[STREAM]),
    }
    figures: dict[str, float] = {}
    for name, values in per_round.items():
        figures[name] = median(values)
        figures[f"{name}_min"] = min(values)
        figures[f"{name}_max"] = max(values)
        figures[f"{name}_q1"], figures[f"{name}_q3"] = quartiles(values)
    figures.update(_breakdown(got))
    figures.update(
        {
            "rounds": float(pairs),
            "stream_raced_mean": statistics.fmean(x.raced for x in got[STREAM]),
            "stream_head_pages": stream.head,
            **{f"{m}_ready_ms_p50": median(ready[m]) for m in PAIRED_MODES},
            **{f"{m}_ready_ms_min": min(ready[m]) for m in PAIRED_MODES},
            **{f"{m}_ready_ms_max": max(ready[m]) for m in PAIRED_MODES},
            "prefetch_ms_uncached": median([x.prefetch_ms for x in got[PREFETCH]]),
            "prefetch_ms_cached": median([x.prefetch_ms for x in got[CACHED]]),
            "hot_pages": len(hot),
            "demand_faults_mean": statistics.fmean(x.faults for x in got[DEMAND]),
            "misses_mean": statistics.fmean(x.misses for x in got[PREFETCH] + got[CACHED]),
            "unrecorded_pages_mean": statistics.fmean(unrecorded.values()),
            # Extra misses: a hot page that was not installed. Fewer misses than the touched
            # pages the hot set lacks are the gaps between hot runs that a copy bridged.
            "misses_beyond_unrecorded": float(max(beyond)),
            "misses_saved_by_bridging": float(max(0, -min(beyond))),
            "hot_set_precision": median(precision),
            "hot_set_recall": median(recall),
            "present_faults": float(max(x.faults for x in got[LIMIT])),
            "checksums_ok": float(all(x.checksum_ok for m in PAIRED_MODES for x in got[m])),
        }
    )
    console.print(
        "per-round ratios, median (quartiles) \\[min-max] over "
        f"{pairs} rounds: on demand / prefetched {spread(per_round['speedup'])}, plan cached "
        f"{spread(per_round['speedup_cached'])}, every page present "
        f"{spread(per_round['speedup_present'])} (target >= 8x)"
    )
    console.print(
        f"prefetched / all present (the limit): first fork "
        f"{spread(per_round['prefetch_over_present'])}, later forks "
        f"{spread(per_round['cached_over_present'])} (target <= 1.3x); resumed early "
        f"({stream.head} pages before resume, the rest streamed) "
        f"{spread(per_round['stream_over_present'])}, "
        f"{figures['stream_raced_mean']:.0f} faults raced the stream per fork"
    )
    console.print(
        "starting the install at the handshake (armed at registration) against asking for it "
        f"once the handshake is seen: the latter takes {spread(per_round['late_over_cached'])} "
        "as long"
    )
    console.print(
        f"hot set ({len(hot)} pages) against the pages a fork of each trace touched (recorded): "
        f"precision {figures['hot_set_precision']:.3f}, recall {figures['hot_set_recall']:.3f}; "
        f"misses {figures['misses_mean']:.0f} per prefetched fork, beyond the touched pages the "
        f"hot set lacks: {beyond}; all-present forks' faults: "
        f"{int(figures['present_faults'])}"
    )
    return figures


def _breakdown(got: dict[str, list[ForkReport]]) -> dict[str, float]:
    """Where each mode's fork-ready time goes, against the limit's, from each fork's timeline
    (ms from its start; medians over rounds, differences paired by round)."""
    table = Table(title="a. where fork-ready goes: medians, ms from the fork's start "
                  "(excess: paired per round against present)")  # fmt: skip
    cols = ("forks", "handshake", "install from", "install to", "restored", "set to go",
            "wait after restore", "run", "restore excess", "wait excess", "run excess",
            "misses", "us per miss")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "forks" else "right")
    limit = got[LIMIT]
    figures: dict[str, float] = {}
    for mode in (PREFETCH, CACHED, LATE, STREAM, LIMIT, DEMAND):
        reports = got[mode]
        # Time between the VMM's restore and resume that the fork paid (its prefetch's tail).
        waits = [max(0.0, r.ready_ms - r.restore_ms - r.run_ms) for r in reports]
        restore_x = [r.restore_ms - p.restore_ms for r, p in zip(reports, limit, strict=True)]
        wait_x = [w - max(0.0, p.ready_ms - p.restore_ms - p.run_ms)
                  for w, p in zip(waits, limit, strict=True)]  # fmt: skip
        run_x = [r.run_ms - p.run_ms for r, p in zip(reports, limit, strict=True)]
        per_miss = [1e3 * x / r.misses for x, r in zip(run_x, reports, strict=True) if r.misses]
        cells = [
            median([r.handshake_at_ms for r in reports]),
            median([r.install_from_ms for r in reports]),
            median([r.install_to_ms for r in reports]),
            median([r.restore_ms for r in reports]),
            median([r.set_to_go_ms for r in reports]),
            median(waits),
            median([r.run_ms for r in reports]),
            median(restore_x),
            median(wait_x),
            median(run_x),
            statistics.fmean(r.misses for r in reports),
        ]
        table.add_row(
            mode,
            *(f"{c:.1f}" for c in cells),
            f"{median(per_miss):.0f}" if per_miss else "-",
        )
        if mode in (PREFETCH, CACHED, LATE, STREAM):
            figures[f"{mode}_install_ms"] = median(
                [r.install_to_ms - r.install_from_ms for r in reports]
            )
            figures[f"{mode}_wait_after_restore_ms"] = median(waits)
            figures[f"{mode}_restore_excess_ms"] = median(restore_x)
            figures[f"{mode}_run_excess_ms"] = median(run_x)
            if per_miss:
                figures[f"{mode}_us_per_miss"] = median(per_miss)
    console.print(table)
    return figures


def planning_costs(template: Template, hot: HotPageList, repeats: int = 7) -> dict[str, float]:
    """Planning the hot set anew, and reading a plan stored with it (a template's first fork
    pays one of them), timed in this process: best of ``repeats``."""
    base = 0x7F00_0000_0000
    regions = []
    for spec in template.layout:
        regions.append(Region(base, spec.size, spec.file_offset, PAGE_SIZE))
        base += spec.size + (1 << 30)
    with MemFile(template.path / MEM_FILE, mapped=False) as mem:
        plan_s, read_s, per_run_s = [], [], []
        plan = plan_prefetch(hot, regions, mem.is_zero)
        blob = plan.to_bytes()
        for _ in range(repeats):
            fresh = HotPageList.from_pages(hot.in_order())
            t0 = time.perf_counter()
            plan_prefetch(fresh, regions, mem.is_zero)
            plan_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            PrefetchPlan.from_bytes(blob)
            read_s.append(time.perf_counter() - t0)
            # The check a stored plan used to get, one run at a time in Python (for the A/B).
            t0 = time.perf_counter()
            check_runs_one_by_one(plan.table, regions, "bench")
            per_run_s.append(time.perf_counter() - t0)
    figures = {
        "planning_ms": min(plan_s) * 1e3,
        "stored_plan_read_ms": min(read_s) * 1e3,
        "stored_plan_check_per_run_ms": min(per_run_s) * 1e3,
    }
    console.print(
        f"planning {len(hot)} hot pages ({plan.run_count} runs): "
        f"{figures['planning_ms']:.2f} ms; reading the plan stored with them (its runs "
        f"checked as arrays): {figures['stored_plan_read_ms']:.2f} ms; checking the runs one "
        f"by one, as a stored plan used to be: {figures['stored_plan_check_per_run_ms']:.2f} ms"
        f" (best of {repeats}, in this process)"
    )
    return figures


def fan_out(
    server: PageServer,
    template: Template,
    warm: ForkReport,
    hot: HotPageList,
    burst: int,
    rounds: int,
    singles: int,
) -> dict[str, float]:
    """(b): bursts of ``burst`` forks against ``singles`` single forks, per mode, interleaved."""
    counter = iter(range(1_000, 1_000_000))  # fork_index k values after (a)'s

    def indices(n: int) -> list[int]:
        return [orchestrate.fork_index(template, next(counter), warm.variant) for _ in range(n)]

    modes: tuple[orchestrate.Mode, ...] = ("prefetch", "demand")
    kinds = [(mode, size) for mode in modes for size in (1, burst)]
    got: dict[tuple[str, int], list[list[ForkReport]]] = {k: [] for k in kinds}
    for _, (mode, size) in alternating(rounds, kinds):
        forks = indices(singles if size == 1 else size)
        got[(mode, size)].append(
            orchestrate.run_forks(
                server,
                template,
                forks,
                mode,
                hot=hot,
                warmup_variant=warm.variant,
                concurrent=size > 1,
            )
        )
    table = _table(
        f"b. fan-out: {burst} forks at once vs single forks, {rounds} rounds interleaved"
    )
    figures: dict[str, float] = {}
    for mode in ("prefetch", "demand"):
        singles_r = got[(mode, 1)]
        bursts_r = got[(mode, burst)]
        for label, per_round in ((f"{mode}: single", singles_r), (f"{mode}: {burst}", bursts_r)):
            flat = [x for rr in per_round for x in rr]
            _row(table, label, flat, [x.ready_ms for x in flat])
        one = [percentile([x.ready_ms for x in rr], 50) for rr in singles_r]
        for p in (50, 99):
            b = [percentile([x.ready_ms for x in rr], p) for rr in bursts_r]
            figures[f"{mode}_burst_p{p}_over_single"] = paired_ratio(b, one)
    console.print(table)
    for mode in ("prefetch", "demand"):
        console.print(
            f"{mode}: {burst}-fork burst p50 {figures[f'{mode}_burst_p50_over_single']:.2f}x, "
            f"p99 {figures[f'{mode}_burst_p99_over_single']:.2f}x a single fork's p50 "
            "(medians of per-round ratios)"
        )
    return figures


def main(quick: bool = False, argv: list[str] | None = None) -> dict[str, float]:
    """Run both comparisons, print their figures and ratios, and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem-size", type=int, default=256, help="guest RAM in MiB")
    parser.add_argument("--pairs", type=int, default=None, help="paired rounds of (a)")
    parser.add_argument("--burst", type=int, default=16, help="concurrent forks")
    parser.add_argument("--burst-rounds", type=int, default=2, help="rounds of (b)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 12 rounds, 8 concurrent")
    args = parser.parse_args(argv if argv is not None else [])
    if quick or args.quick:
        args.mem_size, args.burst = 64, 8
    if args.pairs is None:
        args.pairs = 12 if quick or args.quick else 16
    try:
        orchestrate.check_environment()
    except PageforkError as exc:
        print(f"bench_fork_ready: {exc}", file=sys.stderr)
        return {}
    figures: dict[str, float] = {"load_1min_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="pagefork-bench-") as tmp:
        t0 = time.monotonic()
        template = build_template(Path(tmp) / "t", TemplateSpec(mem_size=args.mem_size << 20))
        console.print(
            f"template: {args.mem_size} MiB, {template.meta['common_pages']} common hot pages, "
            f"built in {time.monotonic() - t0:.1f} s"
        )
        config = ServerConfig(
            mem_file_path=str(template.path / MEM_FILE), socket_dir=tmp, on_failure="kill"
        )
        with PageServer(config) as server:
            warm, hot = orchestrate.warm_up(server, template, fork_index=0)
            console.print(
                f"warm-up: ready {warm.ready_ms:.1f} ms, {warm.faults} faults, {len(hot)} recorded"
            )
            figures.update(planning_costs(template, hot))
            t_a = time.monotonic()
            figures.update(paired_rounds(server, template, warm, hot, args.pairs))
            t_b = time.monotonic()
            singles = 2 if quick or args.quick else 3
            figures.update(
                fan_out(server, template, warm, hot, args.burst, args.burst_rounds, singles)
            )
        template.close()
    figures["load_1min_end"] = os.getloadavg()[0]
    console.print(
        f"total {time.monotonic() - t0:.1f} s ((a) {t_b - t_a:.1f} s, (b) "
        f"{time.monotonic() - t_b:.1f} s); load average (1 min) {figures['load_1min_start']:.1f}"
        f" at the start, {figures['load_1min_end']:.1f} at the end"
    )
    return figures


if __name__ == "__main__":
    sys.exit(0 if main(argv=sys.argv[1:]) else 2)
