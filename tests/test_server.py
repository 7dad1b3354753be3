"""The page server against real userfaultfd faults from a test VMM in another process."""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from pathlib import Path

import pytest

from conftest import PAGE, needs_uffd
from pagefork.errors import ForkError, MemFileError, PageforkError
from pagefork.server import PageServer, ServerConfig

pytestmark = needs_uffd

MIB = 1 << 20


def test_every_page_of_two_regions_matches_the_template(no_leaks, make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    regions = server.wait_connected("a", timeout=10)
    assert [r.size for r in regions] == [8 * MIB, 4 * MIB]
    assert regions[1].offset == 8 * MIB and regions[1].base > regions[0].end  # a hole between

    reply = vmm.send(cmd="touch", all=True)
    assert reply["touched"] == 3072 and reply["bad"] == 0, reply["mismatches"]
    stats = server.stats("a")
    assert stats.faults == 3072
    assert stats.zero_pages == 3072 // 4  # every 4th template page is zero: UFFDIO_ZEROPAGE
    assert stats.pages_copied == 3072 - 3072 // 4
    assert stats.pid == vmm.pid and stats.errors == 0
    assert stats.latency_us["p50"] > 0
    vmm.close()
    # A fault's latency is noted after its ioctl woke the guest: read them once the fork ended.
    latency = server.wait_ended("a", timeout=10).latency_us
    # One service time per fault, and the percentiles are those of the measured samples.
    samples = sorted(server.fault_latencies_ns("a"))
    assert len(samples) == 3072 and samples[0] > 0
    assert latency["p50"] == samples[1536 - 1] / 1000  # nearest rank: ceil(n/2)
    assert latency["p99"] == samples[math.ceil(0.99 * 3072) - 1] / 1000
    assert latency["max"] == samples[-1] / 1000
    # One fault loop served them one after another, all while the guest was touching: their
    # sum cannot exceed the guest-visible time of the touch (catches wrong units or clocks).
    assert sum(samples) / 1e9 <= reply["seconds"]
    server.unregister_fork("a")


def test_random_order_and_second_touch_needs_no_fault(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    assert vmm.send(cmd="touch", all=True, order="random", seed=7)["bad"] == 0
    assert vmm.send(cmd="touch", all=True, order="random", seed=8)["bad"] == 0
    assert server.stats("a").faults == 3072  # pages present after first touch


def test_concurrent_faults_from_guest_threads(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    reply = vmm.send(cmd="touch", all=True, order="random", threads=6)
    assert reply["bad"] == 0
    stats = server.stats("a")
    # Two threads may fault on one page only if they touch the same page; they don't here.
    assert stats.faults + stats.already_present == 3072


def test_several_forks_of_one_template_at_once(make_server, vmms):
    server = make_server()
    forks = [vmms(server.register_fork(f"f{i}")) for i in range(4)]
    replies: list[dict] = []
    threads = [
        threading.Thread(
            target=lambda v=v, i=i: replies.append(
                v.send(cmd="touch", all=True, order="random", seed=i)
            )
        )
        for i, v in enumerate(forks)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 4 and all(r["bad"] == 0 for r in replies)
    assert [server.stats(f"f{i}").faults for i in range(4)] == [3072] * 4


def test_removed_range_reads_zero_and_stays_zero(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    # Touch everything, then balloon-remove 1 MiB: the guest must see zeros there, never the
    # template's bytes, while the rest keeps the template.
    assert vmm.send(cmd="touch", all=True)["bad"] == 0
    assert vmm.send(cmd="remove", region=1, offset=MIB, length=MIB) == {"ok": True}
    assert vmm.send(cmd="check_zero", region=1, offset=MIB, length=MIB)["zero"] is True
    assert vmm.send(cmd="touch", all=True)["bad"] == 0  # checks removed pages against zeros
    stats = server.stats("a")
    assert stats.removed_bytes == MIB
    assert stats.faults == 3072 + 256


def test_remove_before_first_touch_serves_zero_pages(make_server, vmms):
    server = make_server()
    vmm = vmms(server.register_fork("a"))
    assert vmm.send(cmd="remove", region=0, offset=0, length=2 * MIB) == {"ok": True}
    assert vmm.send(cmd="check_zero", region=0, offset=0, length=2 * MIB)["zero"] is True
    assert server.stats("a").zero_pages == 512


def test_copy_eagain_while_remove_unread_is_deferred_and_retried(make_server, vmms):
    server = make_server()
    # 80 faults and then a REMOVE are queued before the handshake: the server's first read
    # takes 64 faults, the REMOVE stays unread, so the kernel refuses those copies with EAGAIN.
    vmm = vmms(server.register_fork("a"), "--pending-faults", "80", "--pending-remove", "1:0:1M")
    stats = server.wait_connected("a") and server.stats("a")
    reply = vmm.send(cmd="touch", all=True)
    assert reply["bad"] == 0
    assert vmm.send(cmd="check_zero", region=1, offset=0, length=MIB)["zero"] is True
    stats = server.stats("a")
    assert stats.eagain_retries >= 1
    assert stats.errors == 0 and stats.removed_bytes == MIB


def test_vmm_dying_mid_run_ends_its_session_without_leaks(no_leaks, make_server, vmms):
    server = make_server()
    healthy = vmms(server.register_fork("ok"))
    doomed = vmms(server.register_fork("doomed"))
    assert doomed.send(cmd="touch", all=False, pages=[[0, 0], [0, PAGE]])["bad"] == 0
    doomed.kill()
    ended = server.wait_ended("doomed", timeout=10)
    assert ended.state == "ended" and ended.errors == 0 and ended.faults == 2
    assert healthy.send(cmd="touch", all=True)["bad"] == 0  # the other fork is unaffected
    healthy.close()
    server.wait_ended("ok", timeout=10)
    server.unregister_fork("doomed")
    server.unregister_fork("ok")
    server.close()


def test_fault_outside_every_region_kills_only_that_vmm(make_server, vmms):
    server = make_server()
    healthy = vmms(server.register_fork("ok"))
    # The VMM registers 8 MiB but tells the server about 4 MiB less: a fault in the tail is
    # outside every region the server knows.
    bad = vmms(server.register_fork("bad"), "--shrink", str(4 * MIB))
    server.wait_connected("bad")
    bad.proc.stdin.write(json.dumps({"cmd": "touch", "pages": [[0, 6 * MIB]]}) + "\n")
    bad.proc.stdin.flush()
    stats = server.wait_ended("bad", timeout=10)
    assert stats.state == "failed" and stats.errors == 1
    assert "outside every region" in (stats.error or "")
    assert bad.proc.wait(10) == -9  # SIGKILL: its guest would otherwise hang forever
    assert healthy.send(cmd="touch", all=True)["bad"] == 0


def test_close_policy_leaves_the_vmm_alive(make_server, vmms):
    server = make_server(on_failure="close")
    bad = vmms(server.register_fork("bad"), "--shrink", str(4 * MIB))
    server.wait_connected("bad")
    bad.proc.stdin.write(json.dumps({"cmd": "touch", "pages": [[0, 6 * MIB]]}) + "\n")
    bad.proc.stdin.flush()
    assert server.wait_ended("bad", timeout=10).state == "failed"
    assert bad.proc.poll() is None


def test_server_close_with_connected_forks_joins_everything(no_leaks, tmp_path, mem_file, vmms):
    server = PageServer(ServerConfig(str(mem_file), str(tmp_path)))
    paths = [server.register_fork(f"f{i}") for i in range(3)]
    procs = [vmms(p) for p in paths]
    for i, p in enumerate(procs):
        server.wait_connected(f"f{i}")
        assert p.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    server.close()
    server.close()  # idempotent
    assert not any(os.path.exists(p) for p in paths)
    for p in procs:
        p.kill()


def test_fork_socket_is_private_and_ids_are_validated(make_server, tmp_path):
    server = make_server()
    path = server.register_fork("vm-1.a_b")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path == str(tmp_path / "vm-1.a_b.sock")
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "a b"):
        with pytest.raises(ForkError, match="invalid fork id"):
            server.register_fork(bad)
    with pytest.raises(ForkError, match="already registered"):
        server.register_fork("vm-1.a_b")
    server.unregister_fork("vm-1.a_b")
    assert not os.path.exists(path)
    server.unregister_fork("never-registered")  # no-op
    with pytest.raises(ForkError, match="unknown fork"):
        server.stats("never-registered")


def test_wait_connected_times_out_clearly(make_server):
    server = make_server()
    server.register_fork("a")
    with pytest.raises(ForkError, match=r"no handshake within 0\.2s"):
        server.wait_connected("a", timeout=0.2)


def test_missing_mem_file_is_a_clear_error(tmp_path):
    with pytest.raises(MemFileError, match="No such file"):
        PageServer(ServerConfig(str(tmp_path / "nope"), str(tmp_path)))


def test_multiple_forks_on_one_shared_socket(tmp_path: Path, mem_file: Path, vmms):
    ended: list[str] = []
    done = threading.Event()

    def on_end(fork_id: str, stats) -> None:
        ended.append(f"{fork_id}:{stats.faults}")
        if len(ended) == 2:
            done.set()

    server = PageServer(ServerConfig(str(mem_file), on_fork_end=on_end))
    try:
        sock = str(tmp_path / "shared.sock")
        server.listen(sock)
        a = vmms(sock)
        b = vmms(sock)
        assert a.send(cmd="touch", pages=[[0, 0], [1, 0]])["bad"] == 0
        assert b.send(cmd="touch", pages=[[0, PAGE]])["bad"] == 0
        a.close()
        b.close()
        assert done.wait(10)
        assert sorted(ended) == ["fork-1:2", "fork-2:1"] or sorted(ended) == [
            "fork-1:1",
            "fork-2:2",
        ]
    finally:
        server.close()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"record_max_pages": 0}, "record_max_pages"),
        ({"record_max_seconds": -1.0}, "record_max_seconds"),
        ({"handshake_timeout": float("inf")}, "handshake_timeout"),
        ({"on_failure": "explode"}, "on_failure"),
        ({"page_size": 5000}, "neither 4 KiB nor 2 MiB"),
        ({"page_size": 1 << 30}, "neither 4 KiB nor 2 MiB"),
    ],
)
def test_bad_settings_are_refused_up_front(tmp_path, mem_file, setting, message):
    with pytest.raises(PageforkError, match=message):
        PageServer(ServerConfig(str(mem_file), str(tmp_path), **setting))


