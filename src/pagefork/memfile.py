"""The template mem-file: opened once, indexed for zero pages, mapped read-only and shared.

Every fork's ``UFFDIO_COPY`` reads straight from a shared mapping of this file, so all forks of
a template (and every worker process) share the page cache and hold no per-fork copy. Which
4 KiB pages are all zero is worked out once at open, so the fault path never scans a page to
choose ``UFFDIO_ZEROPAGE``; :meth:`MemFile.zero_index_fd` shares that index with the workers.

The scan reads the file with ``pread``, never through a mapping: a file that shrinks while it
is read is then a clear error, not a SIGBUS that kills the process.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from types import TracebackType

from pagefork import libc
from pagefork.errors import MemFileError
from pagefork.files import open_regular
from pagefork.regions import PAGE_SIZE

_SCAN_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_SCAN_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)


def scan_zero_pages(
    data: bytes | memoryview | mmap.mmap | ctypes.Array[ctypes.c_char],
) -> bytearray:
    """One byte per 4 KiB page of ``data``: 1 where the page is all zero (a partial tail is
    judged on its bytes)."""
    size = len(data)
    npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    zeros = bytearray(npages)
    view = memoryview(data).cast("B")  # ctypes arrays export format "c": compare as bytes
    try:
        for start in range(0, size, _SCAN_CHUNK):
            chunk = view[start : start + _SCAN_CHUNK]
            first = start // PAGE_SIZE
            if len(chunk) == _SCAN_CHUNK and chunk == _ZERO_CHUNK:
                zeros[first : first + _SCAN_CHUNK // PAGE_SIZE] = b"\x01" * (
                    _SCAN_CHUNK // PAGE_SIZE
                )
                continue
            for i, off in enumerate(range(0, len(chunk), PAGE_SIZE)):
                page = chunk[off : off + PAGE_SIZE]
                if page == _ZERO_PAGE[: len(page)]:
                    zeros[first + i] = 1
    finally:
        view.release()
    return zeros


def _scan_fd(fd: int, size: int, path: str) -> bytearray:
    """The zero-page index of ``size`` bytes of ``fd``, read with ``pread`` (no mapping)."""
    zeros = bytearray((size + PAGE_SIZE - 1) // PAGE_SIZE)
    buf = bytearray(_SCAN_CHUNK)
    view = memoryview(buf)
    for start in range(0, size, _SCAN_CHUNK):
        want = min(_SCAN_CHUNK, size - start)
        got = os.preadv(fd, [view[:want]], start)
        if got != want:
            raise MemFileError(
                f"mem-file {path}: shrank while being read (ends at {start + got:#x}, "
                f"expected {size:#x})"
            )
        zeros[start // PAGE_SIZE : (start + want + PAGE_SIZE - 1) // PAGE_SIZE] = scan_zero_pages(
            view[:want]
        )
    view.release()
    return zeros


def readonly_memfd(name: str, data: bytes | bytearray) -> int:
    """A new memfd holding ``data``, mode 0400 (for sharing an index with the workers)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, 0o400)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ZeroIndexed:
    """A template's memory whose all-zero 4 KiB pages are known: one byte per page in
    ``_zeros`` (set by the subclass, with ``_zero_fd = -1``; the subclass closes ``_zero_fd``).
    The fault path then never scans a page to choose ``UFFDIO_ZEROPAGE``."""

    _zeros: bytearray
    _zero_fd: int

    def zero_index_fd(self) -> int:
        """A memfd holding :attr:`zero_pages` (made once; closed by :meth:`close`)."""
        if self._zero_fd < 0:
            self._zero_fd = readonly_memfd("pagefork-zero-index", self._zeros)
        return self._zero_fd

    def is_zero(self, offset: int, length: int = PAGE_SIZE) -> bool:
        """True when ``[offset, offset+length)`` is all zero (no scanning)."""
        first = offset // PAGE_SIZE
        last = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        return self._zeros.find(0, first, last) < 0

    @property
    def zero_pages(self) -> bytearray:
        """One byte per 4 KiB page, 1 where the page is zero. Shared: do not modify."""
        return self._zeros


class MemFile(ZeroIndexed):
    """A template mem-file opened read-only, indexed for zero pages (unless ``scan`` is False),
    and (unless ``mapped`` is False) mapped once with ``MAP_SHARED``.

    ``address`` is the mapping's address in this process: the ``src`` of every ``UFFDIO_COPY``
    (0 when not mapped). ``fd`` stays open for handing the file to worker processes.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, mapped: bool = True, scan: bool = True
    ) -> None:
        self.path = os.fspath(path)
        # Regular files only, checked before open: a FIFO would block open() for good.
        fd = open_regular(self.path, "mem-file", error=MemFileError)
        self.address = 0
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                raise MemFileError(f"mem-file {self.path}: file is empty")
            self.size = st.st_size
            # Without the scan no page counts as zero (for readers that never serve faults).
            npages = (self.size + PAGE_SIZE - 1) // PAGE_SIZE
            self._zeros = _scan_fd(fd, self.size, self.path) if scan else bytearray(npages)
            if mapped:
                try:
                    self.address = libc.mmap(
                        self.size, mmap.PROT_READ, mmap.MAP_SHARED | libc.MAP_POPULATE, fd
                    )
                except OSError as exc:
                    raise MemFileError(f"mem-file {self.path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._zero_fd = -1
        self._closed = False

    def close(self) -> None:
        """Unmap and close the file; idempotent. No fork may be served from it afterwards."""
        if not self._closed:
            self._closed = True
            if self.address:
                libc.munmap(self.address, self.size)
            os.close(self.fd)
            if self._zero_fd >= 0:
                os.close(self._zero_fd)

    def __enter__(self) -> MemFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
