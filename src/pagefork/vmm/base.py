"""The one interface every VMM driver implements (Firecracker, the built-in KVM microVM).

A fork's lifecycle, as the daemon runs it: :meth:`VmmDriver.check_options` before anything
starts → register the fork with the page server (a uffd socket) → :meth:`VmmDriver.restore`
loads the template snapshot with the uffd backend, paused → the page server prefetches the hot
set → :meth:`VmmHandle.resume` → ... → :meth:`VmmHandle.stop`. Meanwhile the daemon watches
:attr:`VmmHandle.pidfd` to learn of the VMM's exit, and reads :meth:`VmmHandle.exit_status`.

A live takeover moves a running VMM to another daemon: :meth:`VmmHandle.handover` says what
goes with it (JSON state and named fds), and the new daemon's driver rebuilds a handle from
that with :meth:`VmmDriver.adopt`. An adopted handle hands over again the same way, so a VMM
survives any number of takeovers. Everything here has a default, so a driver implements only
what it can do.
"""

from __future__ import annotations

import abc
import contextlib
import os
import select
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pagefork.errors import VmmError


@dataclass(frozen=True)
class RestoreRequest:
    """What a driver needs to restore one fork.

    ``snapshot_path`` is the template's VM state (Firecracker's snapshot file, or the
    microVM's template directory); ``uffd_socket`` the page server's socket for this fork;
    ``options`` holds driver-specific settings (e.g. Firecracker's API socket path);
    ``layers`` the template's layers over ``mem_file``, bottom first (a child template; the
    page server serves them, a driver only needs them to check what the guest reads).
    ``share_memory`` asks the driver to mark the VMM mergeable for KSM
    (``PR_SET_MEMORY_MERGE``, :mod:`pagefork.ksm`) before it runs.
    """

    fork_id: str
    uffd_socket: str
    snapshot_path: str
    mem_file: str
    options: dict[str, Any] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    share_memory: bool = False


@dataclass(frozen=True)
class VmmSnapshot:
    """A diff snapshot of a paused fork: ``memory_diff`` is a sparse file as big as guest
    memory (mem-file offsets) with data only at the pages the guest wrote since its restore;
    ``vmstate`` is what a child template's forks restore from (a Firecracker snapshot file,
    or a microVM template directory)."""

    memory_diff: str
    vmstate: str


@dataclass(frozen=True)
class VmmHandover:
    """What moves with one fork's VMM in a live takeover.

    ``state`` is JSON (the peer may run another pagefork version); ``fds`` names the file
    descriptors that go with it (a pidfd, the pipes a VMM is driven through). They stay the
    handle's: the takeover sends copies, and the old daemon's are closed when it exits.
    """

    state: dict[str, Any] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)


class VmmHandle(abc.ABC):
    """One restored fork's VMM."""

    fork_id: str

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The VMM's process id, when the driver knows it."""

    @property
    def pidfd(self) -> int | None:
        """A pidfd of the VMM process, readable once it has exited; None when the driver has
        none (the daemon then cannot tell that it exited) or after :meth:`stop`."""
        return None

    def exit_status(self) -> int | None:
        """The VMM's exit status once it has exited, reaping it (negative: the signal that
        killed it); None while it runs, or when only another process can read it."""
        return None

    @property
    def stays_after_run(self) -> bool:
        """True when the VMM stays after its guest's work is done (kept for snapshots): the
        daemon then does not wait for its session to end."""
        return False

    def handover(self) -> VmmHandover:
        """What a live takeover sends so that the new daemon's :meth:`VmmDriver.adopt`
        rebuilds this handle: by default its pid and pidfd."""
        fds = {"pidfd": self.pidfd} if self.pidfd is not None else {}
        return VmmHandover(state={"pid": self.pid}, fds=fds)

    def handover_cancelled(self) -> None:
        """The takeover that :meth:`handover` was for failed: this daemon drives the VMM on
        (undo what :meth:`handover` paused). By default nothing to undo."""
        return None

    @abc.abstractmethod
    def resume(self) -> None:
        """Start the vCPUs (Firecracker: ``PATCH /vm {"state": "Resumed"}``)."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> dict[str, Any]:
        """Wait until the guest has done its work, when the driver can tell; a summary."""

    def snapshot(self, out_dir: str, timeout: float) -> VmmSnapshot:
        """Pause the VM and write a diff snapshot into the existing directory ``out_dir``.
        The VM stays paused; :meth:`resume` runs it again. Drivers that cannot raise
        :class:`~pagefork.errors.VmmError`."""
        raise VmmError(f"fork {self.fork_id}: this VMM cannot take snapshots")

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the VMM and release what the driver holds for it; idempotent."""


