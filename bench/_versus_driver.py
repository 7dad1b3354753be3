"""One round of one scenario of ``bench_versus``, against whichever pagefork is on the path.

    PYTHONPATH=<tree>/src python bench/_versus_driver.py SCENARIO MEM_FILE WORKDIR [SPARE]

``bench_versus`` runs this script once per scenario, round and tree, with ``PYTHONPATH`` set to
that tree's ``src``, so each tree is measured on its own code. It uses only the API both the
current tree and older ones share (``pagefork.server``, ``pagefork.testing.vmm``, the ``serve``
command's JSON events) and prints one JSON object of figures on its last stdout line.

Scenarios:

- ``fanout``: a page server (default settings) and 16 forks of the template, each a test VMM
  touching all its pages in random order at the same moment. ``startup_ms``: from this
  process's first line to the server's workers all serving (interpreter not counted: the same
  for both trees), imports included; ``connect_ms``: 16 forks registered until all connected;
  ``burst_ms``: first page asked to last page answered, all forks.
- ``faults``: one fork touching all its pages in random order; µs per demand fault as the guest
  sees it (the median of three such forks, one after another).
- ``recovery``: 4 forks of 2 workers fault continuously; one worker is SIGKILLed. ``ms``: until
  every fork it served has had a fault served again; with the spare worker (``SPARE`` = 1) or
  without it (0). Also ``respawn_ms``: until a worker took the dead one's place, and
  ``ready_ms``: until every worker (that one too) has mapped the template and serves.
- ``takeover``: ``pagefork serve`` with 16 forks faulting; a ``serve --takeover`` (held after
  connecting) takes over. ``handover_ms``: go-on to ``took_over``; ``slowest_fault_ms``: the
  longest page any fork waited for (the pause the forks feel); ``command_s``: what the
  operator waits for in all.

Every scenario checks what it served (no wrong bytes; the server's fault counts).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before pagefork is imported: start-up includes its imports

import json  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Serve  # noqa: E402

from pagefork.server import PageServer, ServerConfig  # noqa: E402
from pagefork.testing.vmm import VmmProcess  # noqa: E402

FANOUT_FORKS = 16
TAKEOVER_FORKS = 16
RECOVERY_FORKS = 4
#: Forks of the fault scenario, one after another (its figure is their median).
FAULT_FORKS = 3


def _pages(mem: str) -> int:
    return os.path.getsize(mem) // 4096


def _all_at_once(vms: list[VmmProcess], **cmd: Any) -> tuple[float, list[dict[str, Any]]]:
    """Every VMM runs ``touch`` at the same moment: (wall seconds, replies)."""
    start = threading.Barrier(len(vms) + 1)
    replies: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def run(vm: VmmProcess, k: int) -> None:
        try:
            start.wait(60)
            replies.append(vm.send(cmd="touch", seed=k, **cmd))
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(vm, k)) for k, vm in enumerate(vms)]
    for t in threads:
        t.start()
    start.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if len(replies) != len(vms) or any(r["bad"] for r in replies):
        raise RuntimeError("a guest read wrong bytes, or got no answer")
    return seconds, replies


def fanout(mem: str, workdir: str) -> dict[str, float]:
    server = PageServer(ServerConfig(mem_file_path=mem, socket_dir=workdir))
    vms: list[VmmProcess] = []
    ids = [f"f{i}" for i in range(FANOUT_FORKS)]
    try:
        server.wait_ready()
        startup = time.perf_counter() - T_START
        t0 = time.perf_counter()
        for fork_id in ids:
            vms.append(VmmProcess(server.register_fork(fork_id), mem, [f"{_pages(mem) // 256}M"]))
        for fork_id in ids:
            server.wait_connected(fork_id, timeout=60)
        connect = time.perf_counter() - t0
        burst, _ = _all_at_once(vms, all=True, order="random", verify=True)
        for vm in vms:
            vm.close()
        faults = [server.wait_ended(f, timeout=60).faults for f in ids]
        if faults != [_pages(mem)] * FANOUT_FORKS:
            raise RuntimeError(f"served {faults} faults, not {_pages(mem)} per fork")
        return {"startup_ms": startup * 1e3, "connect_ms": connect * 1e3, "burst_ms": burst * 1e3}
    finally:
        for vm in vms:
            vm.close()
        server.close()


def faults(mem: str, workdir: str) -> dict[str, float]:
    server = PageServer(ServerConfig(mem_file_path=mem, socket_dir=workdir))
    per_fork: list[float] = []
    try:
        server.wait_ready()
        # One fork after another, the median of them: a shared host's hiccup in one fork's
        # second of faults then does not make the round.
        for fork_id in (f"a{i}" for i in range(FAULT_FORKS)):
            vm = VmmProcess(server.register_fork(fork_id), mem, [f"{_pages(mem) // 256}M"])
            try:
                server.wait_connected(fork_id)
                reply = vm.send(cmd="touch", all=True, order="random", verify=True)
            finally:
                vm.close()
            served = server.wait_ended(fork_id).faults
            if reply["bad"] or served != reply["touched"]:
                raise RuntimeError(f"{reply['bad']} wrong pages; {served} faults served")
            per_fork.append(float(reply["seconds"]) / reply["touched"] * 1e6)
        return {"us_per_fault": sorted(per_fork)[len(per_fork) // 2]}
    finally:
        server.close()


def recovery(mem: str, workdir: str, spare: bool) -> dict[str, float]:
    server = PageServer(
        ServerConfig(mem_file_path=mem, socket_dir=workdir, workers=2, spare_worker=spare)
    )
    vms: list[VmmProcess] = []
    ids = [f"f{i}" for i in range(RECOVERY_FORKS)]
    try:
        server.wait_ready()  # a spare still starting is not what a long-running host has
        for fork_id in ids:
            vms.append(VmmProcess(server.register_fork(fork_id), mem, [f"{_pages(mem) // 256}M"]))
            server.wait_connected(fork_id)
        victim = server.worker_pids()[0]
        orphans = [f for f in ids if server.stats(f).worker_pid == victim]
        if not orphans:
            raise RuntimeError(f"worker {victim} serves none of the forks")
        out: dict[str, Any] = {}

        def storm() -> None:
            try:
                out["seconds"], _ = _all_at_once(vms, all=True, order="random")
            except BaseException as exc:  # re-raised below
                out["error"] = exc

        storm_thread = threading.Thread(target=storm)
        storm_thread.start()
        # Every fork has faults in flight when the worker dies.
        while min(server.stats(f).faults for f in orphans) < 200:
            time.sleep(0.0002)
        pidfd = os.pidfd_open(victim)
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        # Counted only once it is dead: a SIGKILL takes effect at the victim's next return to
        # user mode, so it may finish a fault or two after kill() returned.
        select.select([pidfd], [], [], 30)
        os.close(pidfd)
        before = {f: server.stats(f).faults for f in orphans}
        respawn = float("nan")
        ready: list[float] = []

        def watch_ready() -> None:
            # Every worker, the one just started among them, has mapped the template.
            server.wait_ready(timeout=60)
            ready.append(time.perf_counter() - t0)

        watcher = threading.Thread(target=watch_ready)
        pending = set(orphans)
        while pending:
            if respawn != respawn and victim not in server.worker_pids():
                respawn = time.perf_counter() - t0
                watcher.start()
            pending = {f for f in pending if server.stats(f).faults <= before[f] + 1}
            time.sleep(0.0001)
        ms = (time.perf_counter() - t0) * 1e3
        if watcher.is_alive() or respawn == respawn:
            watcher.join(60)
        storm_thread.join(600)
        if "error" in out:
            raise out["error"]
        return {
            "ms": ms,
            "respawn_ms": respawn * 1e3,
            "ready_ms": ready[0] * 1e3 if ready else float("nan"),
        }
    finally:
        for vm in vms:
            vm.close()
        server.close()


def takeover(mem: str, workdir: str) -> dict[str, float]:
    sock = os.path.join(workdir, "serve.sock")
    old = Serve("--mem-file", mem, "--socket", sock)
    new: Serve | None = None
    vms: list[VmmProcess] = []
    try:
        old.wait("listening")
        vms = [VmmProcess(sock, mem, [f"{_pages(mem) // 256}M"]) for _ in range(TAKEOVER_FORKS)]
        t_cmd = time.perf_counter()
        new = Serve("--mem-file", mem, "--socket", sock, "--takeover",
                    env={"PAGEFORK_TAKEOVER_PAUSE_AT": "hello"})  # fmt: skip
        t_ready = new.wait("takeover: paused at hello")["_at"]
        result: dict[str, Any] = {}

        def storm() -> None:
            try:
                result["storm"] = _all_at_once(
                    vms, all=True, order="random", threads=2, max_latency=True
                )
            except BaseException as exc:  # re-raised below
                result["error"] = exc

        storm_thread = threading.Thread(target=storm)
        storm_thread.start()  # its pages take seconds: the handover meets it under way
        t_go = time.perf_counter()
        new.go_on()
        took = new.wait("took_over")
        storm_thread.join(600)
        if "error" in result:
            raise result["error"]
        if took["forks"] != TAKEOVER_FORKS:
            raise RuntimeError(f"took over {took['forks']} forks of {TAKEOVER_FORKS}")
        _, replies = result["storm"]
        return {
            "handover_ms": (took["_at"] - t_go) * 1e3,
            "slowest_fault_ms": max(float(r["max_latency_ms"]) for r in replies),
            "command_s": (t_ready - t_cmd) + (took["_at"] - t_go),
        }
    finally:
        for vm in vms:
            vm.close()
        for s in (new, old):
            if s is not None:
                s.stop()


def main(argv: list[str]) -> None:
    scenario, mem, workdir = argv[:3]
    if scenario == "recovery":
        figures = recovery(mem, workdir, argv[3] == "1")
    else:
        figures = {"fanout": fanout, "faults": faults, "takeover": takeover}[scenario](mem, workdir)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