def test_pending_handshakes_are_bounded_and_the_acceptor_lives_on(no_leaks, make_server, vmms):
    import socket as socket_mod

    server = make_server(max_pending_handshakes=2, handshake_timeout=30)
    path = str(server.config.socket_dir) + "/shared.sock"
    server.listen(path)
    idle = [socket_mod.socket(socket_mod.AF_UNIX) for _ in range(3)]
    try:
        for s in idle:
            s.connect(path)
        # The third idle connection is refused: the server closes it.
        idle[2].settimeout(10)
        assert idle[2].recv(1) == b""
        for s in idle[:2]:
            s.close()
        # Once the idle ones are gone, a real VMM is served.
        vmm = vmms(path)
        assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
        vmm.close()
    finally:
        for s in idle:
            s.close()
    server.close()


def test_shared_socket_ids_never_replace_a_registered_fork(make_server, vmms):
    server = make_server()
    registered = server.register_fork("fork-1")
    shared = str(server.config.socket_dir) + "/shared.sock"
    server.listen(shared)
    vmm = vmms(shared)
    assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    assert set(server.forks()) == {"fork-1", "fork-2"}
    assert server.stats("fork-1").state == "waiting" and os.path.exists(registered)


def test_long_socket_paths_that_fit_sun_path_work(tmp_path, mem_file, vmms):
    deep = tmp_path / ("d" * (100 - len(str(tmp_path)) - len("/x.sock") - 1))
    deep.mkdir()
    path = str(deep / "x.sock")
    assert 95 <= len(path) <= 107
    with PageServer(ServerConfig(str(mem_file))) as server:
        server.listen(path)
        vmm = vmms(path)
        assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
        vmm.close()


def test_a_socket_put_at_our_path_by_someone_else_is_left_alone(tmp_path: Path, mem_file: Path):
    import socket

    server = PageServer(ServerConfig(str(mem_file), str(tmp_path)))
    others: list[socket.socket] = []
    try:
        path = server.register_fork("a")
        shared = str(tmp_path / "shared.sock")
        server.listen(shared)
        for p in (path, shared):  # an operator removes ours; another server binds there
            os.unlink(p)
            other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            other.bind(p)
            other.listen(1)
            others.append(other)
        server.unregister_fork("a")
    finally:
        server.close()
    try:
        assert os.path.exists(path) and os.path.exists(shared)  # theirs, still there
    finally:
        for other in others:
            other.close()
