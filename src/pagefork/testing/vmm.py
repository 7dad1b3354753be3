"""A test VMM that does what Firecracker does with a uffd backend, in its own process.

Run as ``python -m pagefork.testing.vmm --socket S --mem-file F --region SIZE[@GAP] ...``. It
creates a uffd (``O_CLOEXEC|O_NONBLOCK``), calls ``UFFDIO_API`` with ``EVENT_REMOVE``, maps
each region ``MAP_PRIVATE|MAP_ANONYMOUS`` (with a hole between regions), registers them in
MISSING mode, connects to the page server and sends the bare JSON array of mappings plus the
uffd in one ``sendmsg``, keeping the socket open (``--close-after-handshake`` closes it right
after sending, as Firecracker 1.7-1.11 do). It then obeys JSON-line commands on stdin
(``touch``, ``remove``, ``check_zero``, ``exit``, ``crash``) and answers on stdout, checking every
touched page against the mem-file byte for byte.

:class:`VmmProcess` starts and drives one from a test or benchmark.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from pagefork import libc, uffd
from pagefork.handshake import encode_mappings
from pagefork.regions import PAGE_SIZE, Region


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``8M``, ``1G`` -> bytes."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if mult > 1 else text) * mult


class GuestMemory:
    """The regions of the test VMM, registered with its own uffd."""

    def __init__(self, sizes: Sequence[int], gap: int, page_size: int, hugetlb: bool) -> None:
        self.page_size = page_size
        self.uffd = uffd.open_userfaultfd()
        uffd.uffdio_api(self.uffd, uffd.UFFD_FEATURE_EVENT_REMOVE)
        span = sum(sizes) + gap * (len(sizes) - 1)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (libc.MAP_HUGETLB if hugetlb else 0)
        base = libc.mmap(span + page_size, mmap.PROT_READ | mmap.PROT_WRITE, flags)
        # Align the first region to the page size, then punch the holes between regions.
        aligned = (base + page_size - 1) & ~(page_size - 1)
        self.regions: list[Region] = []
        addr, offset = aligned, 0
        for i, size in enumerate(sizes):
            self.regions.append(Region(addr, size, offset, page_size))
            addr += size
            offset += size
            if i < len(sizes) - 1 and gap:
                libc.munmap(addr, gap)
                addr += gap
        for r in self.regions:
            uffd.uffdio_register(self.uffd, r.base, r.size)

    def address(self, region: int, offset: int) -> int:
        """Host address of ``offset`` inside ``region``."""
        return self.regions[region].base + offset


def _wchan(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


class TestVmm:
    """The process side: connects, hands over the uffd, then obeys commands."""

    def __init__(self, args: argparse.Namespace) -> None:
        sizes = [parse_size(s) for s in args.region]
        self.mem = GuestMemory(sizes, parse_size(args.gap), args.page_size, args.hugetlb)
        fd = os.open(args.mem_file, os.O_RDONLY)
        try:
            self.template = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.removed: list[tuple[int, int]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(args.socket)
        advertised = [
            Region(r.base, r.size - (args.shrink if i == 0 else 0), r.offset, r.page_size)
            for i, r in enumerate(self.mem.regions)
        ]
        payload = encode_mappings(advertised, version=args.fc_version)
        blocked = self._block_before_handshake(args.pending_faults, args.pending_remove)
        socket.send_fds(self.sock, [payload], [self.mem.uffd])
        if args.close_after_handshake:
            self.sock.close()  # Firecracker < 1.12 drops its end once the handshake is sent
        for t in blocked:
            t.join()

    def _block_before_handshake(self, faults: int, remove: str | None) -> list[threading.Thread]:
        """Leave ``faults`` faults (pages 0..faults-1 of region 0) and a REMOVE event pending
        in the uffd before the server sees it, so its first read finds them all queued.

        More pending faults than the server reads at once leave the REMOVE unread while it
        copies: the kernel answers those copies with EAGAIN, deterministically.
        """
        threads: list[threading.Thread] = []
        sink = ctypes.create_string_buffer(1)
        for i in range(faults):
            addr = self.mem.address(0, i * self.mem.page_size)
            threads.append(threading.Thread(target=ctypes.memmove, args=(sink, addr, 1)))
        if remove:
            region, offset, length = (parse_size(x) for x in remove.split(":"))
            addr = self.mem.address(region, offset)
            self.removed.append((addr, addr + length))
            threads.append(
                threading.Thread(target=libc.madvise, args=(addr, length, libc.MADV_DONTNEED))
            )
        deadline = time.monotonic() + 30
        for t in threads:
            t.start()
            # Poll until it sleeps in the kernel's userfaultfd code, so its event is queued
            # before the next one is made.
            while t.native_id is None or "userfault" not in _wchan(t.native_id):
                if not t.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("pre-handshake access did not block in userfaultfd")
                time.sleep(0.001)
        return threads

    def _expected(self, region: int, offset: int, length: int) -> bytes:
        r = self.mem.regions[region]
        addr = r.base + offset
        if any(lo <= addr < hi for lo, hi in self.removed):
            return bytes(length)
        return self.template[r.offset + offset : r.offset + offset + length]

    def touch(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Read (and check) pages; several threads fault concurrently when asked."""
        ps = self.mem.page_size
        pages = [tuple(p) for p in cmd.get("pages", [])]
        if cmd.get("all"):
            pages = [(i, o) for i, r in enumerate(self.mem.regions) for o in range(0, r.size, ps)]
        if cmd.get("order") == "random":
            random.Random(cmd.get("seed", 0)).shuffle(pages)
        verify = cmd.get("verify", True)
        nthreads = max(1, int(cmd.get("threads", 1)))
        length = ps if verify else 1
        mismatches: list[list[int]] = []
        lock = threading.Lock()

        timed = bool(cmd.get("max_latency"))
        slowest = [0.0]

        def work(chunk: list[tuple[int, int]]) -> None:
            buf = ctypes.create_string_buffer(length)
            memmove = ctypes.memmove  # releases the GIL: threads fault concurrently
            address = self.mem.address
            clock = time.perf_counter
            for region, off in chunk:
                t = clock() if timed else 0.0
                memmove(buf, address(region, off), length)
                if timed:
                    slowest[0] = max(slowest[0], clock() - t)  # the longest single page
                if verify and buf.raw != self._expected(region, off, length):
                    with lock:
                        mismatches.append([region, off])

        t0 = time.perf_counter()
        if nthreads == 1:
            work(pages)
        else:
            threads = [
                threading.Thread(target=work, args=(pages[i::nthreads],)) for i in range(nthreads)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        seconds = time.perf_counter() - t0
        return {
            "touched": len(pages),
            "mismatches": mismatches[:20],
            "bad": len(mismatches),
            "seconds": seconds,
            **({"max_latency_ms": slowest[0] * 1000} if timed else {}),
        }

    def remove(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Balloon inflation: ``madvise(MADV_DONTNEED)`` a range (the server sees REMOVE)."""
        addr = self.mem.address(cmd["region"], cmd["offset"])
        try:
            libc.madvise(addr, cmd["length"], libc.MADV_DONTNEED)
        except OSError as exc:
            return {"error": exc.strerror}
        self.removed.append((addr, addr + cmd["length"]))
        return {}

    def check_zero(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Read a range (faulting it in) and say whether it is all zero."""
        data = ctypes.string_at(self.mem.address(cmd["region"], cmd["offset"]), cmd["length"])
        return {"zero": data == bytes(cmd["length"])}

    def run(self) -> None:
        """Answer commands until ``exit`` or end of input."""
        print(
            json.dumps(
                {
                    "ready": True,
                    "pid": os.getpid(),
                    "regions": [[r.base, r.size] for r in self.mem.regions],
                }
            ),
            flush=True,
        )
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["cmd"]
            if op == "exit":
                break
            if op == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            handler = {"touch": self.touch, "remove": self.remove, "check_zero": self.check_zero}[
                op
            ]
            print(json.dumps({"ok": True, **handler(cmd)}), flush=True)
        self.sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m pagefork.testing.vmm``."""
    p = argparse.ArgumentParser(prog="pagefork-test-vmm", description=__doc__)
    p.add_argument("--socket", required=True, help="page server socket to connect to")
    p.add_argument("--mem-file", required=True, help="template mem-file, to check pages against")
    p.add_argument("--region", action="append", required=True, help="region size, e.g. 8M (repeat)")
    p.add_argument("--gap", default="2M", help="unmapped hole between regions")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE)
    p.add_argument("--hugetlb", action="store_true", help="back regions with 2 MiB hugepages")
    p.add_argument("--fc-version", default="1.12", help="Firecracker version whose fields to send")
    p.add_argument("--pending-faults", type=int, default=0, help="faults queued before handshake")
    p.add_argument("--pending-remove", help="REGION:OFFSET:LENGTH to madvise before handshake")
    p.add_argument(
        "--close-after-handshake",
        action="store_true",
        help="close the socket right after sending the handshake (Firecracker 1.7-1.11)",
    )
    p.add_argument("--shrink", type=int, default=0, help="advertise region 0 this much smaller")
    TestVmm(p.parse_args(argv)).run()


class VmmProcess:
    """Starts a :class:`TestVmm` in a child process and sends it commands."""

    def __init__(
        self,
        socket_path: str,
        mem_file: str,
        regions: Sequence[str] = ("8M",),
        *extra: str,
        timeout: float = 60.0,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "pagefork.testing.vmm",
            "--socket",
            socket_path,
            "--mem-file",
            mem_file,
        ]
        for r in regions:
            cmd += ["--region", r]
        cmd += list(extra)
        self.timeout = timeout
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._reply()
        self.pid: int = self.hello["pid"]

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready = threading.Event()
        out: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            out.append(self.proc.stdout.readline())
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self.timeout):
            self.kill()
            raise TimeoutError(f"test VMM gave no answer within {self.timeout}s")
        if not out[0]:
            raise EOFError(f"test VMM exited (code {self.proc.wait(5)})")
        reply: dict[str, Any] = json.loads(out[0])
        return reply

    def send(self, **cmd: Any) -> dict[str, Any]:
        """Send one command and wait (bounded) for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> int:
        """Ask the VMM to exit and reap it; returns its exit code."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the VMM (a crash mid-run) and close the pipes to it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


if __name__ == "__main__":
    main()
