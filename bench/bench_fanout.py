"""Fan-out: many forks of one template faulting at once, pagefork against a C handler.

N forks (N = 1, 4, 16, 32) of one 32 MiB template each take 8,192 demand faults (every page,
in random order) at the same moment. Every fork is a test VMM in its own process
(``pagefork.testing.vmm``, as Firecracker would be). The handlers:

- pagefork: one :class:`PageServer` with its defaults; its ``workers`` setting is also swept
  (1, 2 and the default) when :class:`ServerConfig` has it;
- C: ``c_handler.c --fork-per-connection``, which serves each VMM in its own process, so it
  uses every core: the mark a fan-out server is measured against.

The figure is the burst's wall time, from the moment every VMM is told to touch (all are
connected and waiting) until the last has touched its last page, and the ratio pagefork / C
per round. The handlers take turns within each N, in an order that reverses every round, so
drift on this shared machine hits them alike. Every fork's faults are counted by its server,
and the first round of each handler checks every page's bytes.

Reading it: pagefork's workers serve on every core, as the C handler's processes do; a
single on-demand fork is itself slowed by faults served across cores.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import (
    PAGE,
    MiB,
    alternating,
    console,
    fmt,
    header,
    make_mem_file,
    median,
    paired_ratio,
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

#: Figures with a goal, for run.py's summary: key -> (comparison, target).
TARGETS = {"ratio_16": ("<=", 1.5)}
#: The figures worth a row in run.py's summary, and what each means (those of a missing
#: ``workers`` setting are skipped).
SUMMARY = {
    **{f"ratio_{n}": f"burst wall time of {n} forks, pagefork / C" for n in SIZES},
    **{
        f"ratio_{n}_workers_{w}": f"the same at {n} forks with workers={w}"
        for w in (1, 2)
        for n in (16, 32)
    },
    **{f"pagefork_ms_{n}": f"burst wall time of {n} forks, pagefork (ms)" for n in SIZES},
    **{f"c_ms_{n}": "the same, C with a process per connection (ms)" for n in SIZES},
}


@dataclass
class Burst:
    """One burst: its wall time and each fork's server-side fault count."""

    seconds: float
    faults: list[int]
    bad: int


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

    def burst(self, n: int, seed: int, verify: bool) -> Burst:
        """``n`` forks touching every page at once."""
        ids = []
        vms: list[VmmProcess] = []
        try:
            for _ in range(n):
                self._n += 1
                ids.append(f"f{self._n}")
                path = self.server.register_fork(ids[-1])
                vms.append(VmmProcess(path, self.mem_file, [f"{TEMPLATE // MiB}M"]))
            for fork_id in ids:
                self.server.wait_connected(fork_id, timeout=60)
            seconds, bad = _touch_all_at_once(vms, seed, verify)
        finally:
            for vm in vms:
                vm.close()
        # The last fault of a fork is counted before its ioctl wakes the guest, but read the
        # figures once the session is over anyway: nothing can change them then.
        stats: list[ForkStats] = [self.server.wait_ended(f, timeout=60) for f in ids]
        for fork_id in ids:
            self.server.unregister_fork(fork_id)
        return Burst(seconds, [s.faults for s in stats], bad)

    def close(self) -> None:
        """Stop the page server."""
        self.server.close()


class CSide:
    """The C handler in process-per-connection mode, serving bursts of forks on one socket."""

    def __init__(self, workdir: str, binary: str, mem_file: str) -> None:
        self.mem_file = mem_file
        self.socket = os.path.join(workdir, "c.sock")
        self.handler = CHandler(binary, self.socket, mem_file, fork_per_connection=True)

    def burst(self, n: int, seed: int, verify: bool) -> Burst:
        """``n`` forks touching every page at once, each served by its own C process."""
        vms: list[VmmProcess] = []
        try:
            for _ in range(n):
                vms.append(VmmProcess(self.socket, self.mem_file, [f"{TEMPLATE // MiB}M"]))
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


def _workers_variants() -> dict[str, dict[str, Any]]:
    """pagefork's configurations: the default, plus workers=1 and 2 when the setting exists."""
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    if "workers" not in fields:
        return {"pagefork": {}}
    default = fields["workers"].default
    if default is dataclasses.MISSING:  # a default_factory: name it by what it is
        default = "default"
    # Short labels ("pf w=2"): the table has a column per configuration and per ratio.
    variants: dict[str, dict[str, Any]] = {f"pf w={default}": {}}
    for w in (1, 2):
        if w != default:
            variants[f"pf w={w}"] = {"workers": w}
    return variants


