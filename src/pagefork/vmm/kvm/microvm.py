"""A fork: a new microVM restored from a template's vmstate, its RAM served by a page server.

Restore follows Firecracker's snapshot load: map RAM, create and register the uffd, hand it to
the page server, create the VM and its vCPUs from the vmstate, then wait (``resume_vm: false``)
until told to run, so the orchestrator can prefetch first. :meth:`MicroVm.run` runs one thread
per vCPU; each blocks in ``KVM_RUN`` with the GIL released, and faults on missing pages are
served by the page server in another process.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from pagefork.errors import TemplateError, VmmError
from pagefork.regions import PAGE_SIZE
from pagefork.vmm.kvm import cpustate, guest
from pagefork.vmm.kvm.devices import PortIoBus
from pagefork.vmm.kvm.memory import GuestMemory
from pagefork.vmm.kvm.snapshot import DiffSnapshot, write_diff_snapshot
from pagefork.vmm.kvm.template import TEMPLATE_FILE, VMSTATE_FILE, Template, TraceSlice
from pagefork.vmm.kvm.vcpu import EXIT_HALT
from pagefork.vmm.kvm.vm import VirtualMachine

#: How long a vCPU that finished its reads waits for the others (a safety net: a vCPU that
#: fails releases the rest at once).
_READS_BARRIER_TIMEOUT = 300.0


class TraceDevice:
    """The guest program's port-I/O device: hands each vCPU its trace slice, and records
    progress, the checksum and the time each vCPU reported ready."""

    def __init__(self, slices: list[TraceSlice]) -> None:
        self.slices = slices
        self.checksums: list[int | None] = [None] * len(slices)
        self.ready_at: list[float | None] = [None] * len(slices)
        #: (monotonic time, vCPU, pages read so far) at each progress report.
        self.progress: list[tuple[float, int, int]] = []
        self._pages = [0] * len(slices)
        # Every vCPU finishes its reads before any writes: the read phase sums the word the
        # write phase stores, and slices of one trace may share pages.
        self._reads_done = threading.Barrier(len(slices))

    def abort(self) -> None:
        """Release vCPUs waiting for the others (one of them failed)."""
        self._reads_done.abort()

    def io_in(self, vcpu: int, port: int, size: int) -> int:
        """Answer the program's three questions about its slice."""
        s = self.slices[vcpu]
        if port == guest.PORT_TRACE_ADDR:
            self._pages[vcpu] = 0  # a new walk starts
            return s.gpa
        if port == guest.PORT_TRACE_READS:
            return s.reads
        if port == guest.PORT_TRACE_WRITES:
            return s.writes
        raise VmmError(f"vCPU {vcpu}: read of unexpected port {port:#x}")

    def io_out(self, vcpu: int, port: int, size: int, value: int) -> bool:
        """Record progress and readiness; never stops the vCPU (it halts by itself)."""
        now = time.monotonic()
        if port == guest.PORT_PROGRESS:
            done = min(self._pages[vcpu] + guest.CHUNK_PAGES, self.slices[vcpu].reads)
            self._pages[vcpu] = done
            self.progress.append((now, vcpu, done))
            if done == self.slices[vcpu].reads:
                try:
                    self._reads_done.wait(_READS_BARRIER_TIMEOUT)
                except threading.BrokenBarrierError:
                    raise VmmError(
                        f"vCPU {vcpu}: another vCPU stopped before finishing its reads"
                    ) from None
        elif port == guest.PORT_READY:
            self.checksums[vcpu] = value
            self.ready_at[vcpu] = now
        else:
            raise VmmError(f"vCPU {vcpu}: write of {value:#x} to unexpected port {port:#x}")
        return False


@dataclass
class RunResult:
    """What a fork's run produced. Times are ``time.monotonic()`` (system-wide clock)."""

    started: float
    ready: float
    checksums: list[int]
    exits: int
    progress: list[tuple[float, int, int]] = field(default_factory=list)


