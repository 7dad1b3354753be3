"""The guest program: a hand-assembled 32-bit x86 "boot" that walks an access trace.

It runs in flat 32-bit protected mode without paging (set up through ``KVM_SET_SREGS``, no
firmware), so guest-virtual = guest-physical. Under nested KVM (the host is itself a VM) guest
instructions may be emulated: we measured 0.5-1.4 µs each (a long ``dec/jnz`` loop), so the
per-page loop is kept to five instructions.

What the program does, and the port-I/O "device" it talks to (ports are :data:`PORT_*`):

1. boot: stamp :data:`BOOT_STAMP` into the scratch page, then ``out PORT_PAUSE``. The template
   builder snapshots the VM at this exit; every fork resumes right after it.
2. ask the VMM for its slice of the trace: ``in PORT_TRACE_ADDR`` (guest-physical address of the
   first entry), ``in PORT_TRACE_WRITES`` and ``in PORT_TRACE_READS`` (entry counts). Each vCPU
   gets its own slice, so the same snapshot serves any fork and any share of the trace.
3. read phase: for each read entry (a page address) ``sum = rol(sum + [page], 1) +
   [page+0xFFC]``;
   after every :data:`CHUNK_PAGES` pages ``out PORT_PROGRESS`` with the running sum.
4. write phase: for each write entry store the sum at ``page + 0xFFC`` (first touch of a page
   that was not read is a write fault, as a boot zeroing fresh memory produces). The read phase
   reads that word too, so a later walk over this memory sums what this one wrote: a snapshot
   of the fork carries the change to its branches, and their checksums show it.
5. ``out PORT_READY`` with the sum, then ``hlt``. The VMM compares the sum with
   :func:`expected_checksum` over the template: every page served must have held the right bytes.
6. run again after the halt (a VMM that resumes it, or a fork restored from a snapshot taken
   there), it starts over at 2: a new walk over memory as the last one left it.

Register use after the pause point: esi = trace cursor, edi = reads left, ebp = writes, edx =
checksum, ecx = loop counter, eax = scratch (lodsd target, port data).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Guest-physical address the program is loaded at (page 0 stays unused, like a null page).
PROGRAM_GPA = 0x1000
#: A page the boot part writes to; it is in the mem-file but no fork touches it.
SCRATCH_GPA = 0x2000
#: The per-vCPU trace slices start here.
TRACE_GPA = 0x3000
#: Value the boot part stores at SCRATCH_GPA: proof the mem-file is a snapshot of a run.
BOOT_STAMP = 0x600DB007

PORT_PAUSE = 0xF0
PORT_TRACE_ADDR = 0xF1
PORT_TRACE_READS = 0xF2
PORT_TRACE_WRITES = 0xF3
PORT_PROGRESS = 0xF4
PORT_READY = 0xF5

#: Pages walked between two progress exits: an exit costs a userspace round trip.
CHUNK_PAGES = 512
#: Byte offset of the word written per page, and of the two words read (the second is the
#: written one: a walk over memory a previous walk wrote sums what it wrote).
WRITE_OFFSET = 0xFFC
READ_OFFSETS = (0, WRITE_OFFSET)

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Instruction:
    """One assembled instruction: its bytes and what it does (for the listing)."""

    label: str
    code: bytes
    comment: str


class _Assembler:
    """Just enough of an assembler: bytes in order, labels, and rel8 branch fixups."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.items: list[tuple[str, bytes | tuple[bytes, str], str]] = []

    def label(self, name: str) -> None:
        self.items.append((name, b"", ""))

    def emit(self, code: bytes, comment: str) -> None:
        self.items.append(("", code, comment))

    def branch(self, opcode: bytes, target: str, comment: str) -> None:
        """A rel8 branch (jcc/loop/jecxz/jmp short) to ``target``."""
        self.items.append(("", (opcode, target), comment))

    def assemble(self) -> tuple[bytes, dict[str, int], list[Instruction]]:
        labels: dict[str, int] = {}
        pos = self.origin
        for name, code, _ in self.items:
            if name:
                labels[name] = pos
            pos += len(code[0]) + 1 if isinstance(code, tuple) else len(code)
        out = bytearray()
        listing: list[Instruction] = []
        pos = self.origin
        pending = ""
        for name, code, comment in self.items:
            if name:
                pending = name
                continue
            if isinstance(code, tuple):
                opcode, target = code
                rel = labels[target] - (pos + len(opcode) + 1)
                if not -128 <= rel <= 127:
                    raise ValueError(f"branch to {target} out of rel8 range")
                raw = opcode + struct.pack("<b", rel)
            else:
                raw = code
            out += raw
            listing.append(Instruction(pending, raw, comment))
            pending = ""
            pos += len(raw)
        return bytes(out), labels, listing


