"""Snapshots of running microVM forks: their cost against a full memory copy, and branches.

Measured side by side in one run, with the built-in KVM microVM and real page servers:

a. **Snapshot cost.** For a 256 MiB guest whose walk writes 1%, 10% and 50% of its memory
   (templates whose one trace reads that share of memory and then writes every page it read),
   each round restores a fork with dirty logging, lets it walk, then takes in
   turn (the order reversing every round):

   - ``snapshot``: the diff snapshot in the VMM (``KVM_GET_DIRTY_LOG``, the dirty pages written
     to a sparse file, fsynced) plus the capture into a layer (data extents only, minus pages
     equal to the template, written atomically): what ``POST /forks/{id}/snapshot`` does
     before it registers the child;
   - ``full``: a full memory copy, what a full snapshot stores: every byte of guest RAM written
     to a file by the VMM and fsynced (pages the guest never touched are fetched from the page
     server, as a full snapshot of a uffd-backed VM must).

   Figures: time and bytes on disk of each, and full / snapshot (medians of per-round ratios).
b. **Fork-ready of a branch.** A fork of a 256 MiB template is snapshotted; forks of the child
   (the template's mem-file plus that layer, prefetched from what the child inherits: its layer's
   pages, then the template's hot set) run against forks of the template (prefetched from its
   hot set), on the same trace per round, the order reversing every round. One untimed fork of
   each fills the plan caches first (every fork after a template's first). Target: branch /
   base <= 1.1x.

Reading it: a snapshot costs what the guest changed; the changed pages are written twice
(the VMM's diff file, then the layer) against one stream of all memory for a full copy, so the
two come close when half the memory was written, while the layer stays half the size.

Run: ``python bench/bench_snapshot.py [--quick]``. Prints figures and ratios; no assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import alternating, median, paired_ratio
from rich.console import Console
from rich.table import Table

from pagefork.demo import branch, orchestrate
from pagefork.demo.orchestrate import ForkReport, percentile
from pagefork.errors import PageforkError
from pagefork.layers.capture import capture_layer
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm.process import ForkProcess
from pagefork.vmm.kvm.template import (
    MEM_FILE,
    Template,
    TemplateSpec,
    build_template,
    load_template,
)
from pagefork.vmm.kvm.trace import TraceSpec

console = Console(highlight=False, width=120)

SHARES = (0.01, 0.10, 0.50)
TARGETS = {"branch_over_base_ready": ("<=", 1.1)}
SUMMARY = {
    "snapshot_ms_1pct": "(a) snapshot of a guest that wrote 1% of its memory (ms)",
    "snapshot_ms_10pct": "(a) the same, 10% written",
    "snapshot_ms_50pct": "(a) the same, 50% written",
    "full_copy_ms_1pct": "(a) a full memory copy of the 1% guest (ms)",
    "full_over_snapshot_time_1pct": "(a) full copy / snapshot, time, 1% written",
    "full_over_snapshot_time_10pct": "(a) the same, 10% written",
    "full_over_snapshot_time_50pct": "(a) the same, 50% written",
    "layer_mib_1pct": "(a) the layer on disk, 1% written (MiB; 2.56 MiB were written)",
    "layer_mib_10pct": "(a) the same, 10% written (25.6 MiB written)",
    "layer_mib_50pct": "(a) the same, 50% written (128 MiB written)",
    "branch_ready_ms_p50": "(b) fork-ready of a branch of a snapshot, prefetched, p50 (ms)",
    "base_ready_ms_p50": "(b) fork-ready of a fork of its template, prefetched, p50 (ms)",
    "branch_over_base_ready": "(b) branch / template fork, median of per-round ratios",
}


def _label(share: float) -> str:
    return f"{round(share * 100)}pct"


def _written_template(directory: Path, mem_mib: int, share: float) -> Template:
    """A template whose one trace reads ``share`` of guest memory, then writes every page it
    read: each write (the walk's checksum, never zero in practice) changes its page."""
    trace = TraceSpec(working_set=share, fork_share=0.0, write_first_share=0.0, rewrite_share=1.0)
    return build_template(directory, TemplateSpec(mem_size=mem_mib << 20, variants=1, trace=trace))


def _one_round(
    server: PageServer, template: Template, work: Path, order: tuple[str, str], n: int
) -> dict[str, float]:
    """A fork walks (writing), then both copies in ``order``; their times and sizes."""
    name = f"snap-{template.path.name}-{n}"
    sock = server.register_fork(name)
    fork = ForkProcess(str(template.path), sock, 0, snapshots=True)
    out: dict[str, float] = {}
    try:
        fork.wait_restored()
        fork.go()
        if not fork.wait_result().checksum_ok:
            raise PageforkError("a snapshotted fork read wrong bytes")
        for kind in order:
            if kind == "snapshot":
                snap_dir = work / name
                snap_dir.mkdir()
                t0 = time.perf_counter()
                doc = fork.snapshot(str(snap_dir))
                captured = capture_layer(
                    str(doc["memory_diff"]),
                    parent_chain=template.memory_chain,
                    removed=server.removed_ranges(name),
                    out_path=str(snap_dir / "layer.pfl"),
                )
                out["snapshot_ms"] = (time.perf_counter() - t0) * 1e3
                out["vmm_ms"] = float(doc["seconds"]) * 1e3
                out["layer_bytes"] = float(captured.info.bytes)
                out["dirty_pages"] = float(captured.dirty_pages)
                os.unlink(doc["memory_diff"])
            else:
                path = work / f"full-{template.path.name}-{n}"
                t0 = time.perf_counter()
                fork.command(f"dump {path}", "dumped")
                out["full_ms"] = (time.perf_counter() - t0) * 1e3
                out["full_bytes"] = float(path.stat().st_size)
                path.unlink()
    finally:
        fork.close()
        server.unregister_fork(name)
    return out


def snapshot_cost(tmp: Path, mem_mib: int, rounds: int) -> dict[str, float]:
    """(a): per share of memory written, snapshot against full copy."""
    figures: dict[str, float] = {}
    table = Table(title=f"a. snapshot vs full memory copy, {mem_mib} MiB guest, {rounds} rounds")
    for col in ("written", "dirty pages", "snapshot ms", "of it in the VMM", "full copy ms",
                "full / snapshot", "layer MiB", "full MiB"):  # fmt: skip
        table.add_column(col, justify="right")
    for share in SHARES:
        t0 = time.monotonic()
        template = _written_template(tmp / f"t{_label(share)}", mem_mib, share)
        built = time.monotonic() - t0
        config = ServerConfig(mem_file_path=str(template.path / MEM_FILE), socket_dir=str(tmp))
        got: list[dict[str, float]] = []
        with PageServer(config) as server:
            for r, _ in alternating(rounds, ("x",)):
                order = ("snapshot", "full") if r % 2 == 0 else ("full", "snapshot")
                got.append(_one_round(server, template, tmp, order, len(got)))
        template.close()
        snap = [g["snapshot_ms"] for g in got]
        full = [g["full_ms"] for g in got]
        label = _label(share)
        figures.update(
            {
                f"snapshot_ms_{label}": median(snap),
                f"snapshot_vmm_ms_{label}": median([g["vmm_ms"] for g in got]),
                f"full_copy_ms_{label}": median(full),
                f"full_over_snapshot_time_{label}": paired_ratio(full, snap),
                f"layer_mib_{label}": median([g["layer_bytes"] for g in got]) / (1 << 20),
                f"full_mib_{label}": median([g["full_bytes"] for g in got]) / (1 << 20),
                f"dirty_pages_{label}": median([g["dirty_pages"] for g in got]),
            }
        )
        table.add_row(
            f"{share:.0%}",
            f"{figures[f'dirty_pages_{label}']:.0f}",
            f"{figures[f'snapshot_ms_{label}']:.1f}",
            f"{figures[f'snapshot_vmm_ms_{label}']:.1f}",
            f"{figures[f'full_copy_ms_{label}']:.1f}",
            f"{figures[f'full_over_snapshot_time_{label}']:.2f}x",
            f"{figures[f'layer_mib_{label}']:.1f}",
            f"{figures[f'full_mib_{label}']:.0f}",
        )
        console.print(f"template writing {share:.0%} built in {built:.1f} s")
    console.print(table)
    return figures


def branch_ready(tmp: Path, mem_mib: int, pairs: int) -> dict[str, Any]:
    """(b): forks of a snapshot against forks of its template, both prefetched."""
    template = build_template(tmp / "tb", TemplateSpec(mem_size=mem_mib << 20))
    socket_dir = tmp / "sockets"
    socket_dir.mkdir()
    config = ServerConfig(mem_file_path=str(template.path / MEM_FILE), socket_dir=str(socket_dir))
    base: list[ForkReport] = []
    branches: list[ForkReport] = []
    with PageServer(config) as server:
        warm, hot = orchestrate.warm_up(server, template, fork_index=0)
        # The snapshotted parent answers, from its own memory, what each branch must walk to.
        indices = [orchestrate.fork_index(template, k, warm.variant) for k in range(pairs + 1)]
        snap = branch.snapshot_parent(
            server, template, warm.variant, tmp / "child", hot, branch_indices=indices
        )
        memory = (*template.memory_chain, snap.layer)
        child = load_template(snap.directory, memory)
        child_hot = branch.child_hot_set(template, memory[1:], hot)
        child_config = ServerConfig(
            mem_file_path=memory[0], layers=tuple(memory[1:]), socket_dir=str(socket_dir)
        )
        with PageServer(child_config) as child_server:
            index0 = orchestrate.fork_index(template, 0, warm.variant)
            # Untimed: plans cached, page cache warm, for both.
            orchestrate.run_forks(server, template, [index0], "prefetch", hot=hot)
            orchestrate.run_forks(child_server, child, [index0], "prefetch", hot=child_hot)
            for r, kind in alternating(pairs, ("base", "branch")):
                index = orchestrate.fork_index(template, 1 + r, warm.variant)
                if kind == "base":
                    base += orchestrate.run_forks(server, template, [index], "prefetch", hot=hot)
                else:
                    branches += orchestrate.run_forks(
                        child_server, child, [index], "prefetch", hot=child_hot
                    )
        child.close()
    template.close()
    ok = all(x.checksum_ok for x in base + branches)
    sees = all(b.checksums != a.checksums for a, b in zip(base, branches, strict=True))
    sees = sees and all(snap.expected.get(b.fork_index) == b.checksums for b in branches)
    figures: dict[str, Any] = {
        "branch_ready_ms_p50": percentile([x.ready_ms for x in branches], 50),
        "base_ready_ms_p50": percentile([x.ready_ms for x in base], 50),
        "branch_over_base_ready": paired_ratio(
            [x.ready_ms for x in branches], [x.ready_ms for x in base]
        ),
        "branch_snapshot_ms": snap.snapshot_ms,
        "branch_layer_mib": snap.layer_bytes / (1 << 20),
        "branch_changed_pages": float(snap.changed_pages),
        "branch_prefetched_pages_mean": sum(x.prefetched_pages for x in branches) / len(branches),
        "base_prefetched_pages_mean": sum(x.prefetched_pages for x in base) / len(base),
        "branch_misses_mean": sum(x.misses for x in branches) / len(branches),
        "base_misses_mean": sum(x.misses for x in base) / len(base),
        "checksums_ok": float(ok and sees),
    }
    table = Table(title=f"b. fork-ready, {mem_mib} MiB: branch of a snapshot vs the template")
    for col in ("forks", "n", "ready p50 ms", "restore ms", "prefetch ms", "run ms", "prefetched",
                "misses"):  # fmt: skip
        table.add_column(col, justify="left" if col == "forks" else "right")
    for label, reports in (("template (base)", base), ("branch", branches)):
        table.add_row(
            label,
            str(len(reports)),
            f"{percentile([x.ready_ms for x in reports], 50):.1f}",
            f"{median([x.restore_ms for x in reports]):.1f}",
            f"{median([x.prefetch_ms for x in reports]):.1f}",
            f"{median([x.run_ms for x in reports]):.1f}",
            f"{sum(x.prefetched_pages for x in reports) / len(reports):.0f}",
            f"{sum(x.misses for x in reports) / len(reports):.0f}",
        )
    console.print(table)
    console.print(
        f"branch / base fork-ready: [bold]{figures['branch_over_base_ready']:.2f}x[/] (median of "
        f"{pairs} paired rounds; target <= 1.1x); snapshot of the parent "
        f"{snap.snapshot_ms:.1f} ms, layer {figures['branch_layer_mib']:.2f} MiB; every branch "
        f"saw the change and every checksum was right: {'yes' if ok and sees else 'NO'}"
    )
    return figures


def main(quick: bool = False, argv: list[str] | None = None) -> dict[str, Any]:
    """Run both comparisons, print their figures and ratios, and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem-size", type=int, default=256, help="guest RAM in MiB")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per share in (a)")
    parser.add_argument("--pairs", type=int, default=8, help="paired rounds of (b)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds, 4 pairs")
    args = parser.parse_args(argv if argv is not None else [])
    if quick or args.quick:
        args.mem_size, args.rounds, args.pairs = 64, 2, 4
    try:
        orchestrate.check_environment()
    except PageforkError as exc:
        print(f"bench_snapshot: {exc}", file=sys.stderr)
        return {}
    t0 = time.monotonic()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pagefork-bench-") as tmp:
        figures.update(snapshot_cost(Path(tmp), args.mem_size, args.rounds))
        figures.update(branch_ready(Path(tmp), args.mem_size, args.pairs))
    console.print(f"total {time.monotonic() - t0:.1f} s")
    return figures


if __name__ == "__main__":
    sys.exit(0 if main(argv=sys.argv[1:]) else 2)
