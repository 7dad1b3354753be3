"""``pagefork demo``: end to end on a small guest, and its failure modes."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_kvm
from pagefork.cli import main
from pagefork.vmm.kvm import orchestrate


@needs_kvm
def test_demo_json_reports_speedup_and_checksums(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["demo", "--mem-size", "16", "--forks", "2", "--json", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert code == 0
    assert doc["checksums_ok"] is True
    assert doc["speedup"] > 0
    for mode in ("demand", "prefetch"):
        m = doc["modes"][mode]
        assert m["forks"] == 2 and m["checksums_ok"]
        assert m["ready_ms_p50"] > 0
    assert doc["modes"]["demand"]["prefetched_pages_mean"] == 0
    prefetch = doc["modes"]["prefetch"]
    assert prefetch["misses_mean"] == prefetch["specific_pages_mean"]
    assert (tmp_path / "hot-pages.hpl").exists()


@needs_kvm
def test_demo_prints_a_table_per_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--mem-size", "16", "--forks", "1"]) == 0
    out = capsys.readouterr().out
    assert "demand (1)" in out and "prefetch (1)" in out and "speed-up" in out


def test_demo_without_kvm_is_a_one_line_error_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(orchestrate, "kvm_available", lambda: "/dev/kvm: No such file or directory")
    assert main(["demo", "--mem-size", "16", "--forks", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KVM is not available" in err[0]


def test_demo_plot_without_matplotlib_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["demo", "--mem-size", "16", "--plot", str(tmp_path / "p.png")]) == 2
    assert "pagefork[plot]" in capsys.readouterr().err


@needs_kvm
def test_demo_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    assert main(["demo", "--mem-size", "16", "--forks", "1", "--json", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--working-set", "2"),
        ("--working-set", "0"),
        ("--working-set", "nan"),
        ("--fork-share", "-1"),
        ("--fork-share", "inf"),
    ],
)
def test_demo_rejects_shares_out_of_range_with_one_line(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--mem-size", "16", option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0]


def test_demo_rejects_a_workdir_that_is_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["demo", "--mem-size", "16", "--workdir", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


def test_demo_rejects_a_plot_in_a_missing_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "missing" / "p.png"
    assert main(["demo", "--mem-size", "16", "--plot", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
