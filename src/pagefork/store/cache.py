"""The host's chunk cache: content-addressed files, bounded, least recently used out first.

Every template and fork on a host shares one cache directory: a chunk is the file named by its
SHA-256, so templates that share content share cache entries too. Writes go to a temporary
file renamed into place, so processes that share the directory (two ``serve``s, a daemon)
never see half a chunk. An entry is verified against its name on every read: a corrupt one is
removed and reported as absent, so it is fetched again. A read refreshes the entry's mtime:
eviction drops the oldest mtimes first, across restarts and processes alike. The directory,
not this process's count, is the truth: it is rescanned (sizes and mtimes) whenever this
process has written a sixty-fourth of the bound or 16 chunks since the last scan, so processes
that share it together stay within the bound (each may overshoot by that much between scans).
Only files named as a SHA-256 (and our own temporaries) are ever removed, and only regular
files: anything else under a chunk's name (a FIFO, a directory, a symlink) is not ours, so it
is a miss, logged once and left alone, and the chunk is served from the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading

from pagefork.errors import StoreError

log = logging.getLogger("pagefork.store")

_ENTRY = re.compile(r"[0-9a-f]{64}")
#: Eviction goes down to this share of the bound, so it does not run on every write.
_LOW_WATER = 0.9
#: The directory is rescanned after this many writes, or this share of the bound written.
_RESCAN_WRITES = 16
_RESCAN_SHARE = 64
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"20G"``, ``"1048576"`` as bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise StoreError(f"cache size {text!r} is not a positive size like 512M or 20G")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/pagefork/chunks`` (``~/.cache/pagefork/chunks``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pagefork", "chunks")


class ChunkCache:
    """Chunks by SHA-256 in ``path``, at most ``max_bytes`` of them (thread-safe)."""

    def __init__(self, path: str, max_bytes: int = 10 << 30) -> None:
        if max_bytes <= 0:
            raise StoreError(f"cache size must be positive, not {max_bytes}")
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cache directory {self.path}: {exc.strerror}") from None
        if not os.path.isdir(self.path):
            raise StoreError(f"cache directory {self.path}: not a directory")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreError(f"cache directory {self.path}: not writable")
        self._lock = threading.Lock()
        self._foreign: set[str] = set()  # entries logged as not ours (logged once each)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.evicted = 0
        self._bytes = sum(size for _, size, _ in self._scan())
        self._since_scan = (0, 0)  # (writes, bytes) since the directory was last scanned

    def _file(self, sha: str) -> str:
        if not _ENTRY.fullmatch(sha):
            raise StoreError(f"{sha!r} is not a SHA-256")
        return os.path.join(self.path, sha)

    def _scan(self) -> list[tuple[str, int, float]]:
        """(name, size, mtime) of every entry now in the directory."""
        out = []
        with contextlib.suppress(OSError), os.scandir(self.path) as it:
            for e in it:
                if _ENTRY.fullmatch(e.name):
                    with contextlib.suppress(OSError):
                        st = e.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):  # anything else is not ours
                            out.append((e.name, st.st_size, st.st_mtime))
        return out

    @property
    def used_bytes(self) -> int:
        """Bytes the directory held at the last scan, plus what this process wrote since."""
        return self._bytes

    def _not_ours(self, path: str, what: str) -> None:
        with self._lock:
            self.misses += 1
            first = path not in self._foreign
            self._foreign.add(path)
        if first:
            log.warning("cache entry %s is %s, not a chunk: ignored and left alone", path, what)

    def get(self, sha: str, length: int | None = None) -> bytes | None:
        """The chunk named ``sha``, verified; None when absent, corrupt (then removed), or
        not a regular file (then left alone)."""
        path = self._file(sha)
        try:
            # Non-blocking: opening a FIFO must not wait for a writer that never comes.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        except OSError as exc:  # a symlink (ELOOP), no permission...
            self._not_ours(path, f"unreadable ({exc.strerror})")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._not_ours(path, "not a regular file")
                return None
            try:
                data = _read_all(fd, st.st_size)
            except OSError as exc:
                self._not_ours(path, f"unreadable ({exc.strerror})")
                return None
            with contextlib.suppress(OSError):
                os.utime(fd)  # most recently used: evicted last
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != sha or (length is not None and len(data) != length):
            log.warning("cache entry %s is corrupt: removed, to be fetched again", path)
            with contextlib.suppress(OSError):
                os.unlink(path)
            with self._lock:
                self.corrupt += 1
                self.misses += 1
                self._bytes = max(0, self._bytes - len(data))
            return None
        with self._lock:
            self.hits += 1
        return data

    def put(self, sha: str, data: bytes) -> None:
        """Keep ``data`` (whose SHA-256 the caller checked) as ``sha``; may evict others.

        A cache that cannot be written (disk full) costs only the caching: it is logged.
        """
        path = self._file(sha)
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                self._not_ours(path, "not a regular file")
                return  # renaming over it would remove a file that is not ours
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path)
            try:
                with open(fd, "wb") as f:
                    f.write(data)
                os.rename(tmp, path)  # atomic: readers see all of it or nothing
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot cache chunk %s in %s: %s", sha[:12], self.path, exc.strerror)
            return
        with self._lock:
            self._bytes += len(data)
            writes, written = self._since_scan[0] + 1, self._since_scan[1] + len(data)
            self._since_scan = (writes, written)
            rescan = (
                self._bytes > self.max_bytes
                or writes >= _RESCAN_WRITES
                or written >= self.max_bytes // _RESCAN_SHARE
            )
        if rescan:  # others sharing the directory may have filled it meanwhile
            self.evict()

    def evict(self) -> int:
        """Rescan the directory; when it holds more than the bound, remove least recently used
        entries down to 90% of it. The count removed."""
        with self._lock:
            self._since_scan = (0, 0)
            entries = sorted(self._scan(), key=lambda e: e[2])
            total = sum(size for _, size, _ in entries)
            target = int(self.max_bytes * _LOW_WATER) if total > self.max_bytes else total
            removed = 0
            for name, size, _ in entries:
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
                total -= size
                removed += 1
            self._bytes = total
            self.evicted += removed
            return removed


def _read_all(fd: int, size: int) -> bytes:
    """The bytes of regular file ``fd`` (``size`` expected; a file that grew is read whole)."""
    parts: list[bytes] = []
    offset = 0
    while True:
        piece = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not piece:
            return b"".join(parts)
        parts.append(piece)
        offset += len(piece)
