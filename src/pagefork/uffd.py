"""The userfaultfd kernel interface: the syscall, the UFFDIO ioctls, their structs, uffd_msg.

Names follow ``include/uapi/linux/userfaultfd.h`` so they can be looked up there and in
``Documentation/admin-guide/mm/userfaultfd.rst``. Everything is ctypes/fcntl/struct: nothing is
compiled at install time. The copy ioctls go through :class:`UffdIoctls`, which keeps one
preallocated buffer per struct so the fault path allocates nothing but the call itself.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import fcntl
import os
import platform
import select
import struct
from dataclasses import dataclass

from pagefork.errors import UffdError
from pagefork.libc import LIBC

# --- ioctl numbers: _IOC(dir, 0xAA, nr, size) as in <asm-generic/ioctl.h> -------------------
_IOC_WRITE = 1
_IOC_READ = 2
UFFDIO = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFDIO << 8) | nr


# struct sizes: uffdio_api 24, uffdio_register 32, uffdio_range 16, uffdio_copy 40,
# uffdio_zeropage 32.
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, 16)
UFFDIO_WAKE = _ioc(_IOC_READ, 0x02, 16)
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, 32)
#: ``/dev/userfaultfd`` hands out a uffd through this ioctl (Linux 6.1+), without the syscall.
USERFAULTFD_IOC_NEW = (UFFDIO << 8) | 0x00

UFFD_API = 0xAA

# --- features (uffdio_api.features) ----------------------------------------------------------
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_THREAD_ID = 1 << 8

# --- register modes and copy modes ---------------------------------------------------------
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

# --- uffd_msg ------------------------------------------------------------------------------
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1

#: sizeof(struct uffd_msg): u8 event, u8 + u16 + u32 reserved, then a 24-byte union.
UFFD_MSG_SIZE = 32
#: ``struct uffd_msg`` as (event, reserved, a, b, c): ``a``/``b``/``c`` are the union's three
#: u64s (pagefault: flags, address, ptid; remove/unmap: start, end; remap: from, to, len;
#: fork: ufd). The worker's loop reads a lone fault's address in place (:data:`PAGEFAULT_ADDRESS`)
#: and names every other message with :func:`decode_msg`.
MSG = struct.Struct("=B3xI QQQ")
#: Where ``uffd_msg.arg.pagefault.address`` sits: the fault loop's one-fault fast path.
PAGEFAULT_ADDRESS = struct.Struct("=16xQ8x")

#: ``struct uffdio_copy`` (dst, src, len, mode, copy) and ``struct uffdio_zeropage`` (range,
#: mode, zeropage): for a caller that packs its own argument buffer (the worker's fault path).
COPY_ARG = struct.Struct("=QQQQq")
ZEROPAGE_ARG = struct.Struct("=QQQq")

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "i686": 374, "armv7l": 388}
_O_CLOEXEC = os.O_CLOEXEC
_O_NONBLOCK = os.O_NONBLOCK

_libc = LIBC


@dataclass(frozen=True, slots=True)
class PageFault:
    """``UFFD_EVENT_PAGEFAULT``: a thread touched a missing page at ``address``."""

    address: int
    flags: int
    ptid: int

    @property
    def write(self) -> bool:
        """True when the faulting access was a write."""
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)


@dataclass(frozen=True, slots=True)
class Remove:
    """``UFFD_EVENT_REMOVE``: ``madvise(DONTNEED/REMOVE)`` dropped ``[start, end)``."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """``UFFD_EVENT_UNMAP``: ``munmap`` removed ``[start, end)`` from the registered range."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Remap:
    """``UFFD_EVENT_REMAP``: ``mremap`` moved ``len`` bytes from ``old`` to ``new``."""

    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class ForkEvent:
    """``UFFD_EVENT_FORK``: the VMM process forked; ``ufd`` is a new uffd for the child.

    A process fork, not a VM fork: pagefork's forks are VMs restored from one template."""

    ufd: int


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event code this module does not know (a newer kernel)."""

    event: int


UffdEvent = PageFault | Remove | Unmap | Remap | ForkEvent | UnknownEvent


def decode_msg(buf: bytes | bytearray | memoryview, offset: int = 0) -> UffdEvent:
    """Decode one ``struct uffd_msg`` at ``offset`` of ``buf``."""
    event, _, a, b, c = MSG.unpack_from(buf, offset)
    if event == UFFD_EVENT_PAGEFAULT:
        return PageFault(address=b, flags=a, ptid=c & 0xFFFFFFFF)
    if event == UFFD_EVENT_REMOVE:
        return Remove(start=a, end=b)
    if event == UFFD_EVENT_UNMAP:
        return Unmap(start=a, end=b)
    if event == UFFD_EVENT_REMAP:
        return Remap(old=a, new=b, length=c)
    if event == UFFD_EVENT_FORK:
        return ForkEvent(ufd=a & 0xFFFFFFFF)
    return UnknownEvent(event=event)


def decode_msgs(buf: bytes | bytearray | memoryview) -> list[UffdEvent]:
    """Decode every whole ``uffd_msg`` in ``buf`` (as returned by one ``read``)."""
    return [decode_msg(buf, off) for off in range(0, len(buf) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE)]


def encode_pagefault(address: int, flags: int = 0, ptid: int = 0) -> bytes:
    """Build a ``uffd_msg`` for a page fault (used by tests of the decoder)."""
    return MSG.pack(UFFD_EVENT_PAGEFAULT, 0, flags, address, ptid)


def open_userfaultfd(flags: int = _O_CLOEXEC | _O_NONBLOCK) -> int:
    """Create a userfaultfd, as a VMM does, through the syscall or ``/dev/userfaultfd``."""
    nr = _SYS_USERFAULTFD.get(platform.machine())
    if nr is not None:
        fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(flags))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno_mod.EPERM, errno_mod.ENOSYS):
            raise UffdError(f"userfaultfd(2): {os.strerror(err)}", err)
    # The syscall is refused to unprivileged users when vm.unprivileged_userfaultfd=0; the
    # device node is the sanctioned way around that.
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UffdError(
            f"userfaultfd unavailable: /dev/userfaultfd: {exc.strerror}", exc.errno
        ) from None
    try:
        return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
    except OSError as exc:
        raise UffdError(f"USERFAULTFD_IOC_NEW: {exc.strerror}", exc.errno) from None
    finally:
        os.close(dev)


def uffdio_api(fd: int, features: int = UFFD_FEATURE_EVENT_REMOVE) -> tuple[int, int]:
    """``UFFDIO_API``: handshake with the kernel; returns (features, ioctls) it granted.

    Only the creator of a uffd calls this, once. A page server must never call it on a VMM's
    uffd: a second call fails with EINVAL.
    """
    buf = bytearray(struct.pack("=QQQ", UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_API, buf, True)
    except OSError as exc:
        raise UffdError(f"UFFDIO_API: {exc.strerror}", exc.errno) from None
    _, got, ioctls = struct.unpack("=QQQ", buf)
    return got, ioctls


def uffdio_register(
    fd: int, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING
) -> int:
    """``UFFDIO_REGISTER`` ``[start, start+length)``; returns the ioctls allowed on it."""
    buf = bytearray(struct.pack("=QQQQ", start, length, mode, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_REGISTER, buf, True)
    except OSError as exc:
        raise UffdError(
            f"UFFDIO_REGISTER {start:#x}+{length:#x}: {exc.strerror}", exc.errno
        ) from None
    return int(struct.unpack_from("=Q", buf, 24)[0])


def uffdio_unregister(fd: int, start: int, length: int) -> None:
    """``UFFDIO_UNREGISTER`` ``[start, start+length)``."""
    try:
        fcntl.ioctl(fd, UFFDIO_UNREGISTER, struct.pack("=QQ", start, length))
    except OSError as exc:
        raise UffdError(f"UFFDIO_UNREGISTER {start:#x}: {exc.strerror}", exc.errno) from None


def api_done(fd: int) -> bool:
    """True when ``UFFDIO_API`` has been called on the uffd ``fd`` (which must be O_NONBLOCK).

    A uffd polls as an error until its API handshake is done (and whenever it is blocking):
    ``userfaultfd_poll`` in ``fs/userfaultfd.c``. Without it no range can be registered, so
    no fault would ever reach us.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not any(ev & select.POLLERR for _, ev in poller.poll(0))


