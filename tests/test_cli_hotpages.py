"""``pagefork hotpages show|merge|diff`` through the real command line entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagefork.cli import main
from pagefork.hotpages import HotPageList, load, save

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
    assert main(["hotpages", "show", path, "--json"]) == 0
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
    assert main(["hotpages", "show", path, "--json"]) == 0
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
