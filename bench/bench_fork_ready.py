"""Fork-ready time of the built-in KVM microVM: prefetch vs on demand, and a 16-fork burst.

Two comparisons, each measured side by side in one run against one page server:

a. **Prefetch speed-up.** A template (default 256 MiB, working set 10%, fork-specific 5%) gets
   a recording warm-up fork; then forks run in pairs, one served on demand and one prefetched
   from the warm-up's hot set, the order alternating per pair so drift on this shared machine
   hits both modes alike. Fork-ready time = restore + prefetch (wall clock of the whole
   ``server.prefetch`` call, planning included) + run to guest ready. Targets: speed-up >= 4x
   (REAP 3.7x, E2B 3.3x), residual demand faults <= 5% of the warm-up's.
b. **Fan-out.** 16 forks of the template restored together and resumed at once (one page
   server serving them all) against single forks: p50/p99 ready per mode.

Run: ``python bench/bench_fork_ready.py [--quick]``. Prints figures and ratios; no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pagefork.errors import PageforkError
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm import orchestrate
from pagefork.vmm.kvm.orchestrate import ForkReport, percentile
from pagefork.vmm.kvm.template import MEM_FILE, TemplateSpec, build_template

console = Console(highlight=False, width=120)  # tables wider than a pipe's 80 columns


def _row(table: Table, label: str, reports: list[ForkReport]) -> None:
    ready = [r.ready_ms for r in reports]
    table.add_row(
        label,
        str(len(reports)),
        f"{percentile(ready, 50):.1f}",
        f"{percentile(ready, 99):.1f}",
        f"{statistics.median(r.prefetch_ms for r in reports):.1f}",
        f"{statistics.median(r.run_ms for r in reports):.1f}",
        f"{statistics.fmean(r.faults for r in reports):.0f}",
        f"{statistics.fmean(r.misses for r in reports):.0f}",
        f"{statistics.median(r.fault_latency_us.get('p50', 0.0) for r in reports):.1f}",
        "yes" if all(r.checksum_ok for r in reports) else "NO",
    )


def _table(title: str) -> Table:
    table = Table(title=title)
    for col in ("forks", "n", "ready p50 ms", "ready p99 ms", "prefetch ms", "run ms",
                "faults", "misses", "fault p50 us", "checksums"):  # fmt: skip
        table.add_column(col, justify="left" if col == "forks" else "right")
    return table


TARGETS = {"speedup": (">=", 4.0), "residual_fault_pct": ("<=", 5.0)}
SUMMARY = (
    "speedup",
    "median_pair_ratio",
    "residual_fault_pct",
    "demand_ready_ms_p50",
    "prefetch_ready_ms_p50",
    "prefetch_burst_p50_over_single",
    "prefetch_burst_p99_over_single",
    "demand_burst_p50_over_single",
    "demand_burst_p99_over_single",
)


def main(quick: bool = False, argv: list[str] | None = None) -> dict[str, float]:
    """Run both comparisons, print their figures and ratios, and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem-size", type=int, default=256, help="guest RAM in MiB")
    parser.add_argument("--pairs", type=int, default=8, help="demand/prefetch fork pairs")
    parser.add_argument("--burst", type=int, default=16, help="concurrent forks")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 4 pairs, 8 concurrent")
    args = parser.parse_args(argv if argv is not None else [])
    if quick or args.quick:
        args.mem_size, args.pairs, args.burst = 64, 4, 8
    try:
        orchestrate.check_environment()
    except PageforkError as exc:
        print(f"bench_fork_ready: {exc}", file=sys.stderr)
        return {}
    figures: dict[str, float] = {}
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
            # --- a. prefetch speed-up, pairs alternating order ----------------------------
            demand: list[ForkReport] = []
            prefetch: list[ForkReport] = []
            ratios = []
            for i in range(args.pairs):
                # Never the warm-up's own variant: prefetch is judged on traces it did not record.
                d_index = orchestrate.fork_index(template, 2 * i, warm.variant)
                p_index = orchestrate.fork_index(template, 2 * i + 1, warm.variant)
                order = ("demand", "prefetch") if i % 2 == 0 else ("prefetch", "demand")
                got: dict[str, ForkReport] = {}
                for mode in order:
                    if mode == "demand":
                        [got[mode]] = orchestrate.run_forks(
                            server, template, [d_index], "demand", warmup_variant=warm.variant
                        )
                    else:
                        [got[mode]] = orchestrate.run_forks(
                            server, template, [p_index], "prefetch", hot=hot,
                            warmup_variant=warm.variant,
                        )  # fmt: skip
                demand.append(got["demand"])
                prefetch.append(got["prefetch"])
                ratios.append(got["demand"].ready_ms / got["prefetch"].ready_ms)
            table = _table(f"a. fork-ready, {args.mem_size} MiB guest, sequential pairs")
            _row(table, "on demand", demand)
            _row(table, "prefetched", prefetch)
            console.print(table)
            speedup = percentile([r.ready_ms for r in demand], 50) / percentile(
                [r.ready_ms for r in prefetch], 50
            )
            residual = statistics.fmean(r.misses for r in prefetch) / warm.faults
            figures.update(
                speedup=speedup,
                median_pair_ratio=statistics.median(ratios),
                residual_fault_pct=100 * residual,
                demand_ready_ms_p50=percentile([r.ready_ms for r in demand], 50),
                prefetch_ready_ms_p50=percentile([r.ready_ms for r in prefetch], 50),
            )
            exact = all(r.misses == r.specific_pages for r in prefetch)
            console.print(
                f"speed-up (p50 demand / p50 prefetch): [bold]{speedup:.2f}x[/] "
                f"(median per-pair ratio {statistics.median(ratios):.2f}x; target >= 4x)"
            )
            console.print(
                f"residual demand faults: {100 * residual:.2f}% of the warm-up's (target <= 5%); "
                f"misses == fork-specific pages in every fork: {exact}"
            )
            # --- b. fan-out -------------------------------------------------------------
            table = _table(f"b. fan-out: {args.burst} concurrent forks vs single forks")
            base = 2 * args.pairs  # fork_index() k values after the pairs'
            summary = []
            burst_modes: tuple[orchestrate.Mode, ...] = ("prefetch", "demand")
            for mode in burst_modes:
                single: list[ForkReport] = []
                for k in range(3):
                    index = orchestrate.fork_index(template, base + k, warm.variant)
                    single += orchestrate.run_forks(
                        server, template, [index], mode, hot=hot, warmup_variant=warm.variant
                    )
                base += 3
                indices = [
                    orchestrate.fork_index(template, k, warm.variant)
                    for k in range(base, base + args.burst)
                ]
                burst = orchestrate.run_forks(
                    server, template, indices, mode, hot=hot,
                    warmup_variant=warm.variant, concurrent=True,
                )  # fmt: skip
                base += args.burst
                _row(table, f"{mode}: single", single)
                _row(table, f"{mode}: {args.burst} at once", burst)
                one = percentile([r.ready_ms for r in single], 50)
                b50 = percentile([r.ready_ms for r in burst], 50)
                b99 = percentile([r.ready_ms for r in burst], 99)
                figures[f"{mode}_burst_p50_over_single"] = b50 / one
                figures[f"{mode}_burst_p99_over_single"] = b99 / one
                summary.append(
                    f"{mode}: {args.burst}-fork burst p50 {b50 / one:.2f}x, p99 {b99 / one:.2f}x "
                    "a single fork's p50"
                )
            console.print(table)
            for line in summary:
                console.print(line)
    console.print(f"total {time.monotonic() - t0:.1f} s")
    return figures


if __name__ == "__main__":
    sys.exit(0 if main(argv=sys.argv[1:]) else 2)
