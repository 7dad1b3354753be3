"""A worker's start-up is paid in full before its page server says it is ready.

What a worker is told to do should its supervisor die (import and prepare the orphan handler)
costs CPU; if it ran after ``wait_ready`` it would compete with the faults a takeover's old
side serves meanwhile. The worker's import path stays lean: never numpy, never the supervisor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import needs_uffd
from pagefork.errors import PageforkError
from pagefork.server import PageServer

#: An orphan handler whose ``prepare`` waits until the test opens the FIFO ``gate`` for
#: writing, then notes its worker's pid in ``dir``.
GATED_HANDLER = """
import os

def prepare(worker, settings):
    fd = os.open(settings["gate"], os.O_RDONLY)  # blocks until the test opens it to write
    os.close(fd)
    open(os.path.join(settings["dir"], f"prepared.{os.getpid()}"), "w").close()
    return True

def forget(kept):
    pass

def become_orphan(worker, kept):
    return False
"""


@needs_uffd
def test_wait_ready_waits_for_every_worker_to_carry_out_its_orphan_setup(
    tmp_path: Path, make_server: Callable[..., PageServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "gated_handler.py").write_text(GATED_HANDLER)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(handlers), os.environ.get("PYTHONPATH", "")])
    )
    # A worker blocked in prepare does not answer its pings: it must not be killed meanwhile.
    monkeypatch.setenv("PAGEFORK_WORKER_STUCK_AFTER", "120")
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    marks = tmp_path / "marks"
    marks.mkdir()
    server = make_server(workers=2)
    server.wait_ready()  # mapped and serving; nothing told yet
    server.keep_forks_if_killed({"handler": "gated_handler", "gate": str(gate), "dir": str(marks)})
    # Every worker is held in prepare until the gate opens: not ready, however long we wait.
    with pytest.raises(PageforkError, match="did not start within"):
        server.wait_ready(timeout=0.5)
    assert not list(marks.iterdir())
    writer = os.open(gate, os.O_WRONLY)  # every prepare goes on (and any still to come)
    try:
        server.wait_ready(timeout=60)
        prepared = {int(p.name.split(".")[1]) for p in marks.iterdir()}
        assert prepared == set(server.all_worker_pids())
        assert len(prepared) == 3  # two workers and the spare
    finally:
        os.close(writer)


def test_a_workers_imports_and_its_orphan_handler_leave_out_numpy_and_the_supervisor(
    tmp_path: Path,
) -> None:
    # The handler carried out as a worker does (its rendezvous socket bound), not only imported.
    code = (
        "import os, sys, pagefork.serving.worker, pagefork.takeover.orphan as orphan\n"
        "rv = orphan.prepare(None, {'takeover': sys.argv[1]})\n"
        "assert rv is not None and os.path.exists(rv.path), 'no rendezvous socket'\n"
        "rv.close()\n"
        "heavy = ('numpy', 'pagefork.server', 'pagefork.serving.supervisor', "
        "'pagefork.serving.pageserver', 'pagefork.store.client', 'pagefork.serving.pool', "
        "'subprocess', 'tempfile', 'shutil')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "serve.sock.takeover")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # the socket removed, and no directory left behind