class VmmDriver(abc.ABC):
    """Restores forks of a template into some VMM, memory served over userfaultfd."""

    name: str

    def check_options(self, options: Mapping[str, Any], fork_id: str | None = None) -> None:
        """Validate restore options without side effects (the daemon calls this before it
        registers a fork, with its id: what the options make of that id is checked too);
        :class:`~pagefork.errors.VmmError` naming the bad option. By default every option is
        accepted."""
        return None

    def adopt(self, fork_id: str, handover: VmmHandover) -> VmmHandle:
        """A handle for a VMM another daemon restored, from what its :meth:`VmmHandle.handover`
        sent. The fds in ``handover`` are borrowed: the handle duplicates those it keeps.

        By default the VMM is only watched and stopped through its pidfd
        (:class:`AdoptedProcess`): a driver that can do more overrides this."""
        return AdoptedProcess.from_handover(fork_id, handover)

    def close(self) -> None:
        """Release what the driver holds beyond its forks (the daemon's end); idempotent."""
        return None

    @abc.abstractmethod
    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> VmmHandle:
        """Load the snapshot with the uffd backend at ``request.uffd_socket``, paused.

        Returns once the VMM has been asked to load; the page server sees the handshake.
        Raises :class:`pagefork.errors.VmmError` with the VMM's own message on failure.
        """


def _state_pid(handover: VmmHandover) -> int | None:
    pid = handover.state.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def _dup(handover: VmmHandover, name: str) -> int | None:
    fd = handover.fds.get(name)
    return os.dup(fd) if fd is not None and fd >= 0 else None


class AdoptedProcess(VmmHandle):
    """A VMM adopted in a takeover by a driver that cannot drive it further (or one the new
    daemon does not have): watched and stopped through its pidfd only. It is not this
    daemon's child, so its exit status is unknown."""

    def __init__(self, fork_id: str, pid: int | None, pidfd: int | None) -> None:
        self.fork_id = fork_id
        self._pid = pid
        self._pidfd = pidfd

    @classmethod
    def from_handover(cls, fork_id: str, handover: VmmHandover) -> AdoptedProcess:
        """Adopt what :meth:`VmmHandle.handover` sent (its pidfd duplicated)."""
        return cls(fork_id, _state_pid(handover), _dup(handover, "pidfd"))

    @property
    def pid(self) -> int | None:
        """The VMM's pid."""
        return self._pid

    @property
    def pidfd(self) -> int | None:
        """A pidfd of the VMM; None after :meth:`stop`."""
        return self._pidfd

    def resume(self) -> None:
        """Cannot be resumed: the driver that could is not driving it."""
        raise VmmError(f"fork {self.fork_id}: a VMM adopted in a takeover cannot be resumed")

    def wait(self, timeout: float) -> dict[str, Any]:
        """Nothing to wait for: its pid."""
        return {"fork_id": self.fork_id, "pid": self._pid}

    def stop(self) -> None:
        """SIGKILL the VMM through its pidfd and wait (bounded) for it to go; idempotent."""
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is None:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll(10_000)
        finally:
            os.close(pidfd)


__all__ = [
    "AdoptedProcess",
    "RestoreRequest",
    "VmmDriver",
    "VmmHandle",
    "VmmHandover",
    "VmmSnapshot",
]
