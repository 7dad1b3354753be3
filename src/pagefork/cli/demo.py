"""``pagefork demo``: fork a template of the built-in KVM microVM end to end.

Builds a template, runs a recording warm-up fork, saves its hot set, then runs rounds of three
forks that walk the same trace: one served on demand, one prefetched from the hot set, and one
with every page present before resume (the physical limit: its population is not counted). The
order rotates, so drift hits every mode alike. It prints per mode the fork-ready time (wall
time from the fork's start to the guest's ready), demand faults, prefetched pages, misses and
checksums; the speed-up over on demand (median of the rounds' ratios); and the prefetched
fork's ready time over the limit's, for the template's first prefetched fork (which pays for
its plan) and for later ones.

With ``--branch`` it then snapshots a fork: a fork of the template walks its trace (its writes
change guest memory), is paused at its end and captured into a layer; as many branches as
prefetched forks are forked from that snapshot, each on the trace of one prefetched fork of
the template. Each must report the checksum the snapshotted fork itself answers for its trace
from its own memory (it then walks on from the snapshot, and its own walk must agree): a check
independent of the layers the branches are served from.

Every fork's memory (``Pss`` of its VMM, measured by the kernel at ready) is reported next to
its ready time. With ``--share-memory`` it then runs a burst of ``--forks`` forks alive
together twice, without and with KSM sharing (each VMM marked ``PR_SET_MEMORY_MERGE``), and
reports their memory side by side, with how long merging took to converge. KSM must be on
(``echo 1 > /sys/kernel/mm/ksm/run``): the demo never turns it on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pagefork.errors import PageforkError
from pagefork.hotpages import load as load_hot_pages

if TYPE_CHECKING:
    from pagefork.demo.orchestrate import Mode


def add_parser(subparsers: Any) -> None:
    """Register ``pagefork demo``."""
    p = subparsers.add_parser(
        "demo",
        help="fork a built-in KVM microVM template: on demand vs. prefetched vs. all present",
        description=__doc__,
    )
    p.add_argument(
        "--mem-size", type=int, default=256, metavar="MIB", help="guest RAM (default 256)"
    )
    p.add_argument("--forks", type=int, default=8, metavar="N", help="forks per mode (default 8)")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs per microVM (default 1)")
    p.add_argument(
        "--working-set",
        type=float,
        default=0.10,
        metavar="SHARE",
        help="common hot set as a share of guest RAM (default 0.10)",
    )
    p.add_argument(
        "--fork-share",
        type=float,
        default=0.05,
        metavar="SHARE",
        help="fork-specific pages as a share of the hot set (default 0.05)",
    )
    p.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    p.add_argument(
        "--workdir", help="keep the template and hot-page file here (default: a temp dir)"
    )
    p.add_argument(
        "--branch",
        action="store_true",
        help="also snapshot a fork that changed guest memory and branch --forks forks from it "
        "(JSON: a 'branch' object)",
    )
    p.add_argument(
        "--share-memory",
        action="store_true",
        help="also run a burst of --forks forks alive together, without and with KSM sharing, "
        "and compare their memory (JSON: a 'memory' object; needs KSM on)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw ready times and fault timelines (needs matplotlib)"
    )
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad options before any work: one-line :class:`PageforkError`s (exit 2)."""
    if args.forks < 1 or args.vcpus < 1:
        raise PageforkError("--forks and --vcpus must be at least 1")
    if args.mem_size < 1:
        raise PageforkError("--mem-size must be at least 1 MiB")
    ws, fs = args.working_set, args.fork_share
    if not (math.isfinite(ws) and 0 < ws <= 1):
        raise PageforkError(f"--working-set must be a share in (0, 1], got {ws}")
    if not (math.isfinite(fs) and 0 <= fs <= 1):
        raise PageforkError(f"--fork-share must be a share in [0, 1], got {fs}")
    if args.workdir:
        workdir = Path(args.workdir)
        if workdir.exists() and not workdir.is_dir():
            raise PageforkError(f"--workdir {workdir}: exists and is not a directory")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PageforkError(f"--workdir {workdir}: {exc.strerror or exc}") from None
    if args.plot:
        plot = Path(args.plot)
        parent = plot.parent if str(plot.parent) else Path(".")
        if not parent.is_dir():
            raise PageforkError(f"--plot {plot}: directory {parent} does not exist")
        if plot.is_dir():
            raise PageforkError(f"--plot {plot}: is a directory")
        if not os.access(parent, os.W_OK):
            raise PageforkError(f"--plot {plot}: directory {parent} is not writable")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PageforkError("--plot needs matplotlib: pip install 'pagefork[plot]'") from None


