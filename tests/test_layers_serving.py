"""Forks of layered templates, served through real uffds to a test VMM in another process.

The VMM checks every page it reads against an oracle file the test builds by applying the
layers in plain Python (``Chain`` in test_layers), never against pagefork's own view.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_layers import Chain

from conftest import PAGE, make_mem_file, needs_uffd
from pagefork.hotpages import HotPageList
from pagefork.layers import source
from pagefork.layers.format import LayerError, write_layer
from pagefork.server import PageServer, ServerConfig
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd
MIB = 1 << 20
PAGES = 3072  # 12 MiB: regions of 8M and 4M


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[object]]:
    """Servers and VMMs started by a test; all closed at the end."""
    things: list[object] = []
    yield things
    for t in reversed(things):
        if isinstance(t, VmmProcess):
            t.kill()
        elif isinstance(t, PageServer):
            t.close()


def _serve(served: list[object], tmp: Path, chain: Chain, **kw: object) -> PageServer:
    server = PageServer(
        ServerConfig(
            mem_file_path=chain.base,
            socket_dir=str(tmp),
            layers=tuple(chain.layers),
            **kw,  # type: ignore[arg-type]
        )
    )
    served.append(server)
    return server


def _vmm(
    served: list[object], server: PageServer, chain: Chain, tmp: Path, fork: str
) -> VmmProcess:
    oracle = tmp / "expected"
    if not oracle.exists():
        oracle.write_bytes(bytes(chain.expected))
    vmm = VmmProcess(server.register_fork(fork), str(oracle), ("8M", "4M"))
    served.append(vmm)
    server.wait_connected(fork, timeout=30)
    return vmm


def _host(p: int) -> tuple[int, int]:
    """Guest page ``p`` of the mem-file as (region, offset) in the 8M + 4M layout."""
    off = p * PAGE
    return (0, off) if off < 8 * MIB else (1, off - 8 * MIB)


def _zero_over_parent_data(chain: Chain) -> list[int]:
    """Pages a layer zeroes where the base has data."""
    base = Path(chain.base).read_bytes()
    return [
        p
        for p in range(PAGES)
        if chain.page(p) == bytes(PAGE) and base[p * PAGE : (p + 1) * PAGE] != bytes(PAGE)
    ]


def test_a_fork_of_a_child_reads_its_layers_zeros_and_the_parent_elsewhere(tmp_path: Path, served):
    chain = Chain(tmp_path, PAGES, depth=1, seed=21)
    zeroed = _zero_over_parent_data(chain)
    assert len(zeroed) > 10  # the layer really hides parent bytes behind zeros
    server = _serve(served, tmp_path, chain, workers=1)
    vmm = _vmm(served, server, chain, tmp_path, "a")
    reply = vmm.send(cmd="touch", all=True, order="random", seed=1)
    assert reply["touched"] == PAGES and reply["bad"] == 0, reply["mismatches"]
    stats = server.stats("a")
    zero_pages = sum(chain.page(p) == bytes(PAGE) for p in range(PAGES))
    assert stats.faults == PAGES and stats.errors == 0
    assert stats.zero_pages == zero_pages  # zero runs are served with UFFDIO_ZEROPAGE


def test_a_depth_16_chain_is_served_byte_for_byte(tmp_path: Path, served):
    chain = Chain(tmp_path, PAGES, depth=16, seed=22)
    server = _serve(served, tmp_path, chain, workers=1)
    vmm = _vmm(served, server, chain, tmp_path, "a")
    reply = vmm.send(cmd="touch", all=True)
    assert reply["bad"] == 0, reply["mismatches"]


def test_prefetch_over_zero_runs_installs_zeros_not_the_parent(tmp_path: Path, served):
    chain = Chain(tmp_path, PAGES, depth=2, seed=23)
    zeroed = _zero_over_parent_data(chain)
    server = _serve(served, tmp_path, chain, workers=1)
    vmm = _vmm(served, server, chain, tmp_path, "a")
    # Every page, zero runs included, in one hot set: runs of copies span the zeroed pages'
    # neighbours, and nothing may bring the parent's bytes in.
    result = server.prefetch("a", HotPageList.from_pages(_host(p) for p in range(PAGES)))
    assert result.installed == PAGES
    reply = vmm.send(cmd="touch", all=True)
    assert reply["bad"] == 0, reply["mismatches"]
    assert (
        vmm.send(
            cmd="check_zero", region=_host(zeroed[0])[0], offset=_host(zeroed[0])[1], length=PAGE
        )["zero"]
        is True
    )
    assert server.stats("a").faults == 0  # all prefetched


def test_a_replacement_worker_maps_the_layers_too(tmp_path: Path, served):
    chain = Chain(tmp_path, PAGES, depth=3, seed=24)
    server = _serve(served, tmp_path, chain, workers=1, spare_worker=False)
    vmm = _vmm(served, server, chain, tmp_path, "a")
    assert vmm.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    [old] = server.worker_pids()
    os.kill(old, signal.SIGKILL)
    reply = vmm.send(cmd="touch", all=True)  # served by a new worker, started after the kill
    assert reply["bad"] == 0, reply["mismatches"]
    assert server.stats("a").worker_pid not in (None, old)


def test_a_chain_past_the_map_count_budget_is_served_materialized(
    tmp_path: Path, served, monkeypatch
):
    chain = Chain(tmp_path, PAGES, depth=2, seed=25)
    monkeypatch.setattr(source, "max_segments", lambda: 10)
    server = _serve(served, tmp_path, chain, workers=1)
    assert isinstance(server.memfile, source.LayeredView) and server.memfile.materialized
    vmm = _vmm(served, server, chain, tmp_path, "a")
    assert vmm.send(cmd="touch", all=True, order="random")["bad"] == 0


def test_a_fork_of_the_base_is_untouched_by_a_childs_layers(tmp_path: Path, served):
    chain = Chain(tmp_path, PAGES, depth=1, seed=26)
    (tmp_path / "b").mkdir()
    base_server = PageServer(ServerConfig(chain.base, str(tmp_path / "b"), workers=1))
    served.append(base_server)
    vmm = VmmProcess(base_server.register_fork("base"), chain.base, ("8M", "4M"))
    served.append(vmm)
    child = _serve(served, tmp_path, chain, workers=1)  # the child served at the same time
    child_vmm = _vmm(served, child, chain, tmp_path, "child")
    assert child_vmm.send(cmd="touch", all=True)["bad"] == 0
    assert vmm.send(cmd="touch", all=True)["bad"] == 0  # checked against the base itself


def test_a_bad_layer_fails_the_server_at_start_with_one_line(tmp_path: Path):
    chain = Chain(tmp_path, 64, depth=1)
    write_layer(str(tmp_path / "other"), size=128 * PAGE, pages=[(0, b"x" * PAGE)])
    with pytest.raises(Exception, match=r"^layer .*/other: its memory is 524288 bytes"):
        PageServer(ServerConfig(chain.base, str(tmp_path), layers=(str(tmp_path / "other"),)))


def test_a_corrupt_data_page_fails_the_server_at_start_not_a_guest_later(tmp_path: Path, served):
    """A flipped bit in a layer's data page, which no header CRC covers: the server refuses
    the chain at start, naming the file and the page, before any fork reads it; the same chain
    intact serves a real fork byte for byte."""
    chain = Chain(tmp_path, PAGES, depth=2, seed=31)
    server = _serve(served, tmp_path, chain)
    vmm = _vmm(served, server, chain, tmp_path, "intact")
    assert vmm.send(cmd="touch", all=True)["bad"] == 0
    slot = 7
    with open(chain.layers[1], "r+b") as f:
        f.seek(PAGE * (1 + slot) + 2000)  # data page 7 of the top layer
        byte = f.read(1)[0]
        f.seek(PAGE * (1 + slot) + 2000)
        f.write(bytes([byte ^ 1]))
    with pytest.raises(LayerError) as err:
        _serve(served, tmp_path, chain)
    message = str(err.value)
    assert message.startswith(f"layer {chain.layers[1]}: data page {slot} (memory page ")
    assert "does not match its checksum" in message and "\n" not in message


def test_a_layered_server_closes_every_layer_fd(no_leaks, tmp_path: Path):
    chain = Chain(tmp_path, 256, depth=3, seed=27)
    oracle = tmp_path / "expected"
    oracle.write_bytes(bytes(chain.expected))
    with PageServer(ServerConfig(chain.base, str(tmp_path), layers=tuple(chain.layers))) as server:
        vmm = VmmProcess(server.register_fork("a"), str(oracle), ("1M",))
        try:
            assert vmm.send(cmd="touch", all=True)["bad"] == 0
        finally:
            vmm.close()


def test_a_child_without_a_hot_set_is_prefetched_from_its_parents_plus_its_layers(
    tmp_path: Path, served
):
    from pagefork.hotpages import save
    from pagefork.layers.hotset import inherited_hot_set
    from pagefork.templates import TemplateRegistry

    chain = Chain(tmp_path, PAGES, depth=1, seed=28)
    reg = TemplateRegistry(tmp_path / "state")
    (tmp_path / "vmstate").write_bytes(b"state")
    reg.create_from_snapshot("base", chain.base, tmp_path / "vmstate")
    parent_hot = HotPageList.from_pages([(1, p * PAGE) for p in range(100)])  # region 1 only
    save(parent_hot, reg.get("base").hot_pages_path)
    kid = reg.create_child("kid", "base", chain.layers[0], tmp_path / "vmstate")
    inherited = inherited_hot_set(reg, kid)
    assert inherited is not None and inherited_hot_set(reg, reg.get("base")) is None

    server = _serve(served, tmp_path, chain, workers=1)
    vmm = _vmm(served, server, chain, tmp_path, "a")
    regions = server.wait_connected("a")
    hot = inherited.for_regions(regions)
    assert inherited.for_regions(list(regions)) is hot  # one list per layout: one plan
    with source.LayeredView(chain.base, chain.layers) as view:
        data_pages = [p for f, c, n, _ in view.segments if n is not None for p in range(f, f + c)]
    assert len(hot) == len(set(data_pages) | {8 * MIB // PAGE + p for p in range(100)})
    server.prefetch("a", hot)
    touched = [list(_host(p)) for p in data_pages] + [[1, p * PAGE] for p in range(100)]
    reply = vmm.send(cmd="touch", pages=touched)
    assert reply["bad"] == 0, reply["mismatches"]
    assert server.stats("a").faults == 0  # every layer page and every parent hot page was there


def test_hugepage_forks_copy_zero_runs_as_zeros_from_the_mapped_view(tmp_path: Path):
    """A 2 MiB page that mixes a zero run, layer data and parent bytes is copied whole from
    the view (hugetlbfs has no UFFDIO_ZEROPAGE): only the zero memory mapped over the run keeps
    the parent's bytes out, on demand and under prefetch."""
    from test_hugepages import NR_HUGEPAGES

    from pagefork.hotpages import HotPage

    try:
        before = int(NR_HUGEPAGES.read_text())
        NR_HUGEPAGES.write_text(str(before + 16))
        if int(NR_HUGEPAGES.read_text()) < before + 12:
            pytest.skip("not enough hugetlbfs pages could be reserved")
    except OSError as exc:
        pytest.skip(f"cannot reserve hugetlbfs pages here: {exc}")
    try:
        base = make_mem_file(tmp_path / "base", PAGES, zero_every=1000)  # nearly all data
        expected = bytearray(base.read_bytes())
        pages = [(p, bytes([p % 251 + 1]) * PAGE) for p in (3, 4, 1100)]
        runs = [(10, 290), (512, 512)]  # part of 2 MiB page 0, all of page 1
        for p, data in pages:
            expected[p * PAGE : (p + 1) * PAGE] = data
        for first, count in runs:
            expected[first * PAGE : (first + count) * PAGE] = bytes(count * PAGE)
        write_layer(str(tmp_path / "l"), size=PAGES * PAGE, pages=pages, zero_runs=runs)
        oracle = tmp_path / "expected"
        oracle.write_bytes(bytes(expected))
        huge = ("--hugetlb", "--page-size", str(2 * MIB))
        config = ServerConfig(str(base), str(tmp_path), layers=(str(tmp_path / "l"),))
        with PageServer(config) as server:
            vmm = VmmProcess(server.register_fork("a"), str(oracle), ("8M", "4M"), *huge)
            vmm2 = VmmProcess(server.register_fork("b"), str(oracle), ("8M", "4M"), *huge)
            try:
                server.wait_connected("a")
                reply = vmm.send(cmd="touch", all=True)
                assert reply["touched"] == 6 and reply["bad"] == 0, reply
                assert server.stats("a").faults == 6
                result = server.prefetch("b", [HotPage(0, 0), HotPage(0, 2 * MIB)])
                assert result.installed == 2
                assert vmm2.send(cmd="touch", all=True)["bad"] == 0
                assert server.stats("b").faults == 4  # only the pages not prefetched
            finally:
                vmm.kill()
                vmm2.kill()
    finally:
        NR_HUGEPAGES.write_text(str(before))


