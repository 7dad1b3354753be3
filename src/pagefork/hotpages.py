"""Hot-page lists: the pages a warm-up fork touched, how they are recorded and stored.

A :class:`HotPageList` keeps the pages of one fork in first-touch order (the order later forks
want them prefetched in). A page server's worker records one while a warm-up fork runs, inside
a bounded window (:mod:`pagefork.serving.worker`). Lists from several warm-up runs combine with
:func:`union`, :func:`intersection` and :func:`at_least`.

Two file formats, both a 4-byte magic followed by unsigned LEB128 varints (Go's
``binary.PutUvarint``: 7 bits per byte, low group first, at most 10 bytes, value < 2**64):

``HPL1`` is the hot-page list format of the Go page server pagefork's design grew from. Its
reader must read every HPL1 file pagefork writes, byte for byte, so pagefork writes only what
that reader takes: region indexes below 2**32 (it keeps them in 32 bits) and 4 KiB-aligned
offsets. Both rules are checked on save and on load::

    "HPL1" count { region page_offset } * count        sorted by (region, page_offset), unique

``HPL2`` (ours: keeps first-touch order and, optionally, first-touch times)::

    "HPL2" flags count { region page_offset [time] } * count     first-touch order, unique

``HPL3`` (ours: HPL2 plus the prefetch plans made for the list, so that a restarted server or
a successor does not plan again)::

    "HPL3" flags count { region page_offset [time] } * count
           nplans { keylen key[keylen] bloblen blob[bloblen] } * nplans

``key`` names the region layout a plan was made for (ASCII), ``blob`` is the plan as
:meth:`pagefork.prefetch.PrefetchPlan.to_bytes` wrote it; a plan is checked when it is used,
and planned anew if it does not fit.

``flags`` bit 0 set means every entry carries ``time``: 0 for "unknown", else the first-touch
time in microseconds since the fork's handshake, plus 1. Other flag bits are reserved and
rejected, so a newer writer's extension fails loudly instead of being misread.

Entry indices in error messages count from 0. Encoding and decoding are pure functions over
bytes (:func:`encode_hpl1`, :func:`encode_hpl2`, :func:`decode`); :func:`save` and :func:`load`
add the file I/O through :mod:`pagefork.files` (regular files only, bounded reads, atomic
saves that never replace anything but a regular file).
"""

from __future__ import annotations

import array
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple

from pagefork.errors import HotPageFileError
from pagefork.files import atomic_save, read_regular

MAGIC_HPL1 = b"HPL1"
MAGIC_HPL2 = b"HPL2"
MAGIC_HPL3 = b"HPL3"
#: At most this many stored plans per file (one per region layout; a template has one).
MAX_PLANS = 16
#: HPL2 flag: every entry carries a first-touch time varint.
HPL2_FLAG_TIMES = 1 << 0
_HPL2_KNOWN_FLAGS = HPL2_FLAG_TIMES

#: Page offsets in a file are byte offsets; every page size we serve is a multiple of 4 KiB,
#: so an offset that is not 4 KiB aligned can only come from a corrupt file.
_FILE_ALIGN = 4096
_U64_MAX = (1 << 64) - 1
_VARINT_MAX_BYTES = 10
#: Region indexes are 32-bit in the Go reader of HPL1; one at or above this it would truncate.
REGION_LIMIT = 1 << 32
#: The largest hot-page file :func:`load` reads: about 40 million pages (160 GiB of 4 KiB pages),
#: and it keeps ``hotpages show /dev/zero``-like mistakes from reading without bound.
MAX_FILE_BYTES = 256 << 20


class HotPageEncodeError(HotPageFileError, ValueError):
    """A list holds a page no HPL reader can take back; nothing was written.

    Also a ValueError, as the encoders raised before they named the file and the page.
    """


HotPageFormat = Literal["hpl1", "hpl2", "hpl3"]


class HotPage(NamedTuple):
    """One guest page: region index (handshake order) and the page's byte offset in it.

    A NamedTuple so that it is hashable, ordered by (region, page_offset), and as cheap to
    build as a plain tuple on the fault path.
    """

    region: int
    page_offset: int


