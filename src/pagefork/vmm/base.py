"""The one interface every VMM driver implements (Firecracker, the built-in KVM microVM).

A fork's lifecycle, as the daemon runs it: register the fork with the page server (a uffd
socket) → :meth:`VmmDriver.restore` loads the template snapshot with the uffd backend, paused →
the page server prefetches the hot set → :meth:`VmmHandle.resume` → ... → :meth:`VmmHandle.stop`.
"""

from __future__ import annotations

import abc
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
    """

    fork_id: str
    uffd_socket: str
    snapshot_path: str
    mem_file: str
    options: dict[str, Any] = field(default_factory=dict)
    layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class VmmSnapshot:
    """A diff snapshot of a paused fork: ``memory_diff`` is a sparse file as big as guest
    memory (mem-file offsets) with data only at the pages the guest wrote since its restore;
    ``vmstate`` is what a child template's forks restore from (a Firecracker snapshot file,
    or a microVM template directory)."""

    memory_diff: str
    vmstate: str


class VmmHandle(abc.ABC):
    """One restored fork's VMM."""

    fork_id: str

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The VMM's process id, when the driver knows it."""

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

    @abc.abstractmethod
    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> VmmHandle:
        """Load the snapshot with the uffd backend at ``request.uffd_socket``, paused.

        Returns once the VMM has been asked to load; the page server sees the handshake.
        Raises :class:`pagefork.errors.VmmError` with the VMM's own message on failure.
        """
