"""Fan-out: many forks of one template faulting at once, pagefork against a C handler.

N forks (N = 1, 4, 16, 32) of one 32 MiB template each take 8,192 demand faults (every page,
in random order) at the same moment. Every fork is a test VMM in its own process
(``pagefork.testing.vmm``, as Firecracker would be). The handlers:

- pagefork: one :class:`PageServer` with its defaults, one with the other
  ``pin_workers`` setting (one worker per CPU either way, each with that CPU as its home,
  pinned there or left to the scheduler), and one that does not move a fork to the worker of
  the CPU its VMM settled on (``follow_vmms`` off: a free VMM stays on the worker it was
  placed on);
- C: ``c_handler.c --fork-per-connection``, which serves each VMM in its own process, so it
  uses every core: the mark a fan-out server is measured against.

Every handler serves the VMMs two ways: *free* (the VMM runs where the scheduler puts it) and
*pinned* (VMM k pinned to CPU k mod CPUs, every thread, from before its handshake, as a VMM
that pins its vCPU threads is). A pinned VMM is served by the worker whose home is its CPU;
*crossed* (workers pinned) moves each pinned VMM to the next CPU once it is placed, so that
its worker is on the other core: what placing by CPU is worth. A pinned VMM is compared with
C serving pinned VMMs, a free one with C serving free ones.

The figure is the burst's wall time, from the moment every VMM is told to touch (all are
connected and waiting) until the last has touched its last page, and the ratio pagefork / C
per round (median, and min-max over rounds). The variants take turns within each N, in an
order that reverses every round, so drift on this shared machine hits them alike. Every fork's
faults are counted by its server, and the first round of each variant checks every page's
bytes. For free VMMs the moves per fork (to the worker next to its VMM) are reported too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from _common import (
    PAGE,
    MiB,
    alternating,
    console,
    fmt,
    header,
    make_mem_file,
    median,
    scratch_dir,
    standalone,
    table,
    verdict,
)
from bench_faults import BuildError, CHandler, build_c_handler

from pagefork.server import PageServer, ServerConfig
from pagefork.stats import ForkStats
from pagefork.testing.vmm import VmmProcess

TEMPLATE = 32 * MiB
PAGES = TEMPLATE // PAGE
ZERO_FRACTION = 0.25
SIZES = (1, 4, 16, 32)
C = "C"

#: How a burst's VMMs run: where the scheduler puts them, pinned one CPU each, or pinned and
#: then moved to the CPU next to the one they were placed by (see the module's docstring).
VmmMode = Literal["free", "pinned", "crossed"]

#: Figures with a goal, for run.py's summary: key -> (comparison, target).
TARGETS = {
    **{f"ratio_{n}": ("<=", 1.3) for n in SIZES},
    **{f"ratio_{n}_pinned_vmm": ("<=", 1.3) for n in SIZES},
}
#: The figures worth a row in run.py's summary, and what each means (those of sizes a quick
#: run skips are absent).
SUMMARY = {
    **{f"ratio_{n}": f"burst wall time of {n} forks, pagefork / C, free VMMs" for n in SIZES},
    **{f"ratio_{n}_pinned_vmm": f"the same, {n} pinned VMMs" for n in SIZES},
    **{f"ratio_{n}_other_pinning": f"{n} free VMMs, workers pinned the other way" for n in SIZES},
    **{f"ratio_{n}_no_follow": f"{n} free VMMs, forks not following their VMMs" for n in SIZES},
    **{f"moves_per_fork_{n}": f"moves per fork, {n} free VMMs (median of rounds)" for n in SIZES},
    **{f"pagefork_ms_{n}": f"burst wall time of {n} forks, pagefork (ms)" for n in SIZES},
    **{f"c_ms_{n}": "the same, C with a process per connection (ms)" for n in SIZES},
}


@dataclass
class Burst:
    """One burst: its wall time, each fork's server-side fault count, and how many times each
    fork moved to the worker next to its VMM."""

    seconds: float
    faults: list[int]
    bad: int
    moves: list[int] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def _spawning_on(cpu: int | None) -> Iterator[None]:
    """Processes started in this block run on ``cpu`` only (every thread: they inherit this
    thread's affinity, and only this thread's is changed)."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _vmm_cpu(k: int, mode: VmmMode) -> int | None:
    """The CPU the ``k``-th VMM of a burst is pinned to at its start (None: not pinned)."""
    cpus = sorted(os.sched_getaffinity(0))
    return None if mode == "free" else cpus[k % len(cpus)]


