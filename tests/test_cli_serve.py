"""``pagefork serve`` as a user runs it: a real process, signals, JSON lines, exit codes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from procs import PAGEFORK

from conftest import PAGE, needs_uffd
from pagefork.errors import PageforkError
from pagefork.hotpages import HotPage, load
from pagefork.server import PageServer, ServerConfig


class Serve:
    """A ``pagefork serve`` child process whose stdout JSON lines are collected."""

    def __init__(self, *args: str, command: tuple[str, ...] = tuple(PAGEFORK)) -> None:
        self.proc = subprocess.Popen(
            [*command, "serve", *args],
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
    assert load(hot).sorted_pages() == [HotPage(0, 0), HotPage(0, PAGE), HotPage(1, 8 * PAGE)]

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


# --- bad input is refused at start, as one line ----------------------------------------------


def run_serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``pagefork serve ARGS`` to completion; the timeout fails a serve that blocks."""
    return subprocess.run(
        [sys.executable, "-m", "pagefork", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_exit_2(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"pagefork: error: {message}\n"


def test_serve_refuses_a_fifo_mem_file_without_blocking_in_open(tmp_path: Path) -> None:
    # No writer ever opens this FIFO: an open() for reading would block for good, and the
    # run's timeout would fail the test.
    fifo = tmp_path / "mem"
    os.mkfifo(fifo)
    proc = run_serve("--mem-file", str(fifo), "--socket", str(tmp_path / "s.sock"))
    assert_one_line_exit_2(proc, f"mem-file {fifo}: cannot read: Is a FIFO, not a regular file")
    assert not (tmp_path / "s.sock").exists()


def test_serve_refuses_dev_zero_as_hot_pages(tmp_path: Path, mem_file: Path) -> None:
    proc = run_serve(
        "--mem-file",
        str(mem_file),
        "--socket",
        str(tmp_path / "s.sock"),
        "--hot-pages",
        "/dev/zero",
    )
    assert_one_line_exit_2(
        proc, "hot-page file /dev/zero: cannot read: Is a character device, not a regular file"
    )


@pytest.mark.parametrize("value", ["3e6", "3600.5", "0", "-1", "nan", "inf"])
def test_serve_refuses_a_handshake_timeout_outside_0_to_an_hour(
    tmp_path: Path, mem_file: Path, value: str
) -> None:
    proc = run_serve(
        "--mem-file",
        str(mem_file),
        "--socket",
        str(tmp_path / "s.sock"),
        f"--handshake-timeout={value}",
    )
    assert_one_line_exit_2(
        proc,
        f"--handshake-timeout must be more than 0 and at most 3600 seconds, not {float(value):g}",
    )


def test_the_library_refuses_the_same_handshake_timeouts(mem_file: Path) -> None:
    with pytest.raises(PageforkError, match=r"^handshake_timeout must be at most 3600 seconds"):
        PageServer(ServerConfig(mem_file_path=str(mem_file), handshake_timeout=3e6))
    with PageServer(ServerConfig(mem_file_path=str(mem_file), handshake_timeout=3600)):
        pass


def _fifo(p: Path) -> str:
    os.mkfifo(p)
    return "Is a FIFO, not a regular file; left untouched"


def _device(p: Path) -> str:
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers, in tmp_path
    return "Is a character device, not a regular file; left untouched"


def _symlink(p: Path) -> str:
    (p.parent / "victim").write_bytes(b"keep")
    p.symlink_to(p.parent / "victim")
    return f"Is a symbolic link (to {p.parent / 'victim'}), not a regular file; left untouched"


def _directory(p: Path) -> str:
    p.mkdir()
    return "Is a directory, not a regular file; left untouched"


@pytest.mark.parametrize("make", [_fifo, _device, _symlink, _directory])
def test_serve_refuses_a_record_target_that_is_not_a_regular_file(
    tmp_path: Path, mem_file: Path, make: Any
) -> None:
    out = tmp_path / "hot.hpl"
    why = make(out)
    before = os.lstat(out)
    proc = run_serve(
        "--mem-file", str(mem_file), "--socket", str(tmp_path / "s.sock"), "--record", str(out)
    )
    assert_one_line_exit_2(proc, f"--record {out}: cannot write: {why}")
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    if (tmp_path / "victim").exists():
        assert (tmp_path / "victim").read_bytes() == b"keep"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            "nodir/hot.hpl",
            "--record {tmp}/nodir/hot.hpl: cannot write: directory {tmp}/nodir does not exist",
        ),
        (
            "d-{fork}/hot.hpl",
            "--record {tmp}/d-{{fork}}/hot.hpl: {{fork}} may only appear in the file name",
        ),
        ("mem", "--record {tmp}/mem is the mem-file itself"),
    ],
)
def test_serve_checks_the_record_path_at_start(
    tmp_path: Path, mem_file: Path, record: str, message: str
) -> None:
    mem_before = mem_file.read_bytes()
    proc = run_serve(
        "--mem-file",
        str(mem_file),
        "--socket",
        str(tmp_path / "s.sock"),
        "--record",
        str(tmp_path / record),
    )
    assert_one_line_exit_2(proc, message.format(tmp=tmp_path).replace("{{", "{").replace("}}", "}"))
    assert mem_file.read_bytes() == mem_before


