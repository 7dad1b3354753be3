"""vCPU state as plain data: the flat 32-bit protected-mode setup and its JSON form.

The vmstate file stores each vCPU's registers under the kernel's field names, so a later step
(64-bit long mode for a Linux guest, MSRs, FPU, LAPIC) adds keys here without changing the
ones that exist.
"""

from __future__ import annotations

import ctypes
from typing import Any

from pagefork.vmm.kvm import ioctls

CR0_PE = 1 << 0  # protection enable: 32-bit protected mode
CR0_ET = 1 << 4  # extension type; always 1 on anything newer than a 386
#: Bit 1 of RFLAGS is reserved and reads as 1; KVM rejects a state without it.
RFLAGS_RESERVED = 1 << 1

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEGMENT_FIELDS = tuple(f[0] for f in ioctls.kvm_segment._fields_ if f[0] != "padding")
#: Bit width of each segment field: a value that does not fit is an error, not truncated.
_SEGMENT_BITS = {f[0]: 8 * ctypes.sizeof(f[1]) for f in ioctls.kvm_segment._fields_}
_DTABLE_BITS = {f[0]: 8 * ctypes.sizeof(f[1]) for f in ioctls.kvm_dtable._fields_}
_BITMAP_WORDS = len(ioctls.kvm_sregs().interrupt_bitmap)
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_REGS = tuple(f[0] for f in ioctls.kvm_regs._fields_)


def _segment(selector: int, type_: int, *, code_or_data: bool = True) -> dict[str, int]:
    # Flat: base 0, limit 4 GiB (limit 0xFFFFF in 4 KiB granules), 32-bit default size.
    return {
        "base": 0,
        "limit": 0xFFFFFFFF,
        "selector": selector,
        "type": type_,
        "present": 1,
        "dpl": 0,
        "db": 1 if code_or_data else 0,
        "s": 1 if code_or_data else 0,
        "l": 0,
        "g": 1 if code_or_data else 0,
        "avl": 0,
        "unusable": 0,
    }


def flat_protected_mode_sregs(base: ioctls.kvm_sregs) -> ioctls.kvm_sregs:
    """``base`` (as KVM_GET_SREGS returned it after reset) switched to flat 32-bit protected
    mode without paging: no firmware, no GDT needed because segments are never reloaded."""
    sregs = ioctls.kvm_sregs()
    ctypes_copy(base, sregs)
    code = _segment(0x08, 0xB)  # execute/read, accessed
    data = _segment(0x10, 0x3)  # read/write, accessed
    for name in _SEGMENTS[:6]:
        _fill_segment(getattr(sregs, name), code if name == "cs" else data)
    # VMX/SVM insist on a usable TR (a busy 32-bit TSS); the guest never switches tasks.
    tr = _segment(0x18, 0xB, code_or_data=False)
    tr["limit"] = 0x67
    _fill_segment(sregs.tr, tr)
    ldt = _segment(0, 0x2, code_or_data=False)
    ldt["limit"] = 0xFFFF
    _fill_segment(sregs.ldt, ldt)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    return sregs


def ctypes_copy(src: ioctls.kvm_sregs, dst: ioctls.kvm_sregs) -> None:
    """Copy one ``kvm_sregs`` into another."""
    ctypes.memmove(ctypes.addressof(dst), ctypes.addressof(src), ctypes.sizeof(dst))


def _fill_segment(seg: ioctls.kvm_segment, values: dict[str, int]) -> None:
    for key in _SEGMENT_FIELDS:
        setattr(seg, key, values[key])


def regs_to_dict(regs: ioctls.kvm_regs) -> dict[str, int]:
    """``kvm_regs`` as a JSON-ready dict keyed by the kernel's field names."""
    return {name: int(getattr(regs, name)) for name in _REGS}


def regs_from_dict(doc: dict[str, Any]) -> ioctls.kvm_regs:
    """The inverse of :func:`regs_to_dict`; raises KeyError/TypeError on a bad document."""
    regs = ioctls.kvm_regs()
    for name in _REGS:
        setattr(regs, name, _u64(doc[name], name))
    return regs


def sregs_to_dict(sregs: ioctls.kvm_sregs) -> dict[str, Any]:
    """``kvm_sregs`` as a JSON-ready dict (segments, descriptor tables, control registers)."""
    out: dict[str, Any] = {}
    for name in _SEGMENTS:
        seg = getattr(sregs, name)
        out[name] = {key: int(getattr(seg, key)) for key in _SEGMENT_FIELDS}
    for name in ("gdt", "idt"):
        table = getattr(sregs, name)
        out[name] = {"base": int(table.base), "limit": int(table.limit)}
    for name in _CONTROL:
        out[name] = int(getattr(sregs, name))
    out["interrupt_bitmap"] = [int(x) for x in sregs.interrupt_bitmap]
    return out


def sregs_from_dict(doc: dict[str, Any]) -> ioctls.kvm_sregs:
    """The inverse of :func:`sregs_to_dict`; raises KeyError/TypeError on a bad document."""
    sregs = ioctls.kvm_sregs()
    for name in _SEGMENTS:
        seg = doc[name]
        if not isinstance(seg, dict):
            raise TypeError(f"{name} must be an object")
        _fill_segment(
            getattr(sregs, name),
            {k: _u64(seg[k], f"{name}.{k}", _SEGMENT_BITS[k]) for k in _SEGMENT_FIELDS},
        )
    for name in ("gdt", "idt"):
        table = getattr(sregs, name)
        if not isinstance(doc[name], dict):
            raise TypeError(f"{name} must be an object")
        table.base = _u64(doc[name]["base"], f"{name}.base", _DTABLE_BITS["base"])
        table.limit = _u64(doc[name]["limit"], f"{name}.limit", _DTABLE_BITS["limit"])
    for name in _CONTROL:
        setattr(sregs, name, _u64(doc[name], name))
    bitmap = doc.get("interrupt_bitmap", [0] * _BITMAP_WORDS)
    if not isinstance(bitmap, list) or len(bitmap) != _BITMAP_WORDS:
        raise ValueError(f"interrupt_bitmap must be a list of {_BITMAP_WORDS} integers")
    for i in range(_BITMAP_WORDS):
        sregs.interrupt_bitmap[i] = _u64(bitmap[i], f"interrupt_bitmap[{i}]")
    return sregs


def _u64(value: Any, name: str, bits: int = 64) -> int:
    """``value`` if it is an unsigned integer of ``bits`` bits, else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an unsigned {bits}-bit integer, got {value!r}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} must be an unsigned {bits}-bit integer, got {value!r}")
    return value