def _start_vmm(socket: str, mem_file: str, cpu: int | None) -> VmmProcess:
    """A test VMM on ``socket``, pinned to ``cpu`` from its start (so its handshake shows it
    pinned), or free."""
    with _spawning_on(cpu):
        return VmmProcess(socket, mem_file, [f"{TEMPLATE // MiB}M"])


def _cross(vms: list[VmmProcess]) -> None:
    """Move VMM k (pinned to CPU k mod CPUs) to the next CPU, every thread of it: it was
    placed by the CPU it left, so its worker is on another core."""
    cpus = sorted(os.sched_getaffinity(0))
    for k, vm in enumerate(vms):
        for tid in os.listdir(f"/proc/{vm.pid}/task"):
            os.sched_setaffinity(int(tid), {cpus[(k + 1) % len(cpus)]})


def _touch_all_at_once(vms: list[VmmProcess], seed: int, verify: bool) -> tuple[float, int]:
    """Tell every VMM to touch all its pages at the same moment; (wall seconds, bad pages)."""
    start = threading.Barrier(len(vms) + 1)
    replies: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(vm: VmmProcess, k: int) -> None:
        try:
            start.wait(timeout=60)
            reply = vm.send(cmd="touch", all=True, order="random", seed=seed + k, verify=verify)
        except BaseException as exc:  # re-raised in the caller
            with lock:
                errors.append(exc)
            return
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=run, args=(vm, k)) for k, vm in enumerate(vms)]
    for t in threads:
        t.start()
    start.wait(timeout=60)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds, sum(int(r["bad"]) for r in replies)


class PageforkSide:
    """One page server (one ``workers`` setting) serving bursts of forks."""

    def __init__(self, workdir: str, name: str, mem_file: str, **config: Any) -> None:
        self.mem_file = mem_file
        self.sockets = os.path.join(workdir, name)
        os.mkdir(self.sockets)
        self.server = PageServer(
            ServerConfig(mem_file_path=mem_file, socket_dir=self.sockets, **config)
        )
        self._n = 0

    def burst(self, n: int, seed: int, verify: bool, mode: VmmMode) -> Burst:
        """``n`` forks touching every page at once."""
        ids = []
        vms: list[VmmProcess] = []
        try:
            for k in range(n):
                self._n += 1
                ids.append(f"f{self._n}")
                path = self.server.register_fork(ids[-1])
                vms.append(_start_vmm(path, self.mem_file, _vmm_cpu(k, mode)))
            for fork_id in ids:
                self.server.wait_connected(fork_id, timeout=60)  # placed on a worker by then
            if mode == "crossed":
                _cross(vms)
            seconds, bad = _touch_all_at_once(vms, seed, verify)
        finally:
            for vm in vms:
                vm.close()
        # The last fault of a fork is counted before its ioctl wakes the guest, but read the
        # figures once the session is over anyway: nothing can change them then.
        stats: list[ForkStats] = [self.server.wait_ended(f, timeout=60) for f in ids]
        for fork_id in ids:
            self.server.unregister_fork(fork_id)
        return Burst(seconds, [s.faults for s in stats], bad, [s.moves for s in stats])

    def close(self) -> None:
        """Stop the page server."""
        self.server.close()


class CSide:
    """The C handler in process-per-connection mode, serving bursts of forks on one socket."""

    def __init__(self, workdir: str, binary: str, mem_file: str) -> None:
        self.mem_file = mem_file
        self.socket = os.path.join(workdir, "c.sock")
        self.handler = CHandler(binary, self.socket, mem_file, fork_per_connection=True)

    def burst(self, n: int, seed: int, verify: bool, mode: VmmMode) -> Burst:
        """``n`` forks touching every page at once, each served by its own C process."""
        vms: list[VmmProcess] = []
        try:
            for k in range(n):
                vms.append(_start_vmm(self.socket, self.mem_file, _vmm_cpu(k, mode)))
            for _ in range(n):
                self.handler.wait_connected()
            seconds, bad = _touch_all_at_once(vms, seed, verify)
        finally:
            for vm in vms:
                vm.close()
        reports = [self.handler.next_report() for _ in range(n)]
        return Burst(seconds, [int(r["faults"]) for r in reports], bad)

    def close(self) -> None:
        """Stop the C handler (after its children are done)."""
        self.handler.finish_forking()


