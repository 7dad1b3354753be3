"""Fork memory measured against the kernel's own counters, and KSM sharing with real KVM forks.

Tests that need KSM running turn it on through the ``ksm_on`` fixture, which puts every
setting back as it found it (run, pages_to_scan, sleep_millisecs, ...), even when the test
fails, and checks that it did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from procs import host_lock
from prometheus_client.parser import text_string_to_metric_families
from test_cli_serve import Serve
from test_fc_fanout import FAKE_JAILER, _snapshot

from conftest import PAGE, StartDaemon, needs_kvm, needs_uffd
from pagefork import ksm
from pagefork.cli import main
from pagefork.cli.daemon_cmd import _tune_ksm
from pagefork.demo.density import free_zero_pages
from pagefork.hotpages import HotPageList
from pagefork.memstats import measure
from pagefork.regions import PAGE_SIZE
from pagefork.server import PageServer, ServerConfig
from pagefork.testing.vmm import VmmProcess
from pagefork.vmm.base import RestoreRequest
from pagefork.vmm.firecracker import FirecrackerDriver
from pagefork.vmm.kvm.process import ForkProcess, ForkResult
from pagefork.vmm.kvm.template import MEM_FILE, Template, TemplateSpec, build_template
from pagefork.vmm.kvm.trace import TraceSpec

needs_ksm = pytest.mark.skipif(not ksm.available(), reason="this kernel has no KSM")


@pytest.fixture(autouse=True)
def _host_ksm_lock() -> Iterator[None]:
    # KSM's settings are the host's: two test runs on one host take turns at them.
    with host_lock("ksm"):
        yield


@pytest.fixture
def ksm_on() -> Iterator[None]:
    """KSM running and scanning fast for the test; every setting as found afterwards."""
    found = ksm.settings()
    try:
        with ksm.temporarily(run=1, pages_to_scan=5000, sleep_millisecs=10):
            yield
    finally:
        assert ksm.settings() == found, "KSM settings were not restored"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A 16 MiB microVM template whose forks touch ~40% of RAM and write some of it."""
    path = tmp_path_factory.mktemp("density") / "template"
    trace = TraceSpec(working_set=0.4, fork_share=0.05, write_first_share=0.05, rewrite_share=0.05)
    return build_template(path, TemplateSpec(mem_size=16 << 20, variants=4, trace=trace))


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@contextmanager
def alive_forks(
    tmp_path: Path, template: Template, shares: list[bool]
) -> Iterator[tuple[list[ForkProcess], list[ForkResult]]]:
    """Forks (one per entry: with sharing or not) that ran their trace and stay, stopped."""
    sockets = tmp_path / "sockets"
    sockets.mkdir(exist_ok=True)
    config = ServerConfig(
        mem_file_path=str(template.path / MEM_FILE), socket_dir=str(sockets), on_failure="kill"
    )
    with PageServer(config) as server:
        procs: list[ForkProcess] = []
        try:
            for i, share in enumerate(shares):
                path = server.register_fork(f"f{i}", record=False)
                procs.append(
                    ForkProcess(str(template.path), path, i + 1, snapshots=True, share_memory=share)
                )
            for p in procs:
                p.wait_restored(timeout=30)
                p.go()
            results = [p.wait_result(timeout=60) for p in procs]
            assert all(r.checksum_ok for r in results)
            yield procs, results
        finally:
            for p in procs:
                p.close()


def _wait_merged(procs: list[ForkProcess], timeout: float = 120.0) -> None:
    """Wait until the processes' merged pages stop growing: the same count at three full
    scans of ksmd in a row, at least three scans from now (ksmd's smart scan skips a page
    that did not merge for a few scans, so a scan or two may not be enough)."""
    deadline = time.monotonic() + timeout
    start = last_scan = ksm.counters().full_scans
    counts: list[int] = []
    while True:
        scans = ksm.counters().full_scans
        if scans > last_scan:
            last_scan = scans
            counts.append(sum(measure(p.pid, guest=False).ksm_merging_pages or 0 for p in procs))
            if scans - start >= 3 and len(counts) >= 3 and counts[-1] == counts[-3] > 0:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"merging did not settle within {timeout:g}s: {counts}")
        time.sleep(0.05)  # polling ksmd's scan counter: there is no event to wait on