def run(args: argparse.Namespace) -> int:
    """Handler of ``pagefork demo``; returns the exit code (1 if a checksum failed)."""
    from pagefork.demo import branch, orchestrate
    from pagefork.demo.density import side_by_side
    from pagefork.ksm import off_note
    from pagefork.server import PageServer, ServerConfig
    from pagefork.vmm.kvm.template import MEM_FILE, TemplateSpec, build_template
    from pagefork.vmm.kvm.trace import TraceSpec

    _check_args(args)
    if args.plot:
        _require_matplotlib()
    orchestrate.check_environment()
    if args.share_memory and (note := off_note()) is not None:
        Console(stderr=True).print(note, highlight=False, soft_wrap=True, markup=False)
    spec = TemplateSpec(
        mem_size=args.mem_size << 20,
        vcpus=args.vcpus,
        trace=TraceSpec(working_set=args.working_set, fork_share=args.fork_share, seed=args.seed),
    )
    started = time.monotonic()
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pagefork-demo-"))
    )
    err = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=args.json,
    )
    try:
        with progress:
            t_template = progress.add_task("building template", total=4)
            template = build_template(
                workdir / "template",
                spec,
                progress=lambda msg: progress.update(t_template, advance=1, description=msg[:28]),
            )
            progress.update(t_template, completed=4, description="template ready")
            sockets = workdir / "sockets"
            sockets.mkdir(exist_ok=True)
            config = ServerConfig(
                mem_file_path=str(template.path / MEM_FILE),
                socket_dir=str(sockets),
                on_failure="kill",
            )
            with PageServer(config) as server:
                t_warm = progress.add_task("warm-up fork (recording)", total=1)
                warm, hot = orchestrate.warm_up(server, template, fork_index=0)
                hot_file = workdir / "hot-pages.hpl"
                hot.save(hot_file)
                recorded = hot  # keeps first-touch times for the plot
                hot = load_hot_pages(hot_file)  # forks are prefetched from the file, as in use
                progress.update(t_warm, completed=1)
                t_forks = progress.add_task("forks: 3 modes", total=3 * args.forks)
                done = lambda _r: progress.advance(t_forks)  # noqa: E731
                every = orchestrate.every_page(template)
                runs: dict[str, list[orchestrate.ForkReport]] = {m: [] for m in MODES}
                for i in range(args.forks):
                    # A round walks one trace variant, so its ratios compare like with like;
                    # the order rotates, so page-cache or frequency drift hits every mode.
                    index = orchestrate.fork_index(template, i, warm.variant)
                    for mode in MODES[i % 3 :] + MODES[: i % 3]:
                        runs[mode] += orchestrate.run_forks(
                            server,
                            template,
                            [index],
                            mode,
                            hot={"prefetch": hot, "present": every}.get(mode),
                            warmup_variant=warm.variant,
                            on_done=done,
                        )
                demand, prefetch, present = runs["demand"], runs["prefetch"], runs["present"]
                memory = None
                if args.share_memory:
                    t_mem = progress.add_task("bursts: unshared, shared", total=2)
                    memory = side_by_side(
                        server,
                        template,
                        [r.fork_index for r in prefetch],
                        hot,
                        on_done=lambda: progress.advance(t_mem),
                    )
                snapshot = None
                if args.branch:
                    t_snap = progress.add_task("snapshot of a fork", total=1)
                    snapshot = branch.snapshot_parent(
                        server,
                        template,
                        warm.variant,
                        branch.temp_snapshot_dir(workdir),
                        hot,
                        branch_indices=[r.fork_index for r in prefetch],
                    )
                    progress.update(t_snap, completed=1)
            branched = None
            if snapshot is not None:
                t_branch = progress.add_task("branches of the snapshot", total=args.forks)
                branched = branch.run_branches(
                    template,
                    snapshot,
                    [r.fork_index for r in prefetch],
                    prefetch,
                    str(sockets),
                    hot,
                    on_done=lambda _r: progress.advance(t_branch),
                )
        doc = _result_doc(warm, len(hot), runs, spec.mem_size, time.monotonic() - started)
        doc["parameters"] = {
            "mem_size_mib": args.mem_size,
            "forks": args.forks,
            "vcpus": args.vcpus,
            "working_set": args.working_set,
            "fork_share": args.fork_share,
            "seed": args.seed,
        }
        doc["workdir"] = str(workdir) if args.workdir else None
        if memory is not None:
            doc["memory"] = memory
        if branched is not None:
            doc["branch"] = branched.to_dict()
        # Figures first: a plot that fails must not lose them.
        if args.json:
            print(json.dumps(doc, indent=2), flush=True)
        else:
            _print_tables(doc)
        if args.plot:
            try:
                _plot(args.plot, recorded, doc, demand, prefetch, present)
            except OSError as exc:
                raise PageforkError(f"--plot {args.plot}: {exc.strerror or exc}") from None
            # Said on stderr: with --json, stdout holds the JSON document alone.
            err.print(
                f"wrote the plot to {args.plot}", soft_wrap=True, markup=False, highlight=False
            )
        branch_ok = branched is None or doc["branch"]["checksums_ok"]
        if memory is not None:
            branch_ok = branch_ok and all(m["checksums_ok"] for m in memory.values())
        return 0 if doc["checksums_ok"] and branch_ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