def main(quick: bool = False) -> dict[str, Any]:
    """Run the sweep; returns wall times per handler and N, and the ratios pagefork / C."""
    sizes = SIZES[:3] if quick else SIZES
    rounds = 2 if quick else 5
    header(
        "fanout: N forks faulting at once, pagefork vs C (process per connection)",
        f"{TEMPLATE // MiB} MiB template (~{ZERO_FRACTION:.0%} all-zero pages), each fork a test "
        f"VMM process taking {PAGES} faults (every page, random order) at the same moment; "
        f"N = {', '.join(map(str, sizes))}; {rounds} rounds per N, handlers interleaved; "
        f"{os.cpu_count()} CPUs.",
    )
    try:
        c_binary = build_c_handler()
    except BuildError as exc:
        console.print(f"[red]skipped:[/] {exc}")
        return {"skipped": str(exc)}
    configs = _workers_variants()
    names = [*configs, C]
    results: dict[tuple[str, int], list[Burst]] = {(w, n): [] for w in names for n in sizes}
    with scratch_dir() as workdir:
        mem_file = os.path.join(workdir, "template.mem")
        make_mem_file(mem_file, TEMPLATE, ZERO_FRACTION, seed=11)
        sides: dict[str, PageforkSide | CSide] = {}
        try:
            for i, (name, config) in enumerate(configs.items()):
                sides[name] = PageforkSide(workdir, f"pf{i}", mem_file, **config)
            sides[C] = CSide(workdir, c_binary, mem_file)
            for n in sizes:
                for r, who in alternating(rounds, names):
                    burst: Callable[[int, int, bool], Burst] = sides[who].burst
                    got = burst(n, 1000 * r, r == 0)
                    if got.bad:
                        raise RuntimeError(f"{who}, {n} forks: {got.bad} pages had wrong bytes")
                    if got.faults != [PAGES] * n:
                        raise RuntimeError(
                            f"{who}, {n} forks: served {got.faults}, not {PAGES} each"
                        )
                    results[(who, n)].append(got)
                console.print(
                    f"N={n}: "
                    + ", ".join(
                        f"{w} {fmt(median([b.seconds for b in results[(w, n)]]) * 1e3, 0)} ms"
                        for w in names
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

    def ms(who: str, n: int) -> list[float]:
        return [b.seconds * 1e3 for b in results[(who, n)]]

    default = next(iter(configs))
    figures: dict[str, Any] = {"rounds": rounds, "faults_per_fork": PAGES}
    rows = []
    for n in sizes:
        row: list[Any] = [n]
        for w in names:
            row.append(fmt(median(ms(w, n)), 0))
        for w in configs:
            row.append(fmt(paired_ratio(ms(w, n), ms(C, n))))
        rows.append(row)
        figures[f"pagefork_ms_{n}"] = median(ms(default, n))
        figures[f"c_ms_{n}"] = median(ms(C, n))
        figures[f"ratio_{n}"] = paired_ratio(ms(default, n), ms(C, n))
        figures[f"us_per_fault_pagefork_{n}"] = median(ms(default, n)) * 1e3 / (n * PAGES)
        figures[f"us_per_fault_c_{n}"] = median(ms(C, n)) * 1e3 / (n * PAGES)
        for w, config in configs.items():
            if config:
                key = f"{n}_workers_{config['workers']}"
                figures[f"pagefork_ms_{key}"] = median(ms(w, n))
                figures[f"ratio_{key}"] = paired_ratio(ms(w, n), ms(C, n))
    table(
        "burst wall time, ms (median of rounds), and pagefork / C (median of per-round ratios); "
        "pf w=N: pagefork with ServerConfig(workers=N)",
        ["forks", *[f"{w} ms" for w in names], *[f"{w} / C" for w in configs]],
        rows,
    )
    if 16 in sizes:
        console.print(verdict("ratio pagefork/C at 16 forks", figures["ratio_16"], "<=", 1.5))
    return figures


if __name__ == "__main__":
    standalone(main)