# --- the flag on the VMM ----------------------------------------------------------------------


@needs_ksm
def test_merge_flag_is_set_before_exec_and_inherited_by_the_vmms_children() -> None:
    script = (
        "import subprocess; "
        "print(open('/proc/self/ksm_stat').read()); "
        "subprocess.run(['cat', '/proc/self/ksm_stat'])"
    )
    shared = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=ksm.merge_preexec,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    plain = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    # Once in the exec'd VMM itself, once in its child (cat).
    assert shared.count("ksm_merge_any: yes") == 2
    assert plain.count("ksm_merge_any: no") == 2
    assert not ksm.memory_merge_enabled()  # the launcher itself is left alone


# --- figures against the kernel's --------------------------------------------------------------


@needs_kvm
def test_fork_memory_agrees_with_the_kernel_and_zero_pages_stay_free(
    tmp_path: Path, template: Template
) -> None:
    with alive_forks(tmp_path, template, [False, False]) as (procs, results):
        for p, r in zip(procs, results, strict=True):
            m = measure(p.pid)
            # The kernel's own totals for the process, read while it is stopped.
            assert m.rss == _status_kb(p.pid, "VmRSS")
            assert m.anonymous == _status_kb(p.pid, "RssAnon")
            assert m.pss <= m.rss and m.private + m.shared == m.rss
            # Guest RAM is the userfaultfd-registered memory: all of it, and exactly the
            # pages the guest touched, less those the template holds as zero and the guest
            # only read (UFFDIO_ZEROPAGE maps the shared zero page: not in Rss).
            assert m.guest_size == template.mem_size
            touched = template.touched_pages(r.variant)
            free = free_zero_pages(template, r.variant)
            assert len(free) > 100
            assert m.guest_rss == (len(touched) - len(free)) * PAGE_SIZE
            assert m.guest_pss == m.guest_private == m.guest_rss  # nothing shared yet
            assert m.merge_any is False and m.ksm_merging_pages == 0
            # What the fork measured of itself at ready: the same guest memory.
            assert r.memory["guest_rss_bytes"] == m.guest_rss


@needs_kvm
@needs_ksm
def test_forks_that_share_merge_what_they_hold_in_common_and_others_do_not(
    tmp_path: Path, template: Template, ksm_on: None
) -> None:
    with alive_forks(tmp_path, template, [True, True, True, False]) as (procs, results):
        *shared, plain = procs
        before = [measure(p.pid) for p in shared]
        assert [m.merge_any for m in before] == [True] * 3
        _wait_merged(shared)
        after = [measure(p.pid) for p in shared]
        data_pages = [
            len(template.touched_pages(r.variant)) - len(free_zero_pages(template, r.variant))
            for r in results[:-1]
        ]
        for m, pages in zip(after, data_pages, strict=True):
            assert m.merge_any is True
            # Most of a fork's guest data is the template's bytes, also in the other forks:
            # only its own pages (its trace, its writes) stay private.
            assert m.guest_ksm >= 0.7 * pages * PAGE_SIZE
            assert m.ksm_merging_pages is not None
            assert m.ksm_merging_pages * PAGE_SIZE >= m.guest_ksm
        # Their guest memory together costs well under half of the pages they map (Rss counts
        # a merged page in each fork that maps it; Pss divides it among them).
        guest = sum(m.guest_pss for m in after)
        assert guest < 0.5 * sum(m.guest_rss for m in after)
        # The fork without the flag merged nothing, though it holds the same bytes.
        p = measure(plain.pid)
        assert p.merge_any is False and p.ksm_merging_pages == 0 and p.guest_ksm == 0
        # Every page KSM merged on this host is one of these forks': the per-process counts
        # add up to the global ones (read until no scan ran in between).
        for _ in range(100):
            c0 = ksm.counters()
            merging = sum(measure(q.pid, guest=False).ksm_merging_pages or 0 for q in shared)
            c1 = ksm.counters()
            if (c0.pages_shared, c0.pages_sharing) == (c1.pages_shared, c1.pages_sharing):
                break
        assert merging == c1.pages_shared + c1.pages_sharing


