"""Pure parsing of the kernel's memory files and KSM settings: no kernel needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagefork import ksm
from pagefork.demo.density import converge_time
from pagefork.memstats import (
    memory_from_text,
    parse_ksm_stat,
    parse_smaps,
    parse_smaps_fields,
)

ROLLUP = """\
55dab72bf000-7ffdb0659000 ---p 00000000 00:00 0                          [rollup]
Rss:               10240 kB
Pss:                6144 kB
Pss_Dirty:          4096 kB
Shared_Clean:       3072 kB
Shared_Dirty:       1024 kB
Private_Clean:      2048 kB
Private_Dirty:      4096 kB
Anonymous:          8192 kB
KSM:                1024 kB
Swap:                  0 kB
"""

SMAPS = """\
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:                8192 kB
Pss:                5120 kB
Shared_Clean:          0 kB
Shared_Dirty:       4096 kB
Private_Clean:         0 kB
Private_Dirty:      4096 kB
KSM:                1024 kB
THPeligible:           0
VmFlags: rd wr mr mw me ac sd um
5639683ce000-563968410000 rw-p 00000000 00:00 0                          [heap]
Size:                264 kB
Rss:                  44 kB
Pss:                  44 kB
Private_Dirty:        44 kB
VmFlags: rd wr mr mw me ac
7f0020000000-7f0020200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                1024 kB
Pss:                 512 kB
Shared_Dirty:       1024 kB
VmFlags: rd wr mr mw me ac um
"""

KSM_STAT = """\
ksm_rmap_items 4100
ksm_zero_pages 3
ksm_merging_pages 4096
ksm_process_profit 16384000
ksm_merge_any: yes
ksm_mergeable: yes
"""


def test_rollup_fields_are_bytes_and_non_fields_are_skipped() -> None:
    f = parse_smaps_fields(ROLLUP)
    assert f["Rss"] == 10240 * 1024
    assert f["KSM"] == 1024 * 1024
    assert "VmFlags" not in f and len(f) == 10


def test_smaps_splits_mappings_with_their_flags() -> None:
    maps = parse_smaps(SMAPS)
    assert [(m.start, m.end) for m in maps] == [
        (0x7F0000000000, 0x7F0010000000),
        (0x5639683CE000, 0x563968410000),
        (0x7F0020000000, 0x7F0020200000),
    ]
    assert "um" in maps[0].flags and "um" not in maps[1].flags
    assert maps[1].fields["Pss"] == 44 * 1024


def test_ksm_stat_reads_numbers_and_flags_of_both_spellings() -> None:
    k = parse_ksm_stat(KSM_STAT + "garbage\n\n")
    assert k["ksm_merging_pages"] == 4096
    assert k["ksm_merge_any"] is True
    assert k["ksm_rmap_items"] == 4100


def test_guest_figures_sum_only_userfaultfd_mappings() -> None:
    m = memory_from_text(42, ROLLUP, SMAPS, KSM_STAT)
    assert m.rss == 10 << 20 and m.pss == 6 << 20
    assert m.private == 6 << 20 and m.shared == 4 << 20
    # Two mappings flagged "um"; the heap is not guest RAM.
    assert m.guest_size == (262144 + 2048) * 1024
    assert m.guest_rss == (8192 + 1024) * 1024
    assert m.guest_pss == (5120 + 512) * 1024
    assert m.guest_private == 4096 * 1024
    assert m.guest_ksm == 1024 * 1024
    assert m.ksm_merging_pages == 4096 and m.ksm_zero_pages == 3 and m.merge_any is True
    doc = m.to_dict()
    assert doc["guest_pss_bytes"] == m.guest_pss and doc["ksm_merging_pages"] == 4096
    assert doc["pid"] == 42


def test_without_smaps_or_ksm_stat_the_figures_are_absent_not_invented() -> None:
    m = memory_from_text(1, ROLLUP)
    assert m.guest_rss == 0 and m.ksm_merging_pages is None and m.merge_any is None


def test_thread_cpu_is_utime_plus_stime_even_with_spaces_in_the_name() -> None:
    fields = ["S", "2"] + ["0"] * 9 + ["150", "50"] + ["0"] * 30
    stat = "39 (ksm d) " + " ".join(fields)
    assert ksm.parse_thread_cpu(stat, 100) == pytest.approx(2.0)


def test_advisor_mode_reads_back_as_the_choice_in_brackets() -> None:
    assert ksm.parse_setting("[none] scan-time") == "none"
    assert ksm.parse_setting("5000") == "5000"


def test_restore_puts_back_changed_settings_with_run_last(tmp_path: Path) -> None:
    for name, value in (("run", "0"), ("pages_to_scan", "100"), ("advisor_mode", "[none] x")):
        (tmp_path / name).write_text(value + "\n")
    saved = ksm.settings(tmp_path)
    assert saved == {"run": "0", "pages_to_scan": "100", "advisor_mode": "none"}
    ksm.write_setting("run", 1, tmp_path)
    ksm.write_setting("pages_to_scan", 5000, tmp_path)
    ksm.restore(saved, tmp_path)
    assert (tmp_path / "run").read_text() == "0\n"
    assert (tmp_path / "pages_to_scan").read_text() == "100\n"
    assert (tmp_path / "advisor_mode").read_text() == "[none] x\n"  # unchanged: not rewritten


def test_off_note_names_the_command_that_turns_ksm_on(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("0\n")
    note = ksm.off_note(tmp_path)
    assert note is not None and ksm.ENABLE_COMMAND in note and "\n" not in note
    (tmp_path / "run").write_text("1\n")
    assert ksm.off_note(tmp_path) is None
    assert "CONFIG_KSM" in (ksm.off_note(tmp_path / "absent") or "")


def test_write_setting_refuses_a_name_that_is_not_a_ksm_knob(tmp_path: Path) -> None:
    with pytest.raises(ksm.KsmError, match="not a KSM setting"):
        ksm.write_setting("../../etc/passwd", 1, tmp_path)


def test_converge_time_is_when_the_total_came_within_two_percent_of_final() -> None:
    line = [(0.0, 1000), (1.0, 600), (2.0, 220), (3.0, 210), (4.0, 200)]
    assert converge_time(line) == 3.0  # 201 - 200 <= 0.02 * 800
    assert converge_time([(0.0, 5), (1.0, 5)]) == 0.0
    assert converge_time([]) is None
