"""A VMM's memory as the kernel counts it: ``/proc/PID/smaps_rollup``, ``smaps`` and ``ksm_stat``.

The parsing is pure (text in, figures out) and tested without a kernel; :func:`measure` is the
thin part that reads the files of a live process.

What the figures mean (the kernel's ``Documentation/filesystems/proc.rst``):

- ``Rss``: every page mapped in the process, shared or not;
- ``Pss``: each page divided by the number of processes mapping it, so the ``Pss`` of a set
  of processes adds up to the memory they hold together: the figure a host pays for a burst
  of forks. A page KSM merged across 16 forks counts 1/16 in each;
- ``Private_*`` / ``Shared_*``: pages mapped by this process only, or by others too;
- ``KSM`` (in ``smaps``): bytes of this mapping that are KSM pages;
- ``ksm_stat``'s ``ksm_merging_pages``: this process's pages merged by KSM, ``ksm_zero_pages``
  the ones KSM replaced by the zero page, ``ksm_merge_any`` whether ``PR_SET_MEMORY_MERGE``
  is set on it.

Guest RAM is found without asking the VMM where it lives: it is the memory registered with
userfaultfd in MISSING mode, which ``smaps`` flags ``um`` in ``VmFlags``. The zero page that
``UFFDIO_ZEROPAGE`` maps is not counted in ``Rss``: a template's zero pages cost a fork
nothing until the guest writes them.
"""

from __future__ import annotations

import math
import os
import re
import select
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from pagefork.errors import PageforkError

PAGE = 4096
#: The ``VmFlags`` mnemonic of a mapping registered with userfaultfd in MISSING mode.
UFFD_MISSING_FLAG = "um"

_FIELD = re.compile(r"^([A-Za-z_]+):\s+(\d+)(?:\s+kB)?\s*$")
_VMA_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s")


class MemoryStatsError(PageforkError):
    """A process's memory figures could not be read (it exited, or /proc is unreadable)."""