#: The demo's modes, in the order of a round's first fork.
MODES: tuple[Mode, ...] = ("demand", "prefetch", "present")


def _result_doc(
    warm: Any, hot_pages: int, runs: dict[str, list[Any]], mem_size: int, elapsed: float
) -> dict[str, Any]:
    from pagefork.demo.orchestrate import summarize

    demand, prefetch, present = runs["demand"], runs["prefetch"], runs["present"]
    summaries = {mode: summarize(runs[mode]) for mode in MODES}
    # Round i of each mode walked the same trace variant.
    ratios = [a.ready_ms / b.ready_ms for a, b in zip(demand, prefetch, strict=True)]
    to_limit = [a.ready_ms / b.ready_ms for a, b in zip(prefetch, present, strict=True)]
    p = summaries["prefetch"]
    residual = p["misses_mean"] / warm.faults if warm.faults else float("nan")
    # What prefetch left to fault beyond the pages the hot set could not hold (0 when every hot
    # page was installed); the residual ratio itself only mirrors the trace's fork-specific share.
    # Fewer misses than that is no anomaly: bridged copies install some of those pages too.
    beyond = max(0, max((r.misses - r.specific_pages for r in prefetch), default=0))
    return {
        "speedup": statistics.median(ratios),
        "speedup_pairs": ratios,
        # The template's first prefetched fork pays for its plan; later ones reuse it.
        "prefetch_over_present_first": to_limit[0],
        "prefetch_over_present_later": statistics.median(to_limit[1:])
        if len(to_limit) > 1
        else None,
        "prefetch_over_present_rounds": to_limit,
        "checksums_ok": bool(
            warm.checksum_ok and all(m["checksums_ok"] for m in summaries.values())
        ),
        "residual_fault_ratio": residual,
        "misses_beyond_unrecorded": beyond,
        "mem_size_mib": mem_size >> 20,
        "hot_pages": hot_pages,
        "warmup": warm.to_dict(),
        "modes": {
            mode: {
                **summaries[mode],
                **_pss(runs[mode]),
                "ready_ms": [r.ready_ms for r in runs[mode]],
                "faults": [r.faults for r in runs[mode]],
                "checksums": [r.checksums for r in runs[mode]],
                "per_fork": [r.to_dict() for r in runs[mode]],
            }
            for mode in MODES
        },
        "elapsed_s": elapsed,
    }