@dataclass(frozen=True)
class Variant:
    """One column of the sweep: a handler (``side``) serving VMMs run one way (``mode``), and
    the C variant it is divided by (C serving VMMs run the same way)."""

    side: str
    mode: VmmMode

    @property
    def label(self) -> str:
        """A short column label: ``pf pinned-w / pinned VMM``."""
        return f"{self.side} / {self.mode} VMM"

    @property
    def mark(self) -> Variant:
        """The C variant this one is compared with."""
        return Variant(C, "free" if self.mode == "free" else "pinned")


def _pinnings() -> tuple[bool, dict[str, dict[str, Any]]]:
    """pagefork's default ``pin_workers`` and a page server per setting, by side name (the
    default first)."""
    default = next(f for f in dataclasses.fields(ServerConfig) if f.name == "pin_workers").default
    assert isinstance(default, bool)
    names = {True: "pf pinned-w", False: "pf unpinned-w"}
    return default, {names[default]: {}, names[not default]: {"pin_workers": not default}}


#: The page server whose forks stay on the worker they were placed on (free VMMs only).
NO_FOLLOW = "pf no-follow"


def _variants(quick: bool) -> tuple[list[Variant], dict[str, dict[str, Any]]]:
    """The variants to run and the page-server configurations they need. A quick run: the
    default configuration, with free and pinned VMMs, and free VMMs whose forks do not follow
    them; a full one adds the other ``pin_workers`` setting, and crossed VMMs for the one that
    pins workers."""
    default, configs = _pinnings()
    sides = list(configs)[:1] if quick else list(configs)
    variants = [Variant(side, mode) for side in sides for mode in ("free", "pinned")]
    variants.append(Variant(NO_FOLLOW, "free"))
    pinned_side = sides[0] if default else (sides[1] if len(sides) > 1 else None)
    if not quick and pinned_side is not None:
        variants.append(Variant(pinned_side, "crossed"))
    variants += [Variant(C, "free"), Variant(C, "pinned")]
    return variants, {**{s: configs[s] for s in sides}, NO_FOLLOW: {"follow_vmms": False}}


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True) if y > 0]


