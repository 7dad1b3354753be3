"""Guest memory of the microVM: private anonymous mappings, the userfaultfd, the handshake.

This is the VMM side of Firecracker's UFFD protocol, done the way Firecracker does it: map
every region ``MAP_PRIVATE|MAP_ANONYMOUS``, create the uffd ourselves (``UFFDIO_API`` with
``UFFD_FEATURE_EVENT_REMOVE``), register each region in MISSING mode *before* connecting, then
send the bare JSON mappings and the uffd in one ``sendmsg`` and keep the socket open for the
VM's life (the handler reads a closed socket as "VM gone").

Nothing in this process may read or write guest memory once it is registered, except KVM on
the guest's behalf: a fault here would block on the page server like a vCPU does, which is
fine in this process but pointless, and fatal if done from the server's own process.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
from dataclasses import dataclass
from types import TracebackType

from pagefork import libc
from pagefork.errors import VmmError
from pagefork.handshake import encode_mappings
from pagefork.regions import PAGE_SIZE, Region
from pagefork.uffd import (
    UFFD_FEATURE_EVENT_REMOVE,
    open_userfaultfd,
    uffdio_api,
    uffdio_register,
)


@dataclass(frozen=True)
class MemoryRegionSpec:
    """One guest RAM region: where the guest sees it and where its bytes sit in the mem-file."""

    guest_phys_addr: int
    size: int
    file_offset: int

    @property
    def end(self) -> int:
        """One past the region's last guest-physical address."""
        return self.guest_phys_addr + self.size


class GuestMemory:
    """Guest RAM: one host mapping per region, optionally served through a userfaultfd."""

    def __init__(self, layout: list[MemoryRegionSpec]) -> None:
        self.layout = list(layout)
        self.host_addrs: list[int] = []
        self.uffd = -1
        self._socket: socket.socket | None = None
        try:
            for spec in self.layout:
                if spec.size % PAGE_SIZE or spec.guest_phys_addr % PAGE_SIZE:
                    raise VmmError(f"memory region {spec} is not page aligned")
                try:
                    addr = libc.mmap(
                        spec.size,
                        mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | libc.MAP_NORESERVE,
                    )
                except OSError as exc:
                    raise VmmError(f"guest memory: {exc.strerror}") from None
                self.host_addrs.append(addr)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        """Total guest RAM in bytes."""
        return sum(spec.size for spec in self.layout)

    def regions(self) -> list[Region]:
        """The handshake's view: host address, size and mem-file offset of each region."""
        return [
            Region(base=addr, size=spec.size, offset=spec.file_offset, page_size=PAGE_SIZE)
            for addr, spec in zip(self.host_addrs, self.layout, strict=True)
        ]

    def host_address(self, gpa: int, length: int = 1) -> int:
        """Our address of guest-physical ``gpa`` (the whole range must sit in one region)."""
        for addr, spec in zip(self.host_addrs, self.layout, strict=True):
            if spec.guest_phys_addr <= gpa and gpa + length <= spec.end:
                return addr + gpa - spec.guest_phys_addr
        raise VmmError(f"guest-physical range {gpa:#x}+{length:#x} is not guest RAM")

    def register_userfaultfd(self) -> int:
        """Create the uffd and register every region in MISSING mode, as Firecracker does
        before it connects to the handler. Returns the uffd."""
        self.uffd = open_userfaultfd()
        # We created the uffd, so the API handshake is ours; the handler must not repeat it.
        uffdio_api(self.uffd, UFFD_FEATURE_EVENT_REMOVE)
        for addr, spec in zip(self.host_addrs, self.layout, strict=True):
            uffdio_register(self.uffd, addr, spec.size)
        return self.uffd

    def connect_page_server(self, socket_path: str, timeout: float = 10.0) -> None:
        """Send the mappings JSON and the uffd to the page server in one ``sendmsg``.

        The socket stays open until :meth:`close`: the page server takes its closing as the
        end of this VM.
        """
        if self.uffd < 0:
            raise VmmError("connect_page_server before register_userfaultfd")
        payload = encode_mappings(self.regions())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            # One sendmsg: payload and SCM_RIGHTS together, as the handler reads them together.
            sent = socket.send_fds(sock, [payload], [self.uffd])
        except OSError as exc:
            sock.close()
            raise VmmError(f"page server socket {socket_path}: {exc.strerror or exc}") from None
        if sent != len(payload):
            sock.close()
            raise VmmError(f"page server socket {socket_path}: short handshake write")
        sock.settimeout(None)  # blocking from here on: wait_server_gone() blocks in recv
        self._socket = sock

    def wait_server_gone(self) -> None:
        """Block until the page server closes its end of the socket (or :meth:`close` shuts
        ours down). The server sends nothing after the handshake; anything it does is skipped."""
        sock = self._socket
        if sock is None:
            return
        while True:
            try:
                if not sock.recv(4096):
                    return
            except OSError:
                return

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest RAM (template building only: no uffd registered)."""
        if self.uffd >= 0:
            raise VmmError("guest memory is served by a page server; the VMM must not write it")
        buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
        ctypes.memmove(self.host_address(gpa, len(data)), buf, len(data))

    def view(self, index: int) -> memoryview:
        """Region ``index`` as a writable memoryview (template building only)."""
        if self.uffd >= 0:
            raise VmmError("guest memory is served by a page server; the VMM must not read it")
        spec = self.layout[index]
        array = (ctypes.c_char * spec.size).from_address(self.host_addrs[index])
        return memoryview(array).cast("B")

    def close(self) -> None:
        """Drop the page-server connection, the uffd and the mappings; idempotent."""
        if self._socket is not None:
            try:  # wakes a thread blocked in wait_server_gone(); close() alone would not
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._socket.close()
            self._socket = None
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        for addr, spec in zip(self.host_addrs, self.layout, strict=False):
            libc.munmap(addr, spec.size)
        self.host_addrs.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