class HotPageList:
    """The distinct pages a fork touched, in first-touch order, with first-touch times.

    Thread-safe: the fault loop may :meth:`add` while another thread takes a :meth:`snapshot`.
    Memory is bounded by the number of distinct pages, not by the number of adds.
    """

    __slots__ = ("_lock", "_order", "_packed", "_plans", "_seen", "_times", "source_format")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Plain (region, offset) tuples internally: they hash and compare equal to HotPage, and
        # skip the NamedTuple constructor on the fault path.
        self._order: list[tuple[int, int]] = []
        self._times: list[float | None] = []
        self._seen: set[tuple[int, int]] = set()
        # The same pages as int64 pairs, for planning without a Python object per page.
        self._packed = array.array("q")
        # Prefetch plans made for exactly these pages, by region layout (see plan_data).
        self._plans: dict[str, bytes] = {}
        #: "hpl1"/"hpl2"/"hpl3" when the list was decoded from a file, else None.
        self.source_format: HotPageFormat | None = None

    @classmethod
    def from_pages(
        cls, pages: Iterable[tuple[int, int]], times: Iterable[float | None] | None = None
    ) -> HotPageList:
        """A list of ``pages`` in the given order (later duplicates are dropped).

        ``times``, when given, is aligned with ``pages`` (one first-touch time per entry).
        """
        hot = cls()
        if times is None:
            for region, offset in pages:
                hot._add_unlocked(region, offset, None)
        else:
            pages = list(pages)
            times = list(times)
            if len(times) != len(pages):
                raise ValueError(f"{len(pages)} pages but {len(times)} times")
            for (region, offset), t in zip(pages, times, strict=True):
                hot._add_unlocked(region, offset, t)
        return hot

    def _add_unlocked(self, region: int, page_offset: int, t: float | None) -> bool:
        key = (region, page_offset)
        if key in self._seen:
            return False
        self._seen.add(key)
        self._order.append(key)
        self._times.append(t)
        try:
            self._packed.extend(key)
        except OverflowError:  # beyond int64: no region has it; planning will say which entry
            self._packed = array.array("q")
        if self._plans:
            self._plans = {}
        return True

    def add(self, region: int, page_offset: int, t: float | None = None) -> bool:
        """Record a touch of ``(region, page_offset)``; True when the page is new.

        ``t`` is the touch time in seconds since the fork's handshake; only the first touch's
        time is kept.
        """
        with self._lock:
            return self._add_unlocked(region, page_offset, t)

    def __len__(self) -> int:
        return len(self._order)

    def packed(self) -> array.array[int]:
        """A copy of the pages as ``region, offset`` int64 pairs, in first-touch order.

        Empty (for a non-empty list) when an offset does not fit 64-bit signed integers.
        """
        with self._lock:
            if len(self._packed) != 2 * len(self._order):
                return array.array("q")
            return array.array("q", self._packed)

    def plan_data(self, layout: str) -> bytes | None:
        """The stored prefetch plan for region layout ``layout``, or None.

        Plans are kept with the list (and in HPL3 files) and dropped when a page is added.
        """
        with self._lock:
            return self._plans.get(layout)

    def set_plan_data(self, layout: str, data: bytes) -> None:
        """Keep ``data``, a prefetch plan for region layout ``layout``, with the list."""
        with self._lock:
            if layout not in self._plans and len(self._plans) >= MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[layout] = bytes(data)

    def plans(self) -> dict[str, bytes]:
        """Every stored plan, by layout."""
        with self._lock:
            return dict(self._plans)

    def __contains__(self, page: object) -> bool:
        return page in self._seen

    def __iter__(self) -> Iterator[HotPage]:
        """The pages in first-touch order (iterates over a copy: safe while others add)."""
        return iter(self.in_order())

    def __repr__(self) -> str:
        return f"<HotPageList {len(self._order)} pages>"

    def sorted_pages(self) -> list[HotPage]:
        """The pages sorted by (region, page_offset), deduplicated: HPL1's order."""
        with self._lock:
            keys = sorted(self._order)
        return [HotPage(r, o) for r, o in keys]

    def in_order(self) -> list[HotPage]:
        """The pages in first-touch order."""
        with self._lock:
            keys = list(self._order)
        return [HotPage(r, o) for r, o in keys]

    def times(self) -> list[float | None]:
        """First-touch times in seconds (None where unknown), aligned with :meth:`in_order`."""
        with self._lock:
            return list(self._times)

    def entries(self) -> list[tuple[HotPage, float | None]]:
        """``(page, first-touch time)`` pairs in first-touch order, taken under one lock."""
        with self._lock:
            return [(HotPage(r, o), t) for (r, o), t in zip(self._order, self._times, strict=True)]

    def save(self, path: str | os.PathLike[str], fmt: HotPageFormat = "hpl1") -> None:
        """Write the list to ``path`` atomically; see :func:`save`."""
        save(self, path, fmt)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, strict: bool = False) -> HotPageList:
        """Read a list from ``path``; see :func:`load`."""
        return load(path, strict=strict)