def main(quick: bool = False) -> dict[str, Any]:
    """Run the sweep; returns wall times per variant and N, and the ratios pagefork / C."""
    sizes = SIZES
    rounds = 2 if quick else 4
    variants, configs = _variants(quick)
    header(
        "fanout: N forks faulting at once, pagefork vs C (process per connection)",
        f"{TEMPLATE // MiB} MiB template (~{ZERO_FRACTION:.0%} all-zero pages), each fork a test "
        f"VMM process taking {PAGES} faults (every page, random order) at the same moment; "
        f"N = {', '.join(map(str, sizes))}; VMMs free and pinned; {rounds} rounds per N, "
        f"variants interleaved; {len(os.sched_getaffinity(0))} CPUs.",
    )
    try:
        c_binary = build_c_handler()
    except BuildError as exc:
        console.print(f"[red]skipped:[/] {exc}")
        return {"skipped": str(exc)}
    results: dict[tuple[Variant, int], list[Burst]] = {(v, n): [] for v in variants for n in sizes}
    with scratch_dir() as workdir:
        mem_file = os.path.join(workdir, "template.mem")
        make_mem_file(mem_file, TEMPLATE, ZERO_FRACTION, seed=11)
        sides: dict[str, PageforkSide | CSide] = {}
        try:
            for i, (name, config) in enumerate(configs.items()):
                sides[name] = PageforkSide(workdir, f"pf{i}", mem_file, **config)
            sides[C] = CSide(workdir, c_binary, mem_file)
            for n in sizes:
                for r, v in alternating(rounds, variants):
                    got = sides[v.side].burst(n, 1000 * r, r == 0, v.mode)
                    if got.bad:
                        raise RuntimeError(f"{v.label}, {n} forks: {got.bad} pages had wrong bytes")
                    if got.faults != [PAGES] * n:
                        raise RuntimeError(
                            f"{v.label}, {n} forks: served {got.faults}, not {PAGES} each"
                        )
                    results[(v, n)].append(got)
                console.print(
                    f"N={n}: "
                    + ", ".join(
                        f"{v.label} {fmt(median([b.seconds for b in results[(v, n)]]) * 1e3, 0)} ms"
                        for v in variants
                    )
                )
        finally:
            # Each in its own try: a handler that fails to stop must not leave the others up.
            failures = []
            for side in sides.values():
                try:
                    side.close()
                except Exception as exc:  # reported below, after every side is closed
                    failures.append(exc)
            if failures and sys.exc_info()[1] is None:
                raise failures[0]

    def ms(v: Variant, n: int) -> list[float]:
        return [b.seconds * 1e3 for b in results[(v, n)]]

    default_side = next(iter(configs))
    other_side = list(configs)[1] if len(configs) > 1 else None
    # Figure-name suffixes: the default configuration's figures keep the plain names.
    names = {
        Variant(default_side, "free"): "",
        Variant(default_side, "pinned"): "_pinned_vmm",
    }
    names[Variant(NO_FOLLOW, "free")] = "_no_follow"
    if other_side is not None and other_side != NO_FOLLOW:
        names[Variant(other_side, "free")] = "_other_pinning"
        names[Variant(other_side, "pinned")] = "_other_pinning_pinned_vmm"
    for v in variants:
        if v.mode == "crossed":
            names[v] = "_crossed_vmm"
    figures: dict[str, Any] = {
        "rounds": rounds,
        "faults_per_fork": PAGES,
        "pin_workers_default": _pinnings()[0],
    }
    pf_variants = [v for v in variants if v.side != C]
    for n in sizes:
        for v in pf_variants:
            paired = _ratios(ms(v, n), ms(v.mark, n))
            key = f"ratio_{n}{names[v]}"
            figures[key] = median(paired)
            figures[f"{key}_min"], figures[f"{key}_max"] = min(paired), max(paired)
            figures[f"pagefork_ms_{n}{names[v]}"] = median(ms(v, n))
        free = results[(Variant(default_side, "free"), n)]
        figures[f"moves_per_fork_{n}"] = median([sum(b.moves) / n for b in free])
        figures[f"c_ms_{n}"] = median(ms(Variant(C, "free"), n))
        figures[f"c_ms_{n}_pinned_vmm"] = median(ms(Variant(C, "pinned"), n))
        figures[f"us_per_fault_pagefork_{n}"] = figures[f"pagefork_ms_{n}"] * 1e3 / (n * PAGES)
        figures[f"us_per_fault_c_{n}"] = figures[f"c_ms_{n}"] * 1e3 / (n * PAGES)
    table(
        "burst wall time, ms (median of rounds); pf pinned-w: workers pinned one per CPU, "
        "pf unpinned-w: left to the scheduler",
        ["variant", *[f"{n} forks" for n in sizes]],
        [[v.label, *(fmt(median(ms(v, n)), 0) for n in sizes)] for v in variants],
    )
    table(
        "pagefork / C (the same VMMs' way): median of per-round ratios (min-max)",
        ["variant", *[f"{n} forks" for n in sizes]],
        [
            [
                v.label,
                *(
                    f"{fmt(figures[f'ratio_{n}{names[v]}'])} "
                    f"({fmt(figures[f'ratio_{n}{names[v]}_min'])}-"
                    f"{fmt(figures[f'ratio_{n}{names[v]}_max'])})"
                    for n in sizes
                ),
            ]
            for v in pf_variants
        ],
    )
    console.print(
        "moves per fork, free VMMs (to the worker on the VMM's CPU; median of rounds): "
        + ", ".join(f"{n} forks {fmt(figures[f'moves_per_fork_{n}'])}" for n in sizes)
    )
    for n in sizes:
        for suffix, what in (("", "free"), ("_pinned_vmm", "pinned")):
            console.print(
                verdict(
                    f"pagefork/C at {n} forks, {what} VMMs",
                    figures[f"ratio_{n}{suffix}"],
                    "<=",
                    1.3,
                )
            )
    return figures


if __name__ == "__main__":
    standalone(main)
