"""A daemon template whose hot set learns: forks of one trace keep missing the pages the
warm-up never touched, until enough of them did; then those pages are prefetched too."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import StartDaemon, needs_kvm
from pagefork.cli import main
from pagefork.daemon.client import DaemonClient
from pagefork.hotlearn import load_history
from pagefork.hotpages import load


def _run_fork(client: DaemonClient, template: str, index: int) -> tuple[dict[str, Any], Any]:
    fork = client.create_fork(template, vmm="kvm", options={"fork_index": index})
    done = client.wait_fork(fork["fork"], timeout=30)
    released = client.release_fork(fork["fork"])
    assert done["vmm"]["checksum_ok"], done
    return fork, released["stats"]


@needs_kvm
def test_a_learning_template_prefetches_what_its_forks_kept_missing(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = start_daemon()
    template = client.create_template("vm", "kvm", mem_size_mib=16, variants=4)
    hot_path = template["hot_pages_path"]
    # Before the first fork: the set its warm-up records learns, 2 of the last 2 forks.
    args = ["--window", "2", "--join", "2", "--max-growth", "1", "--per-fork", "1"]
    assert main(["hotpages", "learn", hot_path, *args]) == 0

    warm, _ = _run_fork(client, "vm", 0)
    assert warm["role"] == "warmup"
    recorded = len(load(hot_path))
    fork, first = _run_fork(client, "vm", 1)  # trace 1 misses what trace 0 never touched
    assert fork["role"] == "prefetch" and first["misses"] > 0
    assert len(load(hot_path)) == recorded  # one fork alone changes nothing
    _, second = _run_fork(client, "vm", 1)
    assert second["misses"] == first["misses"]  # not yet: the second fork joins them now
    grown = load(hot_path)
    assert len(grown) == recorded + first["misses"]
    history = load_history(hot_path)
    assert history is not None and history.base == recorded
    assert [(g.generation, g.joined, g.size) for g in history.generations] == [
        (1, first["misses"], len(grown))
    ]
    fork, third = _run_fork(client, "vm", 1)
    assert fork["prefetch"]["installed"] == len(grown)
    assert third["misses"] == third["faults"] == 0  # everything trace 1 touches is prefetched

    capsys.readouterr()
    assert main(["hotpages", "history", hot_path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pages"] == len(grown) and doc["generations"][0]["joined"] == first["misses"]
