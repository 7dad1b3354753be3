"""A Firecracker test double: Firecracker's HTTP API on a Unix socket, with real guest memory.

The Firecracker binary cannot be installed everywhere pagefork is tested, so this process
stands in for it: ``python -m pagefork.testing.fcdouble --api-sock PATH [--fc-version V]``. It
prints one JSON readiness line on stdout once the socket listens. ``--fc-version`` (1.7 to 1.16,
or ``main``) picks the release whose behaviour it reproduces (see
:class:`~pagefork.vmm.firecracker.FirecrackerVersion`). What it does, as Firecracker does:

- ``PUT /snapshot/load`` with ``mem_backend {"backend_type": "Uffd", "backend_path": S}``:
  opens the snapshot's tap devices and binds its vsock socket (with ``network_overrides`` and
  ``vsock_override`` applied), maps each region of the snapshot ``MAP_PRIVATE|MAP_ANONYMOUS``,
  creates a uffd (``O_CLOEXEC|O_NONBLOCK``), ``UFFDIO_API`` with ``EVENT_REMOVE``, registers the
  regions in MISSING mode, connects to ``S`` and sends the bare JSON array of mappings
  (``page_size_kib`` from 1.7, ``page_size`` too from 1.12) plus the uffd in one ``sendmsg``.
  Before 1.12 it then closes that socket; from 1.12 it keeps it open. Only then are the
  devices restored, as Firecracker does: a tap another process holds, a vsock socket that
  cannot be bound, or a ``vsock_override`` for a snapshot without a vsock device (1.16+:
  ``UnknownVsockDevice``) fails the load after the handler got its handshake, and the
  process exits 1. From 1.8 the load then writes a new VMGenID (16 bytes) into guest memory,
  and from 1.14 it also bumps the VMClock page's generation counter (8 bytes): faults the
  page server must serve before the load is answered. ``resume_vm`` false leaves the VM
  paused.
- A load that fails after its body was accepted (an unreadable snapshot, a busy tap, no uffd
  handler...) is answered with its error and then the process exits (status 1), as Firecracker
  does: a fresh process is needed per attempt. Body errors and loads refused because of the
  VM's state ("not allowed after boot") leave it running, and so does the double's own limit
  (it refuses the File backend, which it does not implement).
- Every load field is accepted or refused as the chosen release does (``network_overrides``
  from 1.12, ``track_dirty_pages`` from 1.13, ``clock_realtime`` from 1.14.4/1.15.1,
  ``vsock_override`` from 1.16, ``huge_pages`` on main only, ``"None"`` or ``"2M"``);
  ``network_overrides`` items need ``iface_id`` and ``host_dev_name``, ``vsock_override``
  needs ``uds_path``; other fields inside either are ignored, as Firecracker's structs do not
  deny them. The optional fields Firecracker declares as ``Option`` (``mem_file_path``,
  ``mem_backend``, ``vsock_override``) may be ``null``, which means absent.
- ``PATCH /vm {"state": "Resumed"|"Paused"}``: on the first resume after a load the "guest"
  runs: it reads the snapshot's pages (all of them, or the list in the snapshot file) and checks
  each against the mem-file byte for byte; pausing holds it between pages.
- ``PUT /machine-config`` + ``PUT /actions {"action_type": "InstanceStart"}``: a fresh boot
  (plain anonymous memory filled with seeded content, no uffd), so a template can be made.
- ``PUT /snapshot/create`` (paused only; ``snapshot_type``, ``snapshot_path``,
  ``mem_file_path``, nothing else): writes the mem-file (regions back to back) and the
  snapshot file from guest memory. With ``snapshot_type: "Diff"`` the memory file is sparse,
  as big as guest memory, with data only at the pages the guest wrote since the load (or the
  last snapshot), when the load asked for dirty tracking (``track_dirty_pages``, or
  ``enable_diff_snapshots`` before 1.13); without it, 1.13+ fall back to ``mincore`` (every
  page present, read or written) and older releases refuse. The diff's snapshot file names the
  memory below it (``base``), so a fork of it checks its pages against the chain.
- ``PUT /actions {"action_type": "SendCtrlAltDel"}``: the guest shuts down; the process exits.
- ``GET /``: instance info; ``state`` is ``Not started`` until a load or a boot.

A tap device is "opened" by binding an abstract Unix socket named after it, which, like a tap,
only one process of a network namespace can hold. ``--root DIR`` resolves every path in a
request under ``DIR``, as a Firecracker chrooted by the jailer sees them.

Requests are checked as Firecracker checks them (bad JSON, missing or unknown fields, unknown
``backend_type``, loading twice, wrong state → 400 ``{"fault_message": ...}``); the messages
are close to Firecracker's, not identical.

The double's snapshot file is its own JSON format (:class:`DoubleSnapshot`), not Firecracker's
binary vmstate. Endpoints exist only in the double, under ``/pagefork-test/``:
``GET /pagefork-test/result?wait=SECONDS`` (the guest's run: pages touched, mismatches; waits up
to SECONDS for it to end), ``GET /pagefork-test/requests`` (every API request received), and
three that act as the guest would: ``PUT /pagefork-test/write`` ``{"region", "offset",
"length", "seed"}`` writes seeded bytes (a vCPU's write: logged as dirty), ``PUT
/pagefork-test/remove`` ``{"region", "offset", "length"}`` gives pages back as a balloon does
(``MADV_DONTNEED``), ``PUT /pagefork-test/dump`` ``{"path"}`` writes all guest memory to a file.

:class:`FcDoubleProcess` starts and stops one from a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import random
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from pagefork.errors import VmmError
from pagefork.handshake import encode_mappings
from pagefork.regions import PAGE_SIZE, Region
from pagefork.testing.vmm import GuestMemory
from pagefork.vmm.fc_releases import FirecrackerVersion
from pagefork.vmm.firecracker import FirecrackerApi

SNAPSHOT_FORMAT = "pagefork-fcdouble-snapshot"
#: Where the double's own endpoints live; Firecracker has nothing under this prefix.
TEST_PREFIX = "/pagefork-test/"
#: The release reproduced unless ``--fc-version`` says otherwise.
DEFAULT_FC_VERSION = "1.12"
#: Where a booted double puts its VMGenID: an 8-byte aligned guest-physical address in the low
#: "system memory" Firecracker reserves on x86 (the top of its first 640 KiB).
VMGENID_OFFSET = 0x9FFF0
#: Bytes of the VMGenID (a 128-bit generation id).
VMGENID_SIZE = 16
#: Where a booted double of 1.14+ puts its VMClock page (guest-physical, page aligned, below
#: the VMGenID), and the offset in that page of the generation counter a load bumps.
VMCLOCK_OFFSET = 0x9E000
VMCLOCK_COUNTER = 0x10
#: Bytes of the VMClock generation counter.
VMCLOCK_SIZE = 8
#: The first release that writes the VMClock page while it loads a snapshot.
VMCLOCK_SINCE = (1, 14, 0)
#: The values ``huge_pages`` takes (Firecracker's ``HugePageConfig``).
HUGE_PAGES = ("None", "2M")
#: The longest tap name Linux takes (IFNAMSIZ - 1).
MAX_TAP_NAME = 15
#: Exit status after a failed load.
EXIT_LOAD_FAILED = 1
#: Unmapped hole between regions of a restored guest, like the MMIO gap of a real layout.
_REGION_GAP = 1 << 20
#: Bytes copied per ``memmove`` when dumping guest memory to a mem-file.
_DUMP_CHUNK = 1 << 20


class ApiError(Exception):
    """A request Firecracker would refuse: becomes ``400 {"fault_message": message}``."""


class FatalLoadError(ApiError):
    """A load that failed once under way: answered like :class:`ApiError`, then the process
    exits, as Firecracker does (its VM is in no state to go on)."""


# --- the double's snapshot file --------------------------------------------------------------
@dataclass(frozen=True)
class DoubleSnapshot:
    """The double's VM state: region sizes (back to back in the mem-file), the mem-file the
    guest checks its pages against, and the guest's workload (``touch``: (region, offset)
    pages in order, or ``None`` for every page).

    Like a Firecracker vmstate, it also names the VM's devices: ``vmgenid`` (the offset in
    region 0 of the VMGenID, which a 1.8+ load rewrites; ``None``: no VMGenID device),
    ``network_interfaces`` ((iface_id, host_dev_name) pairs: the taps a load opens) and
    ``vsock_uds`` (the Unix socket a load binds for the vsock device)."""

    regions: tuple[int, ...]
    mem_file: str
    page_size: int = PAGE_SIZE
    touch: tuple[tuple[int, int], ...] | None = None
    vmgenid: int | None = None
    network_interfaces: tuple[tuple[str, str], ...] = ()
    vsock_uds: str | None = None
    #: For a diff snapshot: the memory files below ``mem_file``, bottom (a full mem-file)
    #: first. A page reads from the topmost file that holds data there.
    base: tuple[str, ...] = ()
    #: The offset in region 0 of the VMClock generation counter a 1.14+ load bumps (``None``:
    #: no VMClock device).
    vmclock: int | None = None

    def to_json(self) -> str:
        """The snapshot file's text."""
        return json.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "version": 1,
                "page_size": self.page_size,
                "regions": list(self.regions),
                "mem_file": self.mem_file,
                "touch": None if self.touch is None else [list(p) for p in self.touch],
                "vmgenid": self.vmgenid,
                "network_interfaces": [
                    {"iface_id": i, "host_dev_name": h} for i, h in self.network_interfaces
                ],
                "vsock_uds": self.vsock_uds,
                "base": list(self.base),
                "vmclock": self.vmclock,
            }
        )

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot file at ``path``."""
        with open(path, "w") as f:
            f.write(self.to_json())

    def pages(self) -> list[tuple[int, int]]:
        """The pages the guest reads when resumed, in order."""
        if self.touch is not None:
            return list(self.touch)
        ps = self.page_size
        return [(i, off) for i, size in enumerate(self.regions) for off in range(0, size, ps)]


def read_snapshot(path: str) -> DoubleSnapshot:
    """Parse a double snapshot file; :class:`ApiError` says what is wrong with it."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise ApiError(f"cannot open snapshot file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ApiError(f"snapshot file {path} is not a double snapshot: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
        raise ApiError(f"snapshot file {path} is not a {SNAPSHOT_FORMAT} file")
    try:
        page_size = int(doc.get("page_size", PAGE_SIZE))
        regions = tuple(int(s) for s in doc["regions"])
        mem_file = str(doc["mem_file"])
        touch_doc = doc.get("touch")
        touch = None if touch_doc is None else tuple((int(r), int(o)) for r, o in touch_doc)
        vmgenid = None if doc.get("vmgenid") is None else int(doc["vmgenid"])
        nets = tuple(
            (str(n["iface_id"]), str(n["host_dev_name"])) for n in doc.get("network_interfaces", [])
        )
        vsock = None if doc.get("vsock_uds") is None else str(doc["vsock_uds"])
        base = tuple(str(b) for b in doc.get("base", []))
        vmclock = None if doc.get("vmclock") is None else int(doc["vmclock"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiError(f"snapshot file {path}: malformed ({exc!r})") from None
    if page_size != PAGE_SIZE:
        raise ApiError(f"snapshot file {path}: the double supports {PAGE_SIZE}-byte pages only")
    if not regions or any(s <= 0 or s % page_size for s in regions):
        raise ApiError(f"snapshot file {path}: region sizes must be page multiples > 0")
    for i, (r, off) in enumerate(touch or ()):
        if not (0 <= r < len(regions) and 0 <= off < regions[r] and off % page_size == 0):
            raise ApiError(f"snapshot file {path}: touch entry {i} ({r}, {off}) is not a page")
    if vmgenid is not None and not (0 <= vmgenid <= regions[0] - VMGENID_SIZE and vmgenid % 8 == 0):
        raise ApiError(f"snapshot file {path}: vmgenid {vmgenid:#x} is not in region 0")
    if vmclock is not None and not (
        0 <= vmclock <= regions[0] - VMCLOCK_SIZE and vmclock % VMCLOCK_SIZE == 0
    ):
        raise ApiError(f"snapshot file {path}: vmclock {vmclock:#x} is not in region 0")
    return DoubleSnapshot(regions, mem_file, page_size, touch, vmgenid, nets, vsock, base, vmclock)


class _MemoryChain:
    """What a snapshot's memory reads: its mem-file over its ``base`` files; in a diff file a
    page is data only where the guest wrote it (a hole elsewhere)."""

    def __init__(self, snap: DoubleSnapshot) -> None:
        self.fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in (*snap.base, snap.mem_file)]

    def read(self, offset: int, length: int) -> bytes:
        for fd in reversed(self.fds[1:]):
            try:
                holds = os.lseek(fd, offset, os.SEEK_DATA) == offset
            except OSError:  # ENXIO: no data from there on
                holds = False
            if holds:
                return os.pread(fd, length, offset)
        return os.pread(self.fds[0], length, offset)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


# --- request validation (Firecracker's serde rules: required fields, no unknown ones) ------------
def _fields(
    body: Any,
    what: str,
    required: dict[str, type],
    optional: dict[str, type],
    nullable: frozenset[str] = frozenset(),
    deny_unknown: bool = True,
) -> dict[str, Any]:
    """Check ``body`` as a serde struct: ``required`` and ``optional`` fields of their JSON
    types; ``nullable`` ones (Rust ``Option``) may be ``null``, which counts as absent; unknown
    fields are refused when the struct denies them (``deny_unknown``), else ignored."""
    if not isinstance(body, dict):
        raise ApiError(f"{what}: the body must be a JSON object")
    for name in body:
        if deny_unknown and name not in required and name not in optional:
            expected = ", ".join(f"`{n}`" for n in (*required, *optional))
            raise ApiError(f"{what}: unknown field `{name}`, expected one of {expected}")
    for name, kind in {**required, **optional}.items():
        if name not in body or (name in nullable and body[name] is None):
            if name in required:
                raise ApiError(f"{what}: missing field `{name}`")
            continue
        value = body[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ApiError(f"{what}: field `{name}` must be of type {kind.__name__}")
    return body


def _network_overrides(items: list[Any]) -> list[tuple[str, str]]:
    """``network_overrides`` items: ``iface_id`` and ``host_dev_name`` are required (other
    fields are ignored: Firecracker's ``NetworkOverride`` does not deny unknown ones)."""
    out = []
    for i, item in enumerate(items):
        what = f"network_overrides[{i}]"
        if not isinstance(item, dict):
            raise ApiError(f"{what}: must be an object with `iface_id` and `host_dev_name`")
        for name in ("iface_id", "host_dev_name"):
            if name not in item:
                raise ApiError(f"{what}: missing field `{name}`")
            if not isinstance(item[name], str):
                raise ApiError(f"{what}: field `{name}` must be of type str")
        out.append((item["iface_id"], item["host_dev_name"]))
    return out


#: The JSON type of every ``PUT /snapshot/load`` field any release accepts.
_LOAD_FIELD_TYPES: dict[str, type] = {
    "mem_backend": dict,
    "mem_file_path": str,
    "enable_diff_snapshots": bool,
    "track_dirty_pages": bool,
    "resume_vm": bool,
    "network_overrides": list,
    "vsock_override": dict,
    "clock_realtime": bool,
    "huge_pages": str,
}
#: The load fields Firecracker declares as ``Option``: ``null`` is accepted and means absent.
_NULLABLE_LOAD_FIELDS = frozenset({"mem_file_path", "mem_backend", "vsock_override"})


# --- the VM ------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_DONTNEED = 4


class _Guest:
    """Guest memory of a restored or booted VM and the guest's one workload run."""

    def __init__(self, regions: list[Region], snapshot: DoubleSnapshot | None) -> None:
        self.regions = regions
        self.snapshot = snapshot
        #: What the load wrote into region 0 (VMGenID, VMClock): offset -> the new bytes.
        self.loaded: dict[int, bytes] = {}
        self.running = threading.Event()  # cleared while paused: the guest waits between pages
        self.done = threading.Event()
        self.result: dict[str, Any] = {"state": "not-run"}
        self._thread: threading.Thread | None = None
        #: (region, page offset) the guest wrote since the load or the last snapshot.
        self.dirty: set[tuple[int, int]] = set()

    def load_write(self, offset: int, data: bytes) -> None:
        """The load writes ``data`` at ``offset`` of region 0 (faulting through the uffd);
        the guest's check expects those bytes there."""
        ctypes.memmove(self.regions[0].base + offset, data, len(data))
        self.loaded[offset] = data

    def start(self) -> None:
        """Resume; the first resume after a load starts the workload."""
        self.running.set()
        if self._thread is None and self.snapshot is not None:
            self.result = {"state": "running"}
            self._thread = threading.Thread(target=self._run, name="guest", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        snap = self.snapshot
        assert snap is not None
        ps = snap.page_size
        try:
            template: _MemoryChain | None = _MemoryChain(snap)
        except OSError:
            template = None  # a diff whose files are gone: the pages are read, not checked
        buf = ctypes.create_string_buffer(ps)
        mismatches: list[list[int]] = []
        pages = snap.pages()
        t0 = time.perf_counter()
        for region, off in pages:
            if not self.running.is_set():
                self.running.wait()
            r = self.regions[region]
            # memmove releases the GIL, so the API keeps answering while this page faults.
            ctypes.memmove(buf, r.base + off, ps)
            if template is None:
                continue
            expected = template.read(r.offset + off, ps)
            for at, data in self.loaded.items() if region == 0 else ():
                if off <= at < off + ps:  # the load rewrote these bytes: expect the new ones
                    at -= off
                    expected = expected[:at] + data + expected[at + len(data) :]
            if buf.raw != expected:
                mismatches.append([region, off])
        seconds = time.perf_counter() - t0
        if template is not None:
            template.close()
        self.result = {
            "state": "done",
            "touched": len(pages),
            "checked": template is not None,
            "bad": len(mismatches),
            "mismatches": mismatches[:20],
            "seconds": seconds,
        }
        self.done.set()

    def write(self, region: int, offset: int, data: bytes) -> None:
        """The guest writes ``data`` at ``offset`` of ``region`` (faulting through the uffd);
        the pages are logged dirty, as KVM's dirty log would."""
        r = self.regions[region]
        if not (offset >= 0 and offset + len(data) <= r.size):
            raise ApiError(f"write: {offset:#x}+{len(data):#x} is outside region {region}")
        ctypes.memmove(r.base + offset, data, len(data))
        ps = r.page_size
        self.dirty.update((region, p) for p in range(offset & -ps, offset + len(data), ps))

    def remove(self, region: int, offset: int, length: int) -> None:
        """Give pages back as a balloon does: ``MADV_DONTNEED`` (a ``UFFD_EVENT_REMOVE`` for the
        handler, which the kernel waits for it to read). Then one read of the first page: the
        handler notes a REMOVE before it serves any later fault, so the range is noted when
        this returns."""
        r = self.regions[region]
        if offset % r.page_size or length <= 0 or length % r.page_size or offset + length > r.size:
            raise ApiError(f"remove: {offset:#x}+{length:#x} is not whole pages of region {region}")
        if _libc.madvise(r.base + offset, length, _MADV_DONTNEED) != 0:
            raise ApiError(f"remove: madvise: {os.strerror(ctypes.get_errno())}")
        ctypes.string_at(r.base + offset, 1)

    def present(self) -> set[tuple[int, int]]:
        """Every page present in guest memory (``mincore``): what Firecracker 1.13+ write in a
        Diff snapshot without dirty tracking, pages only read included."""
        out: set[tuple[int, int]] = set()
        for i, r in enumerate(self.regions):
            vec = (ctypes.c_ubyte * (r.size // r.page_size))()
            if _libc.mincore(ctypes.c_void_p(r.base), ctypes.c_size_t(r.size), vec) != 0:
                raise ApiError(f"mincore: {os.strerror(ctypes.get_errno())}")
            out.update((i, k * r.page_size) for k, v in enumerate(vec) if v & 1)
        return out

    def write_diff(self, path: str, pages: set[tuple[int, int]]) -> None:
        """A sparse memory file: regions back to back, data only at ``pages``."""
        with open(path, "wb") as f:
            f.truncate(sum(r.size for r in self.regions))
            for region, off in sorted(pages):
                r = self.regions[region]
                f.seek(r.offset + off)
                f.write(ctypes.string_at(r.base + off, r.page_size))

    def dump(self, path: str) -> None:
        """Write every region, back to back, to ``path`` (faulting in what is missing)."""
        buf = ctypes.create_string_buffer(_DUMP_CHUNK)
        with open(path, "wb") as f:
            for r in self.regions:
                for off in range(0, r.size, _DUMP_CHUNK):
                    n = min(_DUMP_CHUNK, r.size - off)
                    ctypes.memmove(buf, r.base + off, n)
                    f.write(buf.raw[:n])


class FcDouble:
    """The VMM state machine behind the API: not started → loaded/booted → paused/running."""

    def __init__(self, version: FirecrackerVersion, seed: int, root: str | None = None) -> None:
        self.version = version
        self.seed = seed
        self.root = root
        self.lock = threading.Lock()
        self.state = "Not started"
        self.machine_config: dict[str, Any] | None = None
        self.guest: _Guest | None = None
        self.handler_socket: socket.socket | None = None
        self.requests: list[dict[str, Any]] = []
        self.shutting_down = False
        self.exit_code = 0
        self.exit_requested = threading.Event()
        self.devices: list[socket.socket] = []  # open taps and the vsock socket
        self.bound_paths: list[str] = []  # vsock sockets this process created (removed at exit)
        self._net: tuple[tuple[str, str], ...] = ()
        self._vsock: str | None = None
        self._vmgenid: int | None = None
        self._vmclock: int | None = None
        self._track_dirty = False
        self._mem_chain: tuple[str, ...] = ()  # the loaded snapshot's memory: base, mem-file

    def path(self, path: str) -> str:
        """``path`` as this process opens it: under ``--root`` when chrooted by a jailer."""
        if self.root is None:
            return path
        return os.path.join(self.root, path.lstrip("/"))

    # -- pre-boot ------------------------------------------------------------------------
    def _pre_boot(self) -> None:
        if self.state != "Not started":
            raise ApiError("The requested operation is not supported after starting the microVM.")

    def put_machine_config(self, body: Any) -> None:
        """``PUT /machine-config``: memory size for a fresh boot."""
        config = _fields(
            body,
            "machine-config",
            {"vcpu_count": int, "mem_size_mib": int},
            {"smt": bool, "track_dirty_pages": bool, "huge_pages": str, "cpu_template": str},
        )
        if config["mem_size_mib"] <= 0 or config["vcpu_count"] <= 0:
            raise ApiError("machine-config: vcpu_count and mem_size_mib must be > 0")
        self._pre_boot()
        self.machine_config = config

    def instance_start(self) -> None:
        """``InstanceStart``: boot; the guest fills its memory (seeded, every 4th page zero)."""
        self._pre_boot()
        size = (self.machine_config or {}).get("mem_size_mib", 128) << 20
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        rng = random.Random(self.seed)
        for off in range(0, size, PAGE_SIZE):
            if (off // PAGE_SIZE) % 4:
                ctypes.memmove(base + off, rng.randbytes(PAGE_SIZE), PAGE_SIZE)
        self._boot_memory = mem  # keeps the mapping alive: the guest's RAM
        self.guest = _Guest([Region(base, size, 0)], None)
        if self.version.writes_memory_on_load and size >= VMGENID_OFFSET + VMGENID_SIZE:
            self._vmgenid = VMGENID_OFFSET
            ctypes.memmove(base + VMGENID_OFFSET, random.randbytes(VMGENID_SIZE), VMGENID_SIZE)
        else:
            self._vmgenid = None
        self._vmclock = None
        if self.version.key >= VMCLOCK_SINCE and size >= VMGENID_OFFSET:
            self._vmclock = VMCLOCK_OFFSET + VMCLOCK_COUNTER
            ctypes.memmove(base + VMCLOCK_OFFSET, bytes(PAGE_SIZE), PAGE_SIZE)  # counter 0
        self.guest.start()
        self.state = "Running"

    def load_snapshot(self, body: Any) -> None:
        """``PUT /snapshot/load``: the Uffd backend handshake, as this release does it."""
        self._parse_load(body)
        # Like Firecracker: the body is parsed before the VM's state is looked at, and neither
        # kind of refusal ends the process.
        if self.machine_config is not None:
            raise ApiError(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )
        self._pre_boot()
        if body.get("mem_file_path") is not None or body["mem_backend"]["backend_type"] != "Uffd":
            raise ApiError("the test double supports the Uffd memory backend only")
        # From here on, a failure leaves the process in no state to go on: it exits.
        try:
            self._load(body)
        except ApiError as exc:
            raise FatalLoadError(f"Load snapshot error: {exc}") from None

    def _parse_load(self, body: Any) -> None:
        """Refuse what this release's serde structs refuse (a parse error: 400, no exit)."""
        accepted = self.version.load_fields()
        optional = {n: _LOAD_FIELD_TYPES[n] for n in accepted if n != "snapshot_path"}
        _fields(body, "snapshot/load", {"snapshot_path": str}, optional, _NULLABLE_LOAD_FIELDS)
        if (body.get("mem_backend") is None) == (body.get("mem_file_path") is None):
            raise ApiError(
                "snapshot/load: exactly one of `mem_backend` and `mem_file_path` must be given"
            )
        if body.get("huge_pages", "None") not in HUGE_PAGES:
            raise ApiError(
                f"snapshot/load: huge_pages: unknown variant `{body['huge_pages']}`, expected "
                + " or ".join(f"`{v}`" for v in HUGE_PAGES)
            )
        if body.get("mem_backend") is not None:
            backend = _fields(
                body["mem_backend"], "mem_backend", {"backend_type": str, "backend_path": str}, {}
            )
            if backend["backend_type"] not in ("File", "Uffd"):
                raise ApiError(
                    f"mem_backend: unknown variant `{backend['backend_type']}`, "
                    "expected `File` or `Uffd`"
                )
        _network_overrides(body.get("network_overrides", []))
        if body.get("vsock_override") is not None:  # other fields inside are ignored
            _fields(
                body["vsock_override"], "vsock_override", {"uds_path": str}, {}, deny_unknown=False
            )

    def _load(self, body: dict[str, Any]) -> None:
        snap = read_snapshot(self.path(body["snapshot_path"]))
        if not snap.base:  # a diff's memory files may be gone: the Uffd backend never opens them
            self._check_mem_file(snap)
        self._track_dirty = bool(
            body.get("track_dirty_pages", False) or body.get("enable_diff_snapshots", False)
        )
        self._mem_chain = (*snap.base, snap.mem_file)
        # Firecracker's order: guest memory first (the uffd handshake), then the devices,
        # whose restore writes guest memory (VMGenID, VMClock) and may fail (a busy tap).
        self.guest, self.handler_socket = self._connect_uffd(
            snap, self.path(body["mem_backend"]["backend_path"])
        )
        self._open_devices(snap, body)
        self._write_on_load(snap, self.guest)
        self.state = "Paused"
        if body.get("resume_vm", False):
            self.resume()

    def _open_devices(self, snap: DoubleSnapshot, body: dict[str, Any]) -> None:
        """Open the snapshot's taps and bind its vsock socket, overrides applied."""
        taps = dict(snap.network_interfaces)
        for iface, host_dev in _network_overrides(body.get("network_overrides", [])):
            if iface not in taps:
                raise ApiError(f"Invalid network override: no network interface `{iface}`")
            taps[iface] = host_dev
        for iface, host_dev in taps.items():
            tap = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.devices.append(tap)
            if len(host_dev.encode()) > MAX_TAP_NAME:
                raise ApiError(f"Open tap device {host_dev!r} for {iface}: name too long")
            try:  # like TUNSETIFF on a tap another process holds
                tap.bind(f"\0pagefork-fcdouble/tap/{host_dev}")
            except OSError:
                raise ApiError(
                    f"Open tap device {host_dev!r} for {iface} failed: Resource busy (os error 16)"
                ) from None
        self._net = tuple(taps.items())
        override = body.get("vsock_override")
        if override is not None and snap.vsock_uds is None:
            raise ApiError(
                "Failed to restore from snapshot: UnknownVsockDevice: vsock_override names a "
                "vsock device the snapshot does not have"
            )
        uds = override["uds_path"] if override is not None else snap.vsock_uds
        self._vsock = uds
        if uds is not None:
            vsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.devices.append(vsock)
            try:
                vsock.bind(self.path(uds))
            except OSError as exc:
                raise ApiError(
                    f"Cannot create vsock backend at {uds}: {exc.strerror} (os error {exc.errno})"
                ) from None
            self.bound_paths.append(self.path(uds))

    @staticmethod
    def _check_mem_file(snap: DoubleSnapshot) -> None:
        try:
            size = os.stat(snap.mem_file).st_size
        except OSError as exc:
            raise ApiError(f"mem-file {snap.mem_file}: {exc.strerror}") from None
        if sum(snap.regions) > size:
            raise ApiError(
                f"mem-file {snap.mem_file} holds {size} bytes, "
                f"the snapshot's regions need {sum(snap.regions)}"
            )

    def _connect_uffd(self, snap: DoubleSnapshot, path: str) -> tuple[_Guest, socket.socket]:
        # Firecracker's order: uffd + UFFDIO_API + MISSING registration, then connect.
        mem = GuestMemory(list(snap.regions), _REGION_GAP, snap.page_size, hugetlb=False)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            payload = encode_mappings(mem.regions, version=self.version.handshake_version)
            # One sendmsg: the JSON array and the uffd travel together.
            socket.send_fds(sock, [payload], [mem.uffd])
        except OSError as exc:
            sock.close()
            os.close(mem.uffd)
            for r in mem.regions:
                _libc.munmap(r.base, r.size)
            raise ApiError(
                "Failed to restore from snapshot: cannot hand guest memory "
                f"to the uffd handler at {path}: {exc.strerror or exc}"
            ) from None
        if not self.version.keeps_uffd_socket:
            sock.close()  # before 1.12 the socket is dropped once the handshake is sent
        return _Guest(mem.regions, snap), sock

    def _write_on_load(self, snap: DoubleSnapshot, guest: _Guest) -> None:
        """What restoring the devices writes into guest memory: faults the handler serves
        now, before this load is answered."""
        if self.version.writes_memory_on_load and snap.vmgenid is not None:
            guest.load_write(snap.vmgenid, random.randbytes(VMGENID_SIZE))  # a fresh id
        if self.version.key >= VMCLOCK_SINCE and snap.vmclock is not None:
            # The VMClock's generation counter goes up by one: a clone must know it is one.
            counter = ctypes.c_uint64.from_address(guest.regions[0].base + snap.vmclock).value
            guest.load_write(snap.vmclock, ((counter + 1) % (1 << 64)).to_bytes(8, "little"))
        self._vmgenid = snap.vmgenid
        self._vmclock = snap.vmclock

    # -- runtime -------------------------------------------------------------------------
    def _started(self) -> _Guest:
        if self.guest is None:
            raise ApiError("The requested operation is not supported before starting the microVM.")
        return self.guest

    def patch_vm(self, body: Any) -> None:
        """``PATCH /vm``: pause or resume."""
        _fields(body, "vm", {"state": str}, {})
        if body["state"] not in ("Paused", "Resumed"):
            raise ApiError(f"vm: unknown variant `{body['state']}`, expected `Paused` or `Resumed`")
        guest = self._started()
        if body["state"] == "Paused":
            guest.running.clear()
            self.state = "Paused"
        else:
            self.resume()

    def resume(self) -> None:
        """Run the vCPUs (the guest's workload on the first resume after a load)."""
        self._started().start()
        self.state = "Running"

    def create_snapshot(self, body: Any) -> None:
        """``PUT /snapshot/create``: a full snapshot of a paused VM."""
        _fields(
            body,
            "snapshot/create",
            {"snapshot_path": str, "mem_file_path": str},
            {"snapshot_type": str},  # no ``version``: no supported release takes one
        )
        if body.get("snapshot_type", "Full") not in ("Full", "Diff"):
            raise ApiError(
                f"snapshot/create: unknown variant `{body['snapshot_type']}`, "
                "expected `Full` or `Diff`"
            )
        guest = self._started()
        if self.state != "Paused":
            raise ApiError("Create snapshot error: the microVM must be paused first.")
        diff = body.get("snapshot_type") == "Diff"
        if diff and not self._track_dirty and self.version.key < (1, 13, 0):
            raise ApiError(
                "Create snapshot error: Diff snapshots are not enabled: the microVM was "
                "restored without enable_diff_snapshots."
            )
        mem_file = os.path.abspath(self.path(body["mem_file_path"]))
        try:
            if diff:
                pages = guest.dirty if self._track_dirty else guest.present()
                guest.write_diff(mem_file, pages)
                guest.dirty = set()  # the next diff is against this snapshot
            else:
                guest.dump(mem_file)
            touch = guest.snapshot.touch if guest.snapshot is not None else None
            DoubleSnapshot(
                tuple(r.size for r in guest.regions),
                mem_file,
                PAGE_SIZE,
                touch,
                self._vmgenid,
                self._net,
                self._vsock,
                self._mem_chain if diff else (),
                self._vmclock,
            ).write(self.path(body["snapshot_path"]))
        except OSError as exc:
            raise ApiError(f"Create snapshot error: {exc.filename}: {exc.strerror}") from None

    def action(self, body: Any) -> None:
        """``PUT /actions``: InstanceStart, SendCtrlAltDel, FlushMetrics."""
        _fields(body, "actions", {"action_type": str}, {})
        kind = body["action_type"]
        if kind == "InstanceStart":
            self.instance_start()
        elif kind == "SendCtrlAltDel":
            self._started()
            self.shutting_down = True  # the guest "shuts down": exit once this is answered
        elif kind != "FlushMetrics":
            raise ApiError(
                f"actions: unknown variant `{kind}`, expected `FlushMetrics`, `InstanceStart` "
                "or `SendCtrlAltDel`"
            )

    def info(self) -> dict[str, Any]:
        """``GET /``."""
        v = self.version
        return {
            "id": "anonymous-instance",
            "state": self.state,
            "vmm_version": f"{v.major}.{v.minor}.{v.patch}" + ("-dev" if v.main else ""),
            "app_name": "Firecracker",
        }


# --- HTTP ---------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # Firecracker speaks HTTP/1.1 with keep-alive
    server: _ApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test reads /pagefork-test/requests instead

    def _answer(self, status: int, doc: Any = None) -> None:
        self.send_response(status)
        if doc is None:
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(doc).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self) -> None:
        vm = self.server.vm
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith(TEST_PREFIX):
            self._test_endpoint(url, raw)
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            with vm.lock:
                vm.requests.append({"method": self.command, "path": url.path, "raw": raw.decode()})
            self._answer(
                400,
                {
                    "fault_message": "An error occurred when deserializing the json body of a "
                    f"request: {exc}."
                },
            )
            return
        routes: dict[tuple[str, str], Callable[[], Any]] = {
            ("GET", "/"): vm.info,
            ("PUT", "/machine-config"): lambda: vm.put_machine_config(body),
            ("PUT", "/snapshot/load"): lambda: vm.load_snapshot(body),
            ("PUT", "/snapshot/create"): lambda: vm.create_snapshot(body),
            ("PATCH", "/vm"): lambda: vm.patch_vm(body),
            ("PUT", "/actions"): lambda: vm.action(body),
        }
        route = routes.get((self.command, url.path))
        with vm.lock:
            vm.requests.append({"method": self.command, "path": url.path, "body": body})
            if route is None:
                self._answer(
                    400,
                    {
                        "fault_message": "Invalid request method and/or path: "
                        f"{self.command} {url.path}."
                    },
                )
                return
            try:
                answer = route()
            except ApiError as exc:
                self._answer(400, {"fault_message": str(exc)})
                if isinstance(exc, FatalLoadError):
                    vm.exit_code = EXIT_LOAD_FAILED  # answered; now exit, as Firecracker does
                    vm.exit_requested.set()
                return
            self._answer(200 if answer is not None else 204, answer)
            if vm.shutting_down:
                vm.exit_requested.set()

    def _test_endpoint(self, url: urllib.parse.SplitResult, raw: bytes) -> None:
        """``/pagefork-test/...``: the double's own endpoints, not Firecracker's."""
        vm = self.server.vm
        if self.command == "GET" and url.path == TEST_PREFIX + "result":
            wait = float(urllib.parse.parse_qs(url.query).get("wait", ["0"])[0])
            guest = vm.guest
            if guest is not None and guest.snapshot is not None and wait > 0:
                guest.done.wait(wait)
            self._answer(200, guest.result if guest is not None else {"state": "not-run"})
        elif self.command == "GET" and url.path == TEST_PREFIX + "requests":
            with vm.lock:
                self._answer(200, list(vm.requests))
        elif self.command == "PUT" and url.path[len(TEST_PREFIX) :] in ("write", "remove", "dump"):
            try:
                body = json.loads(raw or b"{}")
                self._guest_action(url.path[len(TEST_PREFIX) :], body)
            except (ApiError, ValueError, KeyError, TypeError, OSError) as exc:
                self._answer(400, {"fault_message": f"{url.path}: {exc}"})
                return
            self._answer(204)
        else:
            self._answer(404, {"fault_message": f"no test endpoint {self.command} {url.path}"})

    def _guest_action(self, action: str, body: dict[str, Any]) -> None:
        """The test endpoints that act as the guest (see the module docstring)."""
        guest = self.server.vm._started()
        if action == "write":
            data = random.Random(int(body["seed"])).randbytes(int(body["length"]))
            guest.write(int(body["region"]), int(body["offset"]), data)
        elif action == "remove":
            guest.remove(int(body["region"]), int(body["offset"]), int(body["length"]))
        else:
            guest.dump(str(body["path"]))

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _dispatch


class _ApiServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a long-polling test request must not block exit

    def __init__(self, path: str, vm: FcDouble) -> None:
        self.vm = vm
        super().__init__(path, _Handler)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m pagefork.testing.fcdouble``."""
    p = argparse.ArgumentParser(
        prog="pagefork-fcdouble",
        description="A Firecracker test double: Firecracker's HTTP API on a Unix socket, with "
        "real guest memory, for tests where the Firecracker binary is not installed. It prints "
        "one JSON readiness line on stdout once --api-sock listens, and behaves as the release "
        "chosen with --fc-version does: snapshot loads over a uffd handler, pause and resume, "
        "snapshots, boots. The module pagefork.testing.fcdouble describes it all, and the test "
        "endpoints it adds under /pagefork-test/.",
    )
    p.add_argument("--api-sock", required=True, help="Unix socket path of the HTTP API")
    p.add_argument(
        "--fc-version",
        default=DEFAULT_FC_VERSION,
        help="Firecracker release to reproduce: 1.7 to 1.16 (e.g. 1.14.4), or main",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of a booted guest's memory content")
    p.add_argument("--root", help="resolve request paths under this directory (a jailer chroot)")
    args = p.parse_args(argv)
    try:
        version = FirecrackerVersion.parse(args.fc_version)
    except VmmError as exc:
        p.error(f"--fc-version: {exc}")
    if not version.supported:
        p.error(f"--fc-version: {version} is older than 1.7, which the double does not reproduce")
    vm = FcDouble(version, args.seed, args.root)
    server = _ApiServer(args.api_sock, vm)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    print(json.dumps({"ready": True, "pid": os.getpid(), "api_sock": args.api_sock}), flush=True)
    vm.exit_requested.wait()
    server.shutdown()
    server.server_close()
    for path in [args.api_sock, *vm.bound_paths]:
        with contextlib.suppress(OSError):
            os.unlink(path)
    # A guest blocked in a fault would hang a normal exit; Firecracker just exits too.
    os._exit(vm.exit_code)


# --- controller for tests -------------------------------------------------------------------------
class FcDoubleProcess:
    """Starts the double in a child process and waits (bounded) for its readiness line."""

    def __init__(self, api_sock: str, *extra: str, timeout: float = 30.0) -> None:
        self.api_sock = api_sock
        cmd = [sys.executable, "-m", "pagefork.testing.fcdouble", "--api-sock", api_sock, *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            line.append(self.proc.stdout.readline())
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"Firecracker double gave no readiness line within {timeout:g}s")
        if not line[0]:
            code = self.proc.wait(timeout)
            self.stop()
            raise EOFError(f"Firecracker double exited ({code}) before it was ready")
        self.pid: int = json.loads(line[0])["pid"]
        self.api = FirecrackerApi(api_sock, timeout=timeout)

    def result(self, wait: float = 30.0) -> dict[str, Any]:
        """The guest's run, waiting up to ``wait`` seconds for it to end."""
        doc = self.api.request("GET", f"{TEST_PREFIX}result?wait={wait:g}", timeout=wait + 10)
        assert isinstance(doc, dict)
        return doc

    def requests(self) -> list[dict[str, Any]]:
        """Every API request the double received, in order (method, path, parsed body)."""
        doc = self.api.request("GET", TEST_PREFIX + "requests")
        assert isinstance(doc, list)
        return doc

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; its exit code."""
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill the double if it still runs and reap it; idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FcDoubleProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
