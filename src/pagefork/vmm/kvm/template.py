"""Templates of the built-in microVM: build one by booting the guest to its snapshot point,
and load one back with every file checked.

A template directory holds what a Firecracker snapshot holds, plus what the demo needs:

- ``mem-file``: guest RAM, regions back to back (the page server's source);
- ``vmstate.json``: memory layout and each vCPU's registers at the pause point;
- ``template.json``: how it was made and where each variant's trace slices sit in guest RAM.

The expected checksums and touched pages are derived from the mem-file itself (the trace is
guest data), so nothing on the host side can disagree with what the guest walks.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagefork.errors import PageforkError, TemplateError, VmmError
from pagefork.regions import PAGE_SIZE
from pagefork.vmm.kvm import cpustate, guest
from pagefork.vmm.kvm.devices import PortIoBus
from pagefork.vmm.kvm.memory import GuestMemory, MemoryRegionSpec
from pagefork.vmm.kvm.trace import TraceSpec, generate_variants, split_slices, zero_page_layout
from pagefork.vmm.kvm.vcpu import EXIT_DEVICE
from pagefork.vmm.kvm.vm import TSS_ADDR, TSS_SIZE, VirtualMachine

if TYPE_CHECKING:
    from pagefork.layers.capture import ChainPages

MEM_FILE = "mem-file"
VMSTATE_FILE = "vmstate.json"
TEMPLATE_FILE = "template.json"
VMSTATE_FORMAT = "pagefork-kvm-vmstate"
TEMPLATE_FORMAT = "pagefork-kvm-template"
FORMAT_VERSION = 1

#: Guest-physical base of the second RAM region, above a hole (like x86 RAM above 3 GiB).
HIGH_REGION_GPA = 0xC000_0000
#: The guest runs without paging in 32-bit mode: all RAM must sit below 4 GiB.
MAX_GPA = 1 << 32
MIN_MEM_SIZE = 4 << 20
#: The high region ends where KVM's TSS begins.
MAX_HIGH_REGION = TSS_ADDR - HIGH_REGION_GPA
#: The most guest RAM a split template can have: 3 GiB below the hole, the high region above.
MAX_MEM_SIZE = HIGH_REGION_GPA + MAX_HIGH_REGION

Progress = Callable[[str], None]
#: Guest RAM is copied in slices of this size (each holds the GIL for a few ms only).
_COPY_CHUNK = 4 << 20


@dataclass(frozen=True)
class TemplateSpec:
    """How to build a template. ``split`` puts the upper half of RAM in a second region at
    :data:`HIGH_REGION_GPA`, so the page server sees a multi-region handshake."""

    mem_size: int = 256 << 20
    vcpus: int = 1
    variants: int = 32
    zero_share: float = 0.35
    split: bool = True
    trace: TraceSpec = field(default_factory=TraceSpec)

    def layout(self) -> list[MemoryRegionSpec]:
        """The guest RAM regions, mem-file offsets back to back."""
        if self.mem_size % PAGE_SIZE or self.mem_size < MIN_MEM_SIZE:
            raise TemplateError(
                f"guest memory must be a multiple of 4 KiB and at least {MIN_MEM_SIZE >> 20} MiB"
            )
        if not self.split:
            if self.mem_size > HIGH_REGION_GPA:
                raise TemplateError("guest memory above 3 GiB needs split=True")
            return [MemoryRegionSpec(0, self.mem_size, 0)]
        # Half and half, but the high region ends below KVM's TSS (just under 4 GiB): from
        # 2 GiB on, the low region takes the rest, up to the hole at 3 GiB.
        high = min(self.mem_size - (self.mem_size // 2 & ~(PAGE_SIZE - 1)), MAX_HIGH_REGION)
        low = self.mem_size - high
        if low > HIGH_REGION_GPA:
            raise TemplateError(
                f"guest memory of {self.mem_size >> 20} MiB does not fit below 4 GiB "
                f"(at most {MAX_MEM_SIZE >> 20} MiB)"
            )
        return [MemoryRegionSpec(0, low, 0), MemoryRegionSpec(HIGH_REGION_GPA, high, low)]


@dataclass(frozen=True)
class TraceSlice:
    """One vCPU's part of a variant's trace: ``reads`` then ``writes`` u32 entries at ``gpa``."""

    gpa: int
    reads: int
    writes: int


@dataclass(frozen=True)
class VcpuState:
    """A vCPU's registers at the snapshot point, as the kernel names them."""

    regs: dict[str, int]
    sregs: dict[str, Any]


