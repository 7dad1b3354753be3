"""Device exits: the port-I/O bus a vCPU's ``KVM_EXIT_IO`` is dispatched to.

A device claims ports and answers ``in``/``out``. The trace device of the guest program lives in
:mod:`pagefork.vmm.kvm.microvm`; a serial console for a Linux guest would register on 0x3F8 the
same way.
"""

from __future__ import annotations

from typing import Protocol


class PortDevice(Protocol):
    """A device on the port-I/O bus."""

    def io_in(self, vcpu: int, port: int, size: int) -> int:
        """The value a guest ``in`` of ``size`` bytes from ``port`` reads."""
        ...

    def io_out(self, vcpu: int, port: int, size: int, value: int) -> bool:
        """Handle a guest ``out``; return True to stop this vCPU's run loop."""
        ...


class PortIoBus:
    """Maps ports to devices; unclaimed ports read as all ones and ignore writes (as on a PC)."""

    def __init__(self) -> None:
        self._devices: dict[int, PortDevice] = {}

    def register(self, ports: range | list[int], device: PortDevice) -> None:
        """Give ``ports`` to ``device``; a port claimed twice is a programming error."""
        for port in ports:
            if port in self._devices:
                raise ValueError(f"port {port:#x} already claimed")
            self._devices[port] = device

    def io_in(self, vcpu: int, port: int, size: int) -> int:
        """Dispatch an ``in``."""
        device = self._devices.get(port)
        if device is None:
            return (1 << (8 * size)) - 1
        return device.io_in(vcpu, port, size)

    def io_out(self, vcpu: int, port: int, size: int, value: int) -> bool:
        """Dispatch an ``out``; True when the device stops the vCPU."""
        device = self._devices.get(port)
        return False if device is None else device.io_out(vcpu, port, size, value)
