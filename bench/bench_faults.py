"""Demand-fault round trip: pagefork against a minimal C handler, same VMM, same pages.

A fresh test VMM (``pagefork.testing.vmm``, its own process, as Firecracker would be) maps a
64 MiB guest and reads one byte of every page in random order; every read is a uffd fault that
the handler answers with one 4 KiB ``UFFDIO_COPY`` (or ``UFFDIO_ZEROPAGE`` for the template's
all-zero pages). The handler is either pagefork's :class:`PageServer` (in this process) or
``c_handler.c`` (built with ``gcc -O2``, doing what Firecracker's example handler does). Rounds
alternate between the two; the figure is the guest-visible time per fault and the ratio
pagefork / C. The VMM then reads the same pages again (now present, no faults): subtracting that
gives the "net" time per fault, without the VMM's own Python loop.

Reading it: on the demand path, where the faulting thread and the serving thread run
matters most (a fault served across cores costs several times one served on the faulting
thread's core: ``bench_workers``' placement figure), and the kernel's choice drifts, so compare
the ratio, not the µs, with other runs.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from _common import (
    BENCH_DIR,
    BUILD_DIR,
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
    scratch_dir,
    standalone,
    table,
    verdict,
)

from pagefork.testing.vmm import VmmProcess

GUEST = 64 * MiB
ZERO_FRACTION = 0.25
PAGEFORK, C = "pagefork", "C"

#: Figures with a goal, for run.py's summary: key -> (comparison, target).
TARGETS = {"ratio_pagefork_over_c": ("<=", 1.3)}
#: The figures worth a row in run.py's summary, and what each means.
SUMMARY = {
    "ratio_pagefork_over_c": "guest-visible time per demand fault, pagefork / C handler",
    "pagefork_us_per_fault": "µs per demand fault as the guest sees it, pagefork",
    "c_us_per_fault": "the same, C handler",
    "ratio_net_pagefork_over_c": "the ratio net of the VMM's loop (a fault-free pass subtracted)",
    "pagefork_server_p50_us": "server-side service time per fault, p50, pagefork (µs)",
    "c_server_p50_us": "the same, C handler",
    "pagefork_server_p99_us": "server-side service time per fault, p99, pagefork (µs)",
    "c_server_p99_us": "the same, C handler",
    "pagefork_bad_pages": "pages whose bytes differed from the template, pagefork (must be 0)",
    "c_bad_pages": "the same, C handler",
}


class BuildError(RuntimeError):
    """The C reference handler could not be built."""


def build_c_handler() -> str:
    """Compile ``c_handler.c`` into ``bench/build/`` (when the source is newer) and return
    the binary's path."""
    src = BENCH_DIR / "c_handler.c"
    out = BUILD_DIR / "c_handler"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return str(out)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError(
            "gcc not found: the C reference handler (bench/c_handler.c) needs a C compiler "
            "(apt-get install gcc)"
        )
    BUILD_DIR.mkdir(exist_ok=True)
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BuildError(f"building {src} failed:\n{proc.stderr}")
    return str(out)


