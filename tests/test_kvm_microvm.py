"""The built-in KVM microVM: guest program, traces, templates, and forks served by the server."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import KVM_MISSING as ENV_MISSING
from conftest import needs_kvm
from pagefork.demo import orchestrate
from pagefork.errors import TemplateError, VmmError
from pagefork.regions import PAGE_SIZE
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm import guest
from pagefork.vmm.kvm.microvm import MicroVm
from pagefork.vmm.kvm.process import ForkProcess
from pagefork.vmm.kvm.template import (
    MEM_FILE,
    TEMPLATE_FILE,
    VMSTATE_FILE,
    Template,
    TemplateSpec,
    build_template,
    load_template,
)
from pagefork.vmm.kvm.trace import TraceSpec, generate_variants

SMALL = TemplateSpec(mem_size=16 << 20, variants=4, trace=TraceSpec(working_set=0.10, seed=3))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    if ENV_MISSING is not None:
        pytest.skip(ENV_MISSING)
    tpl = build_template(tmp_path_factory.mktemp("kvm") / "template", SMALL)
    yield tpl
    tpl.close()


@pytest.fixture
def server(template: Template, tmp_path: Path) -> Iterator[PageServer]:
    config = ServerConfig(
        mem_file_path=str(template.path / MEM_FILE), socket_dir=str(tmp_path), on_failure="kill"
    )
    with PageServer(config) as srv:
        yield srv


# --- pure parts: no KVM needed ----------------------------------------------------------------


def test_guest_resumes_right_after_the_pause_port_write() -> None:
    pause = guest.PROGRAM.index(bytes([0xE6, guest.PORT_PAUSE]))
    assert guest.PROGRAM_GPA + pause + 2 == guest.RESUME_GPA
    assert "lodsd" in guest.listing()


def test_expected_checksum_depends_on_page_order() -> None:
    second = guest.READ_OFFSETS[1]
    words = {0x1000: 1, 0x1000 + second: 2, 0x2000: 3, 0x2000 + second: 4}
    forward = guest.expected_checksum([0x1000, 0x2000], words.__getitem__)
    backward = guest.expected_checksum([0x2000, 0x1000], words.__getitem__)
    assert forward != backward


def test_variants_share_the_common_hot_set_in_the_same_order() -> None:
    data = [0x100000 + i * PAGE_SIZE for i in range(4000)]
    spec = TraceSpec(working_set=0.10, fork_share=0.05, seed=7)
    variants = generate_variants(data, 4096, spec, 3)
    common = [p for p in variants[0].reads if p not in variants[0].specific]
    for v in variants[1:]:
        assert [p for p in v.reads if p not in v.specific] == common
        assert not v.specific & (variants[0].pages() - variants[0].specific)
        assert len(v.specific) == round(0.05 * round(0.10 * 4096))
    assert variants[1].specific != variants[2].specific


def test_trace_runs_average_one_to_three_pages() -> None:
    data = [i * PAGE_SIZE for i in range(20000)]
    [v] = generate_variants(data, 20000, TraceSpec(working_set=0.1, fork_share=0.0), 1)
    pages = sorted(v.pages())
    runs = 1 + sum(1 for a, b in itertools.pairwise(pages) if b != a + PAGE_SIZE)
    assert 1.0 <= len(pages) / runs <= 3.0


# --- templates ----------------------------------------------------------------------------------


def _copy(template: Template, dest: Path) -> Path:
    shutil.copytree(template.path, dest)
    return dest


@needs_kvm
def test_template_mem_file_holds_what_the_boot_wrote(template: Template) -> None:
    assert template.read_word(guest.SCRATCH_GPA) == guest.BOOT_STAMP
    assert template.vcpu_states[0].regs["rip"] == guest.RESUME_GPA
    assert len(template.layout) == 2  # split RAM: a multi-region handshake


@needs_kvm
def test_truncated_mem_file_fails_with_template_error(template: Template, tmp_path: Path) -> None:
    broken = _copy(template, tmp_path / "t")
    with open(broken / MEM_FILE, "r+b") as f:
        f.truncate(4 << 20)
    with pytest.raises(TemplateError, match="truncated"):
        load_template(broken)


@needs_kvm
def test_vmstate_that_is_not_json_fails_with_template_error(
    template: Template, tmp_path: Path
) -> None:
    broken = _copy(template, tmp_path / "t")
    (broken / VMSTATE_FILE).write_text('{"format": "pagefork-kvm-vmstate", ')
    with pytest.raises(TemplateError, match=r"vmstate\.json: not valid JSON"):
        load_template(broken)


@needs_kvm
def test_vmstate_missing_a_segment_fails_with_template_error(
    template: Template, tmp_path: Path
) -> None:
    broken = _copy(template, tmp_path / "t")
    doc = json.loads((broken / VMSTATE_FILE).read_text())
    del doc["vcpus"][0]["sregs"]["cs"]
    (broken / VMSTATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(TemplateError, match=r"vmstate\.json: malformed vmstate.*cs"):
        load_template(broken)


@needs_kvm
def test_trace_outside_guest_ram_fails_with_template_error(
    template: Template, tmp_path: Path
) -> None:
    broken = _copy(template, tmp_path / "t")
    doc = json.loads((broken / TEMPLATE_FILE).read_text())
    doc["variants"][0]["slices"][0]["gpa"] = 0x8000_0000
    (broken / TEMPLATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(TemplateError, match="outside RAM"):
        load_template(broken)


# --- forks ----------------------------------------------------------------------------------------


@needs_kvm
def test_plain_restore_without_a_page_server_gives_the_template_checksum(
    template: Template,
) -> None:
    with MicroVm(template, 1) as vm:
        vm.restore(None)
        result = vm.run()
    assert result.checksums == template.expected_checksums(template.variant_of(1))


@needs_kvm
def test_fork_on_demand_reaches_ready_with_the_right_checksum(
    template: Template, server: PageServer
) -> None:
    [report] = orchestrate.run_forks(server, template, [1], "demand")
    assert report.checksum_ok
    # Every page the guest touched arrived through the uffd, once.
    assert report.faults == len(template.touched_pages(report.variant))
    assert report.prefetched_pages == 0 and report.misses == 0


@needs_kvm
def test_prefetched_fork_misses_only_its_fork_specific_pages(
    template: Template, server: PageServer
) -> None:
    warm, hot = orchestrate.warm_up(server, template, fork_index=0)
    assert warm.checksum_ok
    assert len(hot) == len(template.touched_pages(warm.variant))
    [report] = orchestrate.run_forks(
        server, template, [2], "prefetch", hot=hot, warmup_variant=warm.variant
    )
    specific = template.touched_pages(report.variant) - template.touched_pages(warm.variant)
    assert report.checksum_ok
    assert report.prefetched_pages == len(hot)
    assert specific and report.misses == len(specific) == report.specific_pages
    assert report.faults == report.misses


@needs_kvm
def test_concurrent_forks_all_reach_ready(template: Template, server: PageServer) -> None:
    reports = orchestrate.run_forks(server, template, [1, 2, 3], "demand", concurrent=True)
    assert [r.checksum_ok for r in reports] == [True, True, True]


@needs_kvm
def test_two_vcpus_walk_their_own_slices(tmp_path: Path) -> None:
    spec = TemplateSpec(mem_size=16 << 20, vcpus=2, variants=2, split=False)
    tpl = build_template(tmp_path / "t2", spec)
    config = ServerConfig(mem_file_path=str(tpl.path / MEM_FILE), socket_dir=str(tmp_path))
    with PageServer(config) as srv:
        [report] = orchestrate.run_forks(srv, tpl, [1], "demand")
    assert report.checksum_ok
    assert len(tpl.expected_checksums(1)) == 2
    # Both vCPUs may fault on a shared page (the program) at once: count pages, not events.
    assert report.pages_copied + report.zero_pages == len(tpl.touched_pages(1))
    tpl.close()


@needs_kvm
def test_vcpu_error_is_reported_as_the_exit_not_a_buffer_error(
    template: Template, server: PageServer, tmp_path: Path
) -> None:
    broken = _copy(template, tmp_path / "t")
    doc = json.loads((broken / VMSTATE_FILE).read_text())
    doc["vcpus"][0]["regs"]["rip"] = 0x8000_0000  # no RAM there: the fetch cannot be served
    (broken / VMSTATE_FILE).write_text(json.dumps(doc))
    tpl = load_template(broken)
    try:
        with pytest.raises(VmmError, match=r"unexpected exit \w+") as info:
            orchestrate.run_forks(server, tpl, [1], "demand")
        assert "BufferError" not in str(info.value)
        assert "0x80000000" in str(info.value)
    finally:
        tpl.close()


@needs_kvm
def test_a_wrong_byte_in_a_write_first_page_fails_the_fork(
    template: Template, tmp_path: Path
) -> None:
    variant = template.variant_of(1)
    reads = {p for r, _ in template.slice_pages(variant) for p in r}
    write_first = sorted(template.written_pages(variant) - reads)
    assert write_first
    # Serve the fork from a copy of the mem-file with one byte changed in a page the guest
    # only writes (never reads, so the guest checksum cannot see it), away from the written word.
    bad_mem = tmp_path / "bad-mem-file"
    shutil.copyfile(template.mem_file, bad_mem)
    offset = template.file_offset(write_first[0]) + 100
    with open(bad_mem, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    config = ServerConfig(mem_file_path=str(bad_mem), socket_dir=str(tmp_path), on_failure="kill")
    with PageServer(config) as srv:
        [report] = orchestrate.run_forks(srv, template, [1], "demand")
    assert report.checksum_ok is False
    assert report.bad_pages == 1


@needs_kvm
def test_fork_exits_with_an_error_when_its_page_server_goes_away(
    template: Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "gone.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.settimeout(30)
    proc = ForkProcess(str(template.path), path, 1, wait_go=False)
    try:
        conn, _ = listener.accept()
        _, fds, _, _ = socket.recv_fds(conn, 65536, 4)
        for fd in fds:  # the "server" dies without serving a page
            os.close(fd)
        conn.close()
        t0 = time.monotonic()
        with pytest.raises(VmmError, match="page server closed the connection"):
            proc.wait_result(timeout=30)
        assert time.monotonic() - t0 < 30
    finally:
        proc.close()
        listener.close()


def _break_vmstate(template: Template, dest: Path, edit: Any) -> Path:
    broken = _copy(template, dest)
    doc = json.loads((broken / VMSTATE_FILE).read_text())
    edit(doc["vcpus"][0])
    (broken / VMSTATE_FILE).write_text(json.dumps(doc))
    return broken


@needs_kvm
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda v: v["sregs"].__setitem__("interrupt_bitmap", [0]), "interrupt_bitmap"),
        (lambda v: v["sregs"]["cs"].__setitem__("selector", 0x1_0000), "cs.selector"),
        (lambda v: v["sregs"]["ss"].__setitem__("type", 256), "ss.type"),
        (lambda v: v["sregs"]["gdt"].__setitem__("limit", -1), "gdt.limit"),
        (lambda v: v["regs"].__setitem__("rip", 1 << 64), "rip"),
    ],
)
def test_vmstate_field_out_of_range_fails_with_template_error(
    template: Template, tmp_path: Path, edit: Any, match: str
) -> None:
    broken = _break_vmstate(template, tmp_path / "t", edit)
    with pytest.raises(TemplateError, match=rf"vmstate\.json: malformed vmstate.*{match}"):
        load_template(broken)


@needs_kvm
def test_vmstate_kvm_rejects_fails_with_template_error(template: Template, tmp_path: Path) -> None:
    # Paging without protected mode: KVM_SET_SREGS refuses it.
    broken = _break_vmstate(template, tmp_path / "t", lambda v: v["sregs"].update(cr0=1 << 31))
    tpl = load_template(broken)
    try:
        with (
            MicroVm(tpl, 0) as vm,
            pytest.raises(TemplateError, match=r"vmstate\.json: KVM rejected.*SET_SREGS"),
        ):
            vm.restore(None)
    finally:
        tpl.close()


@needs_kvm
@pytest.mark.parametrize(("key", "value"), [("reads", -5), ("writes", -1), ("reads", 1 << 32)])
def test_trace_counts_out_of_range_fail_with_template_error(
    template: Template, tmp_path: Path, key: str, value: int
) -> None:
    broken = _copy(template, tmp_path / "t")
    doc = json.loads((broken / TEMPLATE_FILE).read_text())
    doc["variants"][0]["slices"][0][key] = value
    (broken / TEMPLATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(TemplateError, match=r"template\.json: variant 0 has read/write counts"):
        load_template(broken)


def test_fork_indices_never_reuse_the_warmup_variant() -> None:
    class FakeTemplate:
        variants = 4

        def variant_of(self, index: int) -> int:
            return index % self.variants

    tpl: Any = FakeTemplate()
    indices = [orchestrate.fork_index(tpl, k, 0) for k in range(20)]
    assert len(set(indices)) == 20
    assert all(tpl.variant_of(i) != 0 for i in indices)
    assert {tpl.variant_of(i) for i in indices} == {1, 2, 3}


@needs_kvm
def test_memory_region_over_the_tss_fails_with_template_error(
    template: Template, tmp_path: Path
) -> None:
    broken = _copy(template, tmp_path / "t")
    doc = json.loads((broken / VMSTATE_FILE).read_text())
    doc["memory"]["regions"][-1]["guest_phys_addr"] = 0xFFF0_0000  # 1 MiB just below 4 GiB
    doc["memory"]["regions"][-1]["size"] = 1 << 20
    (broken / VMSTATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(TemplateError, match="overlaps KVM's TSS"):
        load_template(broken)
