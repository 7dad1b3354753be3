"""The control API's OpenAPI document: served by the daemon, kept in docs/, describing every
route the daemon answers (and no other), with examples the daemon accepts."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import KVM_MISSING, make_mem_file, needs_uffd
from pagefork.daemon import api as api_module
from pagefork.daemon.api import ControlApi
from pagefork.daemon.manager import ForkManager, ManagerConfig, load_drivers
from pagefork.daemon.metrics import DaemonMetrics
from pagefork.daemon.openapi import document, render
from pagefork.store.lazy import StoreOptions
from pagefork.templates import TemplateRegistry
from pagefork.testing.vmm import VmmProcess

DOCS = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
#: Statuses that say the daemon did not take the request as written: its body or its route.
REFUSED = {400, 404, 405, 413, 500, 501}


def _answered_routes() -> set[tuple[str, str]]:
    """(path template, method) of every route the API has a handler for."""
    out = set()
    for pattern, name in api_module._ROUTES:
        path = pattern.pattern.replace("([^/]+)", "{id}").replace("\\.", ".")
        for method in METHODS:
            if hasattr(ControlApi, f"_{method.lower()}_{name}"):
                out.add((path, method))
    return out


def _described_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if method.upper() in METHODS
    }


@pytest.fixture
def control(tmp_path: Path, short_dir: Path) -> Iterator[ControlApi]:
    registry = TemplateRegistry(tmp_path / "state")
    config = ManagerConfig(socket_dir=str(short_dir / "forks"))
    manager = ForkManager(registry, config, load_drivers())
    yield ControlApi(registry, manager, DaemonMetrics())
    manager.close()


def test_the_document_in_docs_is_the_one_the_daemon_serves(control: ControlApi) -> None:
    assert DOCS.read_text() == render(), "regenerate: python -m pagefork.daemon.openapi"
    response = control.handle("GET", "/openapi.json", b"")
    assert response.status == 200 and response.content_type == "application/json"
    assert json.loads(response.body) == document()
    assert document()["openapi"].startswith("3.")


def test_every_route_the_daemon_answers_is_described_and_no_other(control: ControlApi) -> None:
    described = _described_routes(document())
    assert described == _answered_routes()
    for path, method in sorted(described):
        target = path.replace("{id}", "nothing-here")
        body = b"{}" if method == "POST" else b""
        status = control.handle(method, target, body).status
        assert status != 405, (method, path)
        if status == 404:  # the id is unknown, never the route
            error = json.loads(control.handle(method, target, body).body)["error"]
            assert "no such route" not in error, (method, path)
    for method in ("PUT", "PATCH"):  # and what is not described is not answered
        assert all(control.handle(method, p.replace("{id}", "x"), b"{}").status == 405
                   for p in document()["paths"])  # fmt: skip


def _examples(doc: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    body = doc["paths"][path][method]["requestBody"]["content"]["application/json"]
    return {name: example["value"] for name, example in body["examples"].items()}


@needs_uffd
def test_every_example_request_is_accepted_by_the_daemon(
    tmp_path: Path, short_dir: Path, s3_endpoint: str
) -> None:
    from pagefork.store.client import make_client
    from pagefork.store.layout import parse_s3_url
    from pagefork.store.push import push

    doc = copy.deepcopy(document())
    registry = TemplateRegistry(tmp_path / "state")
    config = ManagerConfig(
        socket_dir=str(short_dir / "forks"), store=StoreOptions(endpoint_url=s3_endpoint)
    )
    manager = ForkManager(registry, config, load_drivers())
    control = ControlApi(registry, manager, DaemonMetrics())
    kvm = KVM_MISSING is None

    def send(method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        response = control.handle(method, path, json.dumps(body).encode())
        return response.status, json.loads(response.body)

    vmm = None
    try:
        # What the examples name: a Firecracker snapshot's files (at paths of this test's),
        # and a template pushed to the bucket the store example names.
        templates = _examples(doc, "/templates", "post")
        fc = templates["firecracker"]
        mem = make_mem_file(tmp_path / "mem", 512)
        (tmp_path / "vmstate").write_bytes(b"state")
        fc.update(mem_file=str(mem), snapshot_path=str(tmp_path / "vmstate"))
        url = parse_s3_url(templates["store"]["source"])
        client = make_client(s3_endpoint)
        client.create_bucket(Bucket=url.bucket)
        push(url, str(mem), client, vmstate=str(tmp_path / "vmstate"))

        for name, body in templates.items():
            status, answer = send("POST", "/templates", body)
            if name == "kvm" and not kvm:
                assert status not in REFUSED - {500}, answer
                continue
            assert status == 201, (name, answer)
        forks = _examples(doc, "/forks", "post")
        for name, body in forks.items():
            status, answer = send("POST", "/forks", body)
            if body.get("vmm") == "kvm" and not kvm:
                assert status not in REFUSED - {400}, answer  # no driver here: named as such
                continue
            assert status == 201, (name, answer)
        # A VMM connects to web-1, so that its prefetch and wait have something to wait for.
        fork = control.handle("GET", "/forks/web-1", b"")
        vmm = VmmProcess(json.loads(fork.body)["socket"], str(mem), ("2M",))
        [prefetch] = _examples(doc, "/forks/{id}/prefetch", "post").values()
        status, answer = send("POST", "/forks/web-1/prefetch", prefetch)
        assert status == 200, answer
        vmm.kill()
        [wait] = _examples(doc, "/forks/{id}/wait", "post").values()
        status, answer = send("POST", "/forks/web-1/wait", wait)
        assert status == 200 and answer["stats"]["state"] == "ended", answer
        [snapshot] = _examples(doc, "/forks/{id}/snapshot", "post").values()
        status, answer = send("POST", "/forks/vm-1/snapshot", snapshot)
        if kvm:
            assert status == 201, answer
        else:
            assert status == 404, answer  # vm-1 could not be made here
    finally:
        if vmm is not None:
            vmm.kill()
        manager.close()
