"""``pagefork demo``: end to end on a small guest, and its failure modes."""

from __future__ import annotations

import builtins
import json
import os
import statistics
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_kvm
from pagefork.cli import main
from pagefork.demo import branch as kvm_branch
from pagefork.demo import orchestrate
from pagefork.layers.capture import data_extents


@needs_kvm
def test_demo_json_reports_speedup_and_checksums(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["demo", "--mem-size", "16", "--forks", "5", "--json", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert code == 0
    assert doc["checksums_ok"] is True
    for mode in ("demand", "prefetch"):
        m = doc["modes"][mode]
        assert m["forks"] == 5 and m["checksums_ok"]
        assert all(f["checksum_ok"] and f["bad_pages"] == 0 for f in m["per_fork"])
    demand, prefetch = doc["modes"]["demand"], doc["modes"]["prefetch"]
    assert demand["prefetched_pages_mean"] == 0
    assert prefetch["misses_mean"] == prefetch["specific_pages_mean"]
    assert doc["misses_beyond_unrecorded"] == 0
    pairs = list(zip(demand["per_fork"], prefetch["per_fork"], strict=True))
    for d, p in pairs:
        # Each pair walked one trace: the prefetched fork got the whole hot set installed and
        # faulted only on the pages the warm-up never touched: at most a tenth of its pair's.
        assert d["variant"] == p["variant"]
        assert p["prefetched_pages"] == doc["hot_pages"]
        assert p["faults"] == p["misses"] == p["specific_pages"] > 0
        assert d["faults"] >= 10 * p["faults"]
    # How much faster is measured by bench/bench_fork_ready.py, side by side over many
    # rounds, not asserted here: on a shared machine a 5-pair ratio moves with the load (it
    # fell to 1.36 once). What is asserted is why it is faster: the fault counts above.
    assert doc["speedup"] == statistics.median(doc["speedup_pairs"])
    assert doc["speedup_pairs"] == [d["ready_ms"] / p["ready_ms"] for d, p in pairs]
    assert (tmp_path / "hot-pages.hpl").exists()
    present = doc["modes"]["present"]
    for mode in ("demand", "prefetch", "present"):
        m = doc["modes"][mode]
        assert len(m["ready_ms"]) == len(m["faults"]) == len(m["checksums"]) == 5
        assert m["ready_ms"] == [f["ready_ms"] for f in m["per_fork"]]
    for d, p, a in zip(demand["per_fork"], prefetch["per_fork"], present["per_fork"], strict=True):
        # The limit walked the same trace with every page there: no fault at all, the same
        # checksums, and its population is left out of its ready time.
        assert a["variant"] == d["variant"] and a["checksums"] == d["checksums"] == p["checksums"]
        assert a["faults"] == 0 and a["prefetched_pages"] == 16 * 256
        assert a["ready_ms"] == pytest.approx(a["restore_ms"] + a["run_ms"])
        # The others' ready is wall time: at least the restore and the run, whatever overlaps.
        for f in (d, p):
            assert f["ready_ms"] >= f["restore_ms"] + f["run_ms"] - 1e-6
    limit = [
        p["ready_ms"] / a["ready_ms"]
        for p, a in zip(prefetch["per_fork"], present["per_fork"], strict=True)
    ]
    assert doc["prefetch_over_present_rounds"] == limit
    assert doc["prefetch_over_present_first"] == limit[0]
    assert doc["prefetch_over_present_later"] == statistics.median(limit[1:])


@needs_kvm
def test_demo_branch_forks_a_snapshot_that_every_branch_sees(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["demo", "--mem-size", "16", "--forks", "3", "--branch", "--json"]
    code = main([*argv, "--workdir", str(tmp_path)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    b = doc["branch"]
    assert b["checksums_ok"] is True and b["forks"] == 3
    assert b["sees_change"] == [True, True, True]
    assert b["matches_parent"] == [True, True, True]
    prefetch = doc["modes"]["prefetch"]["per_fork"]
    for branch, base in zip(b["per_fork"], prefetch, strict=True):
        # Same trace as the template's fork beside it, other memory: another checksum, each
        # right for the memory it walked (checked in the fork), every page's bytes too.
        assert branch["variant"] == base["variant"]
        assert branch["checksum_ok"] and branch["bad_pages"] == 0
        assert branch["checksums"] != base["checksums"]
        # Prefetched from what the child inherits: its layer's pages, then the hot set.
        assert branch["prefetched_pages"] >= doc["hot_pages"]
    assert 0 < b["changed_pages"] <= b["dirty_pages"]
    assert b["layer_bytes"] >= 4096 * b["changed_pages"]
    assert b["snapshot_ms"] > 0 and b["ready_ms_p50"] > 0 and b["base_ready_ms_p50"] > 0
    assert b["base_ready_ms_p50"] == doc["modes"]["prefetch"]["ready_ms_p50"]


@needs_kvm
def test_demo_branch_catches_a_layer_that_misses_pages(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture that loses every other page the parent wrote: each branch is right for the
    chain it is served from, and still sees a change, yet walks to other checksums than the
    snapshotted parent says from its own memory."""
    real_capture = kvm_branch.capture_layer

    def lossy_capture(memory_diff: str, **kw: Any) -> Any:
        fd = os.open(memory_diff, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            pages = [p for a, b in data_extents(fd, size, memory_diff) for p in range(a, b)]
            kept = {p: os.pread(fd, 4096, p * 4096) for p in pages[::2]}
        finally:
            os.close(fd)
        os.unlink(memory_diff)  # the same size, half the data
        with open(memory_diff, "wb") as f:
            f.truncate(size)
            for page, data in kept.items():
                f.seek(page * 4096)
                f.write(data)
        return real_capture(memory_diff, **kw)

    monkeypatch.setattr(kvm_branch, "capture_layer", lossy_capture)
    code = main(["demo", "--mem-size", "16", "--forks", "3", "--branch", "--json"])
    b = json.loads(capsys.readouterr().out)["branch"]
    assert code == 1 and b["checksums_ok"] is False
    assert False in b["matches_parent"]
    # What the checks against the chain alone saw: nothing wrong.
    assert all(r["checksum_ok"] for r in b["per_fork"]) and all(b["sees_change"])


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
    out, err = capsys.readouterr()
    assert json.loads(out)["modes"]["present"]["forks"] == 1  # stdout is the JSON alone
    assert f"wrote the plot to {png}" in err


@needs_kvm
def test_demo_plot_has_a_title_with_parameters_and_speedup_and_one_quantity_per_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    saved: list[matplotlib.figure.Figure] = []
    real = matplotlib.figure.Figure.savefig

    def keep(self: matplotlib.figure.Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    png = tmp_path / "demo.png"
    args = ["demo", "--mem-size", "16", "--forks", "2", "--seed", "7", "--plot", str(png)]
    assert main(args) == 0
    [fig] = saved
    title = fig._suptitle.get_text()  # type: ignore[union-attr]
    assert "16 MiB" in title and "seed 7" in title and "2 forks per mode" in title
    assert "speed-up over on demand" in title and "x" in title
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["fork ready (ms)", "pages walked by the guest", "demand faults (cumulative)"]


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
