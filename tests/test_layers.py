"""Layer files and the composite view of a chain, checked against an independent oracle.

The oracle applies each layer to a bytearray copy of the base in plain Python; the view, the
mapping a worker makes, and flatten must all give the same bytes.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from conftest import PAGE, make_mem_file
from pagefork import libc
from pagefork.errors import MemFileError, PageforkError
from pagefork.layers import source
from pagefork.layers.capture import ChainPages, capture_layer
from pagefork.layers.format import (
    LayerError,
    LayerFile,
    diff_against,
    write_layer,
)
from pagefork.layers.source import (
    LayeredView,
    flatten,
    map_view,
    open_reader,
    removed_file_ranges,
)
from pagefork.regions import Region


class Chain:
    """A base mem-file and random layers over it, with the bytes a fork must read."""

    def __init__(self, tmp: Path, pages: int, depth: int, seed: int = 3) -> None:
        self.base = str(make_mem_file(tmp / "base", pages, seed=seed))
        self.expected = bytearray(Path(self.base).read_bytes())
        rng = random.Random(seed)
        self.layers: list[str] = []
        for d in range(depth):
            changed = rng.sample(range(pages), pages // 5)
            data = []
            for p in changed:
                page = bytes(PAGE) if p % 7 == 0 else rng.randbytes(PAGE)  # some now zero
                data.append((p, page))
                self.expected[p * PAGE : (p + 1) * PAGE] = page
            taken = set(changed)
            runs = []
            for _ in range(3):  # zero runs over pages this layer does not give data
                first = rng.randrange(pages - 8)
                count = rng.randrange(1, 8)
                if taken.isdisjoint(range(first, first + count)):
                    runs.append((first, count))
                    taken.update(range(first, first + count))
                    self.expected[first * PAGE : (first + count) * PAGE] = bytes(count * PAGE)
            path = str(tmp / f"layer{d}")
            write_layer(path, size=pages * PAGE, pages=data, zero_runs=runs, parent=f"t{d}")
            self.layers.append(path)

    def page(self, p: int) -> bytes:
        return bytes(self.expected[p * PAGE : (p + 1) * PAGE])


def _rewrite_crc(path: str) -> None:
    """Make a hand-edited layer's checksum valid again (a file built to lie)."""
    raw = bytearray(Path(path).read_bytes())
    head = struct.Struct("<8sQQQQHxxI")
    fields = list(head.unpack_from(raw))
    fields[-1] = 0
    bare = head.pack(*fields)
    parent = bytes(raw[head.size : head.size + fields[5]])
    crc = zlib.crc32(bytes(raw[fields[4] :]), zlib.crc32(parent, zlib.crc32(bare)))
    fields[-1] = crc
    raw[: head.size] = head.pack(*fields)
    Path(path).write_bytes(raw)


# --- the file ------------------------------------------------------------------------------


def test_a_layer_round_trips_and_zero_data_pages_become_zero_runs(tmp_path: Path):
    path = str(tmp_path / "l")
    pages = [(9, b"b" * PAGE), (2, b"a" * PAGE), (3, memoryview(b"c" * PAGE)), (5, bytes(PAGE))]
    info = write_layer(path, size=16 * PAGE, pages=pages, zero_runs=[(6, 2), (12, 3)], parent="p")
    assert (info.pages, info.zero_pages) == (3, 6)  # page 5 merged into the run 5..7
    assert info.bytes == os.path.getsize(path)
    with LayerFile(path) as layer:
        assert list(layer.index) == [9, 2, 3]  # stored in the order given
        assert layer.zero_runs == [(5, 3), (12, 3)]
        assert layer.parent == "p" and layer.size == 16 * PAGE
        assert [layer.read_slot(k)[:1] for k in range(3)] == [b"b", b"a", b"c"]
        assert layer.data_offset(1) % PAGE == 0  # mappable


