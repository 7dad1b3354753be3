"""This tree against a baseline revision, side by side in one run: is anything slower?

    python bench/bench_versus.py [--quick] [--baseline REV]    # default REV: 3239e0a
    python bench/run.py --only versus                          # the default baseline

The baseline (by default the revision before the page server was split into the modules of
``serving/``) is unpacked from git into a temporary directory, removed afterwards. Both trees
are compiled to bytecode first, by the same interpreter, as an install is: no process compiles
source while timed, and neither tree's first round pays for it. Every round of every scenario
runs ``bench/_versus_driver.py`` in a fresh process once per tree, with ``PYTHONPATH`` set to
that tree's ``src``: each tree runs its own code (page server, workers, ``serve``, test VMMs)
on the same template, driven by the same driver through the API both share. The two trees
take turns in an order that reverses every round (old new, new old, ...), so drift on the
machine hits them alike.

Rounds: each scenario has its own number of paired rounds (:data:`ROUNDS`). The takeover and
recovery figures are a few tens of ms on a host where one scheduling delay is as long, so a
single round swings 0.3-4x; they get the most rounds (cheap ones). Fan-out (the dearest run)
and demand faults (a median of three forks per run already) vary little between rounds
(fan-out's burst ratio within about 0.1), so a quick run gives them one and two.

The ratio new / old is the median over every pair of one old round and one new round of
new / old (all n x n pairs, the Hodges-Lehmann estimate of a ratio): on this kind of host the
noise is mostly a burst that hits one run, not a drift that hits both runs of a round alike,
and the median of n x n ratios moves far less from run to run than the median of the n
per-round ratios (also given, as ``ratio_<figure>_paired``). Either way one slow round moves
it little. The spread is the smallest and largest per-round ratio.

Figures, each the median per tree over its rounds (times from ``time.perf_counter`` in the
driver, or when the driver read a line of ``serve``'s output):

- ``fanout16_burst_ms``: 16 test VMMs of a 32 MiB template (default server settings) touch
  every page in random order at the same moment; from that moment until the last VMM said it
  is done (every page answered and checked).
- ``fanout16_connect_ms``: registering those 16 forks and starting their VMMs until all are
  connected (the VMMs' interpreter start-up included, the same code for both trees).
- ``startup_ms``: from the driver's first line (interpreter start-up not counted) until the
  page server's workers all serve: the driver's and pagefork's imports, opening the
  template, starting the workers and each one's start-up.
- ``fault_us``: one fork of 16 MiB touches every page in random order; the guest's time per
  page (its fault as it sees it), the median of three forks one after another.
- ``recovery_ms``: 4 forks of 16 MiB on 2 workers fault continuously (the page server in the
  driver's process); from the SIGKILL of one worker until every fork it served has had a
  fault served again (polled every 0.1 ms); with the spare worker. ``recovery_cold_ms``: the
  same without a spare, so a new worker interpreter starts (its imports, mapping the
  template) before the forks move to it;
  ``recovery_cold_respawn_ms`` is the part until a new worker took the dead one's place,
  ``recovery_cold_ready_ms`` until it has started and mapped the template.
- ``takeover_pause_ms``: a ``pagefork serve`` (2 workers) serves 16 forks of 16 MiB; a
  ``serve --takeover`` started beside it is held once connected (its start-up, imports and
  workers done); then the 16 VMMs start touching every page (2 threads each) and the
  successor is let go. From letting it go until its ``took_over`` line was read: the whole
  protocol (plan, ready, the old side's release of every fork, the state with the forks'
  fds, adopting them), and the successor's main thread getting the CPU back to print, while
  the forks it woke compete for both cores.
- ``takeover_slowest_fault_ms``: the longest any one page took to be answered, over every
  fault of those 16 VMMs' touch (before, during and after the handover): the pause a fork
  feels, which the handover usually sets.
- ``takeover_command_s``: what an operator waits for ``serve --takeover`` in all: its
  start-up (interpreter included) until it is ready to hand over, plus the pause.

Each figure: the median per tree, and the ratio new / old (above), with the smallest and
largest per-round ratio (the spread). A ratio above 1 is slower now. Every round's figures
are kept in the JSON (``comparison``: ``old_rounds``, ``new_rounds``, in the order run).
``load_start`` and ``load_end`` are the host's 1-minute load average around the run: figures
from a host that was busy with other work say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from _common import (
    BENCH_DIR,
    MiB,
    console,
    fmt,
    header,
    make_mem_file,
    median,
    scratch_dir,
    table,
)

REPO = BENCH_DIR.parent
DRIVER = BENCH_DIR / "_versus_driver.py"
#: The revision before the page server was split (its supervisor one ``server.py``).
DEFAULT_BASELINE = "3239e0a"
OLD, NEW = "old", "new"

#: (figure, scenario, driver argument, driver figure, what it means)
METRICS: tuple[tuple[str, str, str, str, str], ...] = (
    ("fanout16_burst_ms", "fanout", "", "burst_ms",
     "16 forks of 32 MiB touching every page at once, wall time (ms)"),
    ("fanout16_connect_ms", "fanout", "", "connect_ms",
     "registering 16 forks until all are connected (ms)"),
    ("startup_ms", "fanout", "", "startup_ms",
     "imports + page server + workers serving, interpreter excluded (ms)"),
    ("fault_us", "faults", "", "us_per_fault",
     "one fork's demand fault as the guest sees it (µs)"),
    ("recovery_ms", "recovery", "1", "ms",
     "worker SIGKILLed -> its forks served again, spare worker (ms)"),
    ("recovery_cold_ms", "recovery", "0", "ms",
     "the same without a spare: a new worker interpreter starts (ms)"),
    ("recovery_cold_respawn_ms", "recovery", "0", "respawn_ms",
     "of that, until a new worker took the dead one's place (ms)"),
    ("recovery_cold_ready_ms", "recovery", "0", "ready_ms",
     "of that, until the new worker has started and mapped the template (ms)"),
    ("takeover_pause_ms", "takeover", "", "handover_ms",
     "serve --takeover of 16 faulting forks, go-on -> took_over (ms)"),
    ("takeover_slowest_fault_ms", "takeover", "", "slowest_fault_ms",
     "the longest page any of those forks waited for meanwhile (ms)"),
    ("takeover_command_s", "takeover", "", "command_s",
     "what an operator waits for serve --takeover in all (s)"),
)  # fmt: skip
#: Paired rounds per scenario, (quick, full): see the module's docstring.
ROUNDS = {"fanout": (1, 5), "faults": (2, 6), "recovery": (5, 11), "takeover": (7, 15)}
SUMMARY = {f"ratio_{name}": f"new / old: {meaning}" for name, _, _, _, meaning in METRICS}
#: The figures "no regression" is judged by: none more than 25% slower than the baseline's
#: (the others say where a difference comes from).
TARGETS = {
    f"ratio_{name}": ("<=", 1.25)
    for name in ("fanout16_burst_ms", "fault_us", "recovery_ms", "recovery_cold_ms",
                 "takeover_pause_ms", "takeover_slowest_fault_ms")
}  # fmt: skip


class BaselineError(RuntimeError):
    """The baseline revision cannot be found or unpacked."""


@contextlib.contextmanager
def baseline_tree(rev: str) -> Iterator[str]:
    """The tree of ``rev`` unpacked (``git archive``) into a temporary directory, removed
    afterwards; its commit is checked first, so a wrong name fails in one line."""
    check = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise BaselineError(f"baseline {rev!r}: no such commit in {REPO}")
    path = tempfile.mkdtemp(prefix="pagefork-baseline-", dir="/tmp")
    try:
        archive = subprocess.Popen(
            ["git", "-C", str(REPO), "archive", check.stdout.strip(), "src", "bench"],
            stdout=subprocess.PIPE,
        )
        untar = subprocess.run(["tar", "-x", "-C", path], stdin=archive.stdout)
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait() != 0 or untar.returncode != 0:
            raise BaselineError(f"baseline {rev!r}: git archive into {path} failed")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def compile_trees(trees: list[str]) -> None:
    """Compile every tree's ``src`` to bytecode (``__pycache__``, as an install does).

    Without this, a host that sets ``PYTHONDONTWRITEBYTECODE`` has every worker and every
    ``serve`` compile its modules from source each time it starts: the tree with more source
    lines would pay for that, not for what it runs.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    proc = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(BENCH_DIR), *(f"{t}/src" for t in trees)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compileall failed:\n{proc.stdout}{proc.stderr}")


