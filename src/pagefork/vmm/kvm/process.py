"""Start and drive a fork process (``python -m pagefork.vmm.kvm``) from an orchestrator."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from pagefork.errors import VmmError
from pagefork.ksm import merge_preexec

#: Fork processes die with the thread that started them (``PR_SET_PDEATHSIG`` is per thread),
#: so they are all started from this one long-lived thread, not from short-lived request or
#: worker threads.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagefork-fork-spawner")


def _new_spawner_in_child() -> None:
    # A forked child inherits the executor but not its thread: give it a working one.
    global _SPAWNER
    _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagefork-fork-spawner")


os.register_at_fork(after_in_child=_new_spawner_in_child)


class _Process(Protocol):
    """What a :class:`ForkProcess` needs of its process (a :class:`subprocess.Popen`)."""

    pid: int
    stdin: IO[str] | None
    stdout: IO[str] | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def kill(self) -> None: ...


class _AdoptedPopen:
    """A fork process this process did not start, as :class:`ForkProcess` drives one: its
    pipes, and a pidfd to watch and kill it. Only its parent can read its exit status, so
    ``poll`` and ``wait`` return None for it."""

    def __init__(self, pid: int, pidfd: int, stdin: int, stdout: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.stdin: IO[str] | None = open(stdin, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.stdout: IO[str] | None = open(stdout, encoding="utf-8", errors="replace")  # noqa: SIM115

    def _exited(self, timeout: float | None) -> bool:
        if self._pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else int(timeout * 1000)))

    def poll(self) -> int | None:
        """None: running, or exited with a status only its parent can read."""
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit (:class:`subprocess.TimeoutExpired` after ``timeout``);
        its status is unknown (None)."""
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        return None

    def kill(self) -> None:
        """SIGKILL it through the pidfd (so a reused pid is never hit); the pidfd is closed
        once it has exited."""
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            self.wait(10.0)
            os.close(self._pidfd)
            self._pidfd = -1


@dataclass
class ForkResult:
    """One fork's run, with times on the system-wide monotonic clock.

    ``ready_seconds`` is the fork-ready time: from the start of the restore (before the
    handshake) until the guest reported ready, so it includes the handshake, any prefetch done
    before ``go``, and every demand fault of the run.
    """

    fork_index: int
    variant: int
    pid: int
    t_start: float
    t_restored: float
    t_go: float
    t_ready: float
    checksum_ok: bool
    checksums: list[int]
    expected: list[int]
    exits: int
    progress: list[tuple[float, int, int]] = field(default_factory=list)
    #: Touched pages whose bytes differed from the mem-file (checked after ready).
    bad_pages: list[int] = field(default_factory=list)
    guest_checksum_ok: bool = True
    #: The fork's memory at ready, measured by itself (:meth:`pagefork.memstats.ProcessMemory.
    #: to_dict`); empty if it could not tell.
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def pages_ok(self) -> bool:
        """Every page the trace touched held the mem-file's bytes."""
        return not self.bad_pages

    @property
    def ready_seconds(self) -> float:
        """Fork start to guest ready."""
        return self.t_ready - self.t_start

    @property
    def restore_seconds(self) -> float:
        """Fork start until RAM was handed over and the vCPUs restored."""
        return self.t_restored - self.t_start

    @property
    def run_seconds(self) -> float:
        """``go`` to guest ready: the guest's walk, with its demand faults."""
        return self.t_ready - self.t_go


