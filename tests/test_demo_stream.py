"""Resuming early: a microVM fork resumes once the head of its hot set is in, and the rest
streams in while its guest runs. Every byte the guest reads is checked against the template
(its checksums and the pages it read back), whatever raced whom."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import KVM_MISSING, needs_kvm
from pagefork.demo import orchestrate
from pagefork.hotpages import HotPageList
from pagefork.server import PageServer, ServerConfig
from pagefork.vmm.kvm.template import MEM_FILE, Template, TemplateSpec, build_template
from pagefork.vmm.kvm.trace import TraceSpec

SMALL = TemplateSpec(mem_size=16 << 20, variants=4, trace=TraceSpec(working_set=0.10, seed=5))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    if KVM_MISSING is not None:
        pytest.skip(KVM_MISSING)
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


def test_a_stream_needs_a_head_of_zero_or_more() -> None:
    hot = HotPageList.from_pages([(0, i * 0x1000) for i in (5, 3, 9, 1, 7)])
    assert orchestrate.Stream(hot, 2).pages == 5
    with pytest.raises(ValueError, match="head"):
        orchestrate.Stream(hot, -1)


@needs_kvm
def test_a_fork_resumed_early_reads_the_template_while_the_rest_streams_in(
    template: Template, server: PageServer
) -> None:
    warm, hot = orchestrate.warm_up(server, template, fork_index=0)
    for head in (0, len(hot) // 8):
        stream = orchestrate.Stream(hot, head)
        [report] = orchestrate.run_forks(
            server, template, [2], "prefetch", warmup_variant=warm.variant, stream=stream
        )
        assert report.checksum_ok and report.bad_pages == 0  # every byte it read was right
        assert report.head_pages >= head  # the head's last run may hold a few more
        # Each hot page came in before resume, streamed, or by a fault that raced the stream.
        assert report.head_pages + report.streamed_pages + report.raced == len(hot)
        assert report.prefetched_pages == report.head_pages + report.streamed_pages
        # Misses: pages the hot set lacks, and hot pages the guest reached first (served by a
        # fault; or installed by the stream while the fault waited, which then found it there).
        beyond = report.misses - report.specific_pages
        assert report.raced <= beyond <= report.raced + report.already_present