# --- stopping ----------------------------------------------------------------------------------


def signal_masks(pid: int) -> tuple[int, int]:
    """(ignored, caught) signal masks of process ``pid``, from /proc."""
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["SigIgn"], 16), int(fields["SigCgt"], 16)


def hup_bit() -> int:
    return 1 << (signal.SIGHUP - 1)


def test_sighup_stops_serve_cleanly_and_removes_the_socket(tmp_path: Path, mem_file: Path) -> None:
    sock = tmp_path / "s.sock"
    serve = Serve("--mem-file", str(mem_file), "--socket", str(sock))
    serve.wait_for("listening")
    assert sock.exists()
    serve.proc.send_signal(signal.SIGHUP)
    assert serve.proc.wait(15) == 0
    assert serve.proc.stderr is not None
    assert "Traceback" not in serve.proc.stderr.read()
    assert not sock.exists()


def test_serve_under_nohup_keeps_sighup_ignored(tmp_path: Path, mem_file: Path) -> None:
    normal = Serve("--mem-file", str(mem_file), "--socket", str(tmp_path / "a.sock"))
    normal.wait_for("listening")
    ignored, caught = signal_masks(normal.proc.pid)
    assert caught & hup_bit() and not ignored & hup_bit()
    assert normal.stop()[0] == 0

    # Under the real nohup, which starts it with SIGHUP ignored.
    nohup = Serve(
        "--mem-file",
        str(mem_file),
        "--socket",
        str(tmp_path / "b.sock"),
        command=("nohup", sys.executable, "-m", "pagefork"),
    )
    nohup.wait_for("listening")
    ignored, caught = signal_masks(nohup.proc.pid)
    assert ignored & hup_bit() and not caught & hup_bit()
    assert nohup.stop()[0] == 0


def test_serve_stops_quietly_when_the_reader_of_stdout_goes_away(
    tmp_path: Path, mem_file: Path
) -> None:
    # As in `pagefork serve ... | head -1`: the reader takes the first line and exits.
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pagefork",
            "serve",
            "--mem-file",
            str(mem_file),
            "--socket",
            str(sock),
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["event"] == "listening"
    proc.stdout.close()
    assert proc.wait(15) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    assert "stdout closed by its reader: shutting down" in err
    assert not sock.exists()