def run_driver(tree: str, scenario: str, arg: str, mem: str, workdir: str) -> dict[str, float]:
    """One round of ``scenario`` on ``tree``'s code, in a fresh process; its figures."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    env["PYTHONPATH"] = os.path.join(tree, "src")
    sockets = tempfile.mkdtemp(prefix="v", dir=workdir)
    proc = subprocess.run(
        [sys.executable, str(DRIVER), scenario, mem, sockets, *([arg] if arg else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    shutil.rmtree(sockets, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{scenario} on {tree} exited {proc.returncode}:\n{tail}")
    figures: dict[str, float] = json.loads(lines[-1])
    return figures


def compare(baseline: str, quick: bool) -> dict[str, Any]:
    """Run every scenario on both trees, interleaved; the figures (see the module docstring)."""
    load_start = os.getloadavg()[0]
    trees = {NEW: str(REPO)}
    runs = sorted({(m[1], m[2]) for m in METRICS}, key=lambda s: [m[1:3] for m in METRICS].index(s))
    got: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with baseline_tree(baseline) as old_tree, scratch_dir() as workdir:
        trees[OLD] = old_tree
        compile_trees([trees[OLD], trees[NEW]])
        big, small = os.path.join(workdir, "t32.mem"), os.path.join(workdir, "t16.mem")
        make_mem_file(big, 32 * MiB, 0.25, seed=11)
        make_mem_file(small, 16 * MiB, 0.25, seed=5)
        for scenario, arg in runs:
            mem = big if scenario == "fanout" else small
            rounds = ROUNDS[scenario][0 if quick else 1]
            for r in range(rounds):
                for side in (OLD, NEW) if r % 2 == 0 else (NEW, OLD):
                    one = run_driver(trees[side], scenario, arg, mem, workdir)
                    got.setdefault((scenario, arg, side), []).append(one)
            label = scenario + (f" spare={arg}" if arg else "")
            console.print(
                f"{label}: "
                + "; ".join(
                    f"{side} " + ", ".join(f"{k} {fmt(median([f[k] for f in runs_]))}"
                                          for k in runs_[0])
                    for side in (OLD, NEW)
                    for runs_ in [got[(scenario, arg, side)]]
                )
            )  # fmt: skip
    figures: dict[str, Any] = {
        "baseline": baseline,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        **{f"rounds_{scenario}": ROUNDS[scenario][0 if quick else 1] for scenario in ROUNDS},
    }
    rows = []
    # The side-by-side table of docs/benchmarks.md (bench/report.py renders it).
    comparison: list[dict[str, Any]] = []
    for name, scenario, arg, key, meaning in METRICS:
        old = [f[key] for f in got[(scenario, arg, OLD)]]
        new = [f[key] for f in got[(scenario, arg, NEW)]]
        # A round where a part could not be timed (nan) counts for neither side.
        ratios = [n / o for n, o in zip(new, old, strict=True) if o > 0 and math.isfinite(n)]
        old, new = [x for x in old if math.isfinite(x)], [x for x in new if math.isfinite(x)]
        every_pair = [n / o for o in old if o > 0 for n in new]
        figures[f"old_{name}"] = median(old)
        figures[f"new_{name}"] = median(new)
        figures[f"ratio_{name}"] = median(every_pair)
        figures[f"ratio_{name}_paired"] = median(ratios)
        figures[f"ratio_{name}_min"] = min(ratios, default=float("nan"))
        figures[f"ratio_{name}_max"] = max(ratios, default=float("nan"))
        spread = f"{fmt(figures[f'ratio_{name}_min'])} to {fmt(figures[f'ratio_{name}_max'])}"
        rows.append([name, fmt(median(old)), fmt(median(new)), fmt(median(every_pair)), spread])
        comparison.append({
            "figure": name, "meaning": meaning, "old": median(old), "new": median(new),
            "ratio": median(every_pair), "ratio_min": figures[f"ratio_{name}_min"],
            "ratio_max": figures[f"ratio_{name}_max"],
            # Every round's figure, in the order run: an outlier shows as what it is.
            "old_rounds": old, "new_rounds": new,
        })  # fmt: skip
    figures["comparison"] = {"old": baseline, "new": "this tree", "rows": comparison}
    table(
        f"this tree (new) against {baseline} (old), paired rounds "
        + ", ".join(f"{k} {v[0 if quick else 1]}" for k, v in ROUNDS.items())
        + f"; load {load_start:.1f} -> {figures['load_end']:.1f}",
        ["figure", "old (median)", "new (median)", "new / old", "per-round spread"],
        rows,
    )
    return figures


def main(quick: bool = False, baseline: str = DEFAULT_BASELINE) -> dict[str, Any]:
    """Compare this tree with ``baseline``; figures, or ``skipped`` when it cannot be had."""
    header(
        f"versus: this tree against {baseline}, side by side",
        "fan-out at 16 forks, demand faults, worker recovery (spare and cold), takeover pause; "
        "each round runs both trees' own code in fresh processes, alternating.",
    )
    try:
        return compare(baseline, quick)
    except BaselineError as exc:
        console.print(f"[red]skipped:[/] {exc}")
        return {"skipped": str(exc)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (see ROUNDS)")
    parser.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        metavar="REV",
        help=f"the git revision to compare with (default {DEFAULT_BASELINE})",
    )
    options = parser.parse_args()
    sys.exit(1 if "skipped" in main(options.quick, options.baseline) else 0)
