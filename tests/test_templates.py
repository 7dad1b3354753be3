"""The template registry: records on disk, creation, listing with broken records, deletion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import make_mem_file
from pagefork.errors import TemplateError
from pagefork.templates import (
    RECORD_FILE,
    TemplateFieldError,
    TemplateRecord,
    TemplateRegistry,
    UnknownTemplateError,
    kind_of,
    validate_template_id,
)
from pagefork.vmm.kvm.template import (
    HIGH_REGION_GPA,
    MAX_MEM_SIZE,
    TemplateSpec,
    load_template,
)
from pagefork.vmm.kvm.vm import TSS_ADDR


@pytest.fixture
def snapshot(tmp_path: Path) -> tuple[Path, Path]:
    """A Firecracker-like snapshot: a 1 MiB mem-file and a VM state file."""
    mem = make_mem_file(tmp_path / "mem", 256)
    state = tmp_path / "vmstate"
    state.write_bytes(b"firecracker vm state")
    return mem, state


def test_snapshot_template_references_its_files(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    mem, state = snapshot
    record = reg.create_from_snapshot("web", mem, state, name="Web tier")
    assert record.kind == "firecracker" and record.name == "Web tier"
    assert record.mem_file == str(mem) and record.snapshot_path == str(state)
    assert record.mem_size == 256 * 4096 and record.page_size == 4096
    assert record.live_forks == 0 and not record.owns_files and not record.has_hot_pages()
    assert reg.get("web") == record
    doc = json.loads((reg.root / "web" / RECORD_FILE).read_text())
    assert doc["format"] == "pagefork-template" and doc["id"] == "web"
    reg.delete("web")
    assert mem.exists() and state.exists()  # referenced files are not ours to delete
    assert not reg.exists("web")


def test_snapshot_template_copy_owns_its_files(tmp_path: Path, snapshot: tuple[Path, Path]) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    record = reg.create_from_snapshot("web", *snapshot, copy=True)
    assert record.owns_files
    assert Path(record.mem_file).read_bytes() == snapshot[0].read_bytes()
    assert Path(record.mem_file).is_relative_to(reg.root / "web")
    reg.delete("web")
    assert not Path(record.mem_file).exists() and snapshot[0].exists()


def test_create_refuses_missing_files_bad_sizes_and_duplicates(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    mem, state = snapshot
    with pytest.raises(TemplateError, match=r"mem-file .*nope does not exist"):
        reg.create_from_snapshot("a", tmp_path / "nope", state)
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 5000)
    with pytest.raises(TemplateError, match="not a multiple of 4096"):
        reg.create_from_snapshot("a", odd, state)
    with pytest.raises(TemplateError, match="neither 4 KiB nor 2 MiB"):
        reg.create_from_snapshot("a", mem, state, page_size=3000)
    reg.create_from_snapshot("a", mem, state)
    with pytest.raises(TemplateError, match="'a' already exists"):
        reg.create_from_snapshot("a", mem, state)
    # Failed creations leave nothing behind, not even hidden build directories.
    assert sorted(p.name for p in reg.root.iterdir()) == ["a"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 65, "sp ace", 7])
def test_template_ids_are_safe_directory_names(bad: object) -> None:
    with pytest.raises(TemplateError, match="invalid template id"):
        validate_template_id(bad)


def test_kind_of_names_the_allowed_kinds() -> None:
    assert kind_of("kvm") == "kvm"
    with pytest.raises(TemplateError, match="firecracker, kvm"):
        kind_of("qemu")


def test_corrupt_record_is_named_and_others_still_list(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    for name in ("a", "b", "c"):
        reg.create_from_snapshot(name, *snapshot)
    broken = reg.root / "b" / RECORD_FILE
    broken.write_text("{not json")
    doc = json.loads((reg.root / "c" / RECORD_FILE).read_text())
    del doc["mem_size"]
    (reg.root / "c" / RECORD_FILE).write_text(json.dumps(doc))
    listing = reg.listing()
    assert [r.id for r in listing.templates] == ["a"]
    assert len(listing.errors) == 2
    assert str(broken) in listing.errors[0] and "not valid JSON" in listing.errors[0]
    assert "field 'mem_size' is missing" in listing.errors[1]
    with pytest.raises(TemplateError, match=str(broken)):
        reg.get("b")
    reg.delete("b")  # a broken template can still be cleaned up
    assert not reg.exists("b")


def test_record_types_are_checked(tmp_path: Path, snapshot: tuple[Path, Path]) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    record = reg.create_from_snapshot("a", *snapshot)
    doc = {"format": "pagefork-template", **record.__dict__, "mem_size": True}
    with pytest.raises(TemplateError, match="'mem_size' has a wrong type"):
        TemplateRecord.from_dict(doc, "x.json")
    with pytest.raises(TemplateError, match="format is 'other'"):
        TemplateRecord.from_dict({**doc, "format": "other"}, "x.json")
    # A live-fork count stored by an older version means nothing (even a bad one).
    old = {"format": "pagefork-template", **record.__dict__, "live_forks": True}
    assert TemplateRecord.from_dict(old, "x.json").live_forks == 0


def test_delete_is_refused_while_forks_are_live(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    created = reg.create_from_snapshot("a", *snapshot).created
    live = {("a", created): 2}  # what a fork manager holding two forks of it answers
    reg.live_forks = lambda tid, when: live.get((tid, when), 0)
    assert reg.get("a").live_forks == 2
    reg.touch("a", created)
    assert reg.get("a").last_used is not None
    with pytest.raises(TemplateError, match="'a' is in use by 2 live forks"):
        reg.delete("a")
    assert reg.exists("a")
    live.clear()
    reg.delete("a")
    with pytest.raises(TemplateError, match="unknown template 'a'"):
        reg.delete("a")
    with pytest.raises(TemplateError, match="unknown template 'a'"):
        reg.get("a")


def test_records_are_written_atomically_and_live_counts_are_never_stored(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    created = reg.create_from_snapshot("a", *snapshot).created
    reg.live_forks = lambda tid, when: 3
    for _ in range(3):
        reg.touch("a", created)
    assert sorted(os.listdir(reg.root / "a")) == [RECORD_FILE]  # no temp files left
    assert reg.get("a").live_forks == 3
    assert "live_forks" not in json.loads((reg.root / "a" / RECORD_FILE).read_text())
    # A restarted daemon holds no fork: nothing on disk can say otherwise.
    again = TemplateRegistry(tmp_path / "state")
    assert again.get("a").live_forks == 0


def test_microvm_template_builds_and_loads(tmp_path: Path) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    record = reg.create_microvm("vm", TemplateSpec(mem_size=16 << 20, variants=2))
    assert record.kind == "kvm" and record.mem_size == 16 << 20 and record.owns_files
    template = load_template(record.snapshot_path)
    assert str(template.mem_file) == record.mem_file and template.variants == 2
    template.close()
    assert reg.get("vm") == record


def test_creation_errors_name_the_request_field(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    mem, state = snapshot
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 5000)
    cases = [
        ((tmp_path / "nope", state, 4096), ("mem_file",)),
        ((mem, tmp_path / "nope", 4096), ("snapshot_path",)),
        ((odd, state, 4096), ("mem_file",)),
        ((mem, state, 5000), ("page_size",)),
    ]
    for (m, s, page_size), fields in cases:
        with pytest.raises(TemplateFieldError) as info:
            reg.create_from_snapshot("a", m, s, page_size=page_size)
        assert info.value.fields == fields
        assert str(info.value).startswith(f"field {fields[0]!r}: ")
    # Impossible trace shares: the microVM spec cannot be built (no KVM needed to find out).
    spec = TemplateSpec(mem_size=4 << 20, variants=1024)
    with pytest.raises(TemplateFieldError, match="too small") as info:
        reg.create_microvm("vm", spec)
    assert "mem_size_mib" in info.value.fields and "variants" in info.value.fields
    assert list(reg.root.iterdir()) == []
    with pytest.raises(UnknownTemplateError, match="unknown template 'a'"):
        reg.get("a")
    with pytest.raises(UnknownTemplateError, match="unknown template 'a'"):
        reg.delete("a")


def test_touch_changes_only_the_record_it_was_given(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    old = reg.create_from_snapshot("web", *snapshot)
    reg.delete("web")
    reg.touch("web", old.created)  # gone: nothing to note, and no error
    new = reg.create_from_snapshot("web", *snapshot)
    assert new.created != old.created
    # A fork of the deleted template noting its use late does not touch the new record.
    reg.touch("web", old.created)
    assert reg.get("web").last_used is None
    reg.touch("web", new.created)
    assert reg.get("web").last_used is not None


def test_clean_leftovers_removes_crashed_creations_and_deletions(
    tmp_path: Path, snapshot: tuple[Path, Path]
) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    reg.create_from_snapshot("web", *snapshot)
    (reg.root / ".new-half-abc123" / "microvm").mkdir(parents=True)
    (reg.root / ".del-gone-abc123" / "t").mkdir(parents=True)
    torn = reg.root / "web" / f".{RECORD_FILE}.x1y2.tmp"
    torn.write_text("{")
    torn_hot = reg.root / "web" / ".hot-pages.hpl.k3j_9a0q.tmp"
    torn_hot.write_bytes(b"HPL1")
    # Not of our making, though named alike: a symlink, a FIFO, another name.
    outside = tmp_path / "precious"
    outside.write_text("keep")
    link = reg.root / "web" / ".hot-pages.hpl.abcdefgh.tmp"
    link.symlink_to(outside)
    fifo = reg.root / "web" / f".{RECORD_FILE}.fifo1234.tmp"
    os.mkfifo(fifo)
    other = reg.root / "web" / ".hot-pages.hpl.tmp"
    other.write_text("mine")
    assert sorted(reg.clean_leftovers()) == [
        ".del-gone-abc123",
        ".new-half-abc123",
        f"web/{torn_hot.name}",
        f"web/{torn.name}",
    ]
    assert sorted(p.name for p in reg.root.iterdir()) == ["web"]
    assert reg.get("web").id == "web" and not torn.exists() and not torn_hot.exists()
    assert link.is_symlink() and outside.read_text() == "keep"
    assert fifo.exists() and other.read_text() == "mine"


@pytest.mark.parametrize("mib", [4, 16, 2047, 2048, 3072, 4095])
def test_microvm_ram_up_to_4095_mib_lays_out_below_kvms_tss(mib: int) -> None:
    regions = TemplateSpec(mem_size=mib << 20).layout()
    assert sum(r.size for r in regions) == mib << 20
    assert [r.file_offset for r in regions] == [0, regions[0].size]  # back to back
    low, high = regions
    assert low.guest_phys_addr == 0 and low.end <= HIGH_REGION_GPA
    assert high.guest_phys_addr == HIGH_REGION_GPA and high.end <= TSS_ADDR
    assert all(r.size % 4096 == 0 for r in regions)
    if mib < 2047:
        assert low.size == high.size  # the layout smaller templates always had


def test_microvm_ram_beyond_the_limit_names_it() -> None:
    assert MAX_MEM_SIZE >> 20 == 4095
    with pytest.raises(TemplateError, match=r"4096 MiB does not fit below 4 GiB \(at most 4095"):
        TemplateSpec(mem_size=4096 << 20).layout()
