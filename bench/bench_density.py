"""Density: what a burst of microVM forks holds in memory, without and with KSM sharing.

16 forks of one 256 MiB template of the built-in microVM are restored at once (their hot set
prefetched), run their traces (each touches about 100 MiB and writes about 5% of it), and stay
alive, stopped, while their VMMs' memory is read from the kernel (``/proc/PID/smaps_rollup``,
``smaps``, ``ksm_stat``). The same burst runs twice per round: once plain, once with every VMM
marked mergeable (``PR_SET_MEMORY_MERGE``), the order reversing every round.

Figures, each measured in this run:

- total ``Pss`` of the forks' guest RAM (userfaultfd-registered memory) and of their whole VMM
  processes, settled (after merging converged), both modes side by side; the target compares
  the shared guest total with the template data the burst touched (its non-zero pages) plus
  1.3x the bytes the forks wrote;
- convergence: seconds from the burst's last ready until the total came within 2% of its final
  value, at the scan rate chosen here (``pages_to_scan`` 5000 every 20 ms); ``ksmd``'s CPU
  seconds over that time, from ``/proc`` of the ``ksmd`` thread;
- fork-ready shared / plain, side by side under the same load: bursts that mix both kinds
  (every other fork mergeable, the pattern flipping every round), the mean ready time of
  the shared forks over the plain ones', median over rounds; and the same ratio between the
  whole plain and shared bursts (which includes the drift of the machine between bursts);
- fan-out (first start to last ready of a whole burst) shared / plain, median of the rounds;
- a write to a KSM-merged page (a copy-on-write fault), against a write to a private page
  already present and a first write to a fresh page, per page, in this process (CPU time of
  the writing thread, kernel included);
- pages that stayed the kernel's zero page (``UFFDIO_ZEROPAGE``): they cost nothing.

KSM is turned on for the run only (``run`` 1) and every setting is put back as found after,
even on failure. pagefork itself never turns KSM on.
"""

from __future__ import annotations

import mmap
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import MiB, alternating, console, fmt, header, median, standalone, table, verdict

from pagefork import ksm
from pagefork.demo import orchestrate
from pagefork.demo.density import BurstReport, run_burst
from pagefork.errors import PageforkError
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm.template import MEM_FILE, TemplateSpec, build_template
from pagefork.vmm.kvm.trace import TraceSpec

PAGE = 4096
MEM_SIZE = 256 * MiB
#: ~100 MiB of 256 MiB touched, ~5% of it written (2.5% written first, 2.5% read then written).
TRACE = TraceSpec(working_set=0.39, fork_share=0.02, write_first_share=0.025, rewrite_share=0.025)
PAGES_TO_SCAN = 5000
SLEEP_MS = 20
WRITE_FACTOR = 1.3

TARGETS = {
    "guest_pss_over_budget": ("<=", 1.0),
    "converge_s": ("<=", 15.0),
    "ready_ratio": ("<=", 1.05),
    "fanout_ratio": ("<=", 1.05),
}
SUMMARY = {
    "guest_pss_shared_mib": "Pss of the 16 forks' guest RAM, settled, with KSM sharing (MiB)",
    "guest_pss_unshared_mib": "the same without sharing (MiB)",
    "budget_mib": "template data the burst touched plus 1.3x the bytes the forks wrote (MiB)",
    "guest_pss_over_budget": "shared guest Pss / that budget",
    "pss_shared_mib": "Pss of the whole VMM processes, with sharing (MiB)",
    "pss_unshared_mib": "the same without sharing (MiB)",
    "converge_s": "from the burst's last ready until the total is within 2% of its final value (s)",
    "converge_s_max": "the same, slowest round (s)",
    "ksmd_cpu_s": "ksmd's CPU time over that convergence (s)",
    "ready_ratio": "fork-ready, shared / plain forks in mixed bursts, median over rounds",
    "ready_ratio_bursts": "the same between whole shared and plain bursts",
    "fanout_ratio": "a burst's first start to last ready, shared / plain",
    "cow_write_us": "a write to a KSM-merged page: its copy-on-write fault (µs)",
    "private_write_us": "a write to a private page already present (µs)",
}


