"""The KVM kernel interface: ioctl numbers, the structs they take, and ``struct kvm_run``.

Names follow ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h`` so they can be
looked up there and in ``Documentation/virt/kvm/api.rst``. Only what the microVM uses is here;
a later step (in-kernel irqchip, PIT, MSRs, CPUID for a Linux guest) adds ioctls beside these.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os

from pagefork.errors import VmmError
from pagefork.libc import LIBC

KVMIO = 0xAE
_IOC_WRITE = 1
_IOC_READ = 2


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (_IOC_READ << 30) | (size << 16) | (KVMIO << 8) | nr


class kvm_userspace_memory_region(ctypes.Structure):
    """One memory slot: guest-physical range backed by our host virtual range."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


#: ``kvm_userspace_memory_region.flags``: have KVM log the guest's writes to the slot.
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0


class kvm_dirty_log(ctypes.Structure):
    """``KVM_GET_DIRTY_LOG``'s argument: the slot, and where KVM copies its bitmap (one bit
    per page of the slot, in 64-bit words)."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),
    )


class kvm_regs(ctypes.Structure):
    """General-purpose registers, ``rip`` and ``rflags`` of one vCPU."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )  # fmt: skip


class kvm_segment(ctypes.Structure):
    """A segment register as KVM sees it: the hidden descriptor cache, not a GDT entry."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class kvm_dtable(ctypes.Structure):
    """A descriptor-table register (GDTR/IDTR)."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


class kvm_sregs(ctypes.Structure):
    """Segment, descriptor-table and control registers of one vCPU."""

    _fields_ = (
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    )


class kvm_run_io(ctypes.Structure):
    """``kvm_run.io`` for ``KVM_EXIT_IO``; the data sits at ``data_offset`` in the mapping."""

    _fields_ = (
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    )


class kvm_run_mmio(ctypes.Structure):
    """``kvm_run.mmio`` for ``KVM_EXIT_MMIO``."""

    _fields_ = (
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    )


class kvm_run_internal(ctypes.Structure):
    """``kvm_run.internal`` for ``KVM_EXIT_INTERNAL_ERROR``."""

    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class kvm_run_fail_entry(ctypes.Structure):
    """``kvm_run.fail_entry`` for ``KVM_EXIT_FAIL_ENTRY``."""

    _fields_ = (
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    )


class kvm_run_exit(ctypes.Union):
    """The exit-reason union of ``struct kvm_run`` (256 bytes in the kernel)."""

    _fields_ = (
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("fail_entry", kvm_run_fail_entry),
        ("padding", ctypes.c_char * 256),
    )


class kvm_run(ctypes.Structure):
    """The head of the per-vCPU shared page ``struct kvm_run`` (mmapped from the vCPU fd)."""

    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", kvm_run_exit),
    )


# --- ioctls on /dev/kvm ----------------------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
# --- ioctls on a VM fd -----------------------------------------------------------------------
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _io(0x47)
# --- ioctls on a vCPU fd ---------------------------------------------------------------------
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(kvm_sregs))

#: The API version every KVM since Linux 2.6.22 reports; anything else is not KVM as we know it.
KVM_API_VERSION = 12

# --- kvm_run.exit_reason ---------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}

_libc = LIBC
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def kvm_ioctl(fd: int, request: int, arg: ctypes._CData | int | None = None, what: str = "") -> int:
    """Issue one KVM ioctl through libc; raises :class:`VmmError` naming it on failure.

    ctypes drops the GIL for the call, which matters for ``KVM_RUN``: a vCPU blocked in the
    kernel on a userfaultfd fault must not stop the other vCPU threads of this process.
    EINTR is retried: a signal is not a failure of the request.
    """
    if arg is None:
        ptr: int | ctypes._CData | None = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    while True:
        ret = _libc.ioctl(fd, request, ptr)
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err != errno_mod.EINTR:
            raise VmmError(f"KVM ioctl {what or hex(request)} failed: {os.strerror(err)}")
