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
  they match the template;
- stdout ``{"event": "error", "message": ...}`` and exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pagefork.errors import PageforkError
from pagefork.vmm.kvm.microvm import MicroVm
from pagefork.vmm.kvm.template import load_template


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def run_fork(template_dir: str, socket_path: str | None, fork_index: int, wait_go: bool) -> int:
    """Restore, wait for ``go``, run, report. Returns the exit status."""
    t_start = time.monotonic()
    template = load_template(template_dir)
    with MicroVm(template, fork_index) as vm:
        vm.restore(socket_path)
        _emit(
            {
                "event": "restored",
                "pid": os.getpid(),
                "fork_index": fork_index,
                "variant": vm.variant,
                "t_start": t_start,
                "t_restored": time.monotonic(),
            }
        )
        if wait_go:
            line = sys.stdin.readline().strip()
            if line != "go":
                return 0
        t_go = time.monotonic()
        result = vm.run()
    expected = template.expected_checksums(vm.variant)
    template.close()
    _emit(
        {
            "event": "result",
            "t_go": t_go,
            "t_run_start": result.started,
            "t_ready": result.ready,
            "checksums": result.checksums,
            "expected": expected,
            "checksum_ok": result.checksums == expected,
            "exits": result.exits,
            "progress": result.progress,
        }
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pagefork.vmm.kvm``."""
    parser = argparse.ArgumentParser(prog="python -m pagefork.vmm.kvm", description=__doc__)
    parser.add_argument("template", help="template directory")
    parser.add_argument("--socket", help="page server socket (omit: load RAM from the mem-file)")
    parser.add_argument("--fork-index", type=int, default=0, help="picks the trace variant")
    parser.add_argument("--no-wait", action="store_true", help="run without waiting for 'go'")
    args = parser.parse_args(argv)
    try:
        return run_fork(args.template, args.socket, args.fork_index, not args.no_wait)
    except PageforkError as exc:
        _emit({"event": "error", "message": str(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
