"""Kernel samepage merging (KSM): mark a VMM's memory mergeable, read and tune ``ksmd``.

Forks of one template hold mostly the same bytes: the pages userfaultfd copied from the
template. KSM (``Documentation/admin-guide/mm/ksm.rst``) merges identical anonymous pages of
processes that opted in into one write-protected page; a write to it takes a copy-on-write
fault and gets a private copy back.

- :func:`set_memory_merge` is ``prctl(PR_SET_MEMORY_MERGE, 1)``: every anonymous mapping of
  the process, present and future, becomes mergeable. The flag survives ``execve`` and is
  inherited by children, so a launcher sets it between ``fork`` and ``exec`` of a VMM
  (:func:`merge_preexec`) and the VMM itself (Firecracker, or the jailer and the Firecracker
  it starts) needs no change.
- pagefork never starts ``ksmd`` itself: ``/sys/kernel/mm/ksm/run`` is the host owner's
  choice (:func:`off_note` says how to turn it on). It only tunes the scan rate when asked.

Merging across VMs is a side channel (a tenant can time a write to learn whether another
holds the same page), so sharing is opt-in per template.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pagefork.errors import PageforkError

KSM_DIR = Path("/sys/kernel/mm/ksm")
#: ``include/uapi/linux/prctl.h``.
PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68
#: The command that turns KSM on (as root).
ENABLE_COMMAND = "echo 1 > /sys/kernel/mm/ksm/run"
#: Settings a tuning or a test may write (and must put back): the knobs of ``ksm.rst``.
TUNABLES = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "max_page_sharing",
    "merge_across_nodes",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "smart_scan",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)
#: Counters read to follow ``ksmd``'s progress.
COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "pages_scanned",
    "general_profit",
    "ksm_zero_pages",
)

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class KsmError(PageforkError):
    """KSM cannot be used or tuned as asked (no KSM in the kernel, no permission)."""


def available(root: Path = KSM_DIR) -> bool:
    """True when the kernel has KSM (``/sys/kernel/mm/ksm/run`` exists)."""
    return (root / "run").exists()


def running(root: Path = KSM_DIR) -> bool:
    """True when ``ksmd`` is merging (``run`` is 1)."""
    try:
        return (root / "run").read_text().strip() == "1"
    except OSError:
        return False


def off_note(root: Path = KSM_DIR) -> str | None:
    """One line for a user who asked for shared memory on a host where KSM does not merge;
    None when it does."""
    if not available(root):
        return (
            "memory sharing needs KSM, which this kernel lacks (CONFIG_KSM): forks will "
            "not share memory"
        )
    if running(root):
        return None
    return (
        f"memory sharing needs KSM, which is off on this host: forks will not share memory "
        f"until it is turned on ({ENABLE_COMMAND})"
    )


def set_memory_merge(enable: bool = True) -> None:
    """``prctl(PR_SET_MEMORY_MERGE)`` on the calling process; :class:`KsmError` on failure."""
    if _prctl(PR_SET_MEMORY_MERGE, 1 if enable else 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise KsmError(f"prctl(PR_SET_MEMORY_MERGE): {os.strerror(err)}")


def memory_merge_enabled() -> bool:
    """``prctl(PR_GET_MEMORY_MERGE)`` of the calling process."""
    value = _prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)
    if value < 0:
        err = ctypes.get_errno()
        raise KsmError(f"prctl(PR_GET_MEMORY_MERGE): {os.strerror(err)}")
    return bool(value == 1)


def merge_preexec() -> None:
    """A ``subprocess.Popen(preexec_fn=...)`` that marks the child mergeable before ``exec``.

    Runs in the forked child: only a prctl through a function resolved at import (no
    allocation, no lock), and ``os._exit`` if the kernel refuses, so a VMM never runs
    unshared when sharing was asked for without anyone knowing.
    """
    if _prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        os.write(2, b"pagefork: prctl(PR_SET_MEMORY_MERGE) failed\n")
        os._exit(127)


def read_values(names: tuple[str, ...], root: Path = KSM_DIR) -> dict[str, str]:
    """The present files among ``names``, as their text (stripped)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = (root / name).read_text().strip()
        except OSError:
            continue
    return out


def parse_setting(text: str) -> str:
    """A setting's value as it can be written back: ``advisor_mode`` reads ``[none] scan-time``
    (the choice in brackets), the others read as written."""
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


def settings(root: Path = KSM_DIR) -> dict[str, str]:
    """Every tunable's current value, writable back by :func:`restore`."""
    return {k: parse_setting(v) for k, v in read_values(TUNABLES, root).items()}


def write_setting(name: str, value: int | str, root: Path = KSM_DIR) -> None:
    """Write one tunable; :class:`KsmError` naming it and the kernel's reason on failure."""
    if name not in TUNABLES:
        raise KsmError(f"{name!r} is not a KSM setting")
    path = root / name
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise KsmError(f"cannot set {path} to {value}: {exc.strerror or exc}") from None


def restore(saved: Mapping[str, str], root: Path = KSM_DIR) -> None:
    """Put back every setting of ``saved`` that differs now; ``run`` last (so ``ksmd`` stops
    once the rest is as it was). Tries them all, then raises the first failure."""
    current = settings(root)
    first: KsmError | None = None
    for name in sorted(saved, key=lambda n: n == "run"):
        if current.get(name) == saved[name]:
            continue
        try:
            write_setting(name, saved[name], root)
        except KsmError as exc:
            first = first or exc
    if first is not None:
        raise first


@contextlib.contextmanager
def temporarily(root: Path = KSM_DIR, **values: int | str) -> Iterator[dict[str, str]]:
    """Set tunables for the ``with`` block, then put every setting back as it was, even when
    the block fails (yields the settings as found). For benchmarks and tests: pagefork
    itself never turns KSM on."""
    saved = settings(root)
    try:
        for name in sorted(values, key=lambda n: n == "run"):  # tune first, then start ksmd
            write_setting(name, values[name], root)
        yield saved
    finally:
        restore(saved, root)


@dataclass(frozen=True)
class KsmCounters:
    """``ksmd``'s global counters at one moment (pages, except ``full_scans``)."""

    pages_shared: int = 0
    pages_sharing: int = 0
    pages_unshared: int = 0
    pages_volatile: int = 0
    full_scans: int = 0
    pages_scanned: int = 0
    general_profit: int = 0
    ksm_zero_pages: int = 0


def counters(root: Path = KSM_DIR) -> KsmCounters:
    """The counters of ``/sys/kernel/mm/ksm`` (absent ones read 0)."""
    values: dict[str, int] = {}
    for name, text in read_values(COUNTERS, root).items():
        try:
            values[name] = int(text)
        except ValueError:
            continue
    return KsmCounters(**values)


def parse_thread_cpu(stat: str, clock_ticks: int) -> float:
    """User + system CPU seconds from a ``/proc/PID/stat`` line (fields 14 and 15; the name
    in parentheses may hold spaces, so split after its closing one)."""
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): utime is field 14, stime 15.
    return (int(rest[11]) + int(rest[12])) / clock_ticks


def ksmd_pid() -> int | None:
    """The pid of the ``ksmd`` kernel thread, if there is one."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        ppid = stat[stat.rfind(")") + 2 :].split()[1]
        if name == "ksmd" and ppid == "2":  # a kernel thread: its parent is kthreadd
            return int(entry)
    return None


def ksmd_cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds ``ksmd`` has used since boot; None without a ``ksmd``."""
    pid = ksmd_pid() if pid is None else pid
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_thread_cpu(f.read(), os.sysconf("SC_CLK_TCK"))
    except OSError:
        return None
