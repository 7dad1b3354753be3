"""The built-in microVM behind the :class:`~pagefork.vmm.base.VmmDriver` interface.

Each fork runs in its own process (:class:`~pagefork.vmm.kvm.process.ForkProcess`): restore
hands its RAM to the page server and restores the vCPUs, paused, exactly where Firecracker's
``PUT /snapshot/load`` with ``resume_vm: false`` leaves a VM; ``go`` is its ``PATCH /vm
Resumed``.

The fork process exits by itself once its guest has reported. A handle holds a pidfd of it
(opened while the process cannot yet have been reaped, so it names this process and no other):
whoever watches it learns of the exit without polling, and :meth:`KvmHandle.exit_status` then
reaps the process, so no zombie is left however long the fork stays registered.

In a live takeover the handle hands over its pidfd, its two pipes and where it stands (resumed,
paused by a snapshot, lines read and not yet taken); :meth:`KvmDriver.adopt` builds the same
kind of handle from them in the new daemon, which can hand it over again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from pagefork.errors import VmmError
from pagefork.vmm.base import RestoreRequest, VmmDriver, VmmHandle, VmmHandover, VmmSnapshot
from pagefork.vmm.kvm.process import ForkProcess
from pagefork.vmm.kvm.template import MEM_FILE


class KvmHandle(VmmHandle):
    """One microVM fork process, restored and waiting for :meth:`resume`."""

    def __init__(
        self,
        fork_id: str,
        process: ForkProcess,
        *,
        pidfd: int | None = None,
        resumed: bool = False,
        paused_by_snapshot: bool = False,
    ) -> None:
        self.fork_id = fork_id
        self.process = process
        self._resumed = resumed
        self._paused_by_snapshot = paused_by_snapshot
        self._pidfd: int | None = pidfd
        if pidfd is None:
            # Only this handle's process reaps the pid, and it has not yet: the pidfd is its.
            with contextlib.suppress(OSError):  # no pidfd: the fork is simply not watched
                self._pidfd = os.pidfd_open(process.pid)

    @property
    def pidfd(self) -> int | None:
        """A pidfd of the fork process (readable once it has exited); None after :meth:`stop`."""
        return self._pidfd

    def exit_status(self) -> int | None:
        """The process's exit status once it has exited, reaping it (negative: the signal
        that killed it); None while it runs."""
        status = None
        reaped_elsewhere = False
        pidfd = self._pidfd
        if pidfd is not None:
            # Read without reaping first: a concurrent wait() may be reaping it right now.
            try:
                info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                reaped_elsewhere = True  # that wait() was quicker: it has the status
            except OSError:
                info = None
            else:
                if info is not None:
                    exited = info.si_code == os.CLD_EXITED
                    status = info.si_status if exited else -info.si_status
        code = self.process.poll()  # reaps it (unless that concurrent wait() does)
        if code is None and status is None and reaped_elsewhere:
            # poll() gives None while another thread's wait() holds the process: that wait
            # has reaped it already, so this one returns at once with its status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(timeout=5)
        return code if code is not None else status

    @property
    def stays_after_run(self) -> bool:
        """Restored with ``snapshots``: the process stays, stopped, after its guest's walk
        (for snapshots) until :meth:`stop`; otherwise it exits by itself."""
        return self.process.snapshots

    @property
    def pid(self) -> int | None:
        """The fork process's pid."""
        return self.process.pid

    def handover(self) -> VmmHandover:
        """Its pidfd and pipes, and where it stands: what :meth:`KvmDriver.adopt` needs."""
        events, partial = self.process.hold_output()  # the next daemon reads on
        stdin, stdout = self.process.pipes()
        fds = {"stdin": stdin, "stdout": stdout}
        if self._pidfd is not None:
            fds["pidfd"] = self._pidfd
        state = {
            "pid": self.process.pid,
            "fork_index": self.process.fork_index,
            "snapshots": self.process.snapshots,
            "resumed": self._resumed,
            "paused_by_snapshot": self._paused_by_snapshot,
            "restored": self.process.restored,
            "events": events,
            "partial": partial.decode("latin-1"),
        }
        return VmmHandover(state=state, fds=fds)

    def handover_cancelled(self) -> None:
        """The takeover failed: read the process's output here again."""
        self.process.resume_output()

    def resume(self) -> None:
        """Start the vCPUs: the guest walks to its halt. After a snapshot of the halted guest
        it walks again, as a VM goes on after a snapshot (its memory changes again: the next
        snapshot has new writes). Otherwise a no-op once resumed."""
        again = self._resumed and self._paused_by_snapshot
        self._paused_by_snapshot = False
        if self._resumed and not again:
            return
        self._resumed = True
        self.process.go()

    def snapshot(self, out_dir: str, timeout: float) -> VmmSnapshot:
        """A diff snapshot from KVM's dirty log into ``out_dir``, which becomes a microVM
        template directory (vmstate, trace metadata) plus ``memory.diff``.

        The microVM's vCPUs stop only at the guest's halt (its walk done): a snapshot asked for
        while the guest still walks is taken at that halt, within ``timeout``. The fork must
        have been restored with the ``snapshots`` option."""
        if not self.process.snapshots:
            raise VmmError(
                f"fork {self.fork_id}: restored without the 'snapshots' option: KVM logged no "
                "dirty pages"
            )
        doc = self.process.snapshot(out_dir, timeout=timeout)
        self._paused_by_snapshot = True
        return VmmSnapshot(memory_diff=str(doc["memory_diff"]), vmstate=out_dir)

    def wait(self, timeout: float) -> dict[str, Any]:
        """Wait for the guest to report ready; its figures and whether its checksums match.

        Raises :class:`VmmError` if the guest does not finish within ``timeout`` or the
        process fails.
        """
        if not self._resumed:
            raise VmmError(f"fork {self.fork_id}: wait() before resume()")
        result = self.process.wait_result(timeout=timeout)
        return {
            "fork_id": self.fork_id,
            "pid": result.pid,
            "fork_index": result.fork_index,
            "variant": result.variant,
            "checksum_ok": result.checksum_ok,
            "checksums": result.checksums,
            "pages_ok": result.pages_ok,
            "ready_seconds": result.ready_seconds,
            "restore_seconds": result.restore_seconds,
            "run_seconds": result.run_seconds,
            "exits": result.exits,
        }

    def stop(self) -> None:
        """Kill the fork process if it still runs and reap it; idempotent."""
        self.process.close()
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)


