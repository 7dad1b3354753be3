"""One vCPU: its fd, its ``struct kvm_run`` page, register access and the ``KVM_RUN`` loop."""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import TYPE_CHECKING

from pagefork import libc
from pagefork.errors import VmmError
from pagefork.vmm.kvm import ioctls

if TYPE_CHECKING:
    from pagefork.vmm.kvm.devices import PortIoBus

#: Why :meth:`Vcpu.run` returned.
EXIT_HALT = "hlt"
EXIT_DEVICE = "device"


class Vcpu:
    """A KVM vCPU. :meth:`run` blocks in ``KVM_RUN`` with the GIL released."""

    def __init__(self, index: int, fd: int, run_size: int) -> None:
        self.index = index
        self.fd = fd
        self._run_size = run_size
        # libc mmap + from_address, not Python's mmap + from_buffer: a buffer export kept alive
        # by a traceback's frames would make close() fail and hide the vCPU's real error.
        try:
            self._base = libc.mmap(run_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd)
        except OSError as exc:
            os.close(fd)
            self.fd = -1
            raise VmmError(f"vCPU {index}: cannot map kvm_run: {exc.strerror}") from None
        self._run = ioctls.kvm_run.from_address(self._base)
        #: Exits handled by :meth:`run` so far (device round trips cost a userspace switch).
        self.exits = 0

    def get_regs(self) -> ioctls.kvm_regs:
        """``KVM_GET_REGS``."""
        regs = ioctls.kvm_regs()
        ioctls.kvm_ioctl(self.fd, ioctls.KVM_GET_REGS, regs, what="GET_REGS")
        return regs

    def set_regs(self, regs: ioctls.kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        ioctls.kvm_ioctl(self.fd, ioctls.KVM_SET_REGS, regs, what="SET_REGS")

    def get_sregs(self) -> ioctls.kvm_sregs:
        """``KVM_GET_SREGS``."""
        sregs = ioctls.kvm_sregs()
        ioctls.kvm_ioctl(self.fd, ioctls.KVM_GET_SREGS, sregs, what="GET_SREGS")
        return sregs

    def set_sregs(self, sregs: ioctls.kvm_sregs) -> None:
        """``KVM_SET_SREGS``."""
        ioctls.kvm_ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs, what="SET_SREGS")

    def run(self, bus: PortIoBus) -> str:
        """Run until the guest halts (:data:`EXIT_HALT`) or a device stops it
        (:data:`EXIT_DEVICE`). Any other exit is a :class:`VmmError` that says where."""
        if self.fd < 0:
            raise VmmError(f"vCPU {self.index}: run() after close()")
        run = self._run
        while True:
            ioctls.kvm_ioctl(self.fd, ioctls.KVM_RUN, what="RUN")
            self.exits += 1
            reason = run.exit_reason
            if reason == ioctls.KVM_EXIT_IO:
                io = run.exit.io
                size = io.size
                addr = self._base + io.data_offset
                # A `rep ins/outs` carries count > 1 items; the guest program uses none.
                if io.direction == ioctls.KVM_EXIT_IO_OUT:
                    value = int.from_bytes(ctypes.string_at(addr, size), "little")
                    if bus.io_out(self.index, io.port, size, value):
                        return EXIT_DEVICE
                else:
                    value = bus.io_in(self.index, io.port, size)
                    ctypes.memmove(addr, value.to_bytes(size, "little"), size)
                continue
            if reason == ioctls.KVM_EXIT_HLT:
                return EXIT_HALT
            if reason == ioctls.KVM_EXIT_INTR:
                continue
            raise VmmError(self._describe_exit(reason))

    def _describe_exit(self, reason: int) -> str:
        name = ioctls.EXIT_REASON_NAMES.get(reason, str(reason))
        where = ""
        try:
            where = f" at rip {self.get_regs().rip:#x}"
        except VmmError:
            pass
        detail = ""
        if reason == ioctls.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {self._run.exit.internal.suberror})"
        elif reason == ioctls.KVM_EXIT_FAIL_ENTRY:
            detail = (
                f" (hardware reason {self._run.exit.fail_entry.hardware_entry_failure_reason:#x})"
            )
        elif reason == ioctls.KVM_EXIT_MMIO:
            detail = f" (guest touched {self._run.exit.mmio.phys_addr:#x}: outside guest memory)"
        return f"vCPU {self.index}: unexpected exit {name}{detail}{where}"

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd; idempotent."""
        if self.fd >= 0:
            libc.munmap(self._base, self._run_size)
            os.close(self.fd)
            self.fd = -1
