"""The built-in KVM microVM: guest program, traces, templates, and forks served by the server."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import KVM_MISSING as ENV_MISSING
from conftest import needs_kvm
from pagefork.errors import TemplateError
from pagefork.regions import PAGE_SIZE
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm import guest, orchestrate
from pagefork.vmm.kvm.microvm import MicroVm
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
    words = {0x1000: 1, 0x1800: 2, 0x2000: 3, 0x2800: 4}
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
