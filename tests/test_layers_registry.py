"""Child templates in the registry: create_child, the delete guard, flatten."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import PAGE, make_mem_file
from pagefork.cli import main
from pagefork.errors import TemplateError
from pagefork.layers.format import write_layer
from pagefork.layers.source import LayeredView
from pagefork.templates import RECORD_FILE, TemplateFieldError, TemplateRegistry

PAGES = 256


def _layer(tmp: Path, name: str, seed: int, expected: bytearray) -> Path:
    """A layer changing some pages and zeroing a run; applied to ``expected`` too."""
    rng = random.Random(seed)
    pages = []
    for p in rng.sample(range(PAGES), 20):
        data = rng.randbytes(PAGE)
        pages.append((p, data))
        expected[p * PAGE : (p + 1) * PAGE] = data
    free = next(p for p in range(0, PAGES, 4) if all(q not in dict(pages) for q in range(p, p + 4)))
    expected[free * PAGE : (free + 4) * PAGE] = bytes(4 * PAGE)
    path = tmp / name
    write_layer(str(path), size=PAGES * PAGE, pages=pages, zero_runs=[(free, 4)])
    return path


@pytest.fixture
def family(tmp_path: Path):
    """A root template ``base``, its child ``kid`` and grandchild ``grandkid``, and the bytes
    each must read."""
    reg = TemplateRegistry(tmp_path / "state")
    mem = make_mem_file(tmp_path / "mem", PAGES)
    state = tmp_path / "vmstate"
    state.write_bytes(b"state")
    reg.create_from_snapshot("base", mem, state, copy=True)  # base owns its mem-file
    expected = {"base": bytearray(mem.read_bytes())}
    expected["kid"] = bytearray(expected["base"])
    kid_layer = _layer(tmp_path, "kid.pfl", 1, expected["kid"])
    reg.create_child("kid", "base", kid_layer, state)
    expected["grandkid"] = bytearray(expected["kid"])
    grand_layer = _layer(tmp_path, "grand.pfl", 2, expected["grandkid"])
    reg.create_child("grandkid", "kid", grand_layer, state)
    return reg, expected


def _read(reg: TemplateRegistry, template_id: str) -> bytes:
    record = reg.get(template_id)
    with LayeredView(record.mem_file, record.layers) as view:
        return b"".join(view.read_page(p) for p in range(PAGES))


def test_a_child_record_names_its_parent_and_its_chain(family, tmp_path: Path):
    reg, expected = family
    kid, grand = reg.get("kid"), reg.get("grandkid")
    assert kid.parent == "base" and grand.parent == "kid"
    assert kid.mem_file == grand.mem_file == reg.get("base").mem_file
    assert grand.layers == [*kid.layers, str(reg.directory("grandkid") / "layer.pfl")]
    assert (tmp_path / "kid.pfl").exists()  # the caller's file is left as it was
    # ... and copied, not linked: rewriting it in place must not change the template.
    assert (tmp_path / "kid.pfl").stat().st_ino != Path(kid.layers[-1]).stat().st_ino
    for name in ("base", "kid", "grandkid"):
        assert _read(reg, name) == bytes(expected[name]), name
    doc = json.loads((reg.directory("kid") / RECORD_FILE).read_text())
    assert doc["parent"] == "base" and doc["layers"] == kid.layers


def test_a_parent_with_children_cannot_be_deleted_and_the_error_names_them(family):
    reg, _ = family
    with pytest.raises(
        TemplateError,
        match=r"^template 'base' has templates layered over it: grandkid, kid; delete or flatten",
    ):
        reg.delete("base")
    with pytest.raises(TemplateError, match="template 'kid' has templates layered over it: grand"):
        reg.delete("kid")
    reg.delete("grandkid")
    reg.delete("kid")
    reg.delete("base")
    assert reg.listing().templates == []


def test_flatten_equals_the_chain_and_frees_the_parent(family):
    reg, expected = family
    before = _read(reg, "grandkid")
    flat = reg.flatten("grandkid")
    assert flat.layers == [] and flat.parent is None
    assert Path(flat.mem_file).read_bytes() == before == bytes(expected["grandkid"])
    # Its layer stays (a server starting from the old record may be opening it) ...
    assert (reg.directory("grandkid") / "layer.pfl").exists()
    reg.delete("kid")  # ... but no template depends on kid any more
    with pytest.raises(TemplateError, match="has no layers: nothing to flatten"):
        reg.flatten("grandkid")
    assert _read(reg, "grandkid") == bytes(expected["grandkid"])


def test_flattening_a_middle_template_keeps_the_layer_its_child_uses(family):
    reg, expected = family
    reg.flatten("kid")
    assert (reg.directory("kid") / "layer.pfl").exists()  # grandkid's chain still names it
    assert _read(reg, "kid") == bytes(expected["kid"])
    assert _read(reg, "grandkid") == bytes(expected["grandkid"])
    # kid no longer needs base, but grandkid still reads base's files: base stays.
    with pytest.raises(TemplateError, match="'base' has templates layered over it: grandkid;"):
        reg.delete("base")
    with pytest.raises(TemplateError, match="'kid' has templates layered over it: grandkid;"):
        reg.delete("kid")
    reg.flatten("grandkid")
    reg.delete("base")
    reg.delete("kid")
    assert _read(reg, "grandkid") == bytes(expected["grandkid"])


def test_create_child_refuses_a_bad_layer_and_an_unknown_parent(family, tmp_path: Path):
    reg, _ = family
    state = tmp_path / "vmstate"
    other = tmp_path / "other.pfl"
    write_layer(str(other), size=2 * PAGES * PAGE, pages=[(0, b"x" * PAGE)])
    with pytest.raises(TemplateFieldError, match="is for 2097152 bytes of memory, but template"):
        reg.create_child("c", "base", other, state)
    (tmp_path / "junk.pfl").write_bytes(b"junk")
    with pytest.raises(TemplateFieldError, match=r"field 'layer': layer .*junk.pfl: not a"):
        reg.create_child("c", "base", tmp_path / "junk.pfl", state)
    with pytest.raises(TemplateError, match="unknown template 'nope'"):
        reg.create_child("c", "nope", tmp_path / "kid.pfl", state)
    assert not reg.exists("c") and not any(e.name.startswith(".new") for e in reg.root.iterdir())


def test_create_child_flattens_past_the_configured_depth(family, tmp_path: Path):
    reg, expected = family
    extra = bytearray(expected["grandkid"])
    layer = _layer(tmp_path, "third.pfl", 3, extra)
    record = reg.create_child("third", "grandkid", layer, tmp_path / "vmstate", flatten_past=2)
    assert record.layers == [] and record.parent is None
    assert Path(record.mem_file).read_bytes() == bytes(extra)


def test_records_of_older_versions_without_layers_read_as_roots(family):
    reg, _ = family
    path = reg.directory("base") / RECORD_FILE
    doc = json.loads(path.read_text())
    del doc["parent"], doc["layers"]
    path.write_text(json.dumps(doc))
    record = reg.get("base")
    assert record.parent is None and record.layers == []
    doc["layers"] = [1]
    path.write_text(json.dumps(doc))
    with pytest.raises(TemplateError, match="field 'layers' has a wrong type"):
        reg.get("base")


def test_cli_flatten_and_the_delete_guard_through_the_daemon(
    start_daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    daemon, client = start_daemon()
    ctl = ["--control", client.control_path]
    mem = make_mem_file(tmp_path / "mem", PAGES)
    (tmp_path / "snap").write_bytes(b"state")
    client.create_template(
        "base", "firecracker", mem_file=str(mem), snapshot_path=str(tmp_path / "snap")
    )
    expected = bytearray(mem.read_bytes())
    daemon.registry.create_child(
        "kid", "base", _layer(tmp_path, "l", 4, expected), tmp_path / "snap"
    )
    assert main(["templates", "delete", "base", *ctl]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "has templates layered over it: kid; delete or flatten them first" in err[0]
    )
    assert main(["templates", "flatten", "kid", *ctl, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layers"] == [] and doc["parent"] is None
    assert Path(doc["mem_file"]).read_bytes() == bytes(expected)
    assert main(["templates", "flatten", "kid", *ctl]) == 2
    assert "has no layers: nothing to flatten" in capsys.readouterr().err
    assert main(["templates", "delete", "base", *ctl]) == 0
    assert main(["templates", "flatten", "nope", *ctl]) == 2
    assert "unknown template 'nope'" in capsys.readouterr().err


def test_a_child_of_a_template_that_shares_memory_shares_it_too(tmp_path: Path) -> None:
    reg = TemplateRegistry(tmp_path / "state")
    mem = make_mem_file(tmp_path / "mem", PAGES)
    state = tmp_path / "vmstate"
    state.write_bytes(b"state")
    reg.create_from_snapshot("shared", mem, state, copy=True)
    reg.set_share_memory("shared", True)
    reg.create_from_snapshot("plain", mem, state, copy=True)
    for parent in ("shared", "plain"):
        layer = _layer(tmp_path, f"{parent}.pfl", 3, bytearray(mem.read_bytes()))
        kid = reg.create_child(f"{parent}-kid", parent, layer, state)
        assert kid.share_memory is (parent == "shared")
        assert reg.get(f"{parent}-kid").share_memory is (parent == "shared")  # as stored