def _pss(reports: list[Any]) -> dict[str, float]:
    """Mean memory per fork at ready (its VMM's ``Pss``, and of that its guest RAM's)."""
    pss = [r.memory.get("pss_bytes", 0) for r in reports]
    guest = [r.memory.get("guest_pss_bytes", 0) for r in reports]
    return {
        "pss_bytes_mean": statistics.fmean(pss) if pss else 0.0,
        "guest_pss_bytes_mean": statistics.fmean(guest) if guest else 0.0,
    }


def _print_tables(doc: dict[str, Any]) -> None:
    out = Console()
    if not out.is_terminal:
        out.width = max(out.width, 120)  # off a terminal nothing is cut to 80 columns
    if not out.is_terminal:
        out.width = max(out.width, 100)  # a pipe gets 80 columns by default: too narrow
    warm = doc["warmup"]
    out.print(
        f"[bold]warm-up fork[/]: ready {warm['ready_ms']:.1f} ms, {warm['faults']} demand faults, "
        f"{doc['hot_pages']} hot pages recorded, "
        f"checksum {'OK' if warm['checksum_ok'] else 'WRONG'}"
    )
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"{doc['mem_size_mib']} MiB microVM forks (times are p50 unless noted)",
    )
    columns = (
        "mode",
        "ready p50/p95",
        "restore+prefetch+run",
        "faults",
        "prefetched",
        "misses",
        "Pss (guest)",
        "checksums",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "mode" else "right", no_wrap=col == "mode")
    for mode, m in doc["modes"].items():
        table.add_row(
            f"{mode} ({m['forks']})",
            f"{m['ready_ms_p50']:.0f}/{m['ready_ms_p95']:.0f} ms",
            f"{m['restore_ms_p50']:.0f}+{m['prefetch_ms_p50']:.0f}+{m['run_ms_p50']:.0f} ms",
            f"{m['demand_faults_mean']:.0f}",
            f"{m['prefetched_pages_mean']:.0f}",
            f"{m['misses_mean']:.0f} / {m['specific_pages_mean']:.0f}",
            f"{m['pss_bytes_mean'] / 2**20:.0f} ({m['guest_pss_bytes_mean'] / 2**20:.0f})M",
            "[green]OK[/]" if m["checksums_ok"] else "[red]WRONG[/]",
        )
    out.print(table)
    out.print(
        "faults, prefetched, misses, Pss: means per fork; misses / pages the warm-up never "
        "touched; present: every page installed before resume, not counted in its ready time; "
        "Pss: the VMM's proportional memory at ready, in MiB (of it, guest RAM)"
    )
    out.print(
        f"[bold]speed-up[/] (ready time, demand / prefetch, median of {len(doc['speedup_pairs'])}"
        f" pairs on the same trace): [bold]{doc['speedup']:.2f}x[/]; "
        f"misses beyond the pages the warm-up never touched: {doc['misses_beyond_unrecorded']}; "
        f"{doc['elapsed_s']:.1f} s in all"
    )
    later = doc["prefetch_over_present_later"]
    out.print(
        f"[bold]prefetched / all present[/] (ready time on the same trace): first fork "
        f"{doc['prefetch_over_present_first']:.2f}x (it pays for its plan), later forks "
        + (f"{later:.2f}x (median)" if later is not None else "- (one round only)")
    )
    if doc.get("memory") is not None:
        _print_memory(out, doc["memory"])
    b = doc.get("branch")
    if b is not None:
        out.print(
            f"[bold]branch[/]: snapshot of a fork in {b['snapshot_ms']:.0f} ms "
            f"({b['changed_pages']} pages changed, layer {b['layer_bytes'] / 1024:.0f} KiB); "
            f"{b['forks']} branches ready p50 {b['ready_ms_p50']:.0f} ms vs "
            f"{b['base_ready_ms_p50']:.0f} ms for the template's prefetched forks; every branch "
            f"walks to what the snapshotted fork's own memory says: "
            + ("[green]OK[/]" if b["checksums_ok"] else "[red]WRONG[/]")
        )