# --- combining warm-up runs ------------------------------------------------------------------


def at_least(lists: Iterable[HotPageList], k: int) -> HotPageList:
    """The pages seen in at least ``k`` of the ``n`` lists (1 <= k <= n).

    Pages are ordered by first appearance across the lists taken in sequence (so the first
    list's first-touch order wins), and each keeps the time of that first appearance.
    """
    snapshots = [hot.entries() for hot in lists]
    if not 1 <= k <= len(snapshots):
        raise ValueError(f"k must be between 1 and {len(snapshots)} (the number of lists), not {k}")
    counts: dict[HotPage, int] = {}
    first_time: dict[HotPage, float | None] = {}
    # dict insertion order is the order of first appearance across the lists in sequence.
    for entries in snapshots:
        for page, t in entries:
            if page in counts:
                counts[page] += 1
            else:
                counts[page] = 1
                first_time[page] = t
    kept = [page for page, count in counts.items() if count >= k]
    return HotPageList.from_pages(kept, [first_time[page] for page in kept])


def union(lists: Iterable[HotPageList]) -> HotPageList:
    """The pages seen in any of the lists (empty for no lists)."""
    lists = list(lists)
    return at_least(lists, 1) if lists else HotPageList()


def intersection(lists: Iterable[HotPageList]) -> HotPageList:
    """The pages seen in every one of the lists (empty for no lists).

    Pages any one run skipped are left to demand faults: keeping only what every warm-up run
    touched drops pages that depended on one run's timing.
    """
    lists = list(lists)
    return at_least(lists, len(lists)) if lists else HotPageList()


# --- varints (unsigned LEB128, as Go's encoding/binary) --------------------------------------


def _put_uvarint(out: bytearray, value: int) -> None:
    if value < 0 or value > _U64_MAX:
        raise ValueError(f"value {value} does not fit an unsigned 64-bit varint")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


class _Truncated(Exception):
    """The data ended inside a varint."""


class _Overflow(Exception):
    """A varint runs past 10 bytes or past 2**64-1."""


def _get_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; returns (value, position after it)."""
    value = 0
    shift = 0
    end = len(data)
    for i in range(_VARINT_MAX_BYTES):
        if pos >= end:
            raise _Truncated
        byte = data[pos]
        pos += 1
        if byte < 0x80:
            # The 10th byte may only carry bit 63 (Go's rule: anything more overflows).
            if i == _VARINT_MAX_BYTES - 1 and byte > 1:
                raise _Overflow
            return value | (byte << shift), pos
        value |= (byte & 0x7F) << shift
        shift += 7
    raise _Overflow


# --- encoding --------------------------------------------------------------------------------


def _check_entry(name: str, region: int, offset: int) -> None:
    """Refuse a page that a reader of the file would refuse or misread."""
    where = f"{name}: cannot write (region {region}, offset {offset:#x})"
    if not 0 <= region < REGION_LIMIT:
        raise HotPageEncodeError(f"{where}: region index must be in [0, 2**32)")
    if not 0 <= offset <= _U64_MAX:
        raise HotPageEncodeError(f"{where}: page offset does not fit 64 bits")
    if offset % _FILE_ALIGN:
        raise HotPageEncodeError(f"{where}: page offset is not 4 KiB aligned")


def encode_hpl1(pages: Iterable[tuple[int, int]], name: str = "<bytes>") -> bytes:
    """The HPL1 bytes of ``pages``: sorted and deduplicated, as the Go reader expects.

    A page with a region index of 2**32 or more, or an offset that is negative, above 2**64-1
    or not 4 KiB aligned raises :class:`HotPageEncodeError` naming ``name`` and the page.
    """
    unique = sorted(set(pages))
    for region, offset in unique:
        _check_entry(name, region, offset)
    out = bytearray(MAGIC_HPL1)
    _put_uvarint(out, len(unique))
    for region, offset in unique:
        _put_uvarint(out, region)
        _put_uvarint(out, offset)
    return bytes(out)


def _time_to_varint(t: float | None) -> int:
    if t is None:
        return 0
    # Clamped: a time read from a file may sit at the top of the varint range.
    return min(max(0, round(t * 1_000_000)) + 1, _U64_MAX)


def encode_hpl2(
    hot: HotPageList, *, with_times: bool | None = None, name: str = "<bytes>"
) -> bytes:
    """The HPL2 bytes of ``hot``: first-touch order and, optionally, first-touch times.

    ``with_times`` defaults to "when any page has a known time". Pages are checked as by
    :func:`encode_hpl1`.
    """
    entries = hot.entries()
    for (region, offset), _ in entries:
        _check_entry(name, region, offset)
    if with_times is None:
        with_times = any(t is not None for _, t in entries)
    out = bytearray(MAGIC_HPL2)
    _put_uvarint(out, HPL2_FLAG_TIMES if with_times else 0)
    _put_uvarint(out, len(entries))
    for (region, offset), t in entries:
        _put_uvarint(out, region)
        _put_uvarint(out, offset)
        if with_times:
            _put_uvarint(out, _time_to_varint(t))
    return bytes(out)


def encode_hpl3(hot: HotPageList, *, name: str = "<bytes>") -> bytes:
    """The HPL3 bytes of ``hot``: HPL2's entries followed by the plans kept with the list."""
    body = encode_hpl2(hot, name=name)
    out = bytearray(MAGIC_HPL3)
    out += body[len(MAGIC_HPL2) :]
    plans = hot.plans()
    _put_uvarint(out, len(plans))
    for layout, blob in plans.items():
        key = layout.encode("ascii")
        _put_uvarint(out, len(key))
        out += key
        _put_uvarint(out, len(blob))
        out += blob
    return bytes(out)


