"""The KVM system and VM file descriptors: open ``/dev/kvm``, create a VM, add memory slots.

Thin wrappers over :mod:`.ioctls`; a Linux guest later adds ``KVM_CREATE_IRQCHIP`` and
``KVM_CREATE_PIT2`` here, beside the slots.
"""

from __future__ import annotations

import ctypes
import os
from types import TracebackType

from pagefork.errors import VmmError
from pagefork.regions import PAGE_SIZE
from pagefork.vmm.kvm import ioctls
from pagefork.vmm.kvm.vcpu import Vcpu

KVM_DEVICE = "/dev/kvm"
#: Three pages KVM needs for its real-mode TSS on Intel; placed far above any guest RAM.
TSS_ADDR = 0xFFFBD000
#: Bytes KVM reserves at :data:`TSS_ADDR`; no guest RAM may overlap them.
TSS_SIZE = 3 * 4096


def kvm_available(path: str = KVM_DEVICE) -> str | None:
    """None when ``path`` can be opened read-write, else a one-line reason it cannot."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    os.close(fd)
    return None


class VirtualMachine:
    """One KVM VM: its fd, its memory slots and its vCPUs."""

    def __init__(self, device: str = KVM_DEVICE) -> None:
        try:
            self._kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VmmError(f"cannot open {device}: {exc.strerror}") from None
        self.fd = -1
        self.vcpus: list[Vcpu] = []
        try:
            version = ioctls.kvm_ioctl(
                self._kvm, ioctls.KVM_GET_API_VERSION, what="GET_API_VERSION"
            )
            if version != ioctls.KVM_API_VERSION:
                raise VmmError(f"{device}: KVM API version {version}, expected 12")
            self._run_size = ioctls.kvm_ioctl(
                self._kvm, ioctls.KVM_GET_VCPU_MMAP_SIZE, what="GET_VCPU_MMAP_SIZE"
            )
            self.fd = ioctls.kvm_ioctl(self._kvm, ioctls.KVM_CREATE_VM, 0, what="CREATE_VM")
            ioctls.kvm_ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, TSS_ADDR, what="SET_TSS_ADDR")
        except BaseException:
            self.close()
            raise
        self._slots = 0
        self._slot_pages: dict[int, int] = {}

    def add_memory(
        self, guest_phys_addr: int, size: int, host_addr: int, *, log_dirty: bool = False
    ) -> int:
        """Map ``size`` bytes at our ``host_addr`` as guest-physical ``guest_phys_addr``.

        KVM does not touch the pages here: they fault in (through the uffd, for a fork) when
        the guest first uses them. With ``log_dirty`` KVM logs every page the guest writes
        (``KVM_MEM_LOG_DIRTY_PAGES``; read with :meth:`dirty_pages`). Pages the page server
        installs are not guest writes and are not logged.
        """
        slot = self._slots
        region = ioctls.kvm_userspace_memory_region(
            slot=slot,
            flags=ioctls.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
            guest_phys_addr=guest_phys_addr,
            memory_size=size,
            userspace_addr=host_addr,
        )
        ioctls.kvm_ioctl(
            self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, region, what="SET_USER_MEMORY_REGION"
        )
        self._slots += 1
        self._slot_pages[slot] = size // PAGE_SIZE
        return slot

    def dirty_pages(self, slot: int) -> list[int]:
        """The pages (indexes within ``slot``) the guest wrote since the last call, or since
        the slot was added: ``KVM_GET_DIRTY_LOG``, which also clears the log. The slot must
        have been added with ``log_dirty``; the vCPUs should be stopped, or a page written
        meanwhile lands in the next call."""
        npages = self._slot_pages.get(slot)
        if npages is None:
            raise VmmError(f"no memory slot {slot}")
        words = (ctypes.c_uint64 * ((npages + 63) // 64))()
        log = ioctls.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(words))
        ioctls.kvm_ioctl(self.fd, ioctls.KVM_GET_DIRTY_LOG, log, what="GET_DIRTY_LOG")
        pages = []
        for w, word in enumerate(words):
            while word:
                low = word & -word  # lowest set bit
                pages.append(w * 64 + low.bit_length() - 1)
                word ^= low
        return pages

    def create_vcpu(self) -> Vcpu:
        """Create the next vCPU (ids count up from 0)."""
        index = len(self.vcpus)
        fd = ioctls.kvm_ioctl(self.fd, ioctls.KVM_CREATE_VCPU, index, what="CREATE_VCPU")
        vcpu = Vcpu(index, fd, self._run_size)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close every vCPU, the VM and /dev/kvm; idempotent."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        for name in ("fd", "_kvm"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> VirtualMachine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