def parse_smaps_fields(text: str) -> dict[str, int]:
    """The ``Name: N kB`` lines of ``smaps_rollup`` (or of one ``smaps`` mapping) as bytes.

    Lines that are not such a field (the header, ``VmFlags``, ``THPeligible``) are skipped;
    a field given twice is summed (``smaps_rollup`` gives each once).
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m is None:
            continue
        name, value = m.group(1), int(m.group(2))
        scale = 1024 if line.rstrip().endswith("kB") else 1
        out[name] = out.get(name, 0) + value * scale
    return out


@dataclass(frozen=True)
class Mapping:
    """One ``smaps`` entry: its address range, ``kB`` fields (as bytes) and ``VmFlags``."""

    start: int
    end: int
    fields: dict[str, int]
    flags: frozenset[str]


def parse_smaps(text: str) -> list[Mapping]:
    """Every mapping of ``/proc/PID/smaps``."""
    mappings: list[Mapping] = []
    start = end = 0
    lines: list[str] = []
    flags: frozenset[str] = frozenset()
    seen = False

    def close() -> None:
        if seen:
            mappings.append(Mapping(start, end, parse_smaps_fields("\n".join(lines)), flags))

    for line in text.splitlines():
        header = _VMA_HEADER.match(line)
        if header is not None:
            close()
            start, end = int(header.group(1), 16), int(header.group(2), 16)
            lines, flags, seen = [], frozenset(), True
        elif line.startswith("VmFlags:"):
            flags = frozenset(line.split(":", 1)[1].split())
        else:
            lines.append(line)
    close()
    return mappings


def parse_ksm_stat(text: str) -> dict[str, int | bool]:
    """``/proc/PID/ksm_stat``: numbers as ints, ``yes``/``no`` as bools."""
    out: dict[str, int | bool] = {}
    for line in text.splitlines():
        # Older kernels write "name N", newer ones "name: yes" for the flags.
        name, _, value = line.replace(":", " ", 1).partition(" ")
        value = value.strip()
        if not name or not value:
            continue
        if value in ("yes", "no"):
            out[name] = value == "yes"
        elif value.lstrip("-").isdigit():
            out[name] = int(value)
    return out


@dataclass(frozen=True)
class ProcessMemory:
    """One process's memory, in bytes (``*_pages`` in pages), at one moment.

    The ``guest_*`` figures cover guest RAM only (userfaultfd-registered mappings); the others
    the whole process (a VMM's own code and heap too). ``ksm_*`` are None where the kernel has
    no ``ksm_stat``.
    """

    pid: int
    rss: int
    pss: int
    private: int
    shared: int
    anonymous: int
    swap: int
    ksm: int
    guest_size: int
    guest_rss: int
    guest_pss: int
    guest_private: int
    guest_ksm: int
    ksm_merging_pages: int | None = None
    ksm_zero_pages: int | None = None
    ksm_profit: int | None = None
    merge_any: bool | None = None

    def to_dict(self) -> dict[str, int | bool | None]:
        """JSON-ready: byte counts end in ``_bytes``."""
        out: dict[str, int | bool | None] = {}
        for name, value in asdict(self).items():
            if name in ("pid", "ksm_merging_pages", "ksm_zero_pages", "merge_any"):
                out[name] = value
            else:
                out[f"{name}_bytes"] = value
        return out


def memory_from_text(
    pid: int, rollup: str, smaps: str | None = None, ksm_stat: str | None = None
) -> ProcessMemory:
    """A :class:`ProcessMemory` from the text of the three files (``smaps`` None: no guest
    figures; ``ksm_stat`` None: no KSM figures)."""
    r = parse_smaps_fields(rollup)
    guest = {"Size": 0, "Rss": 0, "Pss": 0, "Private": 0, "KSM": 0}
    for m in parse_smaps(smaps or ""):
        if UFFD_MISSING_FLAG not in m.flags:
            continue
        f = m.fields
        guest["Size"] += f.get("Size", m.end - m.start)
        guest["Rss"] += f.get("Rss", 0)
        guest["Pss"] += f.get("Pss", 0)
        guest["Private"] += f.get("Private_Clean", 0) + f.get("Private_Dirty", 0)
        guest["KSM"] += f.get("KSM", 0)
    k = parse_ksm_stat(ksm_stat) if ksm_stat is not None else {}

    def ksm_int(name: str) -> int | None:
        v = k.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    merge_any = k.get("ksm_merge_any")
    return ProcessMemory(
        pid=pid,
        rss=r.get("Rss", 0),
        pss=r.get("Pss", 0),
        private=r.get("Private_Clean", 0) + r.get("Private_Dirty", 0),
        shared=r.get("Shared_Clean", 0) + r.get("Shared_Dirty", 0),
        anonymous=r.get("Anonymous", 0),
        swap=r.get("Swap", 0),
        ksm=r.get("KSM", 0),
        guest_size=guest["Size"],
        guest_rss=guest["Rss"],
        guest_pss=guest["Pss"],
        guest_private=guest["Private"],
        guest_ksm=guest["KSM"],
        ksm_merging_pages=ksm_int("ksm_merging_pages"),
        ksm_zero_pages=ksm_int("ksm_zero_pages"),
        ksm_profit=ksm_int("ksm_process_profit"),
        merge_any=merge_any if isinstance(merge_any, bool) else None,
    )


def _read(path: str, pid: int, required: bool) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        if required:
            raise MemoryStatsError(f"process {pid} has exited ({path} is gone)") from None
        return None
    except ProcessLookupError:
        raise MemoryStatsError(f"process {pid} has exited") from None
    except OSError as exc:
        if required:
            raise MemoryStatsError(f"{path}: {exc.strerror or exc}") from None
        return None


def measure(pid: int, guest: bool = True) -> ProcessMemory:
    """Read a live process's memory (``guest`` False skips ``smaps``, the costlier file).

    Raises :class:`MemoryStatsError` if the process is gone or its files unreadable; a
    kernel without ``ksm_stat`` only leaves the KSM figures None. An exiting process (a
    zombie) reads as empty: measure a VMM while it lives.
    """
    base = f"/proc/{pid}"
    rollup = _read(f"{base}/smaps_rollup", pid, required=True)
    assert rollup is not None
    if not rollup.strip():
        raise MemoryStatsError(f"process {pid} has no memory left (it is exiting)")
    smaps = _read(f"{base}/smaps", pid, required=True) if guest else None
    ksm_stat = _read(f"{base}/ksm_stat", pid, required=False)
    return memory_from_text(pid, rollup, smaps, ksm_stat)


def try_measure(pid: int | None, guest: bool = True) -> ProcessMemory | None:
    """:func:`measure`, or None when there is no pid or the process is gone."""
    if pid is None:
        return None
    try:
        return measure(pid, guest)
    except MemoryStatsError:
        return None


def total(memories: list[ProcessMemory], name: str) -> int:
    """The sum of one figure (a field of :class:`ProcessMemory`) over several processes."""
    return sum(int(getattr(m, name) or 0) for m in memories)


class MemorySampler:
    """Measures registered processes every ``interval`` seconds on one thread, keeping each
    one's last figures and its peak ``Pss``.

    A VMM's memory can only be read while it lives, and a fork's session usually ends because
    its VMM exited: whoever reports a fork's end (``pagefork serve``'s ``fork_end``) adds the
    fork's VMM here when it connects and takes its figures when it ends: measured afresh if
    the VMM still lives, else the last sample. Each process is held by a pidfd, so a pid the
    kernel hands to another process after the VMM's exit is never measured in its place.
    """

    def __init__(self, interval: float = 2.0) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be > 0, not {interval}")
        self.interval = interval
        self._lock = threading.Lock()
        self._procs: dict[str, _Sampled] = {}
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def add(self, key: str, pid: int) -> None:
        """Sample ``pid`` under ``key`` from now on (a first time at once); a process that is
        already gone is ignored."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        entry = _Sampled(pid, pidfd)
        with self._lock:
            old = self._procs.pop(key, None)
            self._procs[key] = entry
        if old is not None:
            old.close()
        self._sample(entry)

    def take(self, key: str) -> dict[str, Any] | None:
        """Stop sampling ``key``; its figures (:meth:`ProcessMemory.to_dict`) with
        ``peak_pss_bytes`` and ``age_s`` (seconds since they were read: 0 when read now,
        from a live process), or None if they were never read."""
        with self._lock:
            entry = self._procs.pop(key, None)
        if entry is None:
            return None
        try:
            self._sample(entry)
        finally:
            entry.close()
        if entry.last is None:
            return None
        doc: dict[str, Any] = dict(entry.last.to_dict())
        doc["peak_pss_bytes"] = entry.peak
        doc["age_s"] = round(time.monotonic() - entry.taken_at, 3)
        return doc

    @staticmethod
    def _sample(entry: _Sampled) -> None:
        with entry.lock:
            if entry.pidfd < 0 or select.select([entry.pidfd], [], [], 0)[0]:
                return  # closed, or the process has exited: keep the last sample
            memory = try_measure(entry.pid)
            if memory is None:
                return
            entry.last = memory
            entry.peak = max(entry.peak, memory.pss)
            entry.taken_at = time.monotonic()

    def pause(self, paused: bool) -> None:
        """Stop the periodic samples (True), even one under way, until told to go on (False):
        for a spell when the CPU they take is wanted elsewhere (a takeover's handover, when a
        sample of many VMMs would hold up the forks). :meth:`add` and :meth:`take` still
        measure."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                entries = list(self._procs.values())
            for entry in entries:
                if self._paused.is_set():
                    break
                self._sample(entry)

    def close(self) -> None:
        """Stop the thread and let go of every process; idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            entries = list(self._procs.values())
            self._procs.clear()
        for entry in entries:
            entry.close()


class _Sampled:
    """One process a :class:`MemorySampler` follows: its pidfd and what was read of it."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.lock = threading.Lock()  # one reader at a time, and no read after close
        self.last: ProcessMemory | None = None
        self.peak = 0
        self.taken_at = 0.0

    def close(self) -> None:
        with self.lock:
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1
