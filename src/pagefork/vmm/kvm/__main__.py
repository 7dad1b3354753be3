"""Run one fork of a template in this process: ``python -m pagefork.vmm.kvm``.

A fork runs in its own process because ``KVM_RUN`` must not happen in the page server's: a
Python thread faulting on uffd memory while holding the GIL would stop the server that has
to serve the fault. The process speaks JSON lines with whoever started it
(:class:`pagefork.vmm.kvm.process.ForkProcess`):

- stdout ``{"event": "restored", ...}`` once RAM is handed to the page server and the vCPUs are
  restored (times are ``time.monotonic()``, a system-wide clock);
- stdin ``go`` resumes the vCPUs (Firecracker's ``PATCH /vm {"state": "Resumed"}``); ``exit``
  or end of input quits without running;
- stdout ``{"event": "result", ...}`` when every vCPU halted: ready time, checksums, whether
  they match the template, and the touched pages whose bytes differ from the mem-file
  (``bad_pages``, checked after ready); ``checksum_ok`` is true only if both are right;
  ``memory``: the process's own memory figures at that moment (:mod:`pagefork.memstats`);
- stdout ``{"event": "error", "message": ...}`` and exit status 1 on any failure;
- with ``--snapshots`` KVM logs the guest's writes, and the process takes commands on stdin
  until ``exit`` or end of input, before ``go`` and after the result (the vCPUs are then
  stopped: halted, or not yet resumed), each answered by one event or an ``error`` event that
  leaves the fork as it was: ``snapshot DIR`` writes a diff snapshot into the existing
  directory DIR (:mod:`.snapshot`; event ``snapshot``), ``remove GPA LENGTH`` gives guest
  memory back as a balloon does (event ``removed``), ``dump PATH`` writes all guest RAM to a
  new file (event ``dumped``), ``checksums INDEX`` answers the checksums a fork of index INDEX
  would walk over this fork's memory as it is now (event ``checksums``: what every branch of a
  snapshot taken now must report); ``go`` after the result runs the guest again, as a VM goes
  on after a snapshot: a new walk over memory as the last one left it, whose ``result`` expects
  the checksums over the fork's own memory (not the template's);
- ``--memory`` (repeated) reads the template's RAM from a base mem-file and its layers instead
  of the template directory's mem-file: a fork of a snapshot checks its pages against them;
- if the page server closes its socket before the fork is done, an ``error`` event and exit
  status 3 (a watchdog thread: vCPUs blocked on faults nobody serves would otherwise hang
  forever). The process also dies with its parent (``PR_SET_PDEATHSIG``), unless started
  with ``--outlive-parent``: a daemon's forks may be handed to its successor in a live takeover,
  and they still go when no one serves them (the watchdog) or holds their stdin (end of input).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pagefork.errors import PageforkError, VmmError
from pagefork.memstats import try_measure
from pagefork.vmm.kvm.microvm import MicroVm
from pagefork.vmm.kvm.snapshot import dump_memory, remove_range
from pagefork.vmm.kvm.template import Template, load_template

PR_SET_PDEATHSIG = 1
#: Exit status when the page server went away under the fork.
EXIT_SERVER_GONE = 3

_emit_lock = threading.Lock()


def _emit(doc: dict[str, Any]) -> None:
    with _emit_lock:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


def _die_with_parent() -> None:
    """``PR_SET_PDEATHSIG(SIGKILL)``: a fork must not outlive its orchestrator."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def _start_watchdog(vm: MicroVm, finished: threading.Event) -> None:
    """Exit (status 3) with an error event once the page server closes its socket, unless
    the fork finished first (then the EOF is our own shutdown)."""
    memory = vm.memory
    if memory is None:
        return

    def watch() -> None:
        memory.wait_server_gone()
        if not finished.is_set():
            _emit(
                {
                    "event": "error",
                    "message": "page server closed the connection; the guest's memory can no "
                    "longer be served",
                }
            )
            os._exit(EXIT_SERVER_GONE)

    threading.Thread(target=watch, name="server-watchdog", daemon=True).start()


def run_fork(
    template_dir: str,
    socket_path: str | None,
    fork_index: int,
    wait_go: bool,
    *,
    snapshots: bool = False,
    memory: Sequence[str] | None = None,
    outlive_parent: bool = False,
) -> int:
    """Restore, wait for ``go``, run, report. Returns the exit status."""
    t_start = time.monotonic()
    if not outlive_parent:
        _die_with_parent()
    template = load_template(template_dir, memory)
    finished = threading.Event()
    with MicroVm(template, fork_index) as vm:
        try:
            return _restore_and_run(
                vm, template, socket_path, wait_go, t_start, finished, snapshots
            )
        finally:
            finished.set()  # before MicroVm.close() shuts the socket down