@needs_ksm
def test_ksm_settings_come_back_when_the_block_fails() -> None:
    found = ksm.settings()
    with pytest.raises(RuntimeError, match="boom"), ksm.temporarily(run=1, pages_to_scan=1234):
        assert ksm.running() and ksm.settings()["pages_to_scan"] == "1234"
        raise RuntimeError("boom")
    assert ksm.settings() == found


# --- the demo, the daemon ---------------------------------------------------------------------


@needs_kvm
@needs_ksm
def test_demo_share_memory_reports_both_bursts_side_by_side(
    capsys: pytest.CaptureFixture[str], ksm_on: None
) -> None:
    code = main(["demo", "--mem-size", "16", "--forks", "3", "--share-memory", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    for mode in ("demand", "prefetch"):  # memory per fork next to its ready time
        for f in doc["modes"][mode]["per_fork"]:
            assert f["memory"]["pss_bytes"] > 0 and f["ready_ms"] > 0
    unshared, shared = doc["memory"]["unshared"], doc["memory"]["shared"]
    for m in (unshared, shared):
        assert {"pss_total_bytes", "per_fork_pss_bytes", "converge_s"} <= set(m)
        assert m["forks"] == 3 and m["checksums_ok"]
        assert m["pss_total_bytes"] == sum(f["pss_bytes"] for f in m["per_fork"])
    assert unshared["converge_s"] == 0.0 and unshared["ksm_merging_pages"] == 0
    assert shared["converge_s"] is not None and shared["ksm_merging_pages"] > 0
    assert shared["guest_pss_total_bytes"] < 0.6 * unshared["guest_pss_total_bytes"]


@needs_kvm
@needs_ksm
def test_daemon_template_shares_memory_and_reports_each_forks_memory(
    start_daemon: StartDaemon,
) -> None:
    _, client = start_daemon()
    created = client.create_template("vm", "kvm", mem_size_mib=16, variants=4, share_memory=True)
    assert created["share_memory"] is True
    # KSM is off on this host unless someone turned it on: then the creation says so.
    assert created.get("note") == ksm.off_note()
    assert client.template("vm")["share_memory"] is True
    plain = client.create_template("plain", "kvm", mem_size_mib=16, variants=4)
    assert plain["share_memory"] is False and "note" not in plain

    forks = {}
    for t in ("vm", "plain"):
        fork = client.create_fork(t, vmm="kvm", options={"fork_index": 1, "snapshots": True})
        assert client.wait_fork(fork["fork"], timeout=60)["vmm"]["checksum_ok"]
        forks[t] = fork
    shown = {t: client.fork(f["fork"]) for t, f in forks.items()}
    assert shown["vm"]["memory"]["merge_any"] is True
    assert shown["plain"]["memory"]["merge_any"] is False
    for doc in shown.values():
        m = doc["memory"]
        assert m["pid"] == doc["pid"]
        assert m["rss_bytes"] == _status_kb(doc["pid"], "VmRSS")
        assert m["guest_rss_bytes"] > 0 and m["guest_size_bytes"] == 16 << 20
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.metrics())
        for s in family.samples
    }
    vm_fork = forks["vm"]["fork"]
    for t, doc in shown.items():
        for kind in ("rss", "guest_rss"):
            per_fork = samples[
                (
                    "pagefork_fork_memory_bytes",
                    (("fork", doc["fork"]), ("kind", kind), ("template", t)),
                )
            ]
            # Same guest pages at scrape time (the guest is stopped): the same figure.
            if kind == "guest_rss":
                assert per_fork == doc["memory"]["guest_rss_bytes"]
            total = samples[("pagefork_memory_bytes", (("kind", kind), ("template", t)))]
            assert total == per_fork  # one live fork per template
    assert samples[("pagefork_ksm_merging_pages", (("template", "plain"),))] == 0
    assert vm_fork in {f["fork"] for f in client.forks()}
    released = client.release_fork(forks["vm"]["fork"])
    assert released["memory"]["guest_rss_bytes"] == shown["vm"]["memory"]["guest_rss_bytes"]
    client.release_fork(forks["plain"]["fork"])


# --- serve's fork_end --------------------------------------------------------------------------


