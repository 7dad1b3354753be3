"""Worker processes: how fast a killed worker's forks are served again, and what memory the
supervisor and its workers use.

- **Recovery.** Forks of one template fault continuously (each a test VMM touching its pages in
  random order) while one worker is SIGKILLed. The figure is the time from the kill until every
  fork that worker served has had a fault served again (its fault counter moves), with the
  spare worker (the default) and without it (a replacement interpreter must start). Also the
  longest fault the guests saw: the slowest page of the burst, measured in the VMM.
- **Placement.** Workers are pinned one per CPU; a fork whose VMM is pinned goes to the worker
  on its CPU. The figure is µs per demand fault (guest-visible) for a pinned VMM served on its
  own core, against the same VMM moved to the other core after its fork was placed, paired
  round by round.
- **Memory.** RSS and PSS (proportional set size: shared pages split between the processes that
  map them) of the supervisor plus its workers, with 16 forks of a 256 MiB template connected and
  each having faulted 2,048 pages, for 1, 2 and 4 workers. Every worker maps the same mem-file,
  so the page cache is shared: PSS grows by an interpreter per worker, not by the template.

Reading it: the spare worker has its interpreter started and the mem-file mapped, so it
adopts a dead worker's forks at once; without it a new interpreter must start first.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from _common import (
    PAGE,
    MiB,
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

from pagefork.server import PageServer, ServerConfig
from pagefork.testing.vmm import VmmProcess

TARGETS = {"recovery_ms": ("<=", 100.0)}
SUMMARY = {
    "recovery_ms": "from a worker's SIGKILL to every fork it served being served again, with "
    "the spare worker (ms)",
    "recovery_cold_ms": "the same without a spare (a new interpreter starts) (ms)",
    "placement_gain": "a pinned VMM's demand fault served across cores / on its own core",
    "pss_mib_1_worker": "PSS of supervisor + workers, 16 forks of 256 MiB, 1 worker (MiB)",
    "pss_mib_2_workers": "the same, 2 workers",
    "pss_mib_4_workers": "the same, 4 workers",
}


def _kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _recovery_round(workdir: str, mem: str, spare: bool, forks: int) -> tuple[float, float]:
    """(ms from SIGKILL until every orphan is served again, guests' slowest page in ms)."""
    sockets = os.path.join(workdir, f"r{time.monotonic_ns()}")
    os.mkdir(sockets)
    restarted = threading.Event()
    server = PageServer(
        ServerConfig(
            mem,
            sockets,
            workers=2,
            spare_worker=spare,
            on_worker_restarted=lambda *_: restarted.set(),
        )
    )
    server.wait_ready()  # a spare that is still starting is not what a long-running host has
    vms: list[VmmProcess] = []
    try:
        for i in range(forks):
            vms.append(VmmProcess(server.register_fork(f"f{i}"), mem, ["16M"]))
            server.wait_connected(f"f{i}")
        victim = server.worker_pids()[0]
        orphans = [f"f{i}" for i in range(forks) if server.stats(f"f{i}").worker_pid == victim]
        replies: list[dict[str, Any]] = []

        def storm(vm: VmmProcess) -> None:
            replies.append(vm.send(cmd="touch", all=True, order="random", max_latency=True))

        threads = [threading.Thread(target=storm, args=(vm,)) for vm in vms]
        for t in threads:
            t.start()
        # Let the storm get going: every fork has faults in flight when the worker dies.
        while min(server.stats(f).faults for f in orphans) < 200:
            time.sleep(0.0002)
        before = {f: server.stats(f).faults for f in orphans}
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        pending = set(orphans)
        while pending:
            pending = {f for f in pending if server.stats(f).faults <= before[f] + 1}
            time.sleep(0.0001)
        recovery = (time.perf_counter() - t0) * 1000
        for t in threads:
            t.join(120)
        assert all(r["bad"] == 0 for r in replies), "a guest read wrong bytes"
        slowest = max(r.get("max_latency_ms", 0.0) for r in replies)
        return recovery, slowest
    finally:
        for vm in vms:
            vm.close()
        server.close()


def _memory(workdir: str, mem: str, workers: int, forks: int) -> tuple[float, float]:
    """(RSS MiB, PSS MiB) of the supervisor (this process) plus its workers."""
    sockets = os.path.join(workdir, f"m{workers}")
    os.mkdir(sockets)
    base_rss, base_pss = _kb(os.getpid(), "Rss"), _kb(os.getpid(), "Pss")
    server = PageServer(ServerConfig(mem, sockets, workers=workers, spare_worker=False))
    vms: list[VmmProcess] = []
    try:
        for i in range(forks):
            vms.append(VmmProcess(server.register_fork(f"f{i}"), mem, ["256M"]))
        for i, vm in enumerate(vms):
            server.wait_connected(f"f{i}")
            pages = [[0, (i * 2048 + k) * PAGE % (256 * MiB)] for k in range(2048)]
            assert vm.send(cmd="touch", pages=pages)["bad"] == 0
        pids = [os.getpid(), *server.worker_pids()]
        rss = sum(_kb(p, "Rss") for p in pids) - base_rss
        pss = sum(_kb(p, "Pss") for p in pids) - base_pss
        return rss / 1024, pss / 1024
    finally:
        for vm in vms:
            vm.close()
        server.close()


def _pin_all(pid: int, cpu: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def _placement_round(workdir: str, mem: str, cross: bool) -> float:
    """µs per fault of a VMM pinned to CPU 0 whose fork went to CPU 0's worker; ``cross``
    moves the VMM to CPU 1 after placement (the cost a placement ignoring pinning pays)."""
    sockets = os.path.join(workdir, f"p{time.monotonic_ns()}")
    os.mkdir(sockets)
    cpus = sorted(os.sched_getaffinity(0))
    server = PageServer(ServerConfig(mem, sockets))
    mine = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        try:
            vm = VmmProcess(server.register_fork("a"), mem, ["16M"])
        finally:
            os.sched_setaffinity(0, mine)
        try:
            server.wait_connected("a")
            assert os.sched_getaffinity(server.stats("a").worker_pid or 0) == {cpus[0]}
            if cross:
                _pin_all(vm.pid, cpus[1])
            reply = vm.send(cmd="touch", all=True, order="random", verify=False)
            return float(reply["seconds"]) / reply["touched"] * 1e6
        finally:
            vm.close()
    finally:
        server.close()


def main(quick: bool = False) -> dict[str, Any]:
    rounds = 3 if quick else 7
    forks = 4
    header(
        "workers: recovery from a SIGKILL, and memory",
        f"{forks} forks of a 16 MiB template fault continuously; one of 2 workers is SIGKILLed "
        f"mid-storm ({rounds} rounds, with and without the spare worker). Then RSS/PSS of the "
        "supervisor + workers at 16 forks of a 256 MiB template.",
    )
    figures: dict[str, Any] = {}
    with scratch_dir() as workdir:
        small = os.path.join(workdir, "small")
        make_mem_file(small, 16 * MiB, 0.25, seed=3)
        got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for r in range(rounds):
            for spare in (True, False) if r % 2 == 0 else (False, True):
                got[spare].append(_recovery_round(workdir, small, spare, forks))
        rec = median([a for a, _ in got[True]])
        cold = median([a for a, _ in got[False]])
        figures["recovery_ms"] = rec
        figures["recovery_cold_ms"] = cold
        figures["slowest_page_ms"] = median([b for _, b in got[True]])
        table(
            "recovery: SIGKILL of a worker -> all its forks served again",
            ["", "median ms", "max ms", "guests' slowest page, ms (median)"],
            [
                [
                    "spare worker (default)",
                    fmt(rec),
                    fmt(max(a for a, _ in got[True])),
                    fmt(figures["slowest_page_ms"]),
                ],
                [
                    "no spare",
                    fmt(cold),
                    fmt(max(a for a, _ in got[False])),
                    fmt(median([b for _, b in got[False]])),
                ],
            ],
        )
        console.print(verdict("recovery_ms", rec, "<=", 100.0))
        if len(os.sched_getaffinity(0)) >= 2:
            same: list[float] = []
            cross: list[float] = []
            for r in range(rounds):
                for c in (False, True) if r % 2 == 0 else (True, False):
                    (cross if c else same).append(_placement_round(workdir, small, c))
            figures["fault_us_same_core"] = median(same)
            figures["fault_us_cross_core"] = median(cross)
            figures["placement_gain"] = median([c / s for c, s in zip(cross, same, strict=True)])
            table(
                "placement: a pinned VMM's faults served on its own core vs across cores",
                ["", "µs per fault (median)"],
                [["same core (placed)", fmt(median(same))], ["across cores", fmt(median(cross))]],
            )
            console.print(f"across / same core: [bold]{fmt(figures['placement_gain'])}x[/]")
        big = os.path.join(workdir, "big")
        make_mem_file(big, 256 * MiB, 0.25, seed=4)
        rows = []
        for workers in (1, 2, 4):
            rss, pss = _memory(workdir, big, workers, 16)
            figures[f"pss_mib_{workers}_worker{'s' if workers > 1 else ''}"] = pss
            rows.append([f"{workers} worker(s)", fmt(rss, 0), fmt(pss, 0)])
        table("memory at 16 forks of a 256 MiB template (MiB)", ["", "RSS", "PSS"], rows)
    return figures


if __name__ == "__main__":
    standalone(main)