@pytest.mark.parametrize(
    ("pages", "runs", "message"),
    [
        ([(16, b"x" * PAGE)], [], "page 16 (entry 0) is outside the memory (16 pages)"),
        ([(1, b"x" * 10)], [], "page 1 (entry 0) has 10 bytes, not 4096"),
        ([(1, b"x" * PAGE), (1, b"y" * PAGE)], [], "page 1 (entry 1) is given twice"),
        ([(4, b"x" * PAGE)], [(2, 4)], "zero run 0 covers page 4, which is also a data page"),
        ([], [(14, 3)], "zero run 0 (page 14, 3 pages) is outside the memory (16 pages) or empty"),
        ([], [(3, 0)], "zero run 0 (page 3, 0 pages) is outside"),
    ],
)
def test_writing_a_bad_layer_names_the_entry_and_keeps_the_old_file(
    tmp_path: Path, pages, runs, message
):
    path = tmp_path / "l"
    path.write_bytes(b"old")
    with pytest.raises(
        LayerError, match="^layer .*/l: " + message.replace("(", r"\(").replace(")", r"\)")
    ):
        write_layer(str(path), size=16 * PAGE, pages=pages, zero_runs=runs)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["l"]  # no temp file left


def _layer(tmp_path: Path) -> str:
    path = str(tmp_path / "l")
    write_layer(
        path, size=16 * PAGE, pages=[(1, b"a" * PAGE), (2, b"b" * PAGE)], zero_runs=[(8, 2)]
    )
    return path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) - 5], "truncated"),
        (lambda raw: raw[: 3 * PAGE], "truncated"),
        (lambda raw: raw + b"junk", "4 bytes of trailing garbage"),
        (lambda raw: b"NOTLAYER" + raw[8:], "not a pagefork layer file"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum mismatch"),
        (lambda raw: raw[:8] + struct.pack("<Q", 5) + raw[16:], "not a positive multiple"),
        (lambda raw: b"", "not a pagefork layer file"),
    ],
)
def test_a_corrupt_or_truncated_layer_is_a_one_line_error(tmp_path: Path, damage, message):
    path = _layer(tmp_path)
    Path(path).write_bytes(damage(Path(path).read_bytes()))
    with pytest.raises(LayerError) as err:
        LayerFile(path)
    assert str(err.value).startswith(f"layer {path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_layer_pointing_outside_its_memory_is_refused_even_with_a_valid_checksum(
    tmp_path: Path,
):
    path = _layer(tmp_path)
    raw = bytearray(Path(path).read_bytes())
    index_at = PAGE + 2 * PAGE
    raw[index_at : index_at + 8] = struct.pack("<Q", 1 << 40)
    Path(path).write_bytes(raw)
    _rewrite_crc(path)
    with pytest.raises(LayerError, match="data page 0 is page 1099511627776, outside the memory"):
        LayerFile(path)
    # A zero run over a data page is refused the same way.
    path = _layer(tmp_path)
    raw = bytearray(Path(path).read_bytes())
    raw[index_at + 16 : index_at + 24] = struct.pack("<Q", 1)  # the run now starts at page 1
    Path(path).write_bytes(raw)
    _rewrite_crc(path)
    with pytest.raises(LayerError, match="zero run 0 overlaps a data page"):
        LayerFile(path)


