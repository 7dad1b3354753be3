"""pagefork.files: inputs must be regular files (never blocking, bounded), saves are atomic and
never replace what pagefork did not create. Real FIFOs, device nodes, sockets and a real full
file system (a tmpfs of a few KiB) are used."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from pagefork import files
from pagefork.errors import MemFileError, PageforkError
from pagefork.files import FileError, atomic_save, check_writable, open_regular, read_regular
from pagefork.memfile import MemFile

TEMP_NAME = re.compile(r"^\.out\.bin\.[0-9a-f]{8}\.tmp$")


def open_fd_count() -> int:
    # Each listing includes listdir's own fd, once, so two counts compare like for like.
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = open_fd_count()
    yield
    assert open_fd_count() == before, "an fd was left open"


def describe(path: Path) -> tuple[int, int, int]:
    """What is at ``path`` without following it: (mode, inode, mtime_ns)."""
    st = os.lstat(path)
    return st.st_mode, st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def unix_socket_file(path: Path) -> Iterator[None]:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        yield
    finally:
        sock.close()


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``path`` (root only), unmounted afterwards."""
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# --- reading ---------------------------------------------------------------------------------


def test_open_regular_gives_a_blocking_fd_on_the_file(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"hello")
    fd = open_regular(path, "input")
    try:
        assert os.get_blocking(fd)
        assert os.read(fd, 100) == b"hello"
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
    finally:
        os.close(fd)


def test_a_symlink_to_a_regular_file_is_followed_for_reading(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_regular(tmp_path / "link", "input", limit=10) == b"data"


def test_a_fifo_is_refused_at_once_even_with_no_writer(tmp_path: Path, no_fd_leak: None) -> None:
    # open(2) for reading blocks until a writer opens a FIFO, and none ever will here.
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileError) as info:
        open_regular(fifo, "mem-file")
    assert str(info.value) == f"mem-file {fifo}: cannot read: Is a FIFO, not a regular file"


def test_a_device_is_refused_before_any_byte_is_read(no_fd_leak: None) -> None:
    with pytest.raises(
        FileError,
        match=r"^hot-page file /dev/zero: cannot read: Is a character device, not a regular file$",
    ):
        read_regular("/dev/zero", "hot-page file", limit=1 << 20)


def test_a_device_node_is_refused_without_being_opened(tmp_path: Path) -> None:
    # A device node of our own (/dev/null's numbers) in tmp_path: O_PATH never calls the
    # driver's open, so even a device whose open has side effects is safe to name.
    node = tmp_path / "node"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(FileError, match=r"cannot read: Is a character device, not a regular"):
        open_regular(node, "input")


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: p.mkdir(), "Is a directory"),
        (lambda p: (p.parent / "target").mkdir() or p.symlink_to(p.parent / "target"), "Is a dir"),
    ],
)
def test_a_directory_is_refused(tmp_path: Path, make: object, kind: str) -> None:
    path = tmp_path / "in"
    make(path)  # type: ignore[operator]
    with pytest.raises(FileError, match=rf"^input {path}: cannot read: {kind}"):
        read_regular(path, "input", limit=10)


def test_a_socket_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    with unix_socket_file(path), pytest.raises(FileError, match=r"cannot read: Is a socket"):
        read_regular(path, "input", limit=10)


def test_missing_file_is_none_when_missing_ok_else_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    assert read_regular(path, "input", limit=10, missing_ok=True) is None
    with pytest.raises(FileError, match=rf"^input {path}: cannot read: No such file or dir"):
        read_regular(path, "input", limit=10)
    with pytest.raises(FileError, match=r"cannot read: No such file or directory$"):
        open_regular(path, "input")


def test_reads_are_bounded_by_the_limit(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"x" * 100)
    assert read_regular(path, "input", limit=100) == b"x" * 100
    with pytest.raises(FileError, match=r"^input .*: cannot read: larger than 99 bytes"):
        read_regular(path, "input", limit=99)


def test_the_callers_error_class_is_raised(tmp_path: Path) -> None:
    fifo = tmp_path / "mem"
    os.mkfifo(fifo)
    with pytest.raises(MemFileError, match=r"^mem-file .*/mem: cannot read: Is a FIFO"):
        MemFile(fifo)
    with pytest.raises(MemFileError, match=r"^mem-file .*: cannot read: No such file"):
        MemFile(tmp_path / "absent")
    assert issubclass(FileError, PageforkError)


# --- saving ----------------------------------------------------------------------------------


def test_atomic_save_writes_bytes_or_a_writer_with_mode_0644(
    tmp_path: Path, no_fd_leak: None
) -> None:
    path = tmp_path / "out.bin"
    atomic_save(path, b"first", "output")
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644

    seen: list[list[str]] = []

    def writer(f: BinaryIO) -> None:
        seen.append(sorted(os.listdir(tmp_path)))
        f.write(b"second")

    atomic_save(path, writer, "output")
    assert path.read_bytes() == b"second"
    # While writing, the old file and exactly one recognisable temp file sat side by side.
    (listing,) = seen
    assert listing[1] == "out.bin" and TEMP_NAME.match(listing[0]), listing
    assert os.listdir(tmp_path) == ["out.bin"]


def _make_fifo(p: Path) -> None:
    os.mkfifo(p)


