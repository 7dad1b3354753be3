"""The template mem-file: mapped once, read-only and shared, and indexed for zero pages.

Every fork's ``UFFDIO_COPY`` reads straight from this one mapping, so all forks of a template
share the page cache and the server holds no per-fork copy. Which 4 KiB pages are all zero is
worked out once at open, so the fault path never scans a page to choose ``UFFDIO_ZEROPAGE``.
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


class MemFile:
    """A template mem-file opened read-only and mapped once with ``MAP_SHARED``.

    ``address`` is the mapping's address in this process: the ``src`` of every ``UFFDIO_COPY``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # Regular files only, checked before open: a FIFO would block open() for good.
        fd = open_regular(self.path, "mem-file", error=MemFileError)
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                raise MemFileError(f"mem-file {self.path}: file is empty")
            self.size = st.st_size
            try:
                # Populated up front, so neither the scan below nor the first fork's copies
                # take faults on the source side.
                self.address: int = libc.mmap(
                    self.size, mmap.PROT_READ, mmap.MAP_SHARED | libc.MAP_POPULATE, fd
                )
            except OSError as exc:
                raise MemFileError(f"mem-file {self.path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        # The zero-page index is read from that same mapping (no second map, no copy).
        self._zeros = scan_zero_pages((ctypes.c_char * self.size).from_address(self.address))
        self._closed = False

    def is_zero(self, offset: int, length: int = PAGE_SIZE) -> bool:
        """True when ``[offset, offset+length)`` of the mem-file is all zero (no scanning)."""
        first = offset // PAGE_SIZE
        last = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        return self._zeros.find(0, first, last) < 0

    @property
    def zero_pages(self) -> bytearray:
        """One byte per 4 KiB page, 1 where the page is zero. Shared: do not modify."""
        return self._zeros

    def close(self) -> None:
        """Unmap the file; idempotent. No fork may be served from it afterwards."""
        if not self._closed:
            self._closed = True
            libc.munmap(self.address, self.size)

    def __enter__(self) -> MemFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
