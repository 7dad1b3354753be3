"""The daemon serving templates from object storage: ``POST /templates {"source": ...}`` and
``pagefork templates create ID --from s3://...`` (a real moto server, real uffd faults)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PAGE, StartDaemon, make_mem_file, needs_uffd
from pagefork.daemon.client import DaemonError
from pagefork.hotpages import HotPageList
from pagefork.store.cache import ChunkCache
from pagefork.store.client import make_client
from pagefork.store.layout import parse_s3_url
from pagefork.store.lazy import StoreOptions
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3Proxy
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd
MIB = 1 << 20


def _push(tmp_path: Path, url: str, endpoint: str, seed: int) -> Path:
    mem = make_mem_file(tmp_path / f"mem-{seed}", 3072, seed=seed)
    hot = HotPageList.from_pages([(0, (4 * i + 1) * PAGE) for i in range(40)])
    hot.save(tmp_path / f"hot-{seed}.hpl")
    (tmp_path / "vmstate").write_bytes(b"vm state bytes")
    push(
        parse_s3_url(url),
        str(mem),
        make_client(endpoint),
        hot_pages=str(tmp_path / f"hot-{seed}.hpl"),
        vmstate=str(tmp_path / "vmstate"),
        chunk_size=MIB,
    )
    return mem


def test_daemon_forks_two_templates_from_the_store_through_one_cache(
    start_daemon: StartDaemon, tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    mem_a = _push(tmp_path, f"s3://{s3_bucket}/a", s3_endpoint, seed=1)
    mem_b = _push(tmp_path, f"s3://{s3_bucket}/b", s3_endpoint, seed=2)
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    _, client = start_daemon(drivers={}, store=StoreOptions(cache=cache, endpoint_url=s3_endpoint))
    a = client.create_template_from("a", f"s3://{s3_bucket}/a")
    assert a["mem_file"].startswith(f"s3://{s3_bucket}/a#sha256=") and a["mem_size"] == 12 * MIB
    assert a["has_hot_pages"] and Path(a["snapshot_path"]).read_bytes() == b"vm state bytes"
    client.create_template_from("b", f"s3://{s3_bucket}/b", name="second")
    for tid, mem in (("a", mem_a), ("b", mem_b)):
        fork = client.create_fork(tid, fork_id=f"{tid}-1")
        vmm = VmmProcess(fork["socket"], str(mem), ("8M", "4M"))
        try:
            result = client.prefetch(f"{tid}-1", timeout=30)
            # Pushed with its hot set: the hot pack's 40 pages are fetched, not their chunk.
            assert result["installed"] == 40 and result["fetched_bytes"] == 40 * PAGE
            bridged = result["bridged_bytes"] // 4096
            assert vmm.send(cmd="touch", all=True)["bad"] == 0
        finally:
            vmm.close()
        stats = client.release_fork(f"{tid}-1")["stats"]
        assert stats["errors"] == 0 and stats["faults"] == 3072 - 40 - bridged
    # One cache for both templates: 12 chunks each, all distinct content.
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 24
    client.delete_template("a")  # only the local record goes; the store is left alone
    assert make_client(s3_endpoint).head_object(Bucket=s3_bucket, Key="a/manifest.json")


def test_a_template_keeps_the_manifest_it_was_made_from(
    start_daemon: StartDaemon, tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    """A new push to the same prefix changes neither the memory nor the vmstate of a template
    made before it (pinned by the manifest's SHA-256); deleting the pinned manifest and its
    chunks fails the template's forks with an error that says so."""
    url = f"s3://{s3_bucket}/v"
    mem_v1 = _push(tmp_path, url, s3_endpoint, seed=1)
    _, client = start_daemon(
        drivers={},
        store=StoreOptions(
            cache=ChunkCache(str(tmp_path / "cache"), 1 << 30), endpoint_url=s3_endpoint
        ),
    )
    client.create_template_from("v1", url)
    (tmp_path / "vmstate").write_bytes(b"vm state of v2")
    mem_v2 = make_mem_file(tmp_path / "mem-v2", 3072, seed=2)
    push(parse_s3_url(url), str(mem_v2), make_client(s3_endpoint), chunk_size=MIB)
    client.create_template_from("v2", url)
    for tid, mem in (("v1", mem_v1), ("v2", mem_v2)):
        fork = client.create_fork(tid, fork_id=f"{tid}-1")
        vmm = VmmProcess(fork["socket"], str(mem), ("8M", "4M"))
        try:
            assert vmm.send(cmd="touch", all=True)["bad"] == 0
        finally:
            vmm.close()
        assert client.release_fork(f"{tid}-1")["stats"]["errors"] == 0
    assert Path(client.template("v1")["snapshot_path"]).read_bytes() == b"vm state bytes"

    # Pinned manifest and chunks deleted: a new template from the pin is refused, naming it.
    s3 = make_client(s3_endpoint)
    pinned = client.template("v1")["mem_file"]
    sha = pinned.rsplit("=", 1)[1]
    s3.delete_object(Bucket=s3_bucket, Key=f"v/manifests/{sha}.json")
    with pytest.raises(DaemonError, match="pinned to is gone from the bucket") as info:
        client.create_template_from("again", pinned)
    assert info.value.status == 400


def test_creates_from_a_hung_store_never_hold_up_quick_requests(
    start_daemon: StartDaemon, tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    """More ``POST /templates {"source"}`` waiting on a hung store than the daemon has threads
    for quick requests: they run on the long pool, so a listing is still answered at once."""
    _push(tmp_path, f"s3://{s3_bucket}/h", s3_endpoint, seed=1)
    with S3Proxy(s3_endpoint) as proxy:
        _, client = start_daemon(
            drivers={},
            store=StoreOptions(cache=ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url),
        )
        proxy.hang("manifest.json")
        errors: list[BaseException] = []

        def create(i: int) -> None:
            try:
                client.create_template_from(f"h{i}", f"s3://{s3_bucket}/h")
            except DaemonError as exc:
                errors.append(exc)

        creates = [threading.Thread(target=create, args=(i,)) for i in range(17)]
        for t in creates:
            t.start()
        deadline = time.monotonic() + 30
        while proxy.requests < 17 and time.monotonic() < deadline:  # all 17 at the store
            time.sleep(0.05)
        assert proxy.requests >= 17
        started = time.monotonic()
        assert client.templates()["templates"] == []
        assert time.monotonic() - started < 5
    for t in creates:  # the proxy closed: the store is gone, each create fails, named
        t.join(60)
    assert len(errors) == 17 and all(e.status == 400 for e in errors)  # type: ignore[attr-defined]


def test_a_bad_source_is_a_400_naming_it(
    start_daemon: StartDaemon, tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    _, client = start_daemon(
        drivers={},
        store=StoreOptions(cache=ChunkCache(str(tmp_path / "c")), endpoint_url=s3_endpoint),
    )
    with pytest.raises(DaemonError, match=r"manifest\.json: no such object") as info:
        client.create_template_from("x", f"s3://{s3_bucket}/missing")
    assert info.value.status == 400
    with pytest.raises(DaemonError, match="give a prefix") as info:
        client.create_template_from("x", "s3://bucket")
    assert info.value.status == 400
    assert client.templates()["templates"] == []


def test_templates_create_from_on_the_command_line(
    start_daemon: StartDaemon, tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    _push(tmp_path, f"s3://{s3_bucket}/cli", s3_endpoint, seed=3)
    _, client = start_daemon(
        drivers={},
        store=StoreOptions(cache=ChunkCache(str(tmp_path / "c")), endpoint_url=s3_endpoint),
    )
    control = client.control_path
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagefork",
            "templates",
            "create",
            "t",
            "--from",
            f"s3://{s3_bucket}/cli",
            "--control",
            control,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    assert client.template("t")["mem_file"].startswith(f"s3://{s3_bucket}/cli#sha256=")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagefork",
            "templates",
            "create",
            "u",
            "--from",
            f"s3://{s3_bucket}/cli",
            "--microvm",
            "--control",
            control,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--from takes no --microvm" in bad.stderr


def test_a_hot_set_recorded_here_is_pushed_with_its_hot_pack_for_cold_hosts(
    start_daemon: StartDaemon, tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    url = f"s3://{s3_bucket}/rec"
    mem = make_mem_file(tmp_path / "mem", 3072, seed=4)
    push(parse_s3_url(url), str(mem), make_client(s3_endpoint), chunk_size=MIB)  # no hot set
    store = StoreOptions(
        cache=ChunkCache(str(tmp_path / "cache"), 1 << 30), endpoint_url=s3_endpoint
    )
    here, client = start_daemon(drivers={}, store=store)
    client.create_template_from("rec", url)
    fork = client.create_fork("rec", fork_id="warm")
    assert fork["role"] == "warmup"
    touched = [[0, (4 * i + 1) * PAGE] for i in range(30)]  # none of them a zero page
    vmm = VmmProcess(fork["socket"], str(mem), ("8M", "4M"))
    try:
        # A VMM the caller drives asks for the prefetch before it resumes (a warm-up has
        # nothing to install): the daemon learns the guest's memory layout from it.
        assert client.prefetch("warm", timeout=30)["installed"] == 0
        assert vmm.send(cmd="touch", pages=touched)["bad"] == 0
    finally:
        vmm.close()
    client.release_fork("warm")  # the warm-up's hot set is saved, then pushed
    s3 = make_client(s3_endpoint)
    deadline = time.monotonic() + 60
    while True:
        doc = json.loads(s3.get_object(Bucket=s3_bucket, Key="rec/manifest.json")["Body"].read())
        if doc.get("hot_pack") is not None:
            break
        assert time.monotonic() < deadline, "the hot set was never pushed"
        time.sleep(0.05)
    assert doc["hot_pack"]["size"] == 30 * PAGE  # exactly the recorded pages
    # A cold host (its own cache) made from the prefix prefetches just those pages.
    here.close()
    cold = StoreOptions(cache=ChunkCache(str(tmp_path / "cold"), 1 << 30), endpoint_url=s3_endpoint)
    _, other = start_daemon(drivers={}, store=cold, state_dir=tmp_path / "state2")
    other.create_template_from("rec", url)
    later = other.create_fork("rec", fork_id="later")
    assert later["role"] == "prefetch"
    vmm = VmmProcess(later["socket"], str(mem), ("8M", "4M"))
    try:
        result = other.prefetch("later", timeout=30)
        assert result["installed"] == 30 and result["fetched_bytes"] == 30 * PAGE
        assert vmm.send(cmd="touch", pages=touched)["bad"] == 0
    finally:
        vmm.close()