def _build() -> tuple[bytes, dict[str, int], list[Instruction]]:
    a = _Assembler(PROGRAM_GPA)
    imm32 = struct.Struct("<I").pack
    # --- boot: runs once, while the template is built -------------------------------------
    a.label("start")
    a.emit(b"\xc7\x05" + imm32(SCRATCH_GPA) + imm32(BOOT_STAMP), "mov dword [SCRATCH], STAMP")
    a.emit(bytes([0xE6, PORT_PAUSE]), "out PORT_PAUSE, al   ; snapshot point")
    # --- a fork resumes here ---------------------------------------------------------------
    a.label("resume")
    a.emit(bytes([0xE5, PORT_TRACE_ADDR]), "in eax, PORT_TRACE_ADDR")
    a.emit(b"\x89\xc6", "mov esi, eax         ; trace cursor")
    a.emit(bytes([0xE5, PORT_TRACE_WRITES]), "in eax, PORT_TRACE_WRITES")
    a.emit(b"\x89\xc5", "mov ebp, eax         ; write entries (after the reads)")
    a.emit(bytes([0xE5, PORT_TRACE_READS]), "in eax, PORT_TRACE_READS")
    a.emit(b"\x89\xc7", "mov edi, eax         ; read entries left")
    a.emit(b"\x31\xd2", "xor edx, edx         ; checksum = 0")
    a.emit(b"\xfc", "cld                  ; lodsd walks forward")
    a.label("read_chunk")
    a.emit(b"\xb9" + imm32(CHUNK_PAGES), "mov ecx, CHUNK_PAGES")
    a.emit(b"\x39\xcf", "cmp edi, ecx")
    a.branch(b"\x73", "read_full", "jae read_full        ; a whole chunk is left")
    a.emit(b"\x89\xf9", "mov ecx, edi         ; else the remainder")
    a.label("read_full")
    a.emit(b"\x29\xcf", "sub edi, ecx")
    a.branch(
        b"\xe3", "read_report", "jecxz read_report    ; empty slice: loop would run 2^32 times"
    )
    # The per-page loop: five instructions.
    a.label("read_page")
    a.emit(b"\xad", "lodsd                ; eax = [esi] (page address), esi += 4")
    a.emit(b"\x03\x10", "add edx, [eax]       ; first word of the page")
    a.emit(b"\xd1\xc2", "rol edx, 1           ; order matters: swapped pages change the sum")
    a.emit(b"\x03\x90" + imm32(READ_OFFSETS[1]), "add edx, [eax+0xFFC] ; second word")
    a.branch(b"\xe2", "read_page", "loop read_page       ; dec ecx, jnz")
    a.label("read_report")
    a.emit(b"\x89\xd0", "mov eax, edx")
    a.emit(bytes([0xE7, PORT_PROGRESS]), "out PORT_PROGRESS, eax")
    a.emit(b"\x85\xff", "test edi, edi")
    a.branch(b"\x75", "read_chunk", "jnz read_chunk")
    # --- write phase -----------------------------------------------------------------------
    a.emit(b"\x89\xe9", "mov ecx, ebp         ; write entries")
    a.branch(b"\xe3", "ready", "jecxz ready")
    a.label("write_page")
    a.emit(b"\xad", "lodsd                ; eax = page address")
    a.emit(b"\x89\x90" + imm32(WRITE_OFFSET), "mov [eax+0xFFC], edx ; the write")
    a.branch(b"\xe2", "write_page", "loop write_page")
    a.label("ready")
    a.emit(b"\x89\xd0", "mov eax, edx")
    a.emit(bytes([0xE7, PORT_READY]), "out PORT_READY, eax  ; checksum to the VMM")
    a.label("halt")
    a.emit(b"\xf4", "hlt                  ; a snapshot's vCPU state is taken here")
    a.branch(b"\xeb", "resume", "jmp resume           ; run again: a new walk")
    return a.assemble()


PROGRAM, LABELS, LISTING = _build()
#: Where the template's vCPUs start (the boot part).
ENTRY_GPA = LABELS["start"]
#: Where a fork resumes: the instruction after ``out PORT_PAUSE``.
RESUME_GPA = LABELS["resume"]


def listing() -> str:
    """The program as an annotated listing (address, bytes, instruction)."""
    lines = []
    addr = PROGRAM_GPA
    for ins in LISTING:
        if ins.label:
            lines.append(f"{ins.label}:")
        lines.append(f"  {addr:08x}  {ins.code.hex(' '):<32} {ins.comment}")
        addr += len(ins.code)
    return "\n".join(lines)


def page_sum(checksum: int, word0: int, word1: int) -> int:
    """One step of the guest's read loop, in Python."""
    s = (checksum + word0) & MASK32
    s = ((s << 1) | (s >> 31)) & MASK32
    return (s + word1) & MASK32


def expected_checksum(read_pages: Sequence[int], read_word: Callable[[int], int]) -> int:
    """The checksum the guest must report after reading ``read_pages`` (guest-physical page
    addresses, in trace order); ``read_word(gpa)`` returns the template's 32-bit word there."""
    s = 0
    lo, hi = READ_OFFSETS
    for page in read_pages:
        s = page_sum(s, read_word(page + lo), read_word(page + hi))
    return s