class CopyOutcome(enum.Enum):
    """What a failed ``UFFDIO_COPY`` / ``UFFDIO_ZEROPAGE`` means, by errno (one rule for demand
    faults and prefetch alike)."""

    #: EEXIST: the page is there already (another vCPU's fault or a prefetch put it first):
    #: success for that page. A copy made with DONTWAKE may have left its faulting thread
    #: asleep, so whoever needs the page wakes it.
    PRESENT = "present"
    #: EAGAIN: the mm is changing under us. With nothing done, a non-cooperative event
    #: (REMOVE) is unread and every copy fails until it is read: read the events, then retry.
    #: With bytes done, a copy stopped early: retry from where it stopped.
    RETRY = "retry"
    #: ESRCH: the VMM's address space is gone (it is exiting): nothing to serve any more.
    GONE = "gone"
    #: EFAULT: our source could not be read (a mem-file that shrank under us).
    UNREADABLE = "unreadable"
    #: Anything else: the fork cannot be served.
    FAILED = "failed"


_OUTCOMES = {
    errno_mod.EEXIST: CopyOutcome.PRESENT,
    errno_mod.EAGAIN: CopyOutcome.RETRY,
    errno_mod.ESRCH: CopyOutcome.GONE,
    errno_mod.EFAULT: CopyOutcome.UNREADABLE,
}


