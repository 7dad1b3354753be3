"""The few libc memory calls ctypes needs to be told about: mmap, munmap, madvise.

Python's :mod:`mmap` does not give the mapping's address without pinning a buffer export, and
the page server and the VMMs need raw addresses (the ``src``/``dst`` of uffd ioctls, KVM memory
slots). Declared once here so every module calls them the same way.
"""

from __future__ import annotations

import ctypes
import os

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
LIBC.syscall.restype = ctypes.c_long

MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MADV_DONTNEED = 4
_MAP_FAILED = ctypes.c_void_p(-1).value


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """``mmap(NULL, ...)``; returns the address or raises ``OSError`` with the errno."""
    addr = LIBC.mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes: {os.strerror(err)}")
    return int(addr)


def munmap(addr: int, length: int) -> None:
    """``munmap``; errors are ignored (only ever called on our own mappings)."""
    LIBC.munmap(addr, length)


def madvise(addr: int, length: int, advice: int) -> None:
    """``madvise``; raises ``OSError`` with the errno."""
    if LIBC.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise: {os.strerror(err)}")
