"""``bench/report.py`` renders a run's JSON as the figures page: the run's facts, one table per
benchmark with each figure's meaning, value and target, and nothing the run did not write."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE = {
    "quick": True,
    "started": "2026-12-07T18:00:00+0000",
    "seconds": 130.4,
    "host": {
        "python": "3.11.7",
        "kernel": "6.1.0",
        "machine": "x86_64",
        "cpus": 2,
        "usable_cpus": 2,
        "cpu_model": "AMD EPYC",
        "virtualized": True,
        "memory_gib": 23.5,
        "load_at_start": [5.25, 4.0, 3.0],
        "load_at_end": [1.0, 1.5, 2.0],
    },
    "method": "Each side is measured in one run.",
    "benchmarks": {
        "faults": {
            "status": "ok",
            "seconds": 41.2,
            "message": "",
            "load_at_start": 5.25,
            "doc": "Demand faults: ``pagefork`` against :class:`~pagefork.server.PageServer`.",
            "summary": ["ratio", "us_per_fault", "bad_pages"],
            "meanings": {"ratio": "pagefork / C | per round", "us_per_fault": "µs per fault"},
            "targets": {"ratio": ["<=", 1.3], "us_per_fault": [">=", 100]},
            "figures": {
                "ratio": 1.2345,
                "us_per_fault": 64.26,
                "bad_pages": 0,
                "rounds": 6,
                "pages": 16384,
                "per_round": [1.1, 1.3],
            },
        },
        "s3": {
            "status": "skipped",
            "seconds": 0.1,
            "message": "moto_server not installed",
            "load_at_start": 4.0,
            "doc": "Object storage.",
            "summary": [],
            "meanings": {},
            "targets": {},
            "figures": {},
        },
    },
}


def test_the_page_has_one_table_per_benchmark_with_meanings_values_and_targets() -> None:
    page = _report().render(SAMPLE, note="The machine was shared.")
    lines = page.splitlines()
    assert lines[0] == "# Measured figures"
    assert (
        "**Run** 2026-12-07T18:00:00+0000, a quick run (`--quick`: fewer rounds, smaller "
        "sizes) of `python bench/run.py`, 2 min in all." in lines
    )
    assert (
        "**Machine** AMD EPYC, 2 CPUs, 23.5 GiB of memory, a virtual machine (the CPU reports a "
        "hypervisor), Linux 6.1.0, Python 3.11.7." in lines
    )
    load = next(line for line in lines if line.startswith("**Load average**"))
    assert "at the start 5.2 / 4.0 / 3.0, at the end 1.0 / 1.5 / 2.0" in load
    assert "above this machine's 2 CPUs" in load
    assert "The machine was shared." in lines
    assert "Each side is measured in one run." in lines

    # The targets at a glance, then the benchmark's own table, in SUMMARY order.
    assert "| [faults](#faults) | `ratio` | 1.23 | ≤ 1.3 | yes |" in lines
    assert "| [faults](#faults) | `us_per_fault` | 64.3 | ≥ 100 | **no** |" in lines
    section = lines[lines.index("## faults") :]
    assert section[2] == "*41 s, load 5.2 at its start*"
    assert section[4] == "Demand faults: `pagefork` against `PageServer`."
    table = section[section.index("| figure | what it means | measured | target | met |") :]
    assert table[2:5] == [
        "| `ratio` | pagefork / C \\| per round | 1.23 | ≤ 1.3 | yes |",
        "| `us_per_fault` | µs per fault | 64.3 | ≥ 100 | **no** |",
        "| `bad_pages` |  | 0 |  |  |",
    ]
    # The other scalar figures are kept, apart; lists are not rendered.
    assert "| `pages` | 16,384 |" in lines and "| `rounds` | 6 |" in lines
    assert "per_round" not in page

    skipped = lines[lines.index("## s3") :]
    assert skipped[2] == "*skipped* (0 s, load 4.0 at its start): moto_server not installed"
    assert "| figure |" not in "\n".join(skipped)


def test_the_command_writes_the_page_and_refuses_other_json(tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps(SAMPLE))
    out = tmp_path / "benchmarks.md"
    cmd = [sys.executable, str(BENCH / "report.py")]
    done = subprocess.run([*cmd, str(run), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == _report().render(SAMPLE)
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    refused = subprocess.run([*cmd, str(other)], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr == f"report: {other}: not the JSON of bench/run.py --json\n"


def test_every_benchmark_says_what_its_summary_figures_mean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each benchmark's SUMMARY maps its figures to a meaning, so the page can say it."""
    monkeypatch.syspath_prepend(str(BENCH))
    for path in sorted(BENCH.glob("bench_*.py")):
        module = importlib.import_module(path.stem)
        summary = module.SUMMARY
        assert isinstance(summary, dict) and summary, f"{path.name}: SUMMARY is not a dict"
        empty = [k for k, v in summary.items() if not isinstance(v, str) or not v.strip()]
        assert not empty, f"{path.name}: no meaning for {empty}"
        assert set(module.TARGETS) <= set(summary), f"{path.name}: a target without a meaning"
        assert (module.__doc__ or "").strip(), f"{path.name}: no module docstring"


def test_a_side_by_side_comparison_gets_its_own_table() -> None:
    """A benchmark that compares two trees (bench_versus) returns its rows as ``comparison``:
    the page shows both sides, the ratio and its spread, before the summary table."""
    doc = {
        **SAMPLE,
        "benchmarks": {
            "versus": {
                "status": "ok",
                "seconds": 300.0,
                "doc": "This tree against a baseline.",
                "summary": ["ratio_fault_us"],
                "meanings": {"ratio_fault_us": "new / old: demand fault"},
                "targets": {"ratio_fault_us": ["<=", 1.25]},
                "figures": {
                    "ratio_fault_us": 1.04,
                    "comparison": {
                        "old": "3239e0a",
                        "new": "this tree",
                        "rows": [
                            {"figure": "fault_us", "meaning": "demand fault (µs)", "old": 41.7,
                             "new": 43.4, "ratio": 1.04, "ratio_min": 0.9, "ratio_max": 1.31},
                        ],
                    },
                },
            }
        },
    }  # fmt: skip
    lines = _report().render(doc).splitlines()
    head = (
        "| figure | what it means | old: 3239e0a | new: this tree | new / old "
        "| spread over rounds |"
    )
    table = lines[lines.index(head) :]
    assert table[2] == "| `fault_us` | demand fault (µs) | 41.7 | 43.4 | 1.04 | 0.90 to 1.31 |"
    assert table[3] == ""
    assert "| `ratio_fault_us` | new / old: demand fault | 1.04 | ≤ 1.25 | yes |" in lines
    assert "comparison" not in "\n".join(lines)


def test_versus_refuses_a_baseline_that_is_no_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong --baseline is skipped in one line naming it, before anything is unpacked."""
    monkeypatch.syspath_prepend(str(BENCH))
    versus = importlib.import_module("bench_versus")
    refused = pytest.raises(versus.BaselineError, match="baseline 'no-such-rev': no such commit")
    with refused, versus.baseline_tree("no-such-rev"):
        pass
