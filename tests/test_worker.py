"""The worker's fault loop and prefetch, driven step by step in this process.

A :class:`Worker` is built here and given one fork whose guest is a test VMM process; the test
calls the worker's handlers itself, so every interleaving below is chosen, not hoped for.
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PAGE, needs_uffd
from pagefork import uffd
from pagefork.handshake import parse_mappings
from pagefork.memfile import MemFile
from pagefork.prefetch import plan_prefetch
from pagefork.regions import Region
from pagefork.serving import ipc
from pagefork.serving import ledger as L
from pagefork.serving import messages as M
from pagefork.serving.worker import Worker
from pagefork.serving.workerprefetch import run_prefetch
from pagefork.testing.vmm import VmmProcess

MIB = 1 << 20


@dataclass
class Harness:
    """One fork served by an in-process worker whose loop the test steps by hand."""

    worker: Worker
    supervisor_end: socket.socket
    vmm: VmmProcess
    memfile: MemFile
    uffd: int
    regions: list[Region]
    ledger: L.Ledger

    def ask(self, **cmd: object) -> None:
        """Send the guest a command without waiting: its answer needs the worker to run."""
        assert self.vmm.proc.stdin is not None
        self.vmm.proc.stdin.write(json.dumps(cmd) + "\n")
        self.vmm.proc.stdin.flush()

    def wait_uffd_readable(self) -> None:
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        assert poller.poll(10_000), "the guest's event never reached the uffd"

    def step(self) -> None:
        """One turn of the worker's loop for this fork's uffd."""
        self.worker._on_fd(self.worker.forks["a#1"].uffd)

    def messages(self) -> list[M.Message]:
        out = []
        self.supervisor_end.setblocking(False)
        try:
            while True:
                message, fds = ipc.recv(self.supervisor_end)
                for fd in fds:
                    os.close(fd)
                out.append(message)
        except (BlockingIOError, ipc.ChannelClosed):
            pass
        finally:
            self.supervisor_end.setblocking(True)
        return out


@pytest.fixture
def harness(tmp_path: Path, mem_file: Path) -> Iterator[Harness]:
    if uffd_missing():
        pytest.skip("userfaultfd unavailable")
    path = str(tmp_path / "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    vmm = VmmProcess(path, str(mem_file), ("8M", "4M"), timeout=20.0)
    conn, _ = listener.accept()
    listener.close()
    msg, fds, _, _ = socket.recv_fds(conn, 65536, 2)
    memfile = MemFile(str(mem_file), mapped=False)
    regions = parse_mappings(msg, memfile.size)
    sup, child = ipc.channel_pair()
    worker = Worker(child, os.dup(memfile.fd), memfile.size, os.dup(memfile.zero_index_fd()))
    ledger = L.Ledger.create(0)
    spec = M.ForkSpec(
        key="a#1",
        fork="a",
        pid=vmm.pid,
        on_failure="close",
        regions=tuple(regions),
        record_capacity=0,
        record_max_pages=None,
        record_max_seconds=None,
        fds=("uffd", "conn", "ledger"),
        adopt=False,
        hangup_ends=False,
    )
    worker.table.add(spec, [os.dup(fds[0]), os.dup(conn.fileno()), os.dup(ledger.fd)])
    h = Harness(worker, sup, vmm, memfile, fds[0], regions, ledger)
    yield h
    vmm.kill()
    for f in list(worker.forks.values()):
        worker.table.end(f, M.EndState.ENDED, None, report=False)
    worker.ep.close()
    worker.zeros.close()
    child.close()
    sup.close()
    conn.close()
    os.close(fds[0])
    ledger.close()
    memfile.close()


def uffd_missing() -> bool:
    try:
        os.close(uffd.open_userfaultfd())
    except Exception:
        return True
    return False


@needs_uffd
def test_fault_on_a_page_prefetch_installed_meanwhile_wakes_the_guest(harness: Harness) -> None:
    """A prefetch copy lands (DONTWAKE) between the guest's fault and the loop's copy: the
    loop's copy gets EEXIST and must wake the guest itself, not leave it asleep."""
    h = harness
    region = h.regions[0]
    h.ask(cmd="touch", pages=[[0, PAGE]])
    h.wait_uffd_readable()  # the guest sleeps in its fault; nothing has read it yet
    mem_address = h.worker.mem_address
    uffd.UffdIoctls(h.uffd).copy(
        region.base + PAGE,
        mem_address + region.offset + PAGE,
        PAGE,
        uffd.UFFDIO_COPY_MODE_DONTWAKE,
    )
    h.step()  # reads the fault; its copy says EEXIST; it wakes the guest
    reply = h.vmm._reply()
    assert reply["bad"] == 0 and reply["touched"] == 1
    assert h.ledger.counters[L.ALREADY_PRESENT] == 1 and h.ledger.counters[L.FAULTS] == 1


