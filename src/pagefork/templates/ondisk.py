"""How the registry writes under ``STATE_DIR/templates``: a record saved atomically, a file or
directory placed into a template (linked or copied), and the leftovers a crash can leave (a
creation or a deletion in progress, a save's temporary file) found and removed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from pagefork.templates.record import HOT_PAGES_FILE, RECORD_FILE, TemplateStorageError

#: Hidden directories of a creation in progress and of a deletion in progress.
NEW_PREFIX = ".new-"
DEL_PREFIX = ".del-"
#: Temporary files of an interrupted atomic save inside a template directory (the record's, or
#: the hot set's): ``.<name>.<mkstemp letters>.tmp``.
_TMP_LEFTOVER = re.compile(
    rf"\.({re.escape(RECORD_FILE)}|{re.escape(HOT_PAGES_FILE)})\.[A-Za-z0-9_]+\.tmp"
)

log = logging.getLogger("pagefork")


def write_atomically(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON to ``path`` so readers see the old or the new file, never a torn one:
    temp file in the same directory, fsync, rename, fsync the directory."""
    data = (json.dumps(doc, indent=1) + "\n").encode()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TemplateStorageError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TemplateStorageError(f"{path}: cannot write: {exc.strerror}") from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(src, dst)


def _copy(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)


def place(src: Path, dst: Path, *, link: bool) -> None:
    """Put ``src`` (a file or a directory) at ``dst``, leaving ``src`` as it was."""
    put = _link_or_copy if link else _copy
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=put, symlinks=True)
    else:
        put(str(src), str(dst))


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def clean_leftovers(root: Path) -> list[str]:
    """Remove what a crashed daemon left under ``root``: creations never renamed into place
    (``.new-*``), deletions never finished (``.del-*``) and torn temporary record files;
    the names removed. Never a symlink, nor a file of another naming."""
    removed: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():
            continue  # never ours: creations and deletions are directories we made
        if entry.name.startswith((NEW_PREFIX, DEL_PREFIX)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        elif entry.is_dir() and not entry.name.startswith("."):
            for tmp in sorted(entry.iterdir()):
                # Only regular files of our own naming: a symlink or a FIFO is not ours.
                if _TMP_LEFTOVER.fullmatch(tmp.name) and _is_regular(tmp):
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                        removed.append(f"{entry.name}/{tmp.name}")
    if removed:
        log.info("templates: removed leftovers of a previous run: %s", ", ".join(removed))
    return removed


__all__ = ["DEL_PREFIX", "NEW_PREFIX", "clean_leftovers", "place", "write_atomically"]
