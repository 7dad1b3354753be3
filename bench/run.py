"""Run pagefork's benchmarks in sequence and print a summary of their figures.

    python bench/run.py                   # everything (about 6 minutes)
    python bench/run.py --quick           # short version (about 1.5 minutes)
    python bench/run.py --only faults     # one benchmark (repeat --only for more)
    python bench/run.py --only versus     # this tree against an older revision, side by side
    python bench/run.py --json out.json   # also write every figure as JSON
    python bench/report.py out.json > docs/benchmarks.md   # the figures page, from that JSON

A benchmark is a module ``bench/bench_<name>.py`` with ``main(quick: bool) -> dict`` returning
its figures; it may declare ``TARGETS`` (figure -> (``"<="`` or ``">="``, goal)) and ``SUMMARY``
(the figures worth a row in the final table, each with a short line saying what it means: a dict
figure -> meaning, or a tuple of figure names; all numeric figures when absent). The module's
docstring says what the benchmark does. The JSON carries all of it (figures, targets, meanings,
docstring) and the machine the run was made on, so the page made from it says what was run.
Benchmarks are not tests: a missed target is reported, not failed; only a benchmark that crashes
makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
#: Run order of the known benchmarks; any other bench_*.py file runs after them.
ORDER = ("faults", "prefetch", "fork_ready", "fanout", "s3", "layers", "snapshot")


def _setup_paths() -> None:
    """Make ``_common`` and the bench modules importable, and ``pagefork`` too (for this
    process and the test VMMs it starts) when it is not installed."""
    sys.path.insert(0, BENCH_DIR)
    if importlib.util.find_spec("pagefork") is None:
        src = os.path.join(os.path.dirname(BENCH_DIR), "src")
        sys.path.insert(0, src)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH")) if p
        )


_setup_paths()

import _common  # noqa: E402  (needs the path set above)
from _common import console, fmt  # noqa: E402
from rich.table import Table  # noqa: E402


@dataclass
class Outcome:
    """What one benchmark did: ``ok``, ``skipped`` or ``error``, its figures and duration."""

    name: str
    status: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)
    summary: tuple[str, ...] = ()
    #: What each summary figure means (from the module's ``SUMMARY``), where it says.
    meanings: dict[str, str] = field(default_factory=dict)
    #: The module's docstring: what the benchmark does.
    doc: str = ""
    #: The 1-minute load average when the benchmark started.
    load_before: float = 0.0


def discover() -> list[str]:
    """Names of the benchmarks present: the known ones in :data:`ORDER`, then the others."""
    present = sorted(
        f[len("bench_") : -len(".py")]
        for f in os.listdir(BENCH_DIR)
        if f.startswith("bench_") and f.endswith(".py")
    )
    return [n for n in ORDER if n in present] + [n for n in present if n not in ORDER]


def call_main(module: ModuleType, quick: bool) -> object:
    """Call the module's ``main``, passing ``quick`` the way its signature takes it.

    A script-style ``main()`` without parameters parses ``sys.argv`` itself: it gets
    ``--quick`` there, and nothing else of this runner's options.
    """
    main = module.main
    params = inspect.signature(main).parameters
    if "quick" in params:
        return main(quick=quick)
    positional = [
        p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if positional:
        return main(quick)
    saved = sys.argv
    sys.argv = [str(module.__file__)] + (["--quick"] if quick else [])
    try:
        return main()
    finally:
        sys.argv = saved


def run_one(name: str, quick: bool) -> Outcome:
    """Import ``bench_<name>`` and run it; never raises."""
    path = os.path.join(BENCH_DIR, f"bench_{name}.py")
    load = os.getloadavg()[0]
    if not os.path.exists(path):
        console.print(f"[yellow]skipped {name}:[/] bench/bench_{name}.py not found")
        return Outcome(name, "skipped", message=f"bench/bench_{name}.py not found")
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"bench_{name}")
        if not callable(getattr(module, "main", None)):
            raise TypeError(f"bench/bench_{name}.py has no main(quick) function")
        result = call_main(module, quick)
    except (Exception, SystemExit) as exc:
        console.print(f"[red]{name} failed:[/]")
        console.print(traceback.format_exc(), markup=False, highlight=False)
        return Outcome(name, "error", time.perf_counter() - t0, message=f"{exc!r}")
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        # A script-style main() returning its exit status.
        console.print(f"[red]{name} failed:[/] main() returned {result}")
        return Outcome(name, "error", time.perf_counter() - t0, message=f"exit status {result}")
    figures = dict(result) if isinstance(result, dict) else {}
    status, message = "ok", ""
    if "skipped" in figures:
        status, message = "skipped", str(figures.pop("skipped"))
    summary = getattr(module, "SUMMARY", ())
    return Outcome(
        name,
        status,
        time.perf_counter() - t0,
        figures,
        message,
        dict(getattr(module, "TARGETS", {})),
        tuple(summary),
        {str(k): str(v) for k, v in summary.items()} if isinstance(summary, dict) else {},
        inspect.cleandoc(module.__doc__ or ""),
        load,
    )


def _value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return fmt(v, 2 if abs(v) < 1000 else 0)


def summary_table(outcomes: list[Outcome], quick: bool) -> Table:
    """The final table: key figures, their targets, and whether each target was met."""
    t = Table(title=f"pagefork benchmarks ({'quick' if quick else 'full'} run)")
    for col in ("benchmark", "figure", "value", "target", "met"):
        t.add_column(col, justify="right" if col in ("value", "target") else "left")
    for o in outcomes:
        if o.status != "ok":
            t.add_row(o.name, f"[yellow]{o.status}[/]", "", "", o.message[:60], end_section=True)
            continue
        if not o.figures:
            t.add_row(o.name, "[dim](no figures returned; see its output above)[/]", "", "", "")
        keys = [k for k in (o.summary or o.figures) if k in o.figures]
        keys += [k for k in o.targets if k in o.figures and k not in keys]
        if not o.summary:
            keys = [k for k in keys if isinstance(o.figures[k], (int, float))]
        for i, key in enumerate(keys):
            value = o.figures[key]
            target, met = "", ""
            if key in o.targets:
                op, goal = o.targets[key]
                target = f"{op} {goal:g}"
                ok = value <= goal if op == "<=" else value >= goal
                met = "[green]yes[/]" if ok else "[red]no[/]"
            t.add_row(o.name if i == 0 else "", key, _value(value), target, met)
        t.add_row("", "[dim]seconds[/]", f"[dim]{o.seconds:.0f}[/]", "", "", end_section=True)
    return t


def host_facts() -> dict[str, Any]:
    """What the figures were measured on: CPU, memory, kernel, Python, and whether the CPU
    says it runs under a hypervisor (a VM, where syscalls and faults cost more)."""
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
    }
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "cpu_model" not in facts:
            facts["cpu_model"] = " ".join(value.split())
        elif key.strip() == "flags" and "virtualized" not in facts:
            facts["virtualized"] = "hypervisor" in value.split()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    facts["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
                    break
    except OSError:
        pass
    return facts


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse options, run the benchmarks, print the summary, write JSON."""
    available = discover()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short version (fewer rounds)")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this benchmark (repeatable); known: {', '.join(ORDER)}",
    )
    p.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    args = p.parse_args(argv)

    names = list(ORDER) + [n for n in available if n not in ORDER]
    if args.only:
        wanted = [n for item in args.only for n in item.split(",") if n]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in wanted]

    started = time.time()
    load_at_start = list(os.getloadavg())
    outcomes = [run_one(name, args.quick) for name in names]
    load_at_end = list(os.getloadavg())
    console.rule("[bold]summary")
    console.print(summary_table(outcomes, args.quick))
    console.print(f"total {time.time() - started:.0f} s")

    if args.json:
        doc = {
            "quick": args.quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": time.time() - started,
            # Load averages (1, 5, 15 minutes): how busy the machine was around the run.
            "host": {**host_facts(), "load_at_start": load_at_start, "load_at_end": load_at_end},
            # How every benchmark measures: _common's docstring after its summary line.
            "method": inspect.cleandoc(_common.__doc__ or "").partition("\n\n")[2],
            "benchmarks": {
                o.name: {
                    "status": o.status,
                    "seconds": o.seconds,
                    "message": o.message,
                    "figures": o.figures,
                    "targets": {k: list(v) for k, v in o.targets.items()},
                    "summary": list(o.summary),
                    "meanings": o.meanings,
                    "doc": o.doc,
                    "load_at_start": o.load_before,
                }
                for o in outcomes
            },
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
            f.write("\n")
        console.print(f"figures written to {args.json}")
    return 1 if any(o.status == "error" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