class ForkProcess:
    """A fork of ``template_dir`` in its own process, connected to ``socket_path``.

    ``share_memory`` marks the process mergeable for KSM (``PR_SET_MEMORY_MERGE``) before it
    runs, so forks of one template can share the pages they hold in common."""

    def __init__(
        self,
        template_dir: str,
        socket_path: str | None,
        fork_index: int,
        *,
        wait_go: bool = True,
        snapshots: bool = False,
        memory: Sequence[str] = (),
        outlive_parent: bool = False,
        share_memory: bool = False,
    ) -> None:
        self.fork_index = fork_index
        #: Started with ``--snapshots``: it stays, stopped, after its result until :meth:`close`.
        self.snapshots = snapshots
        cmd = [
            sys.executable,
            "-m",
            "pagefork.vmm.kvm",
            str(template_dir),
            "--fork-index",
            str(fork_index),
        ]
        if socket_path is not None:
            cmd += ["--socket", socket_path]
        if not wait_go:
            cmd.append("--no-wait")
        if snapshots:
            cmd.append("--snapshots")
        if outlive_parent:
            cmd.append("--outlive-parent")
        for path in memory:
            cmd += ["--memory", str(path)]
        proc = _SPAWNER.submit(
            subprocess.Popen,
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            # Opt-in KSM: the flag is set between fork and exec and survives the exec.
            preexec_fn=merge_preexec if share_memory else None,
        ).result()
        self._attach(proc, [], b"")

    @classmethod
    def adopt(
        cls,
        pid: int,
        pidfd: int,
        stdin: int,
        stdout: int,
        fork_index: int,
        *,
        snapshots: bool,
        restored: dict[str, Any] | None,
        events: Sequence[dict[str, Any]] = (),
        partial: bytes = b"",
    ) -> ForkProcess:
        """A fork process another orchestrator started (a live takeover): driven through the
        same pipes (``stdin``, ``stdout``), watched and killed through ``pidfd``; this object
        owns the three fds. ``events`` are lines the other one had read and not taken,
        ``partial`` the start of a line it had read part of (see :meth:`hold_output`)."""
        self = cls.__new__(cls)
        self.fork_index = fork_index
        self.snapshots = snapshots
        self._attach(_AdoptedPopen(pid, pidfd, stdin, stdout), list(events), partial)
        self.restored = restored
        return self

    def _attach(self, proc: _Process, events: list[dict[str, Any]], partial: bytes) -> None:
        self._proc: _Process = proc
        # Events not yet taken, and whether the output ended: several threads may wait for
        # different events of one fork (its result, a snapshot), so each takes only its own.
        self._events = events
        self._ended = False
        self._arrived = threading.Condition()
        self._command_lock = threading.Lock()
        assert self._proc.stdout is not None
        self._stdout = self._proc.stdout.fileno()
        self._partial = partial  # read, but not yet a whole line
        # Written to stop the reader at a line boundary (hold_output), without polling.
        self._hold = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.restored: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        """The fork process's pid."""
        return self._proc.pid

    def pipes(self) -> tuple[int, int]:
        """The fds of the process's stdin and stdout (for a handover; still this object's)."""
        assert self._proc.stdin is not None
        return self._proc.stdin.fileno(), self._stdout

    def hold_output(self, timeout: float = 10.0) -> tuple[list[dict[str, Any]], bytes]:
        """Stop reading the process's output (a handover: its next reader is in another
        process, and a line read here would be lost to it); the lines read and not yet taken,
        and the start of a line read in part. What the process writes meanwhile stays in the
        pipe. :meth:`resume_output` reads on (the handover failed)."""
        if self._reader.is_alive():
            os.eventfd_write(self._hold, 1)
            self._reader.join(timeout)
            if self._reader.is_alive():
                raise VmmError(f"fork {self.fork_index}: its output reader did not stop")
        with self._arrived:
            return [dict(e) for e in self._events], self._partial

    def resume_output(self) -> None:
        """Read the process's output again after :meth:`hold_output`; a no-op otherwise."""
        if self._reader.is_alive() or self._ended:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._hold)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._hold, select.POLLIN)
        poller.register(self._stdout, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._hold in ready:
                return  # held: what is still in the pipe is the next reader's
            try:
                chunk = os.read(self._stdout, 1 << 16)
            except OSError:
                chunk = b""  # closed under us (close()): the output has ended for us
            if not chunk:
                break
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue  # not ours (a stray print); the protocol lines are JSON
                if isinstance(doc, dict):
                    with self._arrived:
                        self._events.append(doc)
                        self._arrived.notify_all()
        with self._arrived:
            self._ended = True
            self._arrived.notify_all()

    def _take(self, want: str, command: str | None) -> dict[str, Any] | None:
        """The first waiting ``want`` event, or an ``error`` event for ``command`` (or for no
        command: the fork failed), removed from the list; None if there is none yet."""
        for i, doc in enumerate(self._events):
            event = doc.get("event")
            if event == want or (event == "error" and doc.get("command") in (None, command)):
                return self._events.pop(i)
        return None

    def _next(self, want: str, timeout: float, command: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                doc = self._take(want, command)
                if doc is not None:
                    break
                left = deadline - time.monotonic()
                if self._ended:
                    code = self._proc.wait()
                    status = "status unknown" if code is None else code
                    raise VmmError(
                        f"fork {self.fork_index}: process exited ({status}) before {want!r}"
                    )
                if left <= 0:
                    raise VmmError(f"fork {self.fork_index}: no {want!r} within {timeout:g}s")
                self._arrived.wait(left)
        if doc.get("event") == "error":
            raise VmmError(f"fork {self.fork_index}: {doc.get('message')}")
        return doc

    def wait_restored(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the fork has handed its RAM to the page server and restored its vCPUs."""
        self.restored = self._next("restored", timeout)
        return self.restored

    def poll(self) -> int | None:
        """The exit status if the process has exited (reaping it), else None."""
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit and return its status (None for an adopted one);
        :class:`subprocess.TimeoutExpired` after ``timeout``."""
        return self._proc.wait(timeout)

    def go(self) -> None:
        """Resume the vCPUs."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()

    def command(self, line: str, want: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send one command of a ``snapshots`` fork and wait for its ``want`` event (its
        ``error`` event raises :class:`VmmError`)."""
        if not self.snapshots:
            raise VmmError(f"fork {self.fork_index}: started without snapshots")
        if "\n" in line:
            raise VmmError(f"fork {self.fork_index}: a command is one line")
        assert self._proc.stdin is not None
        with self._command_lock:  # one command at a time: their answers come in order
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):  # it died, or was closed: _next says how
                pass
            return self._next(want, timeout, command=line)

    def snapshot(self, out_dir: str, timeout: float = 60.0) -> dict[str, Any]:
        """A diff snapshot of the stopped guest into directory ``out_dir`` (which exists):
        ``memory_diff`` and ``vmstate`` paths and ``dirty_pages``."""
        return self.command(f"snapshot {out_dir}", "snapshot", timeout)

    def own_checksums(self, fork_index: int, timeout: float = 60.0) -> list[int]:
        """The checksums a fork of ``fork_index`` would walk over this stopped fork's memory as
        it is now: what every branch of a snapshot of it taken now must report."""
        doc = self.command(f"checksums {fork_index}", "checksums", timeout)
        return [int(c) for c in doc["checksums"]]

    def wait_result(self, timeout: float = 60.0) -> ForkResult:
        """Wait for the guest to finish; the fork process exits after reporting (one started
        with ``snapshots`` stays, stopped, for commands)."""
        doc = self._next("result", timeout)
        restored = self.restored or {}
        try:
            if not self.snapshots:
                self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmmError(
                f"fork {self.fork_index}: reported its result but did not exit within {timeout:g}s"
            ) from None
        return ForkResult(
            fork_index=self.fork_index,
            variant=int(restored.get("variant", -1)),
            pid=self.pid,
            t_start=float(restored.get("t_start", doc["t_go"])),
            t_restored=float(restored.get("t_restored", doc["t_go"])),
            t_go=float(doc["t_go"]),
            t_ready=float(doc["t_ready"]),
            checksum_ok=bool(doc["checksum_ok"]),
            checksums=[int(c) for c in doc["checksums"]],
            expected=[int(c) for c in doc["expected"]],
            exits=int(doc["exits"]),
            progress=[(float(t), int(v), int(p)) for t, v, p in doc["progress"]],
            bad_pages=[int(p) for p in doc.get("bad_pages", [])],
            guest_checksum_ok=bool(doc.get("guest_checksum_ok", doc["checksum_ok"])),
            memory=dict(doc.get("memory") or {}),
        )

    def close(self) -> None:
        """Stop the process if it still runs and reap it; idempotent."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        # Stop the reader before its fd is closed (a reused fd number must not be read).
        if self._hold >= 0 and self._reader.is_alive():
            os.eventfd_write(self._hold, 1)
            self._reader.join()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        if self._hold >= 0:
            os.close(self._hold)
            self._hold = -1