@needs_uffd
def test_serve_fork_end_carries_the_vmms_memory(
    tmp_path: Path, mem_file: Path, vmms: Callable[..., VmmProcess]
) -> None:
    # A hot set of 64 pages (16 of them zero: every 4th page of the mem-file): serve measures a
    # fork's VMM when it connects, before the prefetch, so prefetch_done says it was measured.
    hot = tmp_path / "hot.hpl"
    HotPageList.from_pages((0, k * PAGE) for k in range(64, 128)).save(hot)
    sock = tmp_path / "s.sock"
    serve = Serve(
        "--mem-file", str(mem_file), "--socket", str(sock), "--hot-pages", str(hot),
        "--memory-interval", "30",
    )  # fmt: skip
    serve.wait_for("listening")
    # A VMM that dies: the kernel drops its memory before its fds, so nothing is left to read
    # when its session ends: the figures are its last sample, from before it held any page.
    gone = vmms(str(sock))
    serve.wait_for("prefetch_done")
    assert gone.send(cmd="touch", pages=[[0, 0]])["bad"] == 0
    gone.kill()
    (first,) = serve.wait_for("fork_end")
    assert first["memory"]["pid"] == gone.pid and first["memory"]["guest_rss_bytes"] == 0
    # A VMM still alive when its session ends (the server stops): read afresh at the end.
    live = vmms(str(sock))
    serve.wait_for("prefetch_done", count=2)
    pages = [[0, k * PAGE] for k in range(64)]
    assert live.send(cmd="touch", pages=pages)["bad"] == 0
    code, err = serve.stop()
    assert code == 0, err
    end = [e for e in serve.events if e["event"] == "fork_end"][1]
    m = end["memory"]
    assert m["pid"] == live.pid and m["age_s"] < 1
    assert m["guest_size_bytes"] == 12 << 20  # both regions: all the uffd-registered memory
    # 48 data pages prefetched and 48 touched; the zero pages of each are the shared zero page.
    assert m["guest_rss_bytes"] == 96 * PAGE
    assert m["peak_pss_bytes"] >= m["pss_bytes"] > 0


# --- the Firecracker driver under the jailer ---------------------------------------------------


@needs_uffd
def test_a_jailed_firecracker_is_mergeable_only_for_a_sharing_template(
    tmp_path: Path,
    mem_file: Path,
    make_server: Callable[..., PageServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = Path(tempfile.mkdtemp(prefix="pf-jail-", dir="/tmp"))  # short: sun_path
    try:
        binary = tmp_path / "jailer"
        binary.write_text(FAKE_JAILER.format(python=sys.executable))
        binary.chmod(0o755)
        monkeypatch.setenv("FAKE_JAILER_LOG", str(tmp_path / "jailer.log"))
        monkeypatch.setenv("FAKE_FC_VERSION", "1.16")
        jailer = {
            "binary": str(binary),
            "exec_file": "/usr/bin/firecracker",
            "chroot_base": str(base),
            "uid": os.getuid(),
            "gid": os.getgid(),
        }
        server = make_server()
        snapshot = _snapshot(tmp_path, mem_file)
        for share in (True, False):
            fork = f"jail-{share}"
            request = RestoreRequest(
                fork,
                server.register_fork(fork),
                snapshot,
                "unused",
                {"jailer": jailer},
                share_memory=share,
            )
            handle = FirecrackerDriver().restore(request, timeout=20)
            try:
                # The Firecracker (double) the jailer exec'd: the flag went through both execs.
                assert handle.pid is not None and handle.pid != os.getpid()
                assert measure(handle.pid, guest=False).merge_any is share
            finally:
                handle.stop()
    finally:
        shutil.rmtree(base)


@needs_ksm
def test_daemon_tunes_the_scan_rate_only_when_asked_and_never_starts_ksm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with ksm.temporarily() as found:  # nothing set; every setting back afterwards
        ksm.write_setting("run", 0)
        _tune_ksm(4321)
        assert ksm.settings()["pages_to_scan"] == "4321"
        assert not ksm.running()
        err = capsys.readouterr().err
        assert err.strip() == f"pagefork: {ksm.off_note()}"
    assert ksm.settings() == {**found}
    code = main(["daemon", "--state-dir", "/nonexistent", "--ksm-pages-to-scan", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().endswith("--ksm-pages-to-scan must be in 1..1000000, not 0")
    assert ksm.settings() == found