def _make_device(p: Path) -> None:
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))


def _make_dir(p: Path) -> None:
    p.mkdir()
    (p / "inside").write_bytes(b"keep")


def _make_symlink_to_file(p: Path) -> None:
    (p.parent / "victim").write_bytes(b"keep")
    p.symlink_to(p.parent / "victim")


def _make_dangling_symlink(p: Path) -> None:
    p.symlink_to(p.parent / "nowhere")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_make_fifo, "Is a FIFO, not a regular file; left untouched"),
        (_make_device, "Is a character device, not a regular file; left untouched"),
        (_make_dir, "Is a directory, not a regular file; left untouched"),
        (_make_symlink_to_file, r"Is a symbolic link \(to .*/victim\), not a regular file"),
        (_make_dangling_symlink, r"Is a symbolic link \(to .*/nowhere\), not a regular file"),
    ],
)
def test_a_target_that_is_not_a_regular_file_is_refused_and_left_untouched(
    tmp_path: Path, no_fd_leak: None, make: object, message: str
) -> None:
    target = tmp_path / "out.bin"
    make(target)  # type: ignore[operator]
    before = describe(target)
    listing = sorted(os.listdir(tmp_path))
    for attempt in (
        lambda: atomic_save(target, b"new", "output"),
        lambda: check_writable(target, "output"),
    ):
        with pytest.raises(FileError, match=rf"^output {target}: cannot write: {message}"):
            attempt()
        assert describe(target) == before
        assert sorted(os.listdir(tmp_path)) == listing  # no temp file left behind
    if (tmp_path / "victim").exists():
        assert (tmp_path / "victim").read_bytes() == b"keep"
    assert not (tmp_path / "nowhere").exists()


def test_a_socket_target_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "out.sock"
    with unix_socket_file(target):
        with pytest.raises(FileError, match=r"cannot write: Is a socket, not a regular file"):
            atomic_save(target, b"new", "output")
        assert stat.S_ISSOCK(os.lstat(target).st_mode)


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "out.bin"
    message = rf"^output {target}: cannot write: directory {tmp_path / 'nope'} does not exist$"
    with pytest.raises(FileError, match=message):
        atomic_save(target, b"x", "output")
    with pytest.raises(FileError, match=message):
        check_writable(target, "output")


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=64k,mode=0755") as mnt:
        target = mnt / "out.bin"
        atomic_save(target, b"old contents", "output")
        with pytest.raises(FileError) as info:
            atomic_save(target, b"\xaa" * (1 << 20), "output")
        assert str(info.value) == (
            f"output {target}: cannot write: No space left on device; nothing was replaced"
        )
        assert target.read_bytes() == b"old contents"
        assert os.listdir(mnt) == ["out.bin"]  # the partial temp file is gone


def test_check_writable_finds_a_read_only_file_system_up_front(tmp_path: Path) -> None:
    message = r"^output .*/ro/out.bin: cannot write: Read-only file system$"
    with tmpfs(tmp_path / "ro", "size=64k,ro") as mnt, pytest.raises(FileError, match=message):
        check_writable(mnt / "out.bin", "output")


def test_check_writable_leaves_nothing_behind(tmp_path: Path) -> None:
    check_writable(tmp_path / "out.bin", "output")
    (tmp_path / "out.bin").write_bytes(b"old")
    check_writable(tmp_path / "out.bin", "output")
    assert os.listdir(tmp_path) == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"old"


def test_a_failing_writer_removes_only_its_own_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    # Someone else's file already has the first temp name drawn: it must be skipped, kept.
    theirs = tmp_path / ".out.bin.00000000.tmp"
    theirs.write_bytes(b"not ours")
    tokens = iter(["00000000", "11111111"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))

    def writer(f: BinaryIO) -> None:
        assert (tmp_path / ".out.bin.11111111.tmp").exists()
        raise RuntimeError("encoder bug")

    with pytest.raises(RuntimeError, match="encoder bug"):
        atomic_save(target, writer, "output")
    assert sorted(os.listdir(tmp_path)) == [".out.bin.00000000.tmp", "out.bin"]
    assert theirs.read_bytes() == b"not ours"
    assert target.read_bytes() == b"old"


def test_a_temp_name_is_never_followed_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hostile peer who guesses the temp name and plants a symlink there gets nothing: the
    # create is O_EXCL|O_NOFOLLOW, so that name is skipped and the link's target untouched.
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / ".out.bin.00000000.tmp").symlink_to(victim)
    tokens = iter(["00000000", "22222222"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))
    atomic_save(tmp_path / "out.bin", b"new", "output")
    assert victim.read_bytes() == b"keep"
    assert (tmp_path / "out.bin").read_bytes() == b"new"


def test_a_name_at_the_length_limit_still_saves(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 255)
    atomic_save(target, b"x", "output")
    assert target.read_bytes() == b"x"
    assert os.listdir(tmp_path) == ["n" * 255]


def test_an_empty_path_is_refused_before_anything_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileError, match=r"^output: cannot write: the path is empty$"):
        atomic_save("", b"x", "output")
    with pytest.raises(FileError, match=r"^output: cannot write: the path is empty$"):
        check_writable("", "output")
    assert os.listdir(tmp_path) == []
