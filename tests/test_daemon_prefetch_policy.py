"""A template's prefetch policy in the daemon: ``before-resume`` (the default), or ``stream``
with a head, where the VMM resumes once the head of the hot set is in and the rest streams
while the guest runs. Forks of a Firecracker double, whose guest reads every page and checks
its bytes against the template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import StartDaemon, needs_uffd
from pagefork.cli import main
from pagefork.daemon.client import DaemonClient, DaemonError
from pagefork.daemon.fork import Fork
from pagefork.daemon.service import Daemon
from pagefork.testing.fcdouble import FcDoubleProcess
from pagefork.vmm.firecracker import create_snapshot

PAGES = (8 << 20) // 4096
#: The default recording window: a quarter of guest memory.
WINDOW = PAGES // 4
HEAD = 32


def _fork_of(
    daemon: Daemon, client: DaemonClient, short_dir: Path, name: str, **policy: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fork in a Firecracker double the daemon restores, prefetches and resumes: its
    guest's run (every page read and checked) and its prefetch report once final."""
    with FcDoubleProcess(str(short_dir / f"{name}.api")) as fc:
        fork = client.create_fork(
            "fc", vmm="firecracker", options={"api_socket": fc.api_sock}, **policy
        )
        run = fc.result(wait=30)
        requests = [(r["method"], r["path"]) for r in fc.requests()]
        manager = daemon.manager
        final = manager.hot_sets.wait_streamed(manager.fork(fork["fork"]), timeout=30)
        shown = client.fork(fork["fork"])["prefetch"]
        client.release_fork(fork["fork"])
    assert (run["touched"], run["checked"], run["bad"]) == (PAGES, True, 0), run
    assert requests[1:3] == [("PUT", "/snapshot/load"), ("PATCH", "/vm")]
    assert shown == final
    return fork, shown


