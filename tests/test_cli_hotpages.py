"""``pagefork hotpages show|merge|diff`` through the real command line entry point."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pagefork.cli import build_parser, main, plain_text
from pagefork.hotpages import HotPageList, encode_hpl1, load, save

P = 0x1000


def write(path: Path, pairs: list[tuple[int, int]], fmt: str = "hpl1") -> str:
    save(HotPageList.from_pages(pairs), path, fmt=fmt)  # type: ignore[arg-type]
    return str(path)


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[str, str]:
    a = write(tmp_path / "a.hpl", [(0, 3 * P), (0, 0), (0, P), (1, 0)], fmt="hpl2")
    b = write(tmp_path / "b.hpl", [(0, P), (0, 0), (2, 0x10000)])
    return a, b


def test_show_json_reports_counts_runs_and_regions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "hot.hpl", [(1, 0), (0, P), (0, 0), (0, 5 * P), (0, 2 * P)])
    assert main(["hotpages", "show", path, "--json", "--pages"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 5
    assert out["bytes"] == 5 * P
    assert out["runs"] == 3  # region 0: 0-2, 5; region 1: 0
    assert out["pages"] == [[0, 0], [0, P], [0, 2 * P], [0, 5 * P], [1, 0]]
    assert out["first"] == [0, 0] and out["last"] == [1, 0]
    assert out["format"] == "hpl1"
    assert out["regions"] == [
        {
            "region": 0,
            "pages": 4,
            "runs": 2,
            "bytes": 4 * P,
            "first_offset": 0,
            "last_offset": 5 * P,
        },
        {"region": 1, "pages": 1, "runs": 1, "bytes": P, "first_offset": 0, "last_offset": 0},
    ]


def test_show_human_form_prints_the_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "hot.hpl", [(0, 0), (0, P), (3, 0x200000)])
    assert main(["hotpages", "show", path]) == 0
    out = capsys.readouterr().out
    assert "pages" in out and " 3" in out
    assert "12288 (assuming 4 KiB pages)" in out
    assert "region 3, offset 0x200000" in out
    assert "per region" in out


def test_show_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "empty.hpl", [])
    assert main(["hotpages", "show", path, "--json", "--pages"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["count"], out["pages"], out["first"], out["runs"]) == (0, [], None, 0)


def test_show_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "absent.hpl")
    assert main(["hotpages", "show", missing]) == 2
    err = capsys.readouterr().err
    assert err == f"pagefork: error: {missing}: no such file\n"


def test_show_corrupt_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.hpl"
    path.write_bytes(b"HPL1\x02\x00\x00\x00\x80")
    assert main(["hotpages", "show", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"pagefork: error: {path}: entry 1: truncated page offset\n"


def test_merge_union_keeps_first_touch_order(
    tmp_path: Path, two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "merged.hpl")
    assert main(["hotpages", "merge", *two_runs, "-o", out]) == 0
    assert "wrote 5 pages" in capsys.readouterr().out
    merged = load(out)
    assert merged.source_format == "hpl2"
    assert merged.in_order() == [(0, 3 * P), (0, 0), (0, P), (1, 0), (2, 0x10000)]


def test_merge_intersect_as_hpl1(tmp_path: Path, two_runs: tuple[str, str]) -> None:
    out = str(tmp_path / "merged.hpl")
    assert main(["hotpages", "merge", *two_runs, "-o", out, "--mode", "intersect"]) == 0
    assert (tmp_path / "merged.hpl").read_bytes()[:4] == b"HPL2"
    assert (
        main(["hotpages", "merge", *two_runs, "-o", out, "--mode=intersect", "--format=hpl1"]) == 0
    )
    merged = load(out)
    assert merged.source_format == "hpl1"
    assert merged.in_order() == [(0, 0), (0, P)]


def test_merge_min_count(tmp_path: Path, two_runs: tuple[str, str]) -> None:
    c = write(tmp_path / "c.hpl", [(2, 0x10000), (1, 0)])
    out = str(tmp_path / "merged.hpl")
    args = ["hotpages", "merge", *two_runs, c, "-o", out, "--mode", "min-count"]
    assert main([*args, "--min-count", "2"]) == 0
    assert load(out).in_order() == [(0, 0), (0, P), (1, 0), (2, 0x10000)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "min-count"], "--mode min-count needs --min-count K"),
        (["--min-count", "1"], "--min-count only applies to --mode min-count"),
        (["--mode", "min-count", "--min-count", "3"], "--min-count must be between 1 and 2"),
    ],
)
def test_merge_rejects_inconsistent_min_count(
    tmp_path: Path,
    two_runs: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "merged.hpl"
    assert main(["hotpages", "merge", *two_runs, "-o", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_merge_with_a_corrupt_input_writes_nothing(
    tmp_path: Path, two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.hpl"
    bad.write_bytes(b"NOPE")
    out = tmp_path / "merged.hpl"
    assert main(["hotpages", "merge", *two_runs, str(bad), "-o", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"pagefork: error: {bad}: not a hot-page file")
    assert not out.exists()


def test_diff_json_lists_both_sides(
    two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_runs
    assert main(["hotpages", "diff", a, b, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["only_in_a"] == [[0, 3 * P], [1, 0]]
    assert out["only_in_b"] == [[2, 0x10000]]
    assert out["common"] == 2
    assert (out["count_a"], out["count_b"]) == (4, 3)


def test_diff_human_form(two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_runs
    assert main(["hotpages", "diff", a, b]) == 0
    out = capsys.readouterr().out
    assert "in both" in out
    assert "region 2 offset 0x10000" in out


def test_diff_missing_file_is_an_error(
    two_runs: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.hpl")
    assert main(["hotpages", "diff", two_runs[0], missing]) == 2
    assert capsys.readouterr().err == f"pagefork: error: {missing}: no such file\n"


def test_python_m_pagefork_reports_a_corrupt_file_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.hpl"
    path.write_bytes(b"HPL1\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")
    proc = subprocess.run(
        [sys.executable, "-m", "pagefork", "hotpages", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"pagefork: error: {path}: count: varint overflows 64 bits\n"
    assert "Traceback" not in proc.stderr


# --- formats and interop ---------------------------------------------------------------------


def test_merge_of_hpl1_inputs_writes_hpl1_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # HPL1 in, HPL1 out: the Go reader of HPL1 reads the merge of its own files.
    a = write(tmp_path / "a.hpl", [(0, P), (1, 0)])
    b = write(tmp_path / "b.hpl", [(0, 0), (0, P)])
    out = tmp_path / "merged.hpl"
    assert main(["hotpages", "merge", a, b, "-o", str(out)]) == 0
    assert "(union of 2 files, hpl1)" in capsys.readouterr().out
    assert out.read_bytes() == encode_hpl1([(0, 0), (0, P), (1, 0)])
    assert main(["hotpages", "merge", a, b, "-o", str(out), "--format", "hpl2"]) == 0
    assert out.read_bytes()[:4] == b"HPL2"
    assert load(out).in_order() == [(0, P), (1, 0), (0, 0)]


def test_show_refuses_a_region_index_the_go_reader_would_truncate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "wide.hpl"
    # One entry: region 2**32 (varint 80 80 80 80 10), offset 0.
    path.write_bytes(b"HPL1\x01\x80\x80\x80\x80\x10\x00")
    assert main(["hotpages", "show", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"pagefork: error: {path}: entry 0: region index 4294967296 is 2**32 or more\n"
    )


def test_show_dev_zero_is_refused_before_reading(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hotpages", "show", "/dev/zero"]) == 2
    assert capsys.readouterr().err == (
        "pagefork: error: hot-page file /dev/zero: cannot read: "
        "Is a character device, not a regular file\n"
    )


def test_show_a_fifo_is_refused_without_blocking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "hot.hpl"
    os.mkfifo(fifo)
    assert main(["hotpages", "show", str(fifo)]) == 2
    assert "cannot read: Is a FIFO, not a regular file" in capsys.readouterr().err


def _fifo(p: Path) -> str:
    os.mkfifo(p)
    return "Is a FIFO"


def _device(p: Path) -> str:
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers, in tmp_path
    return "Is a character device"


def _symlink(p: Path) -> str:
    (p.parent / "victim").write_bytes(b"keep")
    p.symlink_to(p.parent / "victim")
    return f"Is a symbolic link (to {p.parent / 'victim'})"


def _dangling_symlink(p: Path) -> str:
    p.symlink_to(p.parent / "created-through-the-link")
    return f"Is a symbolic link (to {p.parent / 'created-through-the-link'})"


def _directory(p: Path) -> str:
    p.mkdir()
    return "Is a directory"


def _socket(p: Path) -> str:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(p))
    sock.close()  # the socket file stays
    return "Is a socket"


@pytest.mark.parametrize("make", [_fifo, _device, _symlink, _dangling_symlink, _directory, _socket])
def test_merge_refuses_an_output_that_is_not_a_regular_file_and_leaves_it(
    tmp_path: Path, two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str], make: Any
) -> None:
    out = tmp_path / "out.hpl"
    kind = make(out)
    before = os.lstat(out)
    listing = sorted(os.listdir(tmp_path))
    assert main(["hotpages", "merge", *two_runs, "-o", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"pagefork: error: hot-page file {out}: cannot write: {kind}, not a regular file; "
        "left untouched\n"
    )
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino, after.st_mtime_ns) == (
        before.st_mode,
        before.st_ino,
        before.st_mtime_ns,
    )
    assert sorted(os.listdir(tmp_path)) == listing
    if (tmp_path / "victim").exists():
        assert (tmp_path / "victim").read_bytes() == b"keep"


def test_no_help_text_shows_restructuredtext_markup() -> None:
    parser = build_parser()
    seen = 0

    def walk(p: argparse.ArgumentParser) -> None:
        nonlocal seen
        text = p.format_help()
        seen += 1
        assert "``" not in text and ":class:" not in text and ":func:" not in text, p.prog
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)

    walk(parser)
    assert seen >= 8  # pagefork, demo, serve, hotpages and its three actions, daemon, ...
    demo_help = subprocess.run(
        [sys.executable, "-m", "pagefork", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "pagefork demo: fork a template" in demo_help


def test_plain_text_removes_literals_and_roles() -> None:
    assert plain_text("run ``pagefork demo`` or :func:`~pagefork.hotpages.load`") == (
        "run pagefork demo or pagefork.hotpages.load"
    )


def test_show_json_is_a_summary_and_lists_pages_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "hot.hpl", [(0, k * P) for k in range(5000)])
    assert main(["hotpages", "show", path, "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert summary["count"] == 5000 and summary["runs"] == 1
    assert "pages" not in summary and len(out) < 1000  # a summary, whatever the file's size
    assert main(["hotpages", "show", path, "--pages"]) == 2  # --pages is for the JSON
    assert "add --json" in capsys.readouterr().err