class Template:
    """A loaded, checked template. ``read_word`` reads the mem-file by guest-physical address.

    ``memory`` overrides where guest RAM comes from: a base mem-file, then the layers of a
    child template over it, bottom first (a snapshot's directory holds no mem-file of its own).
    """

    def __init__(self, path: str | os.PathLike[str], memory: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.memory_chain = tuple(memory) if memory else (str(self.path / MEM_FILE),)
        self._reader: ChainPages | None = None
        vmstate = _load_json(self.path / VMSTATE_FILE, VMSTATE_FORMAT)
        meta = _load_json(self.path / TEMPLATE_FILE, TEMPLATE_FORMAT)
        where = str(self.path / VMSTATE_FILE)
        try:
            self.layout = [
                MemoryRegionSpec(int(r["guest_phys_addr"]), int(r["size"]), int(r["file_offset"]))
                for r in vmstate["memory"]["regions"]
            ]
            self.vcpu_states = [
                VcpuState(dict(v["regs"]), dict(v["sregs"])) for v in vmstate["vcpus"]
            ]
            for state in self.vcpu_states:  # parse now, so a bad file fails here, not in a fork
                cpustate.regs_from_dict(state.regs)
                cpustate.sregs_from_dict(state.sregs)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TemplateError(
                f"{where}: malformed vmstate ({type(exc).__name__}: {exc})"
            ) from None
        if not self.layout or not self.vcpu_states:
            raise TemplateError(f"{where}: no memory regions or no vCPUs")
        self._check_layout(where)
        where = str(self.path / TEMPLATE_FILE)
        try:
            self.meta = meta
            self.mem_size = int(meta["mem_size"])
            self.variant_slices = [
                [TraceSlice(int(s["gpa"]), int(s["reads"]), int(s["writes"])) for s in v["slices"]]
                for v in meta["variants"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateError(
                f"{where}: malformed template ({type(exc).__name__}: {exc})"
            ) from None
        if not self.variant_slices:
            raise TemplateError(f"{where}: no trace variants")
        for i, slices in enumerate(self.variant_slices):
            if len(slices) != len(self.vcpu_states):
                raise TemplateError(
                    f"{where}: variant {i} has {len(slices)} slices for "
                    f"{len(self.vcpu_states)} vCPUs"
                )
            for s in slices:
                # The guest loads both counts into 32-bit registers: anything else is garbage.
                if not (0 <= s.reads < 1 << 32 and 0 <= s.writes < 1 << 32):
                    raise TemplateError(
                        f"{where}: variant {i} has read/write counts {s.reads}/{s.writes}; "
                        "each must be in 0..2^32-1"
                    )
                if not self._in_ram(s.gpa, 4 * (s.reads + s.writes)):
                    raise TemplateError(f"{where}: variant {i} trace at {s.gpa:#x} is outside RAM")
        self.mem_file = Path(self.memory_chain[0])
        try:
            size = self.mem_file.stat().st_size
        except OSError as exc:
            raise TemplateError(f"{self.mem_file}: {exc.strerror}") from None
        self._size = size
        expected = sum(r.size for r in self.layout)
        if size != expected:
            raise TemplateError(
                f"{self.mem_file}: {size} bytes, but {VMSTATE_FILE} lays out {expected} bytes of "
                "guest memory (truncated or from another template?)"
            )
        self._map: mmap.mmap | None = None

    def _check_layout(self, where: str) -> None:
        offset = 0
        previous_end = 0
        for i, r in enumerate(self.layout):
            if r.size <= 0 or r.size % PAGE_SIZE or r.guest_phys_addr % PAGE_SIZE:
                raise TemplateError(f"{where}: memory region {i} is empty or not page aligned")
            if r.file_offset != offset:
                raise TemplateError(
                    f"{where}: memory region {i} is not back to back in the mem-file"
                )
            if r.guest_phys_addr < previous_end or r.end > MAX_GPA:
                raise TemplateError(f"{where}: memory region {i} overlaps or lies above 4 GiB")
            if r.guest_phys_addr < TSS_ADDR + TSS_SIZE and r.end > TSS_ADDR:
                raise TemplateError(
                    f"{where}: memory region {i} overlaps KVM's TSS at {TSS_ADDR:#x}"
                )
            offset += r.size
            previous_end = r.end

    def _in_ram(self, gpa: int, length: int) -> bool:
        return any(r.guest_phys_addr <= gpa and gpa + length <= r.end for r in self.layout)

    @property
    def vcpus(self) -> int:
        """vCPUs of the snapshot (a fork restores exactly these)."""
        return len(self.vcpu_states)

    @property
    def variants(self) -> int:
        """How many distinct fork traces the template holds."""
        return len(self.variant_slices)

    def variant_of(self, fork_index: int) -> int:
        """The trace variant fork ``fork_index`` walks."""
        return fork_index % self.variants

    def file_offset(self, gpa: int) -> int:
        """Mem-file offset of guest-physical ``gpa``."""
        for r in self.layout:
            if r.guest_phys_addr <= gpa < r.end:
                return r.file_offset + gpa - r.guest_phys_addr
        raise TemplateError(f"{self.path}: guest-physical {gpa:#x} is not guest RAM")

    def _layered(self) -> ChainPages | None:
        """The reader of a layered chain, opened on first use (not in a fork's restore: it
        is only needed to check what the guest read); None for a plain mem-file."""
        if self._reader is None and len(self.memory_chain) > 1:
            from pagefork.layers.capture import ChainPages  # only children need layers

            try:
                reader = ChainPages(self.memory_chain)
            except PageforkError as exc:
                raise TemplateError(f"{self.path}: its memory: {exc}") from None
            if reader.size != self._size:
                raise TemplateError(
                    f"{self.memory_chain[-1]}: a layer of {reader.size} bytes over a "
                    f"mem-file of {self._size}"
                )
            self._reader = reader
        return self._reader

    def read_word(self, gpa: int) -> int:
        """The template's little-endian u32 at guest-physical ``gpa``."""
        if self._layered() is not None:
            return int(struct.unpack_from("<I", self.read_bytes(gpa, 4))[0])
        if self._map is None:
            with open(self.mem_file, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        return int(struct.unpack_from("<I", self._map, self.file_offset(gpa))[0])

    def read_bytes(self, gpa: int, length: int) -> bytes:
        """``length`` bytes of the mem-file from guest-physical ``gpa`` (within one region)."""
        off = self.file_offset(gpa)
        if self.file_offset(gpa + length - 1) != off + length - 1:
            raise TemplateError(f"{self.path}: {gpa:#x}+{length:#x} spans two memory regions")
        reader = self._layered()
        if reader is not None:  # through the layers, page by page
            first, last = off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE
            data = b"".join(reader.read_page(p) for p in range(first, last + 1))
            start = off - first * PAGE_SIZE
            return data[start : start + length]
        if self._map is None:
            self.read_word(gpa)
        assert self._map is not None
        return self._map[off : off + length]

    def _entries(self, s: TraceSlice) -> list[int]:
        n = s.reads + s.writes
        return list(struct.unpack(f"<{n}I", self.read_bytes(s.gpa, 4 * n)))

    def slice_pages(self, variant: int) -> list[tuple[list[int], list[int]]]:
        """Per vCPU: (pages read, pages written) of ``variant``, in trace order."""
        out = []
        for s in self.variant_slices[variant]:
            entries = self._entries(s)
            out.append((entries[: s.reads], entries[s.reads :]))
        return out

    def expected_checksums(self, variant: int) -> list[int]:
        """The checksum each vCPU of a fork walking ``variant`` must report."""
        return [
            guest.expected_checksum(reads, self.read_word) for reads, _ in self.slice_pages(variant)
        ]

    def written_pages(self, variant: int) -> set[int]:
        """Pages a fork walking ``variant`` writes (the word at ``guest.WRITE_OFFSET``)."""
        return {page for _, writes in self.slice_pages(variant) for page in writes}

    def touched_pages(self, variant: int) -> set[int]:
        """Guest-physical pages a fork walking ``variant`` touches after the pause point: the
        program, its trace slices and the data pages."""
        pages = {guest.PROGRAM_GPA}
        for s in self.variant_slices[variant]:
            first = s.gpa & ~(PAGE_SIZE - 1)
            pages.update(range(first, s.gpa + 4 * (s.reads + s.writes), PAGE_SIZE))
        for reads, writes in self.slice_pages(variant):
            pages.update(reads)
            pages.update(writes)
        return pages

    def close(self) -> None:
        """Unmap the mem-file view and close the layers; idempotent."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        if self._map is not None:
            self._map.close()
            self._map = None


def _load_json(path: Path, fmt: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TemplateError(f"{path}: missing (not a pagefork KVM template?)") from None
    except OSError as exc:
        raise TemplateError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise TemplateError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise TemplateError(f"{path}: not a {fmt} file")
    if doc.get("version") != FORMAT_VERSION:
        raise TemplateError(
            f"{path}: format version {doc.get('version')!r}, expected {FORMAT_VERSION}"
        )
    return doc


def load_template(path: str | os.PathLike[str], memory: Sequence[str] | None = None) -> Template:
    """Load and check the template in directory ``path``; :class:`TemplateError` if broken.
    ``memory``: a base mem-file and layers to read guest RAM from instead of ``path``'s."""
    return Template(path, memory)


# --- building --------------------------------------------------------------------------------


class _PauseDevice:
    """During the build: stop each vCPU at ``out PORT_PAUSE``."""

    def io_in(self, vcpu: int, port: int, size: int) -> int:
        raise VmmError(f"vCPU {vcpu}: read of port {port:#x} before the snapshot point")

    def io_out(self, vcpu: int, port: int, size: int, value: int) -> bool:
        return port == guest.PORT_PAUSE


def build_template(
    path: str | os.PathLike[str], spec: TemplateSpec | None = None, progress: Progress | None = None
) -> Template:
    """Build a template in directory ``path``: lay out RAM, boot the guest to its pause point
    in KVM, and write the mem-file (sparse over zero pages), vmstate and metadata."""
    spec = spec or TemplateSpec()
    say = progress or (lambda _msg: None)
    if spec.vcpus < 1 or spec.variants < 1:
        raise TemplateError("a template needs at least one vCPU and one trace variant")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    layout = spec.layout()
    total_pages = spec.mem_size // PAGE_SIZE
    n_hot = round(spec.trace.working_set * total_pages) * (1 + spec.trace.fork_share)
    # Worst case per variant: every page read and rewritten, plus slack per vCPU.
    per_variant = (int(2 * n_hot) + 2 * spec.vcpus + 2) * 4
    per_variant = (per_variant + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    data_start = guest.TRACE_GPA + spec.variants * per_variant
    if data_start + 64 * PAGE_SIZE > layout[0].end:
        raise TemplateError("guest memory too small for the program and its traces")

    say("laying out guest memory")
    data_pages = [
        gpa for r in layout for gpa in range(max(r.guest_phys_addr, data_start), r.end, PAGE_SIZE)
    ]
    try:
        variants = generate_variants(data_pages, total_pages, spec.trace, spec.variants)
    except ValueError as exc:
        raise TemplateError(f"cannot generate traces: {exc}") from None

    # Anonymous mappings, not bytearrays: the kernel zeroes their pages on first touch, where
    # bytearray(n) memsets all of it at once while holding the GIL (a second per GiB: the
    # daemon's other threads would stall that long).
    images = [mmap.mmap(-1, r.size) for r in layout]
    try:
        return _build_in(out, spec, images, data_pages, data_start, per_variant, variants, say)
    finally:
        for img in images:
            img.close()


def _build_in(
    out: Path,
    spec: TemplateSpec,
    images: list[mmap.mmap],
    data_pages: list[int],
    data_start: int,
    per_variant: int,
    variants: list[Any],
    say: Progress,
) -> Template:
    """The rest of :func:`build_template`: fill the guest RAM ``images``, boot, write."""
    layout = spec.layout()
    total_pages = spec.mem_size // PAGE_SIZE
    rng = random.Random(spec.trace.seed ^ 0x5EED)
    zeros = zero_page_layout(rng, len(data_pages), spec.zero_share)

    def put(gpa: int, data: bytes) -> None:
        for img, r in zip(images, layout, strict=True):
            if r.guest_phys_addr <= gpa < r.end:
                img[gpa - r.guest_phys_addr : gpa - r.guest_phys_addr + len(data)] = data
                return
        raise TemplateError(f"guest-physical {gpa:#x} is not guest RAM")

    say("filling data pages")
    block = rng.randbytes(1 << 20)
    stamp = struct.Struct("<I")
    for i, gpa in enumerate(data_pages):
        if zeros[i]:
            continue
        img, r = next((img, r) for img, r in zip(images, layout, strict=True) if gpa < r.end)
        off = gpa - r.guest_phys_addr
        src = (i * 0x1F1F000) % (len(block) - PAGE_SIZE) & ~3
        img[off : off + PAGE_SIZE] = block[src : src + PAGE_SIZE]
        # Word 0 carries the page's own address, so a page served at the wrong place shows.
        stamp.pack_into(img, off, (gpa ^ 0xA5A5A5A5) & 0xFFFFFFFF)
    put(guest.PROGRAM_GPA, guest.PROGRAM)

    meta_variants = []
    for v, trace in enumerate(variants):
        base = guest.TRACE_GPA + v * per_variant
        cursor = base
        slices = []
        reads = split_slices(len(trace.reads), spec.vcpus)
        writes = split_slices(len(trace.writes), spec.vcpus)
        for (rlo, rhi), (wlo, whi) in zip(reads, writes, strict=True):
            entries = list(trace.reads[rlo:rhi]) + list(trace.writes[wlo:whi])
            put(cursor, struct.pack(f"<{len(entries)}I", *entries))
            slices.append({"gpa": cursor, "reads": rhi - rlo, "writes": whi - wlo})
            cursor += 4 * len(entries)
        if cursor > base + per_variant:
            raise TemplateError(f"variant {v}: trace overflows its area")
        meta_variants.append({"slices": slices, "specific_pages": len(trace.specific)})

    say("booting the guest to its snapshot point")
    vcpu_states = _boot_to_pause(layout, images, spec.vcpus, out / MEM_FILE)

    meta = {
        "format": TEMPLATE_FORMAT,
        "version": FORMAT_VERSION,
        "mem_size": spec.mem_size,
        "zero_share": spec.zero_share,
        "trace": asdict(spec.trace),
        "data_start": data_start,
        "common_pages": round(spec.trace.working_set * total_pages),
        "guest": {
            "program_gpa": guest.PROGRAM_GPA,
            "entry_gpa": guest.ENTRY_GPA,
            "resume_gpa": guest.RESUME_GPA,
            "chunk_pages": guest.CHUNK_PAGES,
        },
        "variants": meta_variants,
    }
    vmstate = vmstate_doc(layout, [{"regs": v.regs, "sregs": v.sregs} for v in vcpu_states])
    (out / VMSTATE_FILE).write_text(json.dumps(vmstate, indent=1))
    (out / TEMPLATE_FILE).write_text(json.dumps(meta, indent=1))
    say("template written")
    return Template(out)


def vmstate_doc(layout: Sequence[MemoryRegionSpec], vcpus: list[dict[str, Any]]) -> dict[str, Any]:
    """The vmstate file of a microVM template (or a snapshot of a fork): its memory layout,
    the vCPUs' registers, and the guest program's device."""
    return {
        "format": VMSTATE_FORMAT,
        "version": FORMAT_VERSION,
        "memory": {
            "page_size": PAGE_SIZE,
            "regions": [
                {"guest_phys_addr": r.guest_phys_addr, "size": r.size, "file_offset": r.file_offset}
                for r in layout
            ],
        },
        "vcpus": vcpus,
        "devices": {"trace": {"ports": list(range(guest.PORT_PAUSE, guest.PORT_READY + 1))}},
    }


def _boot_to_pause(
    layout: list[MemoryRegionSpec], images: list[mmap.mmap], vcpus: int, mem_file: Path
) -> list[VcpuState]:
    """Run the boot part on every vCPU up to ``out PORT_PAUSE``, save guest RAM as the mem-file
    (what the guest wrote is part of the snapshot) and return the vCPU states."""
    bus = PortIoBus()
    bus.register(range(guest.PORT_PAUSE, guest.PORT_READY + 1), _PauseDevice())
    with GuestMemory(layout) as memory, VirtualMachine() as vm:
        for i, (img, r) in enumerate(zip(images, layout, strict=True)):
            view = memory.view(i)
            source = memoryview(img)
            # In slices: one copy of a whole GiB region would hold the GIL for seconds.
            for off in range(0, r.size, _COPY_CHUNK):
                view[off : off + _COPY_CHUNK] = source[off : off + _COPY_CHUNK]
            source.release()
            view.release()
            vm.add_memory(r.guest_phys_addr, r.size, memory.host_addrs[i])
        states = []
        for _ in range(vcpus):
            vcpu = vm.create_vcpu()
            vcpu.set_sregs(cpustate.flat_protected_mode_sregs(vcpu.get_sregs()))
            regs = vcpu.get_regs()
            regs.rip = guest.ENTRY_GPA
            regs.rflags = cpustate.RFLAGS_RESERVED
            vcpu.set_regs(regs)
            if vcpu.run(bus) != EXIT_DEVICE:
                raise VmmError(f"vCPU {vcpu.index} halted before the snapshot point")
            regs = vcpu.get_regs()
            if regs.rip != guest.RESUME_GPA:
                raise VmmError(
                    f"vCPU {vcpu.index} paused at {regs.rip:#x}, not {guest.RESUME_GPA:#x}"
                )
            states.append(
                VcpuState(cpustate.regs_to_dict(regs), cpustate.sregs_to_dict(vcpu.get_sregs()))
            )
        _dump_memory(memory, mem_file)
    return states


def _dump_memory(memory: GuestMemory, path: Path) -> None:
    """Write guest RAM to ``path`` back to back, leaving holes over all-zero MiB chunks."""
    chunk = 1 << 20
    zero = bytes(chunk)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for i, r in enumerate(memory.layout):
            view = memory.view(i)
            for off in range(0, r.size, chunk):
                part = view[off : off + chunk]
                if part == zero[: len(part)]:
                    f.seek(len(part), os.SEEK_CUR)
                else:
                    f.write(part)
            view.release()
        f.truncate(sum(r.size for r in memory.layout))
    os.replace(tmp, path)


__all__ = [
    "MAX_MEM_SIZE",
    "MEM_FILE",
    "TEMPLATE_FILE",
    "VMSTATE_FILE",
    "Template",
    "TemplateSpec",
    "TraceSlice",
    "VcpuState",
    "build_template",
    "load_template",
]