def test_serve_with_layers_serves_the_chain(tmp_path: Path):
    from test_cli_serve import Serve

    chain = Chain(tmp_path, PAGES, depth=2, seed=29)
    oracle = tmp_path / "expected"
    oracle.write_bytes(bytes(chain.expected))
    sock = str(tmp_path / "s.sock")
    layers = [a for path in chain.layers for a in ("--layer", path)]
    serve = Serve("--mem-file", chain.base, *layers, "--socket", sock, "--workers", "1")
    try:
        serve.wait_for("listening")
        vmm = VmmProcess(sock, str(oracle), ("8M", "4M"))
        try:
            assert vmm.send(cmd="touch", all=True, order="random")["bad"] == 0
        finally:
            vmm.close()
        assert serve.wait_for("fork_end")[0]["faults"] == PAGES
    finally:
        assert serve.stop()[0] == 0


def test_serve_with_a_corrupt_layer_is_one_line_exit_2(tmp_path: Path):
    from test_cli_serve import assert_one_line_exit_2, run_serve

    chain = Chain(tmp_path, 64, depth=1)
    Path(chain.layers[0]).write_bytes(Path(chain.layers[0]).read_bytes()[:-3])
    proc = run_serve(
        "--mem-file", chain.base, "--layer", chain.layers[0], "--socket", str(tmp_path / "s")
    )
    size = os.path.getsize(chain.layers[0])
    assert_one_line_exit_2(
        proc, f"layer {chain.layers[0]}: truncated ({size} bytes, the header says {size + 3})"
    )
    proc = run_serve(
        "--mem-file", chain.base, "--layer", chain.base, "--socket", str(tmp_path / "s")
    )
    assert_one_line_exit_2(proc, f"layer {chain.base}: not a pagefork layer file (bad magic)")
    proc = run_serve(
        *("--mem-file", chain.base, "--layer", chain.layers[0], "--socket", str(tmp_path / "s")),
        *("--record", chain.layers[0]),
    )
    assert_one_line_exit_2(proc, f"--record {chain.layers[0]} is the layer {chain.layers[0]}")


def test_removed_ranges_are_the_mem_file_ranges_the_guest_removed(tmp_path: Path, served):
    chain = Chain(tmp_path, PAGES, depth=1, seed=30)
    server = _serve(served, tmp_path, chain, workers=1)
    vmm = _vmm(served, server, chain, tmp_path, "a")
    assert server.removed_ranges("a") == []
    assert vmm.send(cmd="remove", region=1, offset=MIB, length=MIB)["ok"]
    assert vmm.send(cmd="remove", region=0, offset=0, length=2 * PAGE)["ok"]
    assert vmm.send(cmd="remove", region=1, offset=2 * MIB, length=PAGE)["ok"]  # adjoins
    # A REMOVE is noted before anything after it is served: touching a page waits for that.
    assert vmm.send(cmd="touch", pages=[[0, 4 * PAGE]])["bad"] == 0
    assert server.removed_ranges("a") == [(0, 2 * PAGE), (9 * MIB, 10 * MIB + PAGE)]
