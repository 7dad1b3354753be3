"""Firecracker under its jailer: one chroot per fork, with the fork's files reachable inside.

The jailer (``jailer --id ID --exec-file FC --uid U --gid G --chroot-base-dir BASE``) runs
Firecracker chrooted at ``BASE/<exec-file name>/ID/root``, as ``U:G``, optionally in a network
namespace (``--netns``). Firecracker then resolves every path it is given inside that root, so
before the jailer starts, :class:`Jail` makes the fork's files reachable there:

- the snapshot's vmstate, as a hard link (or a copy when the link cannot be made or the jailed
  uid could not read it);
- the fork's uffd socket, as a hard link (a Unix socket is reached through its inode, so a link
  connects to the page server), or a bind mount across file systems; it is handed to ``U:G``,
  since the page server makes it mode 0600.

The mem-file is not linked: with the Uffd backend Firecracker never opens it (the page server
serves it), and a jailed VMM gets no more than it needs. Every vsock or other relative path in
the snapshot lands inside the chroot too, so concurrent forks never collide on it.

:meth:`Jail.cleanup` removes exactly what :meth:`Jail.prepare` created, and nothing the jailer
or anyone else put there.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagefork.errors import VmmError

#: Where Firecracker's API socket is inside the chroot (the jailer's default).
API_SOCKET_IN_JAIL = "/run/firecracker.socket"
#: The uffd socket's name inside the chroot.
UFFD_SOCKET_IN_JAIL = "/uffd.sock"
#: The jailer's rule for ``--id``: alphanumerics and hyphens, at most 64 characters.
_JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_MS_BIND = 4096
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


class JailerError(VmmError):
    """The jail of a fork cannot be set up (a bad setting, a file in the way)."""


@dataclass(frozen=True)
class JailerConfig:
    """How to start Firecracker through the jailer.

    ``netns`` is a path pattern such as ``/var/run/netns/{fork}``: the fork's own network
    namespace (made by the platform, with the fork's tap in it), for releases before 1.12 that
    cannot rename a tap on load. ``extra_args`` go to the jailer before ``--``.
    """

    binary: str
    exec_file: str
    chroot_base: str
    uid: int
    gid: int
    netns: str | None = None
    extra_args: tuple[str, ...] = ()


def parse_jailer(value: Any) -> JailerConfig:
    """Validate the ``jailer`` driver option; :class:`JailerError` names the bad key."""
    if not isinstance(value, Mapping):
        raise JailerError(f"must be an object, not {value!r}")
    known = ("binary", "exec_file", "chroot_base", "uid", "gid", "netns", "extra_args")
    for key in value:
        if key not in known:
            raise JailerError(f"key {key!r} is unknown (known: {', '.join(known)})")
    for key in ("binary", "exec_file", "chroot_base"):
        path = value.get(key)
        if not isinstance(path, str) or not os.path.isabs(path):
            raise JailerError(f"key {key!r} must be an absolute path, not {path!r}")
    for key in ("uid", "gid"):
        n = value.get(key)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**32 - 1:
            raise JailerError(f"key {key!r} must be a numeric id, not {n!r}")
    netns = value.get("netns")
    if netns is not None:
        if not isinstance(netns, str) or not os.path.isabs(netns):
            raise JailerError(f"key 'netns' must be an absolute path pattern, not {netns!r}")
        format_pattern("netns", netns, "fork-1")
    extra = value.get("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise JailerError(f"key 'extra_args' must be a list of strings, not {extra!r}")
    return JailerConfig(
        binary=value["binary"],
        exec_file=value["exec_file"],
        chroot_base=value["chroot_base"],
        uid=value["uid"],
        gid=value["gid"],
        netns=netns,
        extra_args=tuple(extra),
    )


#: Hex digits of ``{fork_hash}``: 40 bits, so thousands of concurrent forks do not collide,
#: and ``tap-{fork_hash}`` (14 characters) fits a Linux interface name.
FORK_HASH_DIGITS = 10


def fork_hash(fork: str) -> str:
    """The ``{fork_hash}`` of ``fork``: the first :data:`FORK_HASH_DIGITS` hex digits of the
    SHA-256 of its id (``printf %s ID | sha256sum | cut -c1-10`` gives the same)."""
    return hashlib.sha256(fork.encode()).hexdigest()[:FORK_HASH_DIGITS]


def format_pattern(what: str, pattern: str, fork: str, iface: str = "") -> str:
    """``pattern`` with ``{fork}``, ``{fork_hash}`` (and ``{iface}``) filled in;
    :class:`JailerError` if it names any other field."""
    try:
        return pattern.format(fork=fork, fork_hash=fork_hash(fork), iface=iface)
    except (KeyError, IndexError, ValueError) as exc:
        raise JailerError(
            f"{what} pattern {pattern!r} is not valid: only {{fork}}, {{fork_hash}} and "
            f"{{iface}} may be used ({exc!r})"
        ) from None


class Jail:
    """One fork's jail: its chroot layout, the jailer's command line, and the cleanup."""

    def __init__(self, config: JailerConfig, fork_id: str) -> None:
        if not _JAIL_ID.match(fork_id):
            raise JailerError(
                f"fork id {fork_id!r} cannot be a jailer --id (letters, digits and '-', at most 64)"
            )
        self.config = config
        self.fork_id = fork_id
        self.jail_dir = os.path.join(
            config.chroot_base, os.path.basename(config.exec_file), fork_id
        )
        self.root = os.path.join(self.jail_dir, "root")
        self.netns = (
            None if config.netns is None else format_pattern("netns", config.netns, fork_id)
        )
        self._made_dirs: list[str] = []
        self._made_files: list[str] = []
        self._mounts: list[str] = []

    @property
    def api_socket(self) -> str:
        """Firecracker's API socket as the host sees it."""
        return self.host_path(API_SOCKET_IN_JAIL)

    def host_path(self, inside: str) -> str:
        """The host path of ``inside`` (a path as the jailed Firecracker sees it)."""
        return os.path.join(self.root, inside.lstrip("/"))

    def command(self) -> list[str]:
        """The jailer's argv."""
        c = self.config
        argv = [
            c.binary,
            "--id",
            self.fork_id,
            "--exec-file",
            c.exec_file,
            "--uid",
            str(c.uid),
            "--gid",
            str(c.gid),
            "--chroot-base-dir",
            c.chroot_base,
        ]
        if self.netns is not None:
            argv += ["--netns", self.netns]
        argv += [*c.extra_args, "--", "--api-sock", API_SOCKET_IN_JAIL]
        return argv

    def prepare(self, snapshot_path: str, uffd_socket: str) -> tuple[str, str]:
        """Make the vmstate and the uffd socket reachable in the chroot; returns their paths
        as Firecracker sees them (for ``PUT /snapshot/load``). On failure, undoes itself."""
        if self.netns is not None and not os.path.exists(self.netns):
            raise JailerError(
                f"fork {self.fork_id}: network namespace {self.netns} does not exist "
                "(create it, with the fork's tap inside, before the restore)"
            )
        try:
            self._makedirs(os.path.join(self.root, "run"))
            snap_inside = "/" + os.path.basename(snapshot_path)
            self._place_file(snapshot_path, self.host_path(snap_inside))
            self._place_socket(uffd_socket, self.host_path(UFFD_SOCKET_IN_JAIL))
        except BaseException:
            self.cleanup()
            raise
        return snap_inside, UFFD_SOCKET_IN_JAIL

    def _makedirs(self, path: str) -> None:
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o755)
            except OSError as exc:
                raise JailerError(f"cannot create {d}: {exc.strerror}") from None
            self._made_dirs.append(d)

    def _claim(self, dst: str) -> None:
        if os.path.lexists(dst):
            raise JailerError(
                f"fork {self.fork_id}: {dst} already exists (a jail of the same id is in use "
                "or was left behind); it is not ours to replace"
            )

    def _place_file(self, src: str, dst: str) -> None:
        """A hard link when the jailed uid can read the file through it, else a copy."""
        self._claim(dst)
        try:
            st = os.stat(src)
        except OSError as exc:
            raise JailerError(f"snapshot {src}: {exc.strerror}") from None
        readable = st.st_uid == self.config.uid or st.st_mode & stat.S_IROTH
        try:
            if not readable:
                raise OSError(errno.EACCES, "not readable by the jail's uid")
            os.link(src, dst)
            self._made_files.append(dst)
        except OSError:
            try:
                shutil.copyfile(src, dst)
                self._made_files.append(dst)
                os.chown(dst, self.config.uid, self.config.gid)
            except OSError as exc:
                raise JailerError(f"cannot place {src} at {dst}: {exc.strerror}") from None

    def _place_socket(self, src: str, dst: str) -> None:
        """A hard link to the socket, or a bind mount across file systems; owned by the jail."""
        self._claim(dst)
        try:
            os.link(src, dst)
            self._made_files.append(dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise JailerError(
                    f"cannot link uffd socket {src} to {dst}: {exc.strerror}"
                ) from None
            with open(dst, "x"):  # the mount point
                pass
            self._made_files.append(dst)
            if _libc.mount(src.encode(), dst.encode(), None, _MS_BIND, None) != 0:
                err = ctypes.get_errno()
                raise JailerError(
                    f"cannot bind-mount uffd socket {src} at {dst}: {os.strerror(err)}"
                ) from None
            self._mounts.append(dst)
        try:
            # The page server makes fork sockets 0600: the jailed VMM must own it to connect.
            os.chown(dst, self.config.uid, self.config.gid)
        except OSError as exc:
            raise JailerError(f"cannot hand {dst} to the jail's uid: {exc.strerror}") from None

    def made(self) -> dict[str, list[str]]:
        """What :meth:`prepare` made, for :func:`remove_made` in another process (a daemon
        that adopts the jailed Firecracker in a takeover)."""
        return {
            "mounts": list(self._mounts),
            "files": list(self._made_files),
            "dirs": list(self._made_dirs),
        }

    def cleanup(self) -> None:
        """Remove what :meth:`prepare` made (mounts, links, copies, empty directories)."""
        remove_made(self.made())
        self._mounts.clear()
        self._made_files.clear()
        self._made_dirs.clear()


def remove_made(made: dict[str, list[str]]) -> None:
    """Remove what a jail's :meth:`Jail.prepare` made, as :meth:`Jail.made` lists it."""
    for path in reversed(made.get("mounts", [])):
        _libc.umount2(path.encode(), _MNT_DETACH)
    for path in reversed(made.get("files", [])):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    for d in reversed(made.get("dirs", [])):
        try:
            os.rmdir(d)  # only if empty: what the jailer put there is not ours
        except OSError:
            break


__all__ = [
    "API_SOCKET_IN_JAIL",
    "FORK_HASH_DIGITS",
    "UFFD_SOCKET_IN_JAIL",
    "Jail",
    "JailerConfig",
    "JailerError",
    "fork_hash",
    "format_pattern",
    "parse_jailer",
    "remove_made",
]