def cow_costs(pages: int = 8192, timeout: float = 30.0) -> dict[str, float]:
    """Microseconds per page of a write to a KSM-merged page, to a private present page and to
    a fresh (never touched) page, measured on this process's own anonymous memory."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    merged = mmap.mmap(-1, pages * PAGE, flags=flags)
    fresh = mmap.mmap(-1, pages * PAGE, flags=flags)
    try:
        pattern = b"\x5a" * PAGE
        for i in range(pages):
            merged[i * PAGE : (i + 1) * PAGE] = pattern
        merged.madvise(mmap.MADV_MERGEABLE)
        deadline = time.monotonic() + timeout
        merging = 0
        while time.monotonic() < deadline:
            with open("/proc/self/ksm_stat") as f:
                stat = dict(line.replace(":", " ", 1).split(None, 1) for line in f if " " in line)
            merging = int(stat.get("ksm_merging_pages", "0"))
            if merging >= pages:
                break
            time.sleep(0.05)  # polling ksmd's progress
        if merging < pages:
            raise PageforkError(f"KSM merged only {merging} of {pages} pages in {timeout:g}s")

        def write_all(m: mmap.mmap) -> float:
            # CPU time of this thread (user + the kernel's fault handling): on a loaded machine
            # wall time would mostly measure waiting for a CPU.
            t0 = time.thread_time()
            for i in range(0, pages * PAGE, PAGE):
                m[i] = 1
            return (time.thread_time() - t0) / pages * 1e6

        cow = write_all(merged)  # every page is merged: each write takes a COW fault
        private = write_all(merged)  # now private and present: no fault
        first = write_all(fresh)  # never touched: an anonymous first-touch fault
        return {"cow_write_us": cow, "private_write_us": private, "first_write_us": first}
    finally:
        merged.close()
        fresh.close()


def _burst_row(name: str, b: dict[str, Any]) -> list[str]:
    return [
        name,
        f"{b['guest_pss_total_bytes'] / MiB:.0f}",
        f"{b['guest_per_fork_pss_bytes'] / MiB:.1f}",
        f"{b['pss_total_bytes'] / MiB:.0f}",
        f"{b['per_fork_pss_bytes'] / MiB:.1f}",
        f"{b['ready_ms_mean']:.0f}",
        f"{b['fanout_ms']:.0f}",
        "-" if b["converge_s"] is None else f"{b['converge_s']:.1f}",
        "-" if b["ksmd_cpu_s"] is None else f"{b['ksmd_cpu_s']:.2f}",
    ]


def main(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns its figures."""
    header(
        "density",
        "16 microVM forks alive together: memory without and with KSM sharing, side by side",
    )
    try:
        orchestrate.check_environment()
    except PageforkError as exc:
        console.print(f"[red]skipped:[/] {exc}")
        return {"skipped": str(exc)}
    if not ksm.available():
        console.print("[red]skipped:[/] this kernel has no KSM")
        return {"skipped": "this kernel has no KSM"}
    forks = 8 if quick else 16
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="pagefork-bench-density-") as tmp:
        work = Path(tmp)
        template = build_template(work / "template", TemplateSpec(mem_size=MEM_SIZE, trace=TRACE))
        (work / "sockets").mkdir()
        config = ServerConfig(
            mem_file_path=str(template.path / MEM_FILE),
            socket_dir=str(work / "sockets"),
            on_failure="kill",
        )
        got: dict[bool, list[BurstReport]] = {False: [], True: []}
        with (
            ksm.temporarily(run=1, pages_to_scan=PAGES_TO_SCAN, sleep_millisecs=SLEEP_MS),
            PageServer(config) as server,
        ):
            warm, hot = orchestrate.warm_up(server, template)
            indices = [orchestrate.fork_index(template, k, warm.variant) for k in range(forks)]
            for _, share in alternating(rounds, (False, True)):
                got[share].append(run_burst(server, template, indices, share_memory=share, hot=hot))
                console.print(
                    f"  burst {'shared' if share else 'plain '}: "
                    f"ready {got[share][-1].to_dict()['ready_ms_mean']:.0f} ms mean"
                )
            mixed: list[float] = []
            for r in range(rounds):
                shares = [(k + r) % 2 == 0 for k in range(forks)]
                b = run_burst(
                    server, template, indices, share_memory=shares, hot=hot, converge_timeout=0
                )
                on = [t for t, sh in zip(b.ready_ms, shares, strict=True) if sh]
                off = [t for t, sh in zip(b.ready_ms, shares, strict=True) if not sh]
                mixed.append((sum(on) / len(on)) / (sum(off) / len(off)))
                console.print(f"  mixed burst: shared / plain ready {mixed[-1]:.3f}")
            cow = cow_costs(2048 if quick else 8192)
        template.close()
    plain = [b.to_dict() for b in got[False]]
    shared = [b.to_dict() for b in got[True]]
    s0 = shared[0]
    budget = s0["union_data_bytes"] + WRITE_FACTOR * s0["written_bytes"]
    guest_shared = median([b["guest_pss_total_bytes"] for b in shared])
    figures: dict[str, Any] = {
        "forks": forks,
        "rounds": rounds,
        "guest_pss_shared_mib": guest_shared / MiB,
        "guest_pss_unshared_mib": median([b["guest_pss_total_bytes"] for b in plain]) / MiB,
        "pss_shared_mib": median([b["pss_total_bytes"] for b in shared]) / MiB,
        "pss_unshared_mib": median([b["pss_total_bytes"] for b in plain]) / MiB,
        "per_fork_pss_shared_mib": median([b["per_fork_pss_bytes"] for b in shared]) / MiB,
        "per_fork_pss_unshared_mib": median([b["per_fork_pss_bytes"] for b in plain]) / MiB,
        "touched_per_fork_mib": s0["touched_bytes"] / forks / MiB,
        "written_per_fork_mib": s0["written_bytes"] / forks / MiB,
        "union_touched_mib": s0["union_touched_bytes"] / MiB,
        "union_data_mib": s0["union_data_bytes"] / MiB,
        "written_mib": s0["written_bytes"] / MiB,
        "budget_mib": budget / MiB,
        "guest_pss_over_budget": guest_shared / budget,
        "converge_s": median([b["converge_s"] or 0.0 for b in shared]),
        "converge_s_max": max(b["converge_s"] or 0.0 for b in shared),
        "ksmd_cpu_s": median([b["ksmd_cpu_s"] or 0.0 for b in shared]),
        "full_scans": median([b["full_scans"] for b in shared]),
        "ready_ratio": median(mixed),
        "ready_ratio_bursts": median(
            [s["ready_ms_mean"] / p["ready_ms_mean"] for s, p in zip(shared, plain, strict=True)]
        ),
        "fanout_ratio": median(
            [s["fanout_ms"] / p["fanout_ms"] for s, p in zip(shared, plain, strict=True)]
        ),
        "ready_ms_shared": median([b["ready_ms_mean"] for b in shared]),
        "ready_ms_unshared": median([b["ready_ms_mean"] for b in plain]),
        "fanout_ms_shared": median([b["fanout_ms"] for b in shared]),
        "fanout_ms_unshared": median([b["fanout_ms"] for b in plain]),
        "free_zero_pages_per_fork": s0["free_zero_pages"] / forks,
        "ksm_merging_pages": median([b["ksm_merging_pages"] for b in shared]),
        "checksums_ok": float(all(b["checksums_ok"] for b in plain + shared)),
        "pages_to_scan": PAGES_TO_SCAN,
        "sleep_millisecs": SLEEP_MS,
        **cow,
    }
    cols = ("burst", "guest", "/fork", "VMM", "/fork", "ready", "fan-out", "conv.", "ksmd")
    rows = [_burst_row(f"plain{i + 1}", b) for i, b in enumerate(plain)]
    rows += [_burst_row(f"shared{i + 1}", b) for i, b in enumerate(shared)]
    table(
        f"{forks} forks of a {MEM_SIZE // MiB} MiB template, alive together (Pss in MiB: guest "
        "RAM, whole VMM; ready mean and fan-out in ms; converged in s; ksmd CPU s)",
        cols,
        rows,
    )
    console.print(
        f"each fork touched {figures['touched_per_fork_mib']:.0f} MiB, wrote "
        f"{figures['written_per_fork_mib']:.1f} MiB; {figures['free_zero_pages_per_fork']:.0f} "
        f"touched pages per fork stayed the zero page (free); burst touched "
        f"{figures['union_data_mib']:.0f} MiB of template data"
    )
    console.print(
        verdict(
            "guest Pss shared / (template data touched + 1.3x written)",
            figures["guest_pss_over_budget"],
            "<=",
            1.0,
        )
        + f"; {fmt(guest_shared / MiB, 0)} MiB vs {fmt(budget / MiB, 0)} MiB"
    )
    console.print(
        verdict("converged within (s)", figures["converge_s"], "<=", 15.0)
        + f" (median of bursts; slowest {figures['converge_s_max']:.1f} s); ksmd "
        + f"{figures['ksmd_cpu_s']:.2f} CPU s per burst"
    )
    console.print(
        verdict("fork-ready shared / plain, in one burst", figures["ready_ratio"], "<=", 1.05)
        + f"; between whole bursts {figures['ready_ratio_bursts']:.2f}"
    )
    console.print(verdict("fan-out shared / plain", figures["fanout_ratio"], "<=", 1.05))
    console.print(
        f"a write to a merged page {cow['cow_write_us']:.1f} us (COW fault), to a private "
        f"present page {cow['private_write_us']:.2f} us, first write to a fresh page "
        f"{cow['first_write_us']:.1f} us"
    )
    return figures


if __name__ == "__main__":
    standalone(main)