@needs_uffd
def test_a_stream_policy_resumes_after_the_head_and_streams_the_rest(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    daemon, client = start_daemon()
    with FcDoubleProcess(str(short_dir / "source.api")) as source:
        source.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
        source.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        snap, mem = str(tmp_path / "tpl.vmstate"), str(tmp_path / "tpl.mem")
        create_snapshot(source.api_sock, snap, mem)
    created = client.create_template(
        "fc",
        "firecracker",
        mem_file=mem,
        snapshot_path=snap,
        prefetch_policy="stream",
        prefetch_head=HEAD,
    )
    assert (created["prefetch_policy"], created["prefetch_head"]) == ("stream", HEAD)
    warm, _ = _fork_of(daemon, client, short_dir, "warm")
    assert warm["role"] == "warmup" and client.template("fc")["hot_pages"] == WINDOW

    # The template's policy: the head goes in before resume, the rest while the guest runs.
    _, streamed = _fork_of(daemon, client, short_dir, "streamed")
    assert (streamed["policy"], streamed["head"], streamed["streaming"]) == ("stream", HEAD, False)
    assert "stream_error" not in streamed
    # Whole runs go in, so the head may be a little more than HEAD pages.
    assert HEAD <= streamed["before_resume"] <= WINDOW
    # Whether the rest goes in before the VMM's resume completes, after it, or by the guest's
    # own faults (demand faults go ahead of stream slices) is timing: the stream's own tests
    # decide it with a stopped worker. What is not timing: the resume waited for the head only.
    assert 0 < streamed["head_seconds"] <= streamed["seconds"]  # the resume waited this long
    assert streamed["before_resume"] + streamed["after_resume"] == streamed["installed"]
    # Every hot page went in once, or was found present: faulted in first by the guest (a
    # race with the stream) or by the snapshot load (Firecracker's VMGenID write).
    assert streamed["installed"] + streamed["already_present"] == WINDOW
    assert 0 <= streamed["raced"] <= streamed["already_present"]

    # A fork's own policy overrides its template's: all of the hot set before resume.
    _, whole = _fork_of(daemon, client, short_dir, "whole", prefetch_policy="before-resume")
    assert (whole["policy"], whole["head"], whole["streaming"]) == ("before-resume", None, False)
    assert whole["before_resume"] == whole["installed"] and whole["installed"] >= WINDOW - 1
    assert (whole["after_resume"], whole["raced"]) == (0, 0)

    # The policy is the template's own: kept in its record, across a restart.
    daemon.close()
    _, client = start_daemon()
    shown = client.template("fc")
    assert (shown["prefetch_policy"], shown["prefetch_head"]) == ("stream", HEAD)


def test_invalid_prefetch_policies_get_400_naming_the_field(
    start_daemon: StartDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = start_daemon(drivers={})
    mem, snap = tmp_path / "mem", tmp_path / "snap"
    mem.write_bytes(bytes(8 * 4096))
    snap.write_bytes(b"state")
    template = {"id": "fc", "kind": "firecracker", "mem_file": str(mem), "snapshot_path": str(snap)}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prefetch_policy": "eager"}, "field 'prefetch_policy': unknown policy 'eager'"),
        ({"prefetch_policy": 3}, "field 'prefetch_policy' must be of type str"),
        ({"prefetch_policy": "stream"}, "field 'prefetch_head' is required"),
        ({"prefetch_policy": "stream", "prefetch_head": -1}, "field 'prefetch_head' must be"),
        ({"prefetch_policy": "stream", "prefetch_head": 10**12}, "field 'prefetch_head' must be"),
        ({"prefetch_policy": "stream", "prefetch_head": 1.5}, "field 'prefetch_head' must be of"),
        ({"prefetch_policy": "stream", "prefetch_head": True}, "field 'prefetch_head' must be of"),
        ({"prefetch_head": 8}, "field 'prefetch_head' needs prefetch_policy 'stream'"),
        (
            {"prefetch_policy": "before-resume", "prefetch_head": 8},
            "field 'prefetch_head': only prefetch_policy 'stream' takes a head",
        ),
    ]
    for fields, message in cases:
        with pytest.raises(DaemonError) as info:
            client.request("POST", "/templates", {**template, **fields})
        assert (info.value.status, message in str(info.value)) == (400, True), (fields, info.value)
    assert client.templates()["templates"] == []  # nothing was made

    # Without a policy the template follows the daemon's default, before-resume.
    created = client.request("POST", "/templates", template)
    assert (created["prefetch_policy"], created["prefetch_head"]) == (None, None)
    for fields, message in cases:
        with pytest.raises(DaemonError) as info:
            client.request("POST", "/forks", {"template": "fc", **fields})
        assert (info.value.status, message in str(info.value)) == (400, True), (fields, info.value)
    assert client.forks() == []  # nothing was registered

    # The command line passes both options through, and shows the daemon's refusal in one line.
    ctl = ["--control", client.control_path]
    stream = ["--prefetch-policy", "stream", "--prefetch-head"]
    assert main(["forks", "create", "fc", *stream, "-1", *ctl]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'prefetch_head' must be" in err[0], err
    assert main(["forks", "create", "fc", "--id", "f1", *stream, "16", *ctl, "--json"]) == 0
    capsys.readouterr()
    assert [f["fork"] for f in client.forks()] == ["f1"]
    assert (
        main(
            [
                "templates",
                "create",
                "fc2",
                "--mem-file",
                str(mem),
                "--snapshot",
                str(snap),
                *stream,
                "16",
                *ctl,
                "--json",
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert (shown["prefetch_policy"], shown["prefetch_head"]) == ("stream", 16)


def test_a_fork_handed_over_mid_stream_gets_a_final_report_saying_so(
    start_daemon: StartDaemon,
) -> None:
    # A live takeover carries each fork's prefetch report as it stood; the stream's waiter
    # stayed with the old daemon. A report still "streaming" on arrival would never settle:
    # the new daemon makes it final, and a client's wait returns at once.
    daemon, _ = start_daemon(drivers={})
    streaming = {"policy": "stream", "head": 8, "before_resume": 9, "after_resume": 0}
    fork = Fork("f1", "fc", "/nonexistent/f1.sock", "prefetch", created=0.0)
    fork.prefetch = {**streaming, "streaming": True}
    daemon.manager.handover.adopt_fork(fork, 0)
    # (Its template is not adopted here, so the API's live counters are not asked for.)
    shown = daemon.manager.fork("f1").to_dict()["prefetch"]
    assert {k: shown[k] for k in streaming} == streaming and shown["streaming"] is False
    assert "handed over while this fork's hot set streamed" in shown["stream_error"]
    assert daemon.manager.hot_sets.wait_streamed(fork, timeout=0) == shown