@needs_uffd
def test_the_usual_fault_copies_template_pages_maps_zero_pages_and_counts_each(
    harness: Harness,
) -> None:
    """One fault per read, a 4 KiB page, nothing removed: the loop's short path, which may
    serve several of the guest's faults in one turn. In both regions (the second at a file
    offset) template pages are copied and all-zero ones get the zero page; every fault is
    counted and timed once."""
    h = harness
    # The mem-file's every 4th page is zero: region 1 starts at file page 2048.
    pages = [[0, 0], [0, PAGE], [0, 5 * PAGE], [1, 0], [1, 4 * PAGE], [1, 7 * PAGE]]
    h.ask(cmd="touch", pages=pages)  # the guest checks every byte against the template
    while h.ledger.counters[L.FAULTS] < len(pages):
        h.wait_uffd_readable()
        h.step()
    reply = h.vmm._reply()
    assert reply["bad"] == 0 and reply["touched"] == len(pages)
    c = h.ledger.counters
    assert (c[L.FAULTS], c[L.ZERO_PAGES], c[L.PAGES_COPIED]) == (6, 3, 3)
    assert c[L.LATENCY_N] == 6 and c[L.ALREADY_PRESENT] == 0 and c[L.ERRORS] == 0


@needs_uffd
def test_prefetch_never_copies_into_a_range_removed_before_it_ran(harness: Harness) -> None:
    """The guest removes a range (balloon) and the REMOVE is still unread when prefetch
    starts: prefetch's copy gets EAGAIN from the kernel, the worker reads and notes the REMOVE
    on the same thread, and prefetch skips the range. Template bytes never land there."""
    h = harness
    removed_len = 64 * PAGE
    h.ask(cmd="remove", region=0, offset=0, length=removed_len)
    h.wait_uffd_readable()  # the REMOVE is queued and unread: the guest waits in madvise
    pages = [(0, off) for off in range(0, 128 * PAGE, PAGE)]
    plan = plan_prefetch(pages, h.regions, h.memfile.is_zero)
    run_prefetch(h.worker, 7, "a#1", plan, 10.0, None)
    [done] = [m for m in h.messages() if isinstance(m, M.Prefetched)]
    assert done.req == 7 and done.error is None and done.result is not None
    assert done.result.skipped_removed == 64 and done.installed == done.result.installed == 64
    assert list(h.ledger.removed()) == [(h.regions[0].base, h.regions[0].base + removed_len)]
    assert h.vmm._reply() == {"ok": True}  # the madvise returned once the REMOVE was read
    h.ask(cmd="check_zero", region=0, offset=0, length=removed_len)
    h.wait_uffd_readable()
    while h.ledger.counters[L.ZERO_PAGES] < 64:
        h.wait_uffd_readable()
        h.step()
    assert h.vmm._reply()["zero"] is True
    h.ask(cmd="touch", pages=[[0, off] for off in range(removed_len, 128 * PAGE, PAGE)])
    assert h.vmm._reply()["bad"] == 0  # prefetched: no fault needed the worker
    assert h.ledger.counters[L.FAULTS] == 64


@needs_uffd
def test_remove_is_durable_in_the_ledger_before_the_fault_after_it_is_served(
    harness: Harness,
) -> None:
    h = harness
    h.ask(cmd="remove", region=1, offset=MIB, length=MIB)
    h.wait_uffd_readable()
    h.step()
    assert h.vmm._reply() == {"ok": True}
    # What a replacement worker would start from: the ledger alone.
    assert list(h.ledger.removed()) == [(h.regions[1].base + MIB, h.regions[1].base + 2 * MIB)]
    assert h.ledger.counters[L.REMOVED_BYTES] == MIB


@needs_uffd
def test_a_peer_that_clears_o_nonblock_fails_its_own_fork_and_never_blocks_the_loop(
    harness: Harness,
) -> None:
    """O_NONBLOCK lives in the file description the VMM shares: a hostile one can clear it.
    The loop's read must still return at once, and the uffd, which then polls as an error
    forever, fails that fork (and no other) instead of spinning the loop."""
    import fcntl
    import threading

    h = harness
    f = h.worker.forks["a#1"]
    flags = fcntl.fcntl(h.uffd, fcntl.F_GETFL)
    fcntl.fcntl(h.uffd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    got: list[list[int]] = []
    reader = threading.Thread(
        target=lambda: got.append(h.worker.read_events(f, until_empty=True)), daemon=True
    )
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "the worker blocked in read(2) on a uffd with no event"
    assert got == [[]]
    h.ask(cmd="touch", pages=[[0, 2 * PAGE]])  # the fault's wake-up makes epoll poll it again
    [(fd, ev)] = h.worker.ep.poll(10)  # and the uffd polls as an error now
    assert fd == f.uffd and ev & select.EPOLLERR
    h.worker._on_fd(fd, ev)
    assert "a#1" not in h.worker.forks and h.ledger.counters[L.ERRORS] == 1
    [ended] = [m for m in h.messages() if isinstance(m, M.Ended)]
    assert ended.key == "a#1" and ended.state is M.EndState.FAILED
    assert "O_NONBLOCK" in (ended.error or "")
