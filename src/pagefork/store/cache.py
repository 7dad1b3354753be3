"""The host's chunk cache: content-addressed files, bounded, least recently used out first.

Every template and fork on a host shares one cache directory: a chunk is the file named by its
SHA-256, so templates that share content share cache entries too. A chunk enters the cache only
after its SHA-256 was checked (by the caller, against the store's bytes); writes go to a
temporary file, written whole and synced, made read-only (mode 0400), and renamed into place, so
processes that share the directory (two ``serve``s, a daemon) never see half a chunk.

**Verified once per host.** A later read does not hash the entry again: it trusts it when it is
what only this cache could have made. That is safe because:

- The directory is owned by this process's effective uid and is not group- or other-writable
  (created 0700; a directory another user can write is refused at open with a one-line error),
  so no other user can add, replace or rename an entry. It is opened once and every entry is
  opened relative to that descriptor, so a directory swapped for another (or for a symlink)
  later is never followed.
- An entry is trusted only if, seen through the descriptor it is read from (``O_NOFOLLOW``,
  ``fstat``, so no symlink and no race between check and read), it is a regular file owned by
  this uid, with no write permission for anyone (the cache writes 0400) and one link (no other
  name through which it could be written), of the chunk's size. Its bytes are read once and
  those bytes are what is installed: nothing read later can change what was checked.
- An entry that fails those checks but is a regular file of ours (older caches wrote 0600, or
  someone made it writable) is hashed: if it matches it is served and made read-only, so it is
  trusted next time; if not it is removed and fetched again. Anything else under a chunk's name
  (a FIFO, a directory, a symlink, a file of another owner) is not ours: a miss, logged once and
  left alone.

What remains trusted is this uid (and root): a process of the same user that chmods an entry
back to 0400 after changing it is not detected, as it could change the server's own files.
fs-verity would close that gap (the kernel then checks every read against the file's Merkle
tree and no one can write it); it is not used: the kernels this is built on do not enable it
(``FS_IOC_ENABLE_VERITY`` fails with ``EOPNOTSUPP``).

A read refreshes the entry's mtime: eviction drops the oldest mtimes first, across restarts and
processes alike. The directory, not this process's count, is the truth: it is rescanned (sizes
and mtimes) whenever this process has written a sixty-fourth of the bound or 16 chunks since
the last scan, so processes that share it together stay within the bound (each may overshoot by
that much between scans). Only files named as a SHA-256 (and our own temporaries) are ever
removed, and only regular files of this user. A temporary whose writer died mid-write
(SIGKILL, a crash) is removed when a cache opens the directory or rescans it, once no process
has its pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import stat
import threading

from pagefork.errors import StoreError

log = logging.getLogger("pagefork.store")

_ENTRY = re.compile(r"[0-9a-f]{64}")
#: A temporary file being written: ``.tmp-<pid>-<thread>-<random>``.
_TEMPORARY = re.compile(r"\.tmp-(\d+)-\d+-[0-9a-f]{8}")
#: Eviction goes down to this share of the bound, so it does not run on every write.
_LOW_WATER = 0.9
#: The directory is rescanned after this many writes, or this share of the bound written.
_RESCAN_WRITES = 16
_RESCAN_SHARE = 64
#: Any write permission: an entry that has one is hashed before it is served.
_WRITABLE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
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
        where = f"cache directory {self.path}"
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self._dir = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            why = "not a directory" if isinstance(exc, NotADirectoryError) else exc.strerror
            raise StoreError(f"{where}: {why}") from None
        try:
            st = os.fstat(self._dir)
            if st.st_uid != os.geteuid():
                raise StoreError(
                    f"{where}: owned by uid {st.st_uid}, not this user ({os.geteuid()}): "
                    "entries are served unhashed, so the cache must be this user's alone"
                )
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise StoreError(
                    f"{where}: writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                    "entries are served unhashed; chmod 700 it or choose another directory"
                )
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise StoreError(f"{where}: not writable")
        except BaseException:
            os.close(self._dir)
            raise
        self._lock = threading.Lock()
        self._foreign: set[str] = set()  # entries logged as not ours (logged once each)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.evicted = 0
        #: Entries read and hashed (not trusted as they were), and served without hashing.
        self.hashed = 0
        self.trusted = 0
        self._sweep_temporaries()
        self._bytes = sum(size for _, size, _ in self._scan())
        self._since_scan = (0, 0)  # (writes, bytes) since the directory was last scanned

    def _name(self, sha: str) -> str:
        if not _ENTRY.fullmatch(sha):
            raise StoreError(f"{sha!r} is not a SHA-256")
        return sha

    def _scan(self) -> list[tuple[str, int, float]]:
        """(name, size, mtime) of every entry now in the directory."""
        out = []
        with contextlib.suppress(OSError), os.scandir(self._dir) as it:
            for e in it:
                if _ENTRY.fullmatch(e.name):
                    with contextlib.suppress(OSError):
                        st = e.stat(follow_symlinks=False)
                        # Anything else is not ours: neither counted nor ever removed.
                        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                            out.append((e.name, st.st_size, st.st_mtime))
        return out

    def _sweep_temporaries(self) -> int:
        """Remove the temporaries of writers that died mid-write (killed, or the host went
        down): a regular file of ours named ``.tmp-<pid>-...`` whose process is gone. They are
        not entries, so nothing else would ever remove them or count them against the bound.
        The count removed."""
        removed = 0
        with contextlib.suppress(OSError), os.scandir(self._dir) as it:
            for e in it:
                m = _TEMPORARY.fullmatch(e.name)
                if m is None or _alive(int(m.group(1))):
                    continue
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                        os.unlink(e.name, dir_fd=self._dir)
                        removed += 1
        return removed

    def names(self) -> set[str]:
        """The SHA-256 names of the entries now in the directory (one listing)."""
        return {name for name, _, _ in self._scan()}

    @property
    def used_bytes(self) -> int:
        """Bytes the directory held at the last scan, plus what this process wrote since."""
        return self._bytes

    def _not_ours(self, name: str, what: str, *, miss: bool = True) -> None:
        path = os.path.join(self.path, name)
        with self._lock:
            self.misses += miss  # a read that found it; a write that found it is no miss
            first = path not in self._foreign
            self._foreign.add(path)
        if first:
            log.warning("cache entry %s is %s, not a chunk: ignored and left alone", path, what)

    def get(self, sha: str, length: int | None = None) -> bytes | None:
        """The chunk named ``sha``, verified (when it entered the cache, or now: see the
        module's docstring); None when absent, corrupt (then removed), or not ours (then
        left alone)."""
        name = self._name(sha)
        try:
            # Non-blocking: opening a FIFO must not wait for a writer that never comes.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=self._dir)
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        except OSError as exc:  # a symlink (ELOOP), no permission...
            self._not_ours(name, f"unreadable ({exc.strerror})")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._not_ours(name, "not a regular file")
                return None
            if st.st_uid != os.geteuid():
                self._not_ours(name, f"owned by uid {st.st_uid}")
                return None
            try:
                data = _read_all(fd, st.st_size)
            except OSError as exc:
                self._not_ours(name, f"unreadable ({exc.strerror})")
                return None
            with contextlib.suppress(OSError):
                os.utime(fd)  # most recently used: evicted last
            sealed = not st.st_mode & _WRITABLE and st.st_nlink == 1
            if sealed and len(data) == st.st_size and (length is None or len(data) == length):
                with self._lock:  # as this cache wrote it: verified when it entered
                    self.hits += 1
                    self.trusted += 1
                return data
            with self._lock:
                self.hashed += 1
            if hashlib.sha256(data).hexdigest() == sha and (length is None or len(data) == length):
                if st.st_nlink == 1:
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, 0o400)  # verified: trusted from now on
                with self._lock:
                    self.hits += 1
                return data
        finally:
            os.close(fd)
        log.warning(
            "cache entry %s is corrupt: removed, to be fetched again",
            os.path.join(self.path, name),
        )
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self._dir)
        with self._lock:
            self.corrupt += 1
            self.misses += 1
            self._bytes = max(0, self._bytes - len(data))
        return None

    def put(self, sha: str, data: bytes) -> None:
        """Keep ``data`` (whose SHA-256 the caller checked) as ``sha``; may evict others.

        A cache that cannot be written (disk full) costs only the caching: it is logged.
        """
        name = self._name(sha)
        with contextlib.suppress(OSError):
            st = os.lstat(name, dir_fd=self._dir)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                self._not_ours(name, "not a regular file of ours", miss=False)
                return  # renaming over it would remove a file that is not ours
        tmp = f".tmp-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o400, dir_fd=self._dir)  # read-only once closed
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    # On disk before it has its name: a crash never leaves a trusted entry
                    # whose blocks were never written.
                    os.fsync(fd)
                    os.fchmod(fd, 0o400)  # whatever the umask did
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=self._dir)
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
        self._sweep_temporaries()
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
                    os.unlink(name, dir_fd=self._dir)
                total -= size
                removed += 1
            self._bytes = total
            self.evicted += removed
            return removed

    def close(self) -> None:
        """Let the directory go (idempotent); the entries stay for the next process."""
        fd, self._dir = self._dir, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _alive(pid: int) -> bool:
    """True when process ``pid`` exists (as far as this process can see)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


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