class CHandler:
    """One run of the C handler: serves one VMM on ``socket_path``, then reports its counters.

    With ``fork_per_connection`` it serves any number of VMMs, each in its own process, until
    :meth:`finish_forking`; each connection then gives one :meth:`wait_connected` line and one
    :meth:`next_report`.
    """

    def __init__(
        self,
        binary: str,
        socket_path: str,
        mem_file: str,
        timeout: float = 30.0,
        fork_per_connection: bool = False,
    ) -> None:
        self.timeout = timeout
        mode = ["--fork-per-connection"] if fork_per_connection else []
        self.proc = subprocess.Popen(
            [binary, *mode, socket_path, mem_file],
            stdout=subprocess.PIPE,
            # In fork mode the handler accepts until its stdin reaches EOF.
            stdin=subprocess.PIPE if fork_per_connection else subprocess.DEVNULL,
        )
        self._buf = b""
        line = self._line()
        if line != "ready":
            raise RuntimeError(f"C handler did not start: {line!r}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.proc.kill()
                raise TimeoutError(f"C handler said nothing for {self.timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def wait_connected(self) -> None:
        """Wait until the handler has the VMM's mappings and uffd."""
        line = self._line()
        if not line.startswith("connected"):
            raise RuntimeError(f"C handler handshake failed: {line!r}")

    def finish(self) -> dict[str, Any]:
        """After the VMM hung up: the handler's counters and latencies."""
        line = self._line()
        self.proc.wait(self.timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not line:
            raise RuntimeError(f"C handler exited with code {self.proc.returncode} and no report")
        stats: dict[str, Any] = json.loads(line)
        return stats

    def next_report(self) -> dict[str, Any]:
        """Fork mode: the next child's counters (printed when its VMM hung up)."""
        line = self._line()
        if not line.startswith("{"):
            raise RuntimeError(f"C handler: expected a report, got {line!r}")
        report: dict[str, Any] = json.loads(line)
        return report

    def finish_forking(self) -> None:
        """Fork mode: stop accepting, wait for every child, and check the exit status."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            code = self.proc.wait(self.timeout)
            if code != 0:
                raise RuntimeError(f"C handler (fork per connection) exited with code {code}")
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop the handler if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class Round:
    """One handler's round: guest-visible touch time, its no-fault baseline, server stats."""

    seconds: float
    baseline: float
    faults: int
    latency_us: dict[str, float] = field(default_factory=dict)


def _touch_rounds(vm: VmmProcess, seed: int, verify: bool) -> tuple[float, float, int]:
    """Touch every page (faulting), then again (present): (seconds, baseline, mismatches)."""
    first = vm.send(cmd="touch", all=True, order="random", seed=seed, verify=verify)
    again = vm.send(cmd="touch", all=True, order="random", seed=seed, verify=False)
    return float(first["seconds"]), float(again["seconds"]), int(first["bad"])


class Bench:
    """State of one benchmark run: the scratch dir, the mem-file, both handlers."""

    def __init__(self, workdir: str, c_binary: str) -> None:
        self.workdir = workdir
        self.c_binary = c_binary
        self.mem_file = os.path.join(workdir, "template.mem")
        self.zero_pages = make_mem_file(self.mem_file, GUEST, ZERO_FRACTION, seed=1)
        self.forks = Forks(workdir, "faults", self.mem_file)
        self._n = 0

    def close(self) -> None:
        """Stop the page server."""
        self.forks.close()

    def pagefork_round(self, seed: int, verify: bool = False) -> tuple[Round, int]:
        """Serve one fresh VMM with pagefork; returns the round and the mismatches seen."""
        with self.forks.fork(GUEST) as fork:
            seconds, baseline, bad = _touch_rounds(fork.vm, seed, verify)
        assert fork.stats is not None
        return Round(seconds, baseline, fork.stats.faults, fork.stats.latency_us), bad

    def c_round(self, seed: int, verify: bool = False) -> tuple[Round, int]:
        """Serve one fresh VMM with the C handler; returns the round and the mismatches seen."""
        self._n += 1
        sock = os.path.join(self.workdir, f"c-{self._n}.sock")
        handler = CHandler(self.c_binary, sock, self.mem_file)
        try:
            vm = VmmProcess(sock, self.mem_file, [f"{GUEST // MiB}M"])
            try:
                handler.wait_connected()
                seconds, baseline, bad = _touch_rounds(vm, seed, verify)
            finally:
                vm.close()
            stats = handler.finish()
        finally:
            handler.kill()
        return Round(seconds, baseline, int(stats["faults"]), stats["latency_us"]), bad


def main(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns its figures (µs per fault, ratios, latency percentiles)."""
    rounds = 4 if quick else 21
    pages = GUEST // PAGE
    header(
        "faults: demand-fault round trip, pagefork vs C reference handler",
        f"{GUEST // MiB} MiB guest ({pages} pages, ~{ZERO_FRACTION:.0%} all-zero), one fault per "
        f"page in random order, fresh VMM per round, {rounds} rounds each, interleaved.",
    )
    try:
        c_binary = build_c_handler()
    except BuildError as exc:
        console.print(f"[red]skipped:[/] {exc}")
        return {"skipped": str(exc)}
    with scratch_dir() as workdir:
        bench = Bench(workdir, c_binary)
        try:
            # Warm-up round per handler, not timed: checks every page byte for byte and warms
            # the server's mem-file mapping and the page cache.
            _, pf_bad = bench.pagefork_round(seed=0, verify=True)
            _, c_bad = bench.c_round(seed=0, verify=True)
            console.print(
                f"correctness (all {pages} pages checked against the mem-file): "
                f"pagefork {pf_bad} bad, C {c_bad} bad"
            )
            results: dict[str, list[Round]] = {PAGEFORK: [], C: []}
            for r, who in alternating(rounds, (PAGEFORK, C)):
                run = bench.pagefork_round if who == PAGEFORK else bench.c_round
                result, _ = run(seed=r + 1)
                if result.faults != pages:
                    raise RuntimeError(f"{who}: served {result.faults} faults, expected {pages}")
                results[who].append(result)
        finally:
            bench.close()

    def per_fault(who: str, net: bool) -> list[float]:
        return [(x.seconds - (x.baseline if net else 0.0)) / pages * 1e6 for x in results[who]]

    pf, c = per_fault(PAGEFORK, False), per_fault(C, False)
    pf_net, c_net = per_fault(PAGEFORK, True), per_fault(C, True)
    ratio = paired_ratio(pf, c)
    ratio_net = paired_ratio(pf_net, c_net)

    def lat(who: str, key: str) -> float:
        return median([x.latency_us.get(key, float("nan")) for x in results[who]])

    table(
        "µs per fault, median of rounds (guest-visible; net of the VMM's loop; server-side)",
        ["handler", "guest", "net", "srv p50", "srv p90", "srv p99"],
        [
            [
                who,
                fmt(median(g)),
                fmt(median(n)),
                fmt(lat(who, "p50")),
                fmt(lat(who, "p90")),
                fmt(lat(who, "p99")),
            ]
            for who, g, n in ((PAGEFORK, pf, pf_net), (C, c, c_net))
        ],
    )
    console.print(
        "per round pagefork/C: " + ", ".join(fmt(a / b) for a, b in zip(pf, c, strict=True))
    )
    console.print(verdict("ratio pagefork/C (guest-visible)", ratio, "<=", 1.3))
    console.print(f"ratio pagefork/C (net of VMM loop) {fmt(ratio_net)}")
    return {
        "rounds": rounds,
        "pages_per_round": pages,
        "pagefork_us_per_fault": median(pf),
        "c_us_per_fault": median(c),
        "ratio_pagefork_over_c": ratio,
        "pagefork_net_us_per_fault": median(pf_net),
        "c_net_us_per_fault": median(c_net),
        "ratio_net_pagefork_over_c": ratio_net,
        "pagefork_server_p50_us": lat(PAGEFORK, "p50"),
        "pagefork_server_p90_us": lat(PAGEFORK, "p90"),
        "pagefork_server_p99_us": lat(PAGEFORK, "p99"),
        "c_server_p50_us": lat(C, "p50"),
        "c_server_p90_us": lat(C, "p90"),
        "c_server_p99_us": lat(C, "p99"),
        "pagefork_bad_pages": pf_bad,
        "c_bad_pages": c_bad,
    }


if __name__ == "__main__":
    standalone(main)
