"""Parsing a VMM's handshake: Firecracker's mappings JSON. Pure: bytes in, regions out.

Firecracker sends, in one ``sendmsg``, a bare JSON array of ``GuestRegionUffdMapping`` objects
plus the uffd as SCM_RIGHTS. Fields by version: ``base_host_virt_addr``, ``size``, ``offset``
(all versions), ``page_size_kib`` (v1.7+, holds *bytes* despite its name), ``page_size``
(v1.12+). Unknown fields are ignored, as Firecracker adds fields over time. The
``{"mappings": [...]}`` form is accepted too.
"""

from __future__ import annotations

import json
from typing import Any

from pagefork.errors import HandshakeError
from pagefork.regions import PAGE_SIZE, Region, overlapping

#: Largest handshake payload we accept; Firecracker's is a few hundred bytes per region.
MAX_HANDSHAKE_BYTES = 64 << 10
#: The page sizes guest memory comes in: 4 KiB, and 2 MiB hugetlbfs pages (Firecracker's
#: ``huge_pages: "2M"``).
PAGE_SIZES = frozenset({PAGE_SIZE, 2 << 20})
#: Deepest JSON nesting we accept (Firecracker's is 2: an array of objects).
MAX_NESTING = 16

_OPEN, _CLOSE, _QUOTE, _BACKSLASH = b"[{", b"]}", ord('"'), ord("\\")
_SPACE = b" \t\r\n"


class PayloadScanner:
    """Tells when a handshake payload that arrives in pieces is whole, in O(bytes) total.

    It follows brackets and strings only: the payload is whole once its top-level array or
    object closes, or as soon as it cannot be JSON of that shape (then parsing reports why).
    Re-parsing the whole payload on every read would let a peer that drips bytes make the
    server's work quadratic.
    """

    __slots__ = ("_escape", "_in_string", "_open", "_started", "complete")

    def __init__(self) -> None:
        self._open = bytearray()  # the closing bracket each open one expects
        self._in_string = False
        self._escape = False
        self._started = False
        self.complete = False

    def feed(self, data: bytes) -> bool:
        """Scan the next piece; returns :attr:`complete`."""
        for byte in data:
            if self.complete:
                break
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == _BACKSLASH:
                    self._escape = True
                elif byte == _QUOTE:
                    self._in_string = False
            elif byte in _OPEN:
                self._started = True
                self._open.append(_CLOSE[_OPEN.index(byte)])
                self.complete = len(self._open) > MAX_NESTING
            elif byte in _CLOSE:
                # A mismatched or extra bracket can never become valid: parse and say why.
                self.complete = not self._open or self._open.pop() != byte or not self._open
            elif byte == _QUOTE and self._started:
                self._in_string = True
            elif not self._started and byte not in _SPACE:
                self.complete = True  # not an array or object: parsing will say so
        return self.complete


def payload_complete(data: bytes) -> bool:
    """True when ``data`` is ready to parse: one whole JSON array or object, or bytes that
    cannot become one. False while more may follow (the payload may arrive over several
    reads)."""
    return PayloadScanner().feed(data)


def _int_field(entry: dict[str, Any], name: str, index: int) -> int:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HandshakeError(f"mapping {index}: field {name!r} must be an integer, got {value!r}")
    if value < 0:
        raise HandshakeError(f"mapping {index}: field {name!r} is negative ({value})")
    return value


def _page_size(entry: dict[str, Any], index: int, default: int) -> int:
    # v1.12+ sends page_size; v1.7..v1.11 send page_size_kib, which holds bytes.
    for name in ("page_size", "page_size_kib"):
        if name in entry:
            size = _int_field(entry, name, index)
            break
    else:
        size = default
    if size not in PAGE_SIZES:
        # Each fault copies one page: a made-up 1 GiB "page" would let one VMM keep the worker
        # it shares with other forks busy for a second per fault.
        raise HandshakeError(
            f"mapping {index}: page size {size} is neither 4 KiB nor 2 MiB (hugetlbfs)"
        )
    return size


def parse_mappings(
    payload: bytes, mem_file_size: int, default_page_size: int = PAGE_SIZE
) -> list[Region]:
    """Parse and validate a handshake payload against a mem-file of ``mem_file_size`` bytes.

    ``default_page_size`` applies to entries that carry no page size (Firecracker < v1.7);
    a page size given in the payload wins. Raises :class:`HandshakeError` naming the entry.
    """
    if len(payload) > MAX_HANDSHAKE_BYTES:
        raise HandshakeError(f"handshake payload too large ({len(payload)} bytes)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise HandshakeError("handshake payload is not UTF-8") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise HandshakeError("handshake payload is nested too deeply") from None
    except ValueError as exc:
        raise HandshakeError(f"handshake payload is not JSON: {exc}") from None
    if isinstance(doc, dict) and "mappings" in doc:
        doc = doc["mappings"]
    if not isinstance(doc, list):
        raise HandshakeError(f"handshake payload must be a JSON array, got {type(doc).__name__}")
    if not doc:
        raise HandshakeError("handshake has no mappings")
    regions: list[Region] = []
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise HandshakeError(f"mapping {i}: expected an object, got {type(entry).__name__}")
        base = _int_field(entry, "base_host_virt_addr", i)
        size = _int_field(entry, "size", i)
        offset = _int_field(entry, "offset", i)
        page_size = _page_size(entry, i, default_page_size)
        if size == 0:
            raise HandshakeError(f"mapping {i}: size is 0")
        for name, value in (("base_host_virt_addr", base), ("size", size), ("offset", offset)):
            if value % page_size:
                raise HandshakeError(
                    f"mapping {i}: {name} {value:#x} is not aligned to page size {page_size}"
                )
        if offset + size > mem_file_size:
            raise HandshakeError(
                f"mapping {i}: mem-file range {offset:#x}+{size:#x} ends past the mem-file "
                f"({mem_file_size:#x} bytes)"
            )
        regions.append(Region(base=base, size=size, offset=offset, page_size=page_size))
    clash = overlapping(regions)
    if clash is not None:
        raise HandshakeError(f"mappings {clash[0]} and {clash[1]} overlap")
    return regions


def keeps_socket_open(payload: bytes) -> bool:
    """True when a valid payload comes from a VMM that keeps its socket open for the life of
    the VM: every mapping carries ``page_size``, which Firecracker sends from 1.12, the
    release that stopped closing the socket after the handshake. Its hang-up then means the
    VMM is gone; an older one's means nothing."""
    doc = json.loads(payload)
    if isinstance(doc, dict):
        doc = doc.get("mappings", [])
    return bool(doc) and all(isinstance(e, dict) and "page_size" in e for e in doc)


def encode_mappings(regions: list[Region], *, version: str = "1.12") -> bytes:
    """The payload a Firecracker of ``version`` sends for ``regions`` (for VMM-side code)."""
    major, minor = (int(x) for x in version.split(".")[:2])
    out = []
    for r in regions:
        entry: dict[str, int] = {"base_host_virt_addr": r.base, "size": r.size, "offset": r.offset}
        if (major, minor) >= (1, 7):
            entry["page_size_kib"] = r.page_size
        if (major, minor) >= (1, 12):
            entry["page_size"] = r.page_size
        out.append(entry)
    return json.dumps(out).encode()