def test_not_a_regular_file_is_refused_without_opening_it(tmp_path: Path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(LayerError, match="Is a FIFO, not a regular file"):
        LayerFile(tmp_path / "fifo")


def _flip_data_byte(path: str, slot: int, at: int = 100) -> None:
    """Flip one bit of data page ``slot`` in place (the header and index stay valid)."""
    with open(path, "r+b") as f:
        f.seek(LayerFile.data_offset(slot) + at)
        byte = f.read(1)[0]
        f.seek(LayerFile.data_offset(slot) + at)
        f.write(bytes([byte ^ 0x10]))


def _as_version_1(path: str) -> None:
    """Rewrite a layer as the first file version wrote it: no page checksums."""
    raw = bytearray(Path(path).read_bytes())
    head = struct.Struct("<8sQQQQHxxI")
    pages = head.unpack_from(raw)[2]
    del raw[len(raw) - 4 * pages :]
    raw[:8] = b"PFLAYER1"
    Path(path).write_bytes(raw)
    _rewrite_crc(path)


def test_a_flipped_byte_in_a_data_page_is_refused_naming_the_file_and_page(tmp_path: Path):
    """The header's CRC does not cover the data: each data page has its own, checked when a
    view maps it and whenever a page is read."""
    chain = Chain(tmp_path, pages=64, depth=1, seed=21)
    layer = chain.layers[0]
    with LayerFile(layer) as f:
        slot = 3
        page = f.index[slot]
    _flip_data_byte(layer, slot)
    why = (
        f"layer {layer}: data page {slot} (memory page {page}, file offset "
        f"{LayerFile.data_offset(slot)}) does not match its checksum: the file is corrupt"
    )
    with LayerFile(layer) as f:  # the header and index are intact: it opens
        assert f.version == 2
        f.read_slot(2)
        with pytest.raises(LayerError) as err:
            f.read_slot(slot)
        assert str(err.value) == why
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(LayerError) as err:
        LayeredView(chain.base, [layer])  # what a page server opens
    assert str(err.value) == why
    assert set(os.listdir("/proc/self/fd")) <= fds  # nothing left open
    with pytest.raises(LayerError, match="does not match its checksum"):
        flatten(chain.base, [layer], str(tmp_path / "flat"))
    assert not (tmp_path / "flat").exists()


def test_a_page_a_higher_layer_hides_is_not_what_fails_a_view(tmp_path: Path):
    """Only what reaches a guest is checked: a corrupt page under a newer one is not read."""
    base = make_mem_file(tmp_path / "base", 16)
    write_layer(str(tmp_path / "low"), size=16 * PAGE, pages=[(2, b"a" * PAGE), (5, b"b" * PAGE)])
    write_layer(str(tmp_path / "high"), size=16 * PAGE, pages=[(2, b"c" * PAGE)])
    _flip_data_byte(str(tmp_path / "low"), 0)  # page 2 of the lower layer
    with LayeredView(base, [str(tmp_path / "low"), str(tmp_path / "high")]) as view:
        assert view.read_page(2) == b"c" * PAGE and view.read_page(5) == b"b" * PAGE


def test_a_layer_of_the_first_version_still_loads_unchecked(tmp_path: Path):
    chain = Chain(tmp_path, pages=128, depth=2, seed=23)
    for layer in chain.layers:
        _as_version_1(layer)
    with LayerFile(chain.layers[0]) as f:
        assert (f.version, f.page_crcs) == (1, None)
        assert f.bytes == os.path.getsize(chain.layers[0])
    with LayeredView(chain.base, chain.layers) as view:
        assert all(view.read_page(p) == chain.page(p) for p in range(128))


# --- the view ------------------------------------------------------------------------------


def test_the_view_of_a_deep_chain_reads_what_the_oracle_says(tmp_path: Path):
    chain = Chain(tmp_path, pages=512, depth=4)
    with LayeredView(chain.base, chain.layers) as view:
        assert not view.materialized
        for p in range(512):
            assert view.read_page(p) == chain.page(p), p
            assert view.is_zero(p * PAGE) == (chain.page(p) == bytes(PAGE)), p
        # Segments cover distinct pages in order, and adjacent pages of a layer coalesce.
        ends = [f + c for f, c, _, _ in view.segments]
        assert all(e <= f for e, (f, _, _, _) in zip(ends, view.segments[1:], strict=False))


def test_a_layer_for_another_memory_size_is_refused(tmp_path: Path):
    base = make_mem_file(tmp_path / "base", 8)
    write_layer(str(tmp_path / "l"), size=16 * PAGE, pages=[(1, b"a" * PAGE)])
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(
        LayerError, match=r"its memory is 65536 bytes, but the mem-file .* has 32768"
    ):
        LayeredView(base, [str(tmp_path / "l")])
    assert set(os.listdir("/proc/self/fd")) <= fds  # nothing left open


def test_a_missing_layer_names_it(tmp_path: Path):
    base = make_mem_file(tmp_path / "base", 8)
    with pytest.raises(PageforkError, match=r"layer .*/nope: cannot read: No such file"):
        LayeredView(base, [str(tmp_path / "nope")])


def test_the_mapped_view_is_the_chain_byte_for_byte(tmp_path: Path):
    """What a worker maps (base + segments MAP_FIXED over it) reads exactly the oracle."""
    chain = Chain(tmp_path, pages=512, depth=3, seed=5)
    with LayeredView(chain.base, chain.layers) as view:
        address = libc.mmap(view.size, mmap.PROT_READ, mmap.MAP_SHARED, view.fd)
        try:
            map_view(address, [os.dup(fd) for fd in view.layout_fds()])
            import ctypes

            assert ctypes.string_at(address, view.size) == bytes(chain.expected)
        finally:
            libc.munmap(address, view.size)


def test_too_many_segments_materialize_the_same_bytes(tmp_path: Path):
    chain = Chain(tmp_path, pages=256, depth=2, seed=9)
    with LayeredView(chain.base, chain.layers, segment_limit=3) as view:
        assert view.materialized and view.layout_fds() == ()
        assert os.pread(view.fd, view.size, 0) == bytes(chain.expected)
        assert all(view.read_page(p) == chain.page(p) for p in range(256))
        assert all(view.is_zero(p * PAGE) == (chain.page(p) == bytes(PAGE)) for p in range(256))


def test_a_random_half_of_the_pages_fits_the_map_count_limit(tmp_path: Path):
    """The worst realistic layer: half the pages of a 256 MiB guest, scattered."""
    pages = 65536
    base = tmp_path / "base"
    with open(base, "wb") as f:
        f.truncate(pages * PAGE)
    rng = random.Random(1)
    changed = sorted(rng.sample(range(pages), pages // 2))
    write_layer(str(tmp_path / "l"), size=pages * PAGE, pages=((p, b"\1" * PAGE) for p in changed))
    with LayeredView(str(base), [str(tmp_path / "l")]) as view:
        assert not view.materialized
        assert 0 < len(view.segments) <= source.max_segments()


def test_flatten_equals_the_chain_and_refuses_to_overwrite_it(tmp_path: Path):
    chain = Chain(tmp_path, pages=300, depth=4, seed=11)
    out = tmp_path / "flat"
    assert flatten(chain.base, chain.layers, str(out)) == 300 * PAGE
    assert out.read_bytes() == bytes(chain.expected)
    with pytest.raises(LayerError, match="is part of the chain it would replace"):
        flatten(chain.base, chain.layers, chain.base)
    assert Path(chain.base).read_bytes() != bytes(chain.expected)


def test_open_reader_and_diff_against_keep_only_changed_pages(tmp_path: Path):
    chain = Chain(tmp_path, pages=64, depth=1)
    reader = open_reader([chain.base, *chain.layers])
    try:
        mine = [(p, chain.page(p)) for p in range(64)]
        mine[5] = (5, b"z" * PAGE)
        assert [p for p, _ in diff_against(reader, mine)] == [5]
    finally:
        reader.close()  # type: ignore[attr-defined]


def test_the_view_reads_a_base_that_shrank_as_an_error(tmp_path: Path):
    chain = Chain(tmp_path, pages=64, depth=1)
    with LayeredView(chain.base, chain.layers) as view:
        os.truncate(chain.base, 10 * PAGE)
        base_pages = [p for p in range(20, 64) if view._owner[p] == 255]
        with pytest.raises(MemFileError, match="shrank"):
            view.read_page(base_pages[0])


def test_removed_host_ranges_become_merged_file_ranges():
    regions = [Region(0x10000, 0x4000, 0), Region(0x40000, 0x2000, 0x4000)]
    removed = [(0x41000, 0x50000), (0x13000, 0x41000), (0x0, 0x11000)]
    assert removed_file_ranges(removed, regions) == [(0, 0x1000), (0x3000, 0x6000)]


def test_a_header_claiming_a_huge_memory_costs_nothing_and_is_refused_by_the_view(
    tmp_path: Path,
):
    base = make_mem_file(tmp_path / "base", 16)
    path = str(tmp_path / "l")
    write_layer(path, size=16 * PAGE, pages=[])
    raw = bytearray(Path(path).read_bytes())
    raw[8:16] = struct.pack("<Q", 1 << 60)
    Path(path).write_bytes(raw)
    _rewrite_crc(path)
    with LayerFile(path) as layer:  # validated without a map of 2^48 pages
        assert layer.size == 1 << 60
    with pytest.raises(LayerError, match=f"its memory is {1 << 60} bytes, but the mem-file"):
        LayeredView(base, [path])


def test_an_empty_layer_is_a_valid_file_that_changes_nothing(tmp_path: Path):
    base = make_mem_file(tmp_path / "base", 16)
    info = write_layer(str(tmp_path / "l"), size=16 * PAGE, pages=[])
    assert info.bytes == os.path.getsize(tmp_path / "l") == PAGE
    with LayeredView(base, [str(tmp_path / "l")]) as view:
        assert view.segments == []
        assert b"".join(view.read_page(p) for p in range(16)) == base.read_bytes()


def test_a_captured_layer_opens_only_over_the_memory_it_was_taken_over(tmp_path: Path):
    """Its parent fingerprint ties it to the base's pages and the layer below: another base of
    the same size, or another layer below, is a one-line refusal, not a mix served."""
    chain = Chain(tmp_path, pages=64, depth=1)
    other_base = str(make_mem_file(tmp_path / "other", 64, seed=99))
    other_below = str(tmp_path / "other-layer")
    write_layer(other_below, size=64 * PAGE, pages=[(1, b"o" * PAGE)])
    diff = tmp_path / "diff"
    with open(diff, "wb") as f:
        f.truncate(64 * PAGE)
        f.seek(9 * PAGE)
        f.write(b"d" * PAGE)
    top = str(tmp_path / "top")
    capture_layer(str(diff), parent_chain=[chain.base, *chain.layers], removed=[], out_path=top)

    with LayeredView(chain.base, [*chain.layers, top]) as view:
        assert view.read_page(9) == b"d" * PAGE
    for base, below in ((other_base, chain.layers), (chain.base, [other_below])):
        with pytest.raises(LayerError, match=f"layer {top} was taken over other memory than"):
            LayeredView(base, [*below, top])
        with pytest.raises(LayerError, match="parent fingerprint differs"):
            ChainPages([base, *below, top])
    # The fingerprint is covered by the checksum: a layer cannot be re-tied by editing it.
    raw = bytearray(Path(top).read_bytes())
    raw[48 + 1024] ^= 1
    Path(top).write_bytes(raw)
    with pytest.raises(LayerError, match="checksum mismatch"):
        LayerFile(top)


def test_a_layer_written_without_a_fingerprint_is_not_checked(tmp_path: Path):
    base = make_mem_file(tmp_path / "base", 16)
    path = str(tmp_path / "l")
    write_layer(path, size=16 * PAGE, pages=[(2, b"x" * PAGE)])
    with LayerFile(path) as layer:
        assert layer.parent_fingerprint is None
    with LayeredView(base, [path]) as view:
        assert view.read_page(2) == b"x" * PAGE