def copy_outcome(code: int | None) -> CopyOutcome:
    """What the errno ``code`` of a failed copy or zeropage ioctl means (:class:`CopyOutcome`)."""
    return _OUTCOMES.get(code or 0, CopyOutcome.FAILED)


def is_userfaultfd(fd: int) -> bool:
    """True when ``fd`` is a userfaultfd (its anon inode is named ``[userfaultfd]``)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


class UffdIoctls:
    """The copy-side ioctls on one uffd, with preallocated argument buffers.

    Each method returns the number of bytes the kernel installed and raises ``OSError`` with
    the kernel's errno (the caller decides what EEXIST/EAGAIN mean). Not thread-safe: give each
    thread its own instance; the uffd itself may be shared.
    """

    __slots__ = ("_copy", "_fd", "_range", "_zero")

    _COPY = COPY_ARG
    _ZERO = ZEROPAGE_ARG
    _RANGE = struct.Struct("=QQ")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._copy = bytearray(40)
        self._zero = bytearray(32)
        self._range = bytearray(16)

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """``UFFDIO_COPY``: fill ``[dst, dst+length)`` from our address ``src``.

        On a partial copy the kernel reports the bytes done in ``uffdio_copy.copy`` and the
        ioctl fails; that count is attached to the OSError as ``done``.
        """
        buf = self._copy
        self._COPY.pack_into(buf, 0, dst, src, length, mode, 0)
        try:
            fcntl.ioctl(self._fd, UFFDIO_COPY, buf, True)
        except OSError as exc:
            done = self._COPY.unpack_from(buf)[4]
            exc.done = done if done > 0 else 0  # type: ignore[attr-defined]
            raise
        return length

    def zeropage(self, dst: int, length: int, mode: int = 0) -> int:
        """``UFFDIO_ZEROPAGE``: map the zero page over ``[dst, dst+length)``."""
        buf = self._zero
        self._ZERO.pack_into(buf, 0, dst, length, mode, 0)
        try:
            fcntl.ioctl(self._fd, UFFDIO_ZEROPAGE, buf, True)
        except OSError as exc:
            done = self._ZERO.unpack_from(buf)[3]
            exc.done = done if done > 0 else 0  # type: ignore[attr-defined]
            raise
        return length

    def wake(self, start: int, length: int) -> None:
        """``UFFDIO_WAKE``: wake threads blocked on faults in ``[start, start+length)``."""
        self._RANGE.pack_into(self._range, 0, start, length)
        fcntl.ioctl(self._fd, UFFDIO_WAKE, self._range, False)


__all__ = [
    "COPY_ARG",
    "MSG",
    "PAGEFAULT_ADDRESS",
    "UFFDIO_API",
    "UFFDIO_COPY",
    "UFFDIO_COPY_MODE_DONTWAKE",
    "UFFDIO_REGISTER",
    "UFFDIO_REGISTER_MODE_MISSING",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE",
    "UFFDIO_ZEROPAGE",
    "UFFD_EVENT_FORK",
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_EVENT_REMAP",
    "UFFD_EVENT_REMOVE",
    "UFFD_EVENT_UNMAP",
    "UFFD_FEATURE_EVENT_REMOVE",
    "UFFD_MSG_SIZE",
    "ZEROPAGE_ARG",
    "CopyOutcome",
    "ForkEvent",
    "PageFault",
    "Remap",
    "Remove",
    "UffdEvent",
    "UffdIoctls",
    "UnknownEvent",
    "Unmap",
    "api_done",
    "copy_outcome",
    "decode_msg",
    "decode_msgs",
    "is_userfaultfd",
    "open_userfaultfd",
    "uffdio_api",
    "uffdio_register",
    "uffdio_unregister",
]
