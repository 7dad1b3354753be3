"""Hugepage (2 MiB hugetlbfs) guests: faults are served in the region's page size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import host_lock

from conftest import make_mem_file, needs_uffd
from pagefork.hotpages import HotPage
from pagefork.server import PageServer, ServerConfig
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd

HUGE = 2 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@pytest.fixture
def hugepages() -> Iterator[None]:
    """Reserve 2 MiB pages for the test (root can), restoring the setting afterwards. The pool
    is the host's: two test runs on one host take turns at it, or one would restore the
    other's reservation as its own (and free pages the other is using)."""
    with host_lock("hugepages"):
        try:
            before = int(NR_HUGEPAGES.read_text())
            NR_HUGEPAGES.write_text(str(before + 16))
            got = int(NR_HUGEPAGES.read_text())
        except OSError as exc:
            pytest.skip(f"cannot reserve hugetlbfs pages here: {exc}")
        try:
            if got < before + 8:
                pytest.skip(f"only {got - before} hugetlbfs pages could be reserved")
            yield
        finally:
            NR_HUGEPAGES.write_text(str(before))


def test_hugepage_regions_are_served_in_2mib_pages(tmp_path: Path, hugepages: None) -> None:
    # 12 MiB of template; every 4th 4 KiB page zero, so 2 MiB pages mix data and zeros, and
    # one all-zero 2 MiB page at the end exercises the zero-page path (copied: hugetlbfs has
    # no UFFDIO_ZEROPAGE).
    mem = make_mem_file(tmp_path / "mem", 2560)
    with open(mem, "ab") as f:
        f.write(bytes(HUGE))
    with PageServer(ServerConfig(str(mem), str(tmp_path))) as server:
        path = server.register_fork("huge")
        vmm = VmmProcess(
            path, str(mem), ("8M", "4M"), "--hugetlb", "--page-size", str(HUGE), "--gap", "2M"
        )
        try:
            regions = server.wait_connected("huge")
            assert [r.page_size for r in regions] == [HUGE, HUGE]
            reply = vmm.send(cmd="touch", all=True, order="random")
            assert reply["touched"] == 6 and reply["bad"] == 0, reply  # 6 pages of 2 MiB
            stats = server.stats("huge")
            assert (stats.faults, stats.pages_copied, stats.zero_pages) == (6, 5, 1)
            # Prefetch in 2 MiB units into a second hugepage fork.
            path2 = server.register_fork("huge2")
            vmm2 = VmmProcess(path2, str(mem), ("8M", "4M"), "--hugetlb", "--page-size", str(HUGE))
            try:
                result = server.prefetch("huge2", [HotPage(0, 0), HotPage(0, HUGE), HotPage(1, 0)])
                assert result.installed == 3 and result.bytes == 3 * HUGE
                assert vmm2.send(cmd="touch", all=True)["bad"] == 0
                assert server.stats("huge2").faults == 3  # only the pages not prefetched
            finally:
                vmm2.kill()
        finally:
            vmm.kill()