class KvmDriver(VmmDriver):
    """Restores forks of a built-in microVM template (``request.snapshot_path`` is the
    template directory; ``options["fork_index"]`` picks the trace variant, default 0;
    ``options["snapshots"]`` true has KVM log the guest's writes, for :meth:`KvmHandle.snapshot`,
    and keeps the fork process, stopped, after its guest's walk until the fork is stopped)."""

    name = "kvm"

    def check_options(self, options: Mapping[str, Any], fork_id: str | None = None) -> None:
        """Validate restore options (``fork_index``, ``snapshots``) without side effects."""
        known = ("fork_index", "snapshots")
        for key in options:
            if key not in known:
                raise VmmError(f"option {key!r} is unknown (known: {', '.join(known)})")
        fork_index = options.get("fork_index", 0)
        if isinstance(fork_index, bool) or not isinstance(fork_index, int) or fork_index < 0:
            raise VmmError(f"option 'fork_index' must be an integer >= 0, not {fork_index!r}")
        snapshots = options.get("snapshots", False)
        if not isinstance(snapshots, bool):
            raise VmmError(f"option 'snapshots' must be true or false, not {snapshots!r}")

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> KvmHandle:
        """Start the fork process against ``request.uffd_socket`` and wait until it has handed
        its RAM over and restored its vCPUs."""
        try:
            self.check_options(request.options)
        except VmmError as exc:
            raise VmmError(f"fork {request.fork_id}: {exc}") from None
        fork_index = int(request.options.get("fork_index", 0))
        snapshots = request.options.get("snapshots", False) is True
        # A child template's directory holds no mem-file: its memory is the base and layers
        # (or, once flattened, a mem-file elsewhere in the template's directory).
        own = os.path.join(request.snapshot_path, MEM_FILE)
        elsewhere = bool(request.mem_file) and os.path.abspath(request.mem_file) != (
            os.path.abspath(own)
        )
        memory = (request.mem_file, *request.layers) if request.layers or elsewhere else ()
        process = ForkProcess(
            request.snapshot_path,
            request.uffd_socket,
            fork_index,
            snapshots=snapshots,
            memory=memory,
            # A daemon's fork may be handed to its successor in a live takeover: it must not
            # die with this process. It still exits once its page server and every holder of
            # its stdin are gone (see pagefork.vmm.kvm.__main__).
            outlive_parent=True,
            share_memory=request.share_memory,
        )
        try:
            process.wait_restored(timeout=timeout)
            return KvmHandle(request.fork_id, process)
        except BaseException:
            process.close()
            raise

    def adopt(self, fork_id: str, handover: VmmHandover) -> KvmHandle:
        """The fork process another daemon started, from its :meth:`KvmHandle.handover`:
        driven through the same pipes (duplicated here), so it is resumed, waited for and
        snapshotted as before, and hands over again the same way."""
        state, fds = handover.state, handover.fds
        missing = [name for name in ("pidfd", "stdin", "stdout") if fds.get(name, -1) < 0]
        pid = state.get("pid")
        if missing or not isinstance(pid, int):
            raise VmmError(
                f"fork {fork_id}: a microVM handover needs its pid, pidfd, stdin and stdout "
                f"(missing: {', '.join(missing) or 'pid'})"
            )
        restored = state.get("restored")
        events = [e for e in state.get("events") or () if isinstance(e, dict)]
        partial = str(state.get("partial") or "").encode("latin-1", "replace")
        kept: list[int] = []
        try:
            for name in ("pidfd", "stdin", "stdout"):
                kept.append(os.dup(fds[name]))
            pidfd = os.dup(kept[0])  # the handle's own: the process object closes its one
            kept.append(pidfd)
        except OSError as exc:
            for fd in kept:
                os.close(fd)
            raise VmmError(f"fork {fork_id}: cannot keep its handed-over fds: {exc}") from None
        process = ForkProcess.adopt(
            pid, kept[0], kept[1], kept[2], int(state.get("fork_index", 0)),
            snapshots=bool(state.get("snapshots")),
            restored=restored if isinstance(restored, dict) else None, events=events,
            partial=partial,
        )  # fmt: skip
        return KvmHandle(
            fork_id, process, pidfd=pidfd, resumed=bool(state.get("resumed")),
            paused_by_snapshot=bool(state.get("paused_by_snapshot")),
        )  # fmt: skip