@needs_uffd
def test_a_record_target_swapped_for_a_fifo_after_start_is_left_untouched(
    tmp_path: Path, mem_file: Path, vmms: Any
) -> None:
    # Checked at start, and again at save: a FIFO put there meanwhile is refused, not replaced,
    # and the server keeps serving.
    sock = tmp_path / "s.sock"
    out = tmp_path / "hot.hpl"
    serve = Serve("--mem-file", str(mem_file), "--socket", str(sock), "--record", str(out))
    serve.wait_for("listening")
    os.mkfifo(out)
    vmm = vmms(str(sock))
    assert vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
    vmm.close()
    (end,) = serve.wait_for("fork_end")
    assert end["faults"] == 2
    code, err = serve.stop()
    assert code == 0
    assert not [e for e in serve.events if e["event"] == "hot_pages_saved"]
    assert stat.S_ISFIFO(os.lstat(out).st_mode)
    assert (
        f"hot-page file {out}: cannot write: Is a FIFO, not a regular file; left untouched" in err
    )
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["hot.hpl", "mem"]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("PPid:")).split()[1])


@needs_uffd
def test_serve_names_its_workers_and_replaces_one_killed_mid_run(tmp_path: Path, mem_file, vmms):
    sock = tmp_path / "h.sock"
    serve = Serve("--mem-file", str(mem_file), "--socket", str(sock), "--workers", "2")
    [listening] = serve.wait_for("listening")
    pids = listening["worker_pids"]
    assert len(pids) == 2 and {_parent(p) for p in pids} == {serve.proc.pid}
    vmm = vmms(str(sock))
    assert vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])["bad"] == 0
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    events = serve.wait_for("worker_restarted", count=2)
    assert sorted(e["old_pid"] for e in events) == sorted(pids)
    assert sum(e["forks"] for e in events) == 1  # the one fork moved with its worker
    assert {_parent(e["pid"]) for e in events} == {serve.proc.pid}
    reply = vmm.send(cmd="touch", all=True)
    assert reply["bad"] == 0 and reply["touched"] == 3072
    vmm.close()
    [end] = serve.wait_for("fork_end")
    assert end["faults"] == 3072 and end["errors"] == 0 and end["state"] == "ended"
    code, err = serve.stop()
    assert code == 0 and "Traceback" not in err


def test_serve_refuses_a_bad_worker_count(tmp_path: Path, mem_file) -> None:
    for bad in ("0", "-2", "lots", "100000"):
        proc = subprocess.run(
            [
                *PAGEFORK,
                "serve",
                "--mem-file",
                str(mem_file),
                "--socket",
                str(tmp_path / "s"),
                "--workers",
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2 and "--workers" in proc.stderr
        assert "Traceback" not in proc.stderr


@needs_uffd
def test_serve_prefetches_later_forks_from_the_warmup_it_just_recorded(
    tmp_path: Path, mem_file, vmms
):
    sock = tmp_path / "h.sock"
    hot = tmp_path / "hot.hpl"
    serve = Serve(
        "--mem-file",
        str(mem_file),
        "--socket",
        str(sock),
        "--record",
        str(hot),
        "--record-max-pages",
        "3",
    )
    serve.wait_for("listening")
    warm = vmms(str(sock))
    pages = [[0, 0], [0, PAGE], [1, 8 * PAGE]]
    assert warm.send(cmd="touch", pages=pages)["bad"] == 0  # fills the 3-page window
    (saved,) = serve.wait_for("hot_pages_saved")
    assert saved["fork"] == "fork-1" and saved["pages"] == 3
    later = vmms(str(sock))
    (done,) = serve.wait_for("prefetch_done")
    assert done["fork"] == "fork-2" and done["pages"] == 3  # from the fresh recording
    assert later.send(cmd="touch", pages=pages)["bad"] == 0
    later.close()
    warm.close()
    ends = {e["fork"]: e for e in serve.wait_for("fork_end", count=2)}
    assert ends["fork-2"]["faults"] == 0 and ends["fork-2"]["prefetched_pages"] == 3
    assert len(serve.wait_for("hot_pages_saved")) == 1  # only the warm-up records
    code, err = serve.stop()
    assert code == 0 and "Traceback" not in err