class MicroVm:
    """One fork of ``template`` walking the trace variant of ``fork_index``."""

    def __init__(self, template: Template, fork_index: int) -> None:
        self.template = template
        self.fork_index = fork_index
        self.variant = template.variant_of(fork_index)
        self.memory: GuestMemory | None = None
        self.vm: VirtualMachine | None = None
        self.device = TraceDevice(template.variant_slices[self.variant])
        self.bus = PortIoBus()
        self.bus.register(range(guest.PORT_PAUSE, guest.PORT_READY + 1), self.device)
        self.slots: list[int] = []
        self.log_dirty = False

    def restore(
        self, socket_path: str | None, connect_timeout: float = 10.0, *, log_dirty: bool = False
    ) -> None:
        """Map RAM and restore the vCPUs. With ``socket_path``, RAM is served by the page
        server there (uffd handshake); without, it is read from the mem-file up front (a plain
        restore, for checks without a server). ``log_dirty`` has KVM log the guest's writes,
        for :meth:`snapshot` (Firecracker's ``track_dirty_pages``)."""
        self.memory = GuestMemory(self.template.layout)
        if socket_path is not None:
            self.memory.register_userfaultfd()
            self.memory.connect_page_server(socket_path, timeout=connect_timeout)
        else:
            with open(self.template.mem_file, "rb") as f:
                for i, r in enumerate(self.template.layout):
                    view = self.memory.view(i)
                    f.seek(r.file_offset)
                    if f.readinto(view) != r.size:
                        raise VmmError(f"{self.template.mem_file}: short read")
                    view.release()
        self.vm = VirtualMachine()
        self.log_dirty = log_dirty
        for addr, r in zip(self.memory.host_addrs, self.template.layout, strict=True):
            slot = self.vm.add_memory(r.guest_phys_addr, r.size, addr, log_dirty=log_dirty)
            self.slots.append(slot)
        for state in self.template.vcpu_states:
            vcpu = self.vm.create_vcpu()
            try:
                vcpu.set_sregs(cpustate.sregs_from_dict(state.sregs))
                vcpu.set_regs(cpustate.regs_from_dict(state.regs))
            except (VmmError, TypeError, ValueError, KeyError) as exc:
                raise TemplateError(
                    f"{self.template.path / VMSTATE_FILE}: KVM rejected vCPU {vcpu.index}'s "
                    f"state ({exc})"
                ) from None

    def run(self) -> RunResult:
        """Run every vCPU until it halts; returns when all have. A vCPU that fails makes the
        whole run fail with its error."""
        if self.vm is None:
            raise VmmError("run() before restore()")
        vcpus = self.vm.vcpus
        errors: list[BaseException] = []

        def vcpu_thread(index: int) -> None:
            try:
                if vcpus[index].run(self.bus) != EXIT_HALT:
                    raise VmmError(f"vCPU {index} stopped before halting")
            except BaseException as exc:  # reported by run(), not lost in the thread
                errors.append(exc)
                self.device.abort()

        self.device.progress.clear()  # a run again after a halt reports its own progress
        started = time.monotonic()
        if len(vcpus) == 1:
            vcpu_thread(0)
        else:
            threads = [
                threading.Thread(target=vcpu_thread, args=(i,), name=f"vcpu{i}")
                for i in range(len(vcpus))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        dev = self.device
        if any(c is None for c in dev.checksums):
            raise VmmError("a vCPU halted without reporting ready")
        ready = max(t for t in dev.ready_at if t is not None)
        return RunResult(
            started=started,
            ready=ready,
            checksums=[c for c in dev.checksums if c is not None],
            exits=sum(v.exits for v in vcpus),
            progress=list(dev.progress),
        )

    def snapshot(self, out_dir: str) -> DiffSnapshot:
        """A diff snapshot into directory ``out_dir`` (see :mod:`.snapshot`); only between
        runs (the vCPUs are stopped), and only with ``log_dirty``."""
        if self.vm is None or self.memory is None:
            raise VmmError("snapshot() before restore()")
        if not self.log_dirty:
            raise VmmError("this fork was restored without dirty logging: no diff snapshot")
        return write_diff_snapshot(
            self.vm, self.memory, self.slots, out_dir, self.template.path / TEMPLATE_FILE
        )

    def own_checksums(self, variant: int) -> list[int]:
        """The checksum each vCPU walking ``variant`` would report over this fork's memory as
        it is now (read here, not from the template): after a snapshot, what every branch of
        it walking ``variant`` must report. Only while the vCPUs are stopped."""
        if self.memory is None:
            raise VmmError("own_checksums() before restore()")
        memory = self.memory

        def read_word(gpa: int) -> int:
            # A page never touched faults here and is served like any other.
            word = ctypes.string_at(memory.host_address(gpa, 4), 4)
            return int.from_bytes(word, "little")

        return [
            guest.expected_checksum(reads, read_word)
            for reads, _ in self.template.slice_pages(variant)
        ]

    def check_pages(self) -> list[int]:
        """After :meth:`run`: compare every page the trace touched with the mem-file, byte for
        byte (a written page: all but the written word). Returns the wrong pages' addresses.

        The guest checksum covers only two words of each page read; this covers every byte of
        every page served. Those pages are present once the guest reported ready, so reading
        them here faults nothing (and this process is not the page server).
        """
        if self.memory is None:
            raise VmmError("check_pages() before restore()")
        written = self.template.written_pages(self.variant)
        lo, hi = guest.WRITE_OFFSET, guest.WRITE_OFFSET + 4
        bad = []
        for gpa in sorted(self.template.touched_pages(self.variant)):
            want = self.template.read_bytes(gpa, PAGE_SIZE)
            got = ctypes.string_at(self.memory.host_address(gpa, PAGE_SIZE), PAGE_SIZE)
            if gpa in written:
                same = got[:lo] == want[:lo] and got[hi:] == want[hi:]
            else:
                same = got == want
            if not same:
                bad.append(gpa)
        return bad

    def close(self) -> None:
        """Tear down the VM, then RAM (which drops the page server connection)."""
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def __enter__(self) -> MicroVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
