"""``pagefork serve`` as a user runs it: a real process, signals, JSON lines, exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from conftest import PAGE, needs_uffd
from pagefork.hotpages import HotPage, load


class Serve:
    """A ``pagefork serve`` child process whose stdout JSON lines are collected."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagefork", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, event: str, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len([e for e in self.events if e["event"] == event]) >= count, timeout
            )
        assert ok, f"no {count} {event} events; got {self.events}"
        return [e for e in self.events if e["event"] == event]

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


@needs_uffd
def test_serve_records_a_warmup_fork_then_prefetches_the_next(tmp_path: Path, mem_file, vmms):
    sock = tmp_path / "h.sock"
    hot = tmp_path / "hot.hpl"
    rec = Serve("--mem-file", str(mem_file), "--socket", str(sock), "--record", str(hot))
    rec.wait_for("listening")
    vmm = vmms(str(sock))
    assert vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE], [1, 8 * PAGE]])["bad"] == 0
    vmm.close()
    (end,) = rec.wait_for("fork_end")
    assert end["fork"] == "fork-1" and end["pid"] == vmm.pid and end["faults"] == 3
    assert {
        "pages_copied",
        "zero_pages",
        "removed_bytes",
        "errors",
        "prefetched_pages",
        "misses",
    } <= set(end)
    (saved,) = rec.wait_for("hot_pages_saved")
    assert saved["pages"] == 3
    code, err = rec.stop()
    assert code == 0 and "Traceback" not in err
    assert not sock.exists()
    assert load(hot).snapshot() == [HotPage(0, 0), HotPage(0, PAGE), HotPage(1, 8 * PAGE)]

    sock2 = tmp_path / "p.sock"
    pre = Serve("--mem-file", str(mem_file), "--socket", str(sock2), "--hot-pages", str(hot))
    pre.wait_for("listening")
    vmm = vmms(str(sock2))
    (done,) = pre.wait_for("prefetch_done")
    assert done["pages"] == 3 and done["fork"] == "fork-1" and done["seconds"] >= 0
    assert (
        vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE], [1, 8 * PAGE], [0, 2 * PAGE]])["bad"] == 0
    )
    vmm.close()
    (end,) = pre.wait_for("fork_end")
    assert (end["faults"], end["prefetched_pages"], end["misses"]) == (1, 3, 1)
    assert pre.stop()[0] == 0


def test_serve_missing_mem_file_is_one_line_exit_2(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagefork",
            "serve",
            "--mem-file",
            str(tmp_path / "nope"),
            "--socket",
            str(tmp_path / "s.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_unusable_socket_path_is_one_line_exit_2(tmp_path: Path, mem_file):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagefork",
            "serve",
            "--mem-file",
            str(mem_file),
            "--socket",
            str(tmp_path / "no-such-dir" / "s.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_corrupt_hot_pages_file_is_one_line_exit_2(tmp_path: Path, mem_file):
    bad = tmp_path / "bad.hpl"
    bad.write_bytes(b"HPL1\x05\x00")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagefork",
            "serve",
            "--mem-file",
            str(mem_file),
            "--socket",
            str(tmp_path / "s.sock"),
            "--hot-pages",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "bad.hpl" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.sock").exists()
