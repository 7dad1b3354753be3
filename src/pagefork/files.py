"""The files a user names: inputs opened without surprises, outputs saved atomically.

Every path a user hands pagefork (a mem-file, a hot-page file, the output of ``--record`` or
``hotpages merge -o``) goes through this module, so the same rules hold everywhere.

Reading (:func:`open_regular`, :func:`read_regular`):

- The path is first opened with ``O_PATH``, which neither blocks on a FIFO nor runs a device's
  open routine (opening ``/dev/watchdog`` arms it), and checked with ``fstat``: anything but a
  regular file is refused before a byte is read. The same inode is then reopened for reading
  through ``/proc/self/fd``, so nothing can be swapped in between the check and the open.
- Symbolic links are followed: reading the regular file a link points to is harmless.
- Whole-file reads are bounded by a size limit: a file that grows past it is refused.

Saving (:func:`atomic_save`, :func:`check_writable`):

- The target must be absent or a regular file. A directory, FIFO, socket or device node is
  refused and left untouched: saving never replaces what pagefork did not create.
- A symbolic link is refused too, naming its target. Replacing the link would silently cut it,
  and writing through it would replace a file the user never named (as root, ``-o link`` to
  ``/etc/passwd``). A user who means the target can name it.
- The bytes go to ``.NAME.XXXXXXXX.tmp`` in the target's directory, created with
  ``O_EXCL|O_NOFOLLOW`` (never an existing file, never through a link), fsynced, renamed over
  the target, and the directory is fsynced so the rename survives a crash. Readers see the old
  file or the new one, never a torn write. On any error, a full disk included, only that temp
  file is removed and the old file stays as it was.

The check and the rename are two steps; ``rename`` only replaces a directory entry and never
writes into what it names, so the worst a race can do is unlink an entry swapped in between.

Not a library: ``atomicwrites`` is archived, and neither it nor the maintained ones
(``atomicwriter``, ``safer``) refuse non-regular targets or symbolic links, which is the point.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from typing import BinaryIO

from pagefork.errors import PageforkError

#: The most bytes of a name kept in a temp file's name (NAME_MAX is 255).
_TMP_NAME_KEEP = 200


class FileError(PageforkError):
    """A file a user named cannot be read or saved: the message names what, where, and why."""


ErrorType = type[PageforkError]
Writer = Callable[[BinaryIO], None]


def _kind(mode: int) -> str:
    """What a non-regular file is, phrased like a strerror (``cannot read: Is a FIFO``)."""
    if stat.S_ISDIR(mode):
        return "Is a directory"
    if stat.S_ISFIFO(mode):
        return "Is a FIFO"
    if stat.S_ISCHR(mode):
        return "Is a character device"
    if stat.S_ISBLK(mode):
        return "Is a block device"
    if stat.S_ISSOCK(mode):
        return "Is a socket"
    if stat.S_ISLNK(mode):
        return "Is a symbolic link"
    return "Is not a regular file"


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --- reading ---------------------------------------------------------------------------------


class _NotRegular(Exception):
    def __init__(self, mode: int) -> None:
        super().__init__(_kind(mode))


def _open_regular_fd(path: str) -> int:
    """An fd open for reading on the regular file at ``path``; raises OSError or _NotRegular."""
    path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular(st.st_mode)
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = os.open(f"/proc/self/fd/{path_fd}", flags)
        except FileNotFoundError:
            # No /proc: open the path itself (O_NONBLOCK: a FIFO swapped in cannot block
            # us) and check it is still the inode that was checked.
            fd = os.open(path, flags)
            again = os.fstat(fd)
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise _NotRegular(again.st_mode) from None
    finally:
        os.close(path_fd)
    os.set_blocking(fd, True)  # a regular file: later reads need no special handling
    return fd


def open_regular(path: str | os.PathLike[str], what: str, *, error: ErrorType = FileError) -> int:
    """Open the regular file at ``path`` for reading and return the fd (the caller closes it).

    ``what`` names the file in errors ("mem-file", "hot-page file"); ``error`` is the
    :class:`~pagefork.errors.PageforkError` subclass raised, with a one-line message such as
    ``hot-page file /dev/zero: cannot read: Is a character device, not a regular file``.
    """
    name = os.fspath(path)
    try:
        return _open_regular_fd(name)
    except _NotRegular as exc:
        raise error(f"{what} {name}: cannot read: {exc}, not a regular file") from None
    except OSError as exc:
        raise error(f"{what} {name}: cannot read: {_strerror(exc)}") from None


def read_regular(
    path: str | os.PathLike[str],
    what: str,
    *,
    limit: int,
    error: ErrorType = FileError,
    missing_ok: bool = False,
) -> bytes | None:
    """The whole content of the regular file at ``path``, at most ``limit`` bytes.

    Returns None when the file does not exist and ``missing_ok`` is true. A larger file, a
    non-regular one, or one that cannot be read raises ``error`` naming ``what`` and ``path``.
    """
    name = os.fspath(path)
    try:
        fd = _open_regular_fd(name)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{what} {name}: cannot read: No such file or directory") from None
    except _NotRegular as exc:
        raise error(f"{what} {name}: cannot read: {exc}, not a regular file") from None
    except OSError as exc:
        raise error(f"{what} {name}: cannot read: {_strerror(exc)}") from None
    too_big = f"{what} {name}: cannot read: larger than {limit} bytes, the most pagefork reads"
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > limit:
            raise error(too_big)
        try:
            data = f.read(limit + 1)  # the file may have grown since the fstat
        except OSError as exc:
            raise error(f"{what} {name}: cannot read: {_strerror(exc)}") from None
    if len(data) > limit:
        raise error(too_big)
    return data


# --- saving ----------------------------------------------------------------------------------


def _check_target(name: str, what: str, error: ErrorType) -> None:
    """Refuse an existing target that is not a regular file (a symbolic link included)."""
    if not name:
        raise error(f"{what}: cannot write: the path is empty")
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"{what} {name}: cannot write: {_strerror(exc)}") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name)
        except OSError:
            target = "?"
        raise error(
            f"{what} {name}: cannot write: Is a symbolic link (to {target}), "
            "not a regular file; left untouched"
        )
    if not stat.S_ISREG(st.st_mode):
        raise error(
            f"{what} {name}: cannot write: {_kind(st.st_mode)}, not a regular file; left untouched"
        )


def _create_temp(name: str) -> tuple[int, bytes]:
    """A new file ``.NAME.XXXXXXXX.tmp`` beside ``name``; returns (fd, its path)."""
    directory = os.fsencode(os.path.dirname(name) or ".")
    base = os.fsencode(os.path.basename(name))[:_TMP_NAME_KEEP]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        token = secrets.token_hex(4).encode()
        tmp = os.path.join(directory, b"." + base + b"." + token + b".tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(17, "could not pick a fresh temporary name")


def _temp_beside(name: str, what: str, error: ErrorType) -> tuple[int, bytes]:
    try:
        return _create_temp(name)
    except FileNotFoundError:
        directory = os.path.dirname(name) or "."
        raise error(f"{what} {name}: cannot write: directory {directory} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {name}: cannot write: {_strerror(exc)}") from None


def check_writable(
    path: str | os.PathLike[str], what: str, *, error: ErrorType = FileError
) -> None:
    """Check up front that :func:`atomic_save` to ``path`` can succeed; raises ``error``.

    The target must be absent or a regular file, and its directory must take a new file: a
    temp file is created there and removed at once, which tests exactly what a save needs
    (permissions, a read-only file system, a missing directory).
    """
    name = os.fspath(path)
    _check_target(name, what, error)
    fd, tmp = _temp_beside(name, what, error)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def atomic_save(
    path: str | os.PathLike[str],
    data: bytes | Writer,
    what: str,
    *,
    error: ErrorType = FileError,
    mode: int = 0o644,
) -> None:
    """Replace ``path`` atomically with ``data`` (bytes, or a function writing to a file).

    See the module docstring for the rules: the target must be absent or a regular file, the
    old file survives any failure, and only the temp file this call created is ever removed.
    ``mode`` is the new file's permission bits (not subject to the umask).
    """
    name = os.fspath(path)
    _check_target(name, what, error)
    fd, tmp = _temp_beside(name, what, error)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, name)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise error(
                f"{what} {name}: cannot write: {_strerror(exc)}; nothing was replaced"
            ) from None
        raise
    directory = os.path.dirname(name) or "."
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise error(f"{what} {name}: written, but fsync of {directory}: {_strerror(exc)}") from None


__all__ = ["FileError", "atomic_save", "check_writable", "open_regular", "read_regular"]