def encode(hot: HotPageList, fmt: HotPageFormat = "hpl1", name: str = "<bytes>") -> bytes:
    """The bytes of ``hot`` in file format ``fmt``; errors name ``name``."""
    if fmt == "hpl1":
        return encode_hpl1(hot.in_order(), name)
    if fmt == "hpl2":
        return encode_hpl2(hot, name=name)
    if fmt == "hpl3":
        return encode_hpl3(hot, name=name)
    raise ValueError(f"unknown hot-page format {fmt!r} (expected 'hpl1', 'hpl2' or 'hpl3')")


# --- decoding --------------------------------------------------------------------------------


def decode(data: bytes, name: str = "<bytes>", *, strict: bool = False) -> HotPageList:
    """Parse an HPL1 or HPL2 file's bytes; errors name ``name`` and the entry index.

    HPL1 writers sort and deduplicate, but nothing else depends on that, so
    by default an unsorted HPL1 file is accepted in file order and repeated entries are
    dropped (first occurrence wins). With ``strict=True`` both are errors, in either format.
    """
    data = bytes(data)
    magic = data[:4]
    if magic not in (MAGIC_HPL1, MAGIC_HPL2, MAGIC_HPL3):
        if len(data) < 4 and any(m.startswith(magic) for m in (MAGIC_HPL1, MAGIC_HPL2, MAGIC_HPL3)):
            raise HotPageFileError(f"{name}: truncated header ({len(data)} bytes)")
        raise HotPageFileError(
            f"{name}: not a hot-page file (magic {magic!r}, expected HPL1/HPL2/HPL3)"
        )
    hpl3 = magic == MAGIC_HPL3
    hpl2 = magic == MAGIC_HPL2 or hpl3
    pos = 4

    def header_varint(what: str) -> int:
        nonlocal pos
        try:
            value, pos = _get_uvarint(data, pos)
        except _Truncated:
            raise HotPageFileError(f"{name}: truncated {what}") from None
        except _Overflow:
            raise HotPageFileError(f"{name}: {what}: varint overflows 64 bits") from None
        return value

    flags = header_varint("flags") if hpl2 else 0
    if flags & ~_HPL2_KNOWN_FLAGS:
        raise HotPageFileError(f"{name}: unknown flags {flags:#x}")
    with_times = bool(flags & HPL2_FLAG_TIMES)
    count = header_varint("count")
    # Every entry needs at least one byte per varint: check the untrusted count against the
    # bytes actually present before allocating anything from it.
    min_entry = 3 if with_times else 2
    remaining = len(data) - pos
    if count > remaining // min_entry:
        raise HotPageFileError(
            f"{name}: count {count} is more than {remaining} bytes can hold "
            f"(at most {remaining // min_entry} entries)"
        )

    hot = HotPageList()
    hot.source_format = "hpl3" if hpl3 else "hpl2" if hpl2 else "hpl1"
    previous: tuple[int, int] | None = None
    index = 0
    field = ""
    try:
        for index in range(count):
            field = "region index"
            region, pos = _get_uvarint(data, pos)
            field = "page offset"
            offset, pos = _get_uvarint(data, pos)
            t: float | None = None
            if with_times:
                field = "time"
                raw, pos = _get_uvarint(data, pos)
                t = None if raw == 0 else (raw - 1) / 1_000_000
            if offset % _FILE_ALIGN:
                raise HotPageFileError(
                    f"{name}: entry {index}: page offset {offset:#x} is not 4 KiB aligned"
                )
            if region >= REGION_LIMIT:
                raise HotPageFileError(
                    f"{name}: entry {index}: region index {region} is 2**32 or more"
                )
            key = (region, offset)
            if strict and not hpl2 and previous is not None and key < previous:
                raise HotPageFileError(
                    f"{name}: entry {index}: (region {region}, offset {offset:#x}) "
                    "is out of order (HPL1 is sorted)"
                )
            previous = key
            if not hot._add_unlocked(region, offset, t) and strict:
                raise HotPageFileError(
                    f"{name}: entry {index}: (region {region}, offset {offset:#x}) is a duplicate"
                )
    except _Truncated:
        raise HotPageFileError(f"{name}: entry {index}: truncated {field}") from None
    except _Overflow:
        raise HotPageFileError(
            f"{name}: entry {index}: {field}: varint overflows 64 bits"
        ) from None
    if hpl3:
        pos = _decode_plans(data, pos, hot, name)
    if pos != len(data):
        raise HotPageFileError(
            f"{name}: {len(data) - pos} trailing bytes after the last entry (entry {count - 1})"
            if count
            else f"{name}: {len(data) - pos} trailing bytes after an empty list"
        )
    return hot


