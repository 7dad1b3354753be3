"""A supervisor killed mid fault storm: what its forks feel, and how fast the next one adopts.

A ``pagefork serve`` (2 workers) serves 16 forks of a 16 MiB template, each a test VMM. Every
fork's pages are cut in three thirds, each touched in random order from 2 threads by all 16
forks at once (a storm), each page checked against the template:

1. the first third with the serve alive (``normal``);
2. SIGKILL the serve; the second third with no supervisor at all (``orphaned``): the workers
   serve on by themselves;
3. a new serve on the same socket adopts every fork from the orphaned workers; the last third
   under it (``normal`` again, so the orphaned storm sits between two normal ones).

Figures (median over rounds):

- ``faults_per_s_normal`` / ``faults_per_s_orphaned``: pages installed per second by the
  storm, all forks together (first page asked to last page answered); ``orphaned_ratio``
  is orphaned over the mean of the two normal storms around it, per round.
- ``adopt_ms``: from the new serve's start of adoption to its last fork adopted (its own
  ``adopted`` event), for 16 forks in 2 workers.
- ``restart_to_adopted_s``: from starting the new serve to its ``adopted`` event (what a
  service manager's restart costs in all: interpreter, template, workers, adoption).

How to read it: an orphaned ratio near 1 means forks do not notice their supervisor's death;
``adopt_ms`` is the pause a restart adds once the new supervisor is up.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from _common import (
    MiB,
    Serve,
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

from pagefork.testing.vmm import VmmProcess

TARGETS = {"adopt_ms": ("<=", 100.0), "orphaned_ratio": (">=", 0.8)}
SUMMARY = {
    "faults_per_s_normal": "pages installed per second by a storm of 16 forks, supervisor alive",
    "faults_per_s_orphaned": "the same with the supervisor SIGKILLed (the workers serve alone)",
    "orphaned_ratio": "orphaned over the mean of the two normal storms around it",
    "adopt_ms": "from the new serve's start of adoption to its last fork adopted (ms)",
    "restart_to_adopted_s": "from starting the new serve to its adopted event (s)",
}
FORKS = 16
PAGES = 16 * MiB // 4096


def _storm(vms: list[VmmProcess], pages: list[list[int]]) -> float:
    """Touch ``pages`` in every VM at once; faults per second, all VMs together."""
    replies: list[dict[str, Any]] = []

    def run(vm: VmmProcess, seed: int) -> None:
        replies.append(vm.send(cmd="touch", pages=pages, order="random", seed=seed, threads=2))

    threads = [threading.Thread(target=run, args=(vm, i)) for i, vm in enumerate(vms)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    seconds = time.perf_counter() - t0
    if len(replies) != len(vms) or any(r["bad"] for r in replies):
        raise RuntimeError("a guest read wrong bytes, or got no answer")
    return len(pages) * len(vms) / seconds


def _round(workdir: str, mem: str, n: int) -> dict[str, float]:
    sock = os.path.join(workdir, f"s{n}.sock")
    old = Serve("--mem-file", mem, "--socket", sock)
    new: Serve | None = None
    vms: list[VmmProcess] = []
    third = PAGES // 3
    thirds = [[[0, i * 4096] for i in range(k * third, (k + 1) * third)] for k in range(3)]
    try:
        old.wait("listening")
        vms = [VmmProcess(sock, mem, ["16M"]) for _ in range(FORKS)]
        before = _storm(vms, thirds[0])
        old.proc.kill()
        old.proc.wait(60)
        orphaned = _storm(vms, thirds[1])
        t_start = time.perf_counter()
        new = Serve("--mem-file", mem, "--socket", sock)
        adopted = new.wait("adopted")
        if adopted["forks"] != FORKS:
            raise RuntimeError(f"adopted {adopted['forks']} forks of {FORKS}")
        new.wait("listening")
        after = _storm(vms, thirds[2])
        return {
            "normal": (before + after) / 2,
            "orphaned": orphaned,
            "ratio": orphaned / ((before + after) / 2),
            "adopt_ms": adopted["seconds"] * 1000,
            "restart_s": adopted["_at"] - t_start,
        }
    finally:
        for vm in vms:
            vm.close()
        for s in (new, old):
            if s is not None:
                s.stop()


def main(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    header(
        "orphan: a serve SIGKILLed mid fault storm, its 16 forks adopted by the next one",
        f"{FORKS} forks of a 16 MiB template touch a third of their pages with the serve "
        "alive, a third with no supervisor at all, and a third under the serve that adopted "
        f"them ({rounds} rounds).",
    )
    with scratch_dir() as workdir:
        mem = os.path.join(workdir, "mem")
        make_mem_file(mem, 16 * MiB, 0.25, seed=5)
        runs = [_round(workdir, mem, r) for r in range(rounds)]
    figures: dict[str, Any] = {
        "faults_per_s_normal": median([x["normal"] for x in runs]),
        "faults_per_s_orphaned": median([x["orphaned"] for x in runs]),
        "orphaned_ratio": median([x["ratio"] for x in runs]),
        "adopt_ms": median([x["adopt_ms"] for x in runs]),
        "restart_to_adopted_s": median([x["restart_s"] for x in runs]),
    }
    table(
        "a killed supervisor's forks",
        ["", "median", "max"],
        [
            ["faults/s, supervisor alive", fmt(figures["faults_per_s_normal"], 0),
             fmt(max(x["normal"] for x in runs), 0)],
            ["faults/s, no supervisor", fmt(figures["faults_per_s_orphaned"], 0),
             fmt(max(x["orphaned"] for x in runs), 0)],
            ["orphaned / normal", fmt(figures["orphaned_ratio"]),
             fmt(max(x["ratio"] for x in runs))],
            ["adoption of 16 forks, ms", fmt(figures["adopt_ms"]),
             fmt(max(x["adopt_ms"] for x in runs))],
            ["new serve started -> adopted, s", fmt(figures["restart_to_adopted_s"]),
             fmt(max(x["restart_s"] for x in runs))],
        ],
    )  # fmt: skip
    for name, (op, goal) in TARGETS.items():
        console.print(verdict(name, figures[name], op, goal))
    return figures


if __name__ == "__main__":
    standalone(main)