def _print_memory(out: Console, memory: dict[str, Any]) -> None:
    """The two bursts side by side: memory settled, ready time, convergence."""
    mib = 2**20
    table = Table(box=box.SIMPLE_HEAD, title="forks alive together: memory without and with KSM")
    for col in ("burst", "Pss total", "per fork", "guest Pss", "ready mean", "converged"):
        table.add_column(col, justify="left" if col == "burst" else "right")
    for name, m in memory.items():
        conv = m["converge_s"]
        table.add_row(
            f"{name} ({m['forks']})",
            f"{m['pss_total_bytes'] / mib:.0f} MiB",
            f"{m['per_fork_pss_bytes'] / mib:.1f} MiB",
            f"{m['guest_pss_total_bytes'] / mib:.0f} MiB",
            f"{m['ready_ms_mean']:.0f} ms",
            "-" if conv is None else f"{conv:.1f} s",
        )
    out.print(table)
    s = memory["shared"]
    out.print(
        f"shared: {s['ksm_merging_pages']} pages merged, ksmd "
        + ("-" if s["ksmd_cpu_s"] is None else f"{s['ksmd_cpu_s']:.2f}")
        + f" CPU s; {s['free_zero_pages']} touched pages stayed the zero page (free)"
        + ("" if s["ksm_running"] else "; KSM is off on this host: nothing merged")
    )


def _plot(
    path: str,
    hot: Any,
    doc: dict[str, Any],
    demand: list[Any],
    prefetch: list[Any],
    present: list[Any],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"demand": "tab:red", "prefetch": "tab:blue", "present": "tab:green"}
    reports = {"demand": demand, "prefetch": prefetch, "present": present}
    fig, (ax_ready, ax_walk, ax_faults) = plt.subplots(1, 3, figsize=(16, 4.8))
    params = doc.get("parameters", {})
    later = doc["prefetch_over_present_later"]
    fig.suptitle(
        f"pagefork demo: {doc['mem_size_mib']} MiB microVM, {params.get('forks', '?')} forks per "
        f"mode, working set {params.get('working_set', '?')}, fork share "
        f"{params.get('fork_share', '?')}, seed {params.get('seed', '?')}\n"
        f"speed-up over on demand {doc['speedup']:.2f}x; prefetched / all present: first fork "
        f"{doc['prefetch_over_present_first']:.2f}x"
        + (f", later forks {later:.2f}x" if later is not None else "")
    )
    for i, mode in enumerate(MODES):
        ax_ready.scatter(
            [i] * len(reports[mode]),
            [r.ready_ms for r in reports[mode]],
            color=colors[mode],
            label=mode,
        )
    ax_ready.set_xticks(range(len(MODES)), list(MODES))
    ax_ready.set_ylabel("fork ready (ms)")
    ax_ready.set_ylim(bottom=0)
    ax_ready.set_title("fork-ready time (present: population not counted)")
    for mode in MODES:
        for j, r in enumerate(reports[mode]):
            xs = [0.0] + [t for t, _ in r.progress]
            ys = [0] + [p for _, p in r.progress]
            ax_walk.plot(xs, ys, color=colors[mode], alpha=0.6, label=mode if j == 0 else None)
    ax_walk.set_xlabel("ms since resume")
    ax_walk.set_ylabel("pages walked by the guest")
    ax_walk.set_title("guest progress")
    ax_walk.legend()
    times = [t for t in hot.times() if t is not None]
    if times:
        t0 = min(times)
        ax_faults.plot(
            sorted((t - t0) * 1e3 for t in times),
            range(1, len(times) + 1),
            color="gray",
            label="warm-up fork (recorded)",
        )
    ax_faults.set_xlabel("ms since the warm-up's first fault")
    ax_faults.set_ylabel("demand faults (cumulative)")
    ax_faults.set_title("the warm-up fork's faults")
    ax_faults.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
