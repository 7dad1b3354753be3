"""Writing verified bytes into a lazy template's memory view (pure helpers over an fd).

The view (:class:`~pagefork.store.lazy.LazyTemplate`'s sparse memfd) is read by workers while
it fills. Two rules keep what they read right: bytes whose manifest marks a page zero must be
zero there (else the manifest lies, and the guest would get zeros where the template has
data), and a page already in the view is never written again (a worker may be copying it).
"""

from __future__ import annotations

import os

from pagefork.regions import PAGE_SIZE

_ZERO_PAGE = bytes(PAGE_SIZE)


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_absent(fd: int, data: bytes, offset: int, present: bytes) -> None:
    """Write the pages of ``data`` (at page-aligned ``offset``) whose byte in ``present`` (one
    per page of ``data``) is 0, in runs: never a page already in."""
    view = memoryview(data)
    if 1 not in present:
        write_all(fd, view, offset)
        return
    npages = len(present)
    page = 0
    while page < npages:
        if present[page]:
            page += 1
            continue
        end = present.find(1, page)
        end = npages if end < 0 else end
        write_all(fd, view[page * PAGE_SIZE : end * PAGE_SIZE], offset + page * PAGE_SIZE)
        page = end


def zero_map_lies(zeros: bytes | bytearray, first: int, data: bytes) -> int | None:
    """The first page of ``data`` (starting at page ``first``) that the zero map ``zeros``
    marks zero but ``data`` has data in, or None."""
    view = memoryview(data)
    npages = (len(data) + PAGE_SIZE - 1) // PAGE_SIZE
    page = zeros.find(1, first, first + npages)
    while page >= 0:
        start = (page - first) * PAGE_SIZE
        piece = view[start : start + PAGE_SIZE]
        if piece != _ZERO_PAGE[: len(piece)]:
            return page
        page = zeros.find(1, page + 1, first + npages)
    return None