def _decode_plans(data: bytes, pos: int, hot: HotPageList, name: str) -> int:
    """Read HPL3's plan section into ``hot``; returns the position after it."""

    def varint(what: str) -> int:
        nonlocal pos
        try:
            value, pos = _get_uvarint(data, pos)
        except _Truncated:
            raise HotPageFileError(f"{name}: truncated {what}") from None
        except _Overflow:
            raise HotPageFileError(f"{name}: {what}: varint overflows 64 bits") from None
        return value

    nplans = varint("plan count")
    if nplans > MAX_PLANS:
        raise HotPageFileError(f"{name}: {nplans} stored plans (at most {MAX_PLANS})")
    for i in range(nplans):
        for what in ("layout", "plan"):
            length = varint(f"plan {i}: {what} length")
            if length > len(data) - pos:
                raise HotPageFileError(f"{name}: plan {i}: truncated {what}")
            chunk = data[pos : pos + length]
            pos += length
            if what == "layout":
                try:
                    layout = chunk.decode("ascii")
                except UnicodeDecodeError:
                    raise HotPageFileError(f"{name}: plan {i}: layout is not ASCII") from None
            else:
                hot.set_plan_data(layout, chunk)
    return pos


# --- file I/O --------------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str], *, strict: bool = False, missing_ok: bool = True
) -> HotPageList:
    """Read a hot-page file (HPL1 or HPL2).

    A missing file is an empty list (no hot set means no prefetch), unless ``missing_ok`` is
    False. A corrupt or unreadable file, one that is not a regular file (a FIFO, a device) or
    one larger than :data:`MAX_FILE_BYTES` raises :class:`HotPageFileError`.
    """
    name = os.fspath(path)
    data = read_regular(
        name, "hot-page file", limit=MAX_FILE_BYTES, error=HotPageFileError, missing_ok=True
    )
    if data is None:
        if missing_ok:
            return HotPageList()
        raise HotPageFileError(f"{name}: no such file")
    return decode(data, name, strict=strict)


def save(hot: HotPageList, path: str | os.PathLike[str], fmt: HotPageFormat = "hpl1") -> None:
    """Write ``hot`` to ``path`` in format ``fmt``, atomically (mode 0644).

    Readers see the old file or the new one, never a torn write (see
    :func:`pagefork.files.atomic_save`). A target that exists and is not a regular file (a
    symbolic link, FIFO, device, directory) is refused and left untouched, and a page that no
    reader could take back raises :class:`HotPageEncodeError` before anything is written.
    """
    name = os.fspath(path)
    data = encode(hot, fmt, name)
    atomic_save(name, data, "hot-page file", error=HotPageFileError)


__all__ = [
    "HPL2_FLAG_TIMES",
    "MAGIC_HPL1",
    "MAGIC_HPL2",
    "MAGIC_HPL3",
    "MAX_FILE_BYTES",
    "MAX_PLANS",
    "REGION_LIMIT",
    "HotPage",
    "HotPageEncodeError",
    "HotPageFormat",
    "HotPageList",
    "at_least",
    "decode",
    "encode",
    "encode_hpl1",
    "encode_hpl2",
    "encode_hpl3",
    "intersection",
    "load",
    "save",
    "union",
]
