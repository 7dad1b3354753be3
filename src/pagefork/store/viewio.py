"""Writing verified bytes into a lazy template's memory view (pure helpers over an fd).

The view (:class:`~pagefork.store.lazy.LazyTemplate`'s sparse memfd) is read by workers while
it fills. Two rules keep what they read right: bytes whose manifest marks a page zero must be
zero there (else the manifest lies, and the guest would get zeros where the template has
data), and a page already in the view is never written again (a worker may be copying it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

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


def chunks_wanted(
    presence: Any, nchunks: int, chunk_size: int, spans: Iterable[tuple[int, int]]
) -> list[int]:
    """The chunks that ``(file_offset, length)`` spans touch and that are not yet in, sorted,
    by the ``presence`` map (a byte per chunk, then a byte per page): a chunk is left out when
    its byte is set, or when every page of it the spans touch is in on its own."""
    shift = chunk_size.bit_length() - 1
    per_chunk = chunk_size // PAGE_SIZE
    want: set[int] = set()
    for offset, length in spans:
        for c in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            if not 0 <= c < nchunks or c in want or presence[c]:
                continue
            first = max(offset // PAGE_SIZE, c * per_chunk)
            last = min((offset + length - 1) // PAGE_SIZE, (c + 1) * per_chunk - 1)
            if 0 in presence[nchunks + first : nchunks + last + 1]:
                want.add(c)
    return sorted(want)