def _command(vm: MicroVm, line: str) -> dict[str, Any]:
    """Run one ``--snapshots`` command; its event."""
    verb, _, rest = line.partition(" ")
    args = rest.split()
    if verb == "snapshot" and rest:  # the rest of the line is the path: it may hold spaces
        t0 = time.monotonic()
        snap = vm.snapshot(rest)
        return {
            "event": "snapshot",
            "memory_diff": snap.memory_diff,
            "vmstate": snap.vmstate,
            "dirty_pages": snap.dirty_pages,
            "seconds": time.monotonic() - t0,
        }
    if verb == "remove" and len(args) == 2:
        if vm.memory is None:
            raise VmmError("remove before restore")
        gpa, length = int(args[0], 0), int(args[1], 0)
        remove_range(vm.memory, gpa, length)
        return {"event": "removed", "gpa": gpa, "length": length}
    if verb == "checksums" and len(args) == 1:
        index = int(args[0], 0)
        if index < 0:
            raise ValueError(f"fork index {index} is negative")
        variant = vm.template.variant_of(index)
        return {
            "event": "checksums",
            "fork_index": index,
            "variant": variant,
            "checksums": vm.own_checksums(variant),
        }
    if verb == "dump" and rest:
        if vm.memory is None:
            raise VmmError("dump before restore")
        dump_memory(vm.memory, rest)
        return {"event": "dumped", "path": rest}
    raise VmmError(f"unknown command {line!r}")


def _serve_commands(vm: MicroVm, run: Callable[[], None], again: Callable[[], None]) -> int:
    """The ``--snapshots`` loop: commands until ``exit`` or end of input; the first ``go``
    calls ``run``, each later one ``again``."""
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if line == "exit":
            break
        if line == "go":
            go, run = run, again
            go()  # a failure ends the fork (main reports it)
            continue
        try:
            _emit(_command(vm, line))
        except (PageforkError, OSError, ValueError) as exc:  # the fork stays as it was
            _emit({"event": "error", "message": _one_line(str(exc)), "command": line})
    return 0


def _restore_and_run(
    vm: MicroVm,
    template: Template,
    socket_path: str | None,
    wait_go: bool,
    t_start: float,
    finished: threading.Event,
    snapshots: bool = False,
) -> int:
    vm.restore(socket_path, log_dirty=snapshots)
    if socket_path is not None:
        _start_watchdog(vm, finished)
    _emit(
        {
            "event": "restored",
            "pid": os.getpid(),
            "fork_index": vm.fork_index,
            "variant": vm.variant,
            "t_start": t_start,
            "t_restored": time.monotonic(),
        }
    )
    if snapshots:
        return _serve_commands(
            vm,
            lambda: _run_and_report(vm, template, keep=True),
            lambda: _run_and_report(vm, template, keep=True, again=True),
        )
    if wait_go:
        line = sys.stdin.readline().strip()
        if line != "go":
            return 0
    _run_and_report(vm, template)
    return 0


def _run_and_report(
    vm: MicroVm, template: Template, *, keep: bool = False, again: bool = False
) -> None:
    """Run the guest to its halt and emit its ``result``. ``again``: a run after the first,
    over memory the fork itself changed: its checksums are expected over that memory, and its
    pages are not compared with the template's."""
    # Before the run (it writes): the checksums over the fork's memory as it is now.
    own = vm.own_checksums(vm.variant) if again else None
    t_go = time.monotonic()
    result = vm.run()
    # After ready, so not part of the ready time: every byte of every touched page.
    bad_pages = vm.check_pages() if own is None else []
    expected = template.expected_checksums(vm.variant) if own is None else own
    if not keep:
        template.close()
    guest_ok = result.checksums == expected
    memory = try_measure(os.getpid())  # alive and after ready: what the fork holds now
    _emit(
        {
            "event": "result",
            "t_go": t_go,
            "t_run_start": result.started,
            "t_ready": result.ready,
            "checksums": result.checksums,
            "expected": expected,
            "guest_checksum_ok": guest_ok,
            "pages_ok": not bad_pages,
            "bad_pages": bad_pages,
            "checksum_ok": guest_ok and not bad_pages,
            "exits": result.exits,
            "progress": result.progress,
            "memory": memory.to_dict() if memory is not None else {},
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pagefork.vmm.kvm``."""
    parser = argparse.ArgumentParser(prog="python -m pagefork.vmm.kvm", description=__doc__)
    parser.add_argument("template", help="template directory")
    parser.add_argument("--socket", help="page server socket (omit: load RAM from the mem-file)")
    parser.add_argument("--fork-index", type=int, default=0, help="picks the trace variant")
    parser.add_argument("--no-wait", action="store_true", help="run without waiting for 'go'")
    parser.add_argument(
        "--snapshots",
        action="store_true",
        help="log the guest's writes and take commands (snapshot, remove, dump) until 'exit'",
    )
    parser.add_argument(
        "--memory",
        action="append",
        metavar="PATH",
        help="read the template's RAM from this base mem-file, then these layers (repeat)",
    )
    parser.add_argument(
        "--outlive-parent",
        action="store_true",
        help="do not die with the parent process (a daemon's fork, which a successor daemon "
        "may adopt); it still exits when its page server or its stdin goes away",
    )
    args = parser.parse_args(argv)
    try:
        return run_fork(
            args.template,
            args.socket,
            args.fork_index,
            not args.no_wait,
            snapshots=args.snapshots,
            memory=args.memory,
            outlive_parent=args.outlive_parent,
        )
    except PageforkError as exc:
        _emit({"event": "error", "message": _one_line(str(exc))})
        return 1
    except Exception as exc:  # anything else: still one error event, never a traceback
        _emit({"event": "error", "message": _one_line(f"{type(exc).__name__}: {exc}")})
        return 1


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


if __name__ == "__main__":
    sys.exit(main())
