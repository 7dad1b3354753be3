"""Fan-out with Firecracker: every fork gets its own tap and vsock socket, or its own jail.

Concurrent forks of one snapshot reopen its tap device and vsock path. The double "opens" a
tap as only one process per network namespace can (an abstract Unix socket named after it)
and binds the vsock socket for real, so collisions happen here as they do with Firecracker.
The jailer cannot run here: a fake jailer records its argv, enters a network namespace of its
own for ``--netns``, and execs the double chrooted (``--root``) where the real one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PAGE, StartDaemon, needs_uffd
from pagefork.cli import main
from pagefork.daemon.client import DaemonClient
from pagefork.errors import DaemonError, VmmError
from pagefork.server import PageServer
from pagefork.testing.fcdouble import EXIT_LOAD_FAILED, DoubleSnapshot, FcDoubleProcess
from pagefork.vmm.base import RestoreRequest
from pagefork.vmm.firecracker import (
    FirecrackerApi,
    FirecrackerApiError,
    FirecrackerDriver,
    FirecrackerOptionError,
    fork_devices,
    parse_options,
    tap_name,
)
from pagefork.vmm.jailer import Jail, JailerError, parse_jailer

REGIONS = (8 << 20, 4 << 20)
#: Tap names are global to the network namespace: make this run's unique.
TAG = f"{os.getpid() % 100000}"
TAP = f"tp{TAG}"

FAKE_JAILER = """#!{python}
import ctypes, json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_JAILER_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
def opt(name):
    return argv[argv.index(name) + 1]
root = os.path.join(
    opt("--chroot-base-dir"), os.path.basename(opt("--exec-file")), opt("--id"), "root"
)
if "--netns" in argv:  # the real jailer joins that namespace; this one makes its own
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
        sys.exit("fake jailer: unshare(CLONE_NEWNET) failed")
os.makedirs(os.path.join(root, "run"), exist_ok=True)
api = argv[argv.index("--") + 2]
os.execv(sys.executable, [
    sys.executable, "-m", "pagefork.testing.fcdouble", "--root", root,
    "--api-sock", os.path.join(root, api.lstrip("/")),
    "--fc-version", os.environ["FAKE_FC_VERSION"],
])
"""

pytestmark = needs_uffd


@pytest.fixture
def doubles(tmp_path: Path) -> Iterator[Callable[..., FcDoubleProcess]]:
    procs: list[FcDoubleProcess] = []

    def start(version: str, name: str) -> FcDoubleProcess:
        proc = FcDoubleProcess(str(tmp_path / f"{name}.api"), "--fc-version", version)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


def _snapshot(tmp_path: Path, mem_file: Path, **devices: Any) -> str:
    path = tmp_path / "vmstate.json"
    touch = tuple((r, i * 5 * PAGE) for r in (0, 1) for i in range(40))
    DoubleSnapshot(REGIONS, str(mem_file), PAGE, touch, **devices).write(path)
    return str(path)


def _restore(
    server: PageServer, fork: str, snapshot: str, api: str | None, **opts: Any
) -> tuple[RestoreRequest, Any]:
    if api is not None:
        opts["api_socket"] = api
    req = RestoreRequest(fork, server.register_fork(fork), snapshot, "unused", opts)
    return req, FirecrackerDriver().restore(req, timeout=20)


def _run_guest(api_sock: str) -> dict[str, Any]:
    """Resume and wait for the double's guest: every page it reads is checked byte for byte."""
    api = FirecrackerApi(api_sock, timeout=40)
    api.request("PATCH", "/vm", {"state": "Resumed"})
    result = api.request("GET", "/pagefork-test/result?wait=30")
    assert isinstance(result, dict)
    return result


# --- taps and vsock sockets per fork ----------------------------------------------------------


def test_concurrent_forks_collide_on_the_snapshots_tap_and_the_loser_exits(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    snapshot = _snapshot(tmp_path, mem_file, network_interfaces=(("eth0", TAP),))
    first, second = doubles("1.16", "a"), doubles("1.16", "b")
    _, handle = _restore(server, "a", snapshot, first.api_sock)
    with pytest.raises(FirecrackerApiError, match=f"Open tap device '{TAP}' for eth0 failed"):
        _restore(server, "b", snapshot, second.api_sock)
    assert second.wait(10) == EXIT_LOAD_FAILED  # Firecracker exits after a failed load
    handle.stop()


@pytest.mark.parametrize("shape", ["map and vsock_uds", "Firecracker's own"])
def test_overrides_give_each_fork_its_own_tap_and_vsock_socket(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
    shape: str,
) -> None:
    server = make_server()
    snapshot = _snapshot(
        tmp_path,
        mem_file,
        network_interfaces=(("eth0", TAP),),
        vsock_uds=str(tmp_path / "template-vsock.sock"),
    )
    opts: dict[str, Any] = {
        "network_overrides": {"eth0": "t{fork}"},
        "vsock_uds": str(tmp_path / "vsock-{fork}.sock"),
    }
    if shape == "Firecracker's own":  # as PUT /snapshot/load spells them, with patterns
        opts = {
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "t{fork}"}],
            "vsock_override": {"uds_path": str(tmp_path / "vsock-{fork}.sock")},
        }
    forks = {f"a{TAG}": doubles("1.16", "a"), f"b{TAG}": doubles("1.16", "b")}
    handles = [
        _restore(server, fork, snapshot, fc.api_sock, **opts)[1] for fork, fc in forks.items()
    ]
    for fork, fc in forks.items():
        load = next(r for r in fc.requests() if r["path"] == "/snapshot/load")["body"]
        assert load["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": f"t{fork}"}]
        assert load["vsock_override"] == {"uds_path": str(tmp_path / f"vsock-{fork}.sock")}
        assert (tmp_path / f"vsock-{fork}.sock").is_socket()  # bound by that fork alone
        result = _run_guest(fc.api_sock)
        assert (result["touched"], result["bad"]) == (80, 0)
    assert not (tmp_path / "template-vsock.sock").exists()
    for h in handles:
        h.stop()


@pytest.mark.parametrize(
    ("version", "option", "value", "message"),
    [
        (
            "1.10",
            "network_overrides",
            {"eth0": "t{fork}"},
            r"Firecracker 1\.10\.0 does not accept the load field 'network_overrides'; give "
            r"each fork its own network namespace",
        ),
        (
            "1.12",
            "vsock_uds",
            "/tmp/v-{fork}.sock",
            r"Firecracker 1\.12\.0 does not accept the load field 'vsock_override'; run each "
            r"fork in its own chroot",
        ),
    ],
)
def test_an_override_the_release_lacks_is_refused_before_the_load(
    doubles: Callable[..., FcDoubleProcess],
    make_server: Callable[..., PageServer],
    tmp_path: Path,
    mem_file: Path,
    version: str,
    option: str,
    value: Any,
    message: str,
) -> None:
    server = make_server()
    fc = doubles(version, "fc")
    with pytest.raises(VmmError, match=message):
        _restore(server, "f", _snapshot(tmp_path, mem_file), fc.api_sock, **{option: value})
    assert [r["path"] for r in fc.requests()] == ["/"]  # asked its version, sent nothing else
    assert fc.api.request("GET", "/")["state"] == "Not started"  # untouched: not ours to kill


def test_tap_names_must_be_linux_interface_names() -> None:
    assert tap_name("network_overrides", "tap-{fork}-{iface}", "f1", "eth0") == "tap-f1-eth0"
    with pytest.raises(FirecrackerOptionError, match=r"tap name 'tap-" + "x" * 20 + "'.*: 24 char"):
        tap_name("network_overrides", "tap-{fork}", "x" * 20, "eth0")
    with pytest.raises(FirecrackerOptionError, match=r"only \{fork\}, \{fork_hash\} and \{iface\}"):
        parse_options({"network_overrides": {"eth0": "tap-{vm}"}})
    with pytest.raises(FirecrackerOptionError, match="'vsock_uds' must be a path pattern with"):
        parse_options({"vsock_uds": "/run/same-for-every-fork.sock"})
    with pytest.raises(FirecrackerOptionError, match="may not set network_overrides as well"):
        parse_options(
            {
                "network_overrides": {"eth0": "t{fork}"},
                "load_fields": {"network_overrides": []},
            }
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"network_overrides": [{"iface_id": "eth0"}]},
            r"^option 'network_overrides' entry 0: 'host_dev_name' must be a non-empty string, "
            r"not None$",
        ),
        (
            {"network_overrides": [{"iface_id": "eth0", "host_dev_name": "a{fork}"}, "eth1"]},
            r"^option 'network_overrides' entry 1: must be an object with 'iface_id' and "
            r"'host_dev_name', not 'eth1'$",
        ),
        (
            {"network_overrides": [{"iface_id": "eth0", "host_dev": "a{fork}"}]},
            r"^option 'network_overrides' entry 0: unknown key 'host_dev'",
        ),
        (
            {
                "network_overrides": [
                    {"iface_id": "eth0", "host_dev_name": "a{fork}"},
                    {"iface_id": "eth0", "host_dev_name": "b{fork}"},
                ]
            },
            r"^option 'network_overrides' entry 1: interface 'eth0' given twice$",
        ),
        (
            {"network_overrides": {"eth0": 3}},
            r"^option 'network_overrides' entry 'eth0': 3 is not a tap name pattern",
        ),
        ({"network_overrides": "tap0"}, r"^option 'network_overrides' must be \{'eth0'"),
        (
            {"vsock_override": {"uds_path": "/run/v.sock"}},
            r"^option 'vsock_override.uds_path' must be a path pattern with \{fork\}",
        ),
        ({"vsock_override": "/run/v-{fork}.sock"}, r"^option 'vsock_override' must be "),
        (
            {"vsock_override": {"uds_path": "/v-{fork}", "cid": 3}},
            r"^option 'vsock_override' must be Firecracker's \{'uds_path': PATTERN\}",
        ),
        (
            {"vsock_uds": "/a-{fork}", "vsock_override": {"uds_path": "/b-{fork}"}},
            r"^option 'vsock_override' and 'vsock_uds' both give the vsock socket: give one$",
        ),
        (
            {"vsock_override": {"uds_path": "/b-{fork}"}, "load_fields": {"vsock_override": {}}},
            r"may not set vsock_override as well",
        ),
    ],
)
def test_firecrackers_own_shapes_are_checked_entry_by_entry(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(FirecrackerOptionError, match=message) as err:
        parse_options(options)
    assert "\n" not in str(err.value)


def test_fork_hash_names_a_tap_that_fits_whatever_the_fork_id() -> None:
    fork = "a-template-with-a-long-name-2e566ec9"
    digest = hashlib.sha256(fork.encode()).hexdigest()[:10]
    assert tap_name("network_overrides", "tap-{fork_hash}", fork, "eth0") == f"tap-{digest}"
    opts = parse_options(
        {
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-{fork_hash}"}],
            "vsock_override": {"uds_path": "/run/vsock/{fork_hash}.sock"},
        }
    )
    assert parse_options({"vsock_override": None, "network_overrides": None}) == parse_options({})
    assert fork_devices(opts, fork) == {
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": f"tap-{digest}"}],
        "vsock_override": {"uds_path": f"/run/vsock/{digest}.sock"},
    }


def _recipe_template(client: DaemonClient, tmp_path: Path, mem_file: Path) -> None:
    snapshot = _snapshot(
        tmp_path, mem_file, network_interfaces=(("eth0", TAP),), vsock_uds="/v.sock"
    )
    client.create_template("web", "firecracker", mem_file=str(mem_file), snapshot_path=snapshot)


#: The fan-out recipe's options (docs/firecracker.md), as typed; then Firecracker's own shapes.
RECIPE_OPTIONS = [
    [
        'network_overrides={"eth0": "tap-{fork_hash}"}',
        "vsock_uds=VSOCK/{fork}.sock",
    ],
    [
        'network_overrides=[{"iface_id": "eth0", "host_dev_name": "tap-{fork_hash}"}]',
        'vsock_override={"uds_path": "VSOCK/{fork}.sock"}',
    ],
]


def test_the_fanout_recipe_works_with_generated_fork_ids(
    start_daemon: StartDaemon,
    short_dir: Path,
    tmp_path: Path,
    mem_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The fan-out recipe through the CLI, forks without --id: each gets its own tap and vsock
    socket from the documented patterns, and the tap names fit Linux's 15 characters."""
    _, client = start_daemon()
    _recipe_template(client, tmp_path, mem_file)
    vsock = short_dir / "vsock"
    vsock.mkdir()
    forks = []
    for i, options in enumerate(RECIPE_OPTIONS):
        fc = FcDoubleProcess(str(short_dir / f"fc{i}.api"), "--fc-version", "1.16")
        try:
            argv = [
                "forks",
                "create",
                "web",
                "--vmm",
                "firecracker",
                "--control",
                client.control_path,
            ]
            argv += ["--option", f"api_socket={fc.api_sock}"]
            for option in options:
                argv += ["--option", option.replace("VSOCK", str(vsock))]
            assert main(argv) == 0, capsys.readouterr().err
            fork_id = capsys.readouterr().out.split()[0]
            assert re.fullmatch(r"web-[0-9a-f]{8}", fork_id)  # generated
            tap = "tap-" + hashlib.sha256(fork_id.encode()).hexdigest()[:10]
            load = next(r for r in fc.requests() if r["path"] == "/snapshot/load")["body"]
            assert load["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": tap}]
            assert load["vsock_override"] == {"uds_path": str(vsock / f"{fork_id}.sock")}
            assert (vsock / f"{fork_id}.sock").is_socket()  # bound by this fork alone
            result = fc.result(wait=30)
            assert (result["touched"], result["bad"]) == (80, 0)
            forks.append(fork_id)
        finally:
            fc.stop()
    assert len(set(forks)) == 2
    for fork_id in forks:
        client.release_fork(fork_id)


def test_a_tap_name_too_long_for_the_generated_id_is_refused_at_fork_creation(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path, mem_file: Path
) -> None:
    _, client = start_daemon()
    _recipe_template(client, tmp_path, mem_file)
    with FcDoubleProcess(str(short_dir / "fc.api"), "--fc-version", "1.16") as fc:
        with pytest.raises(DaemonError) as err:
            client.create_fork(
                "web",
                vmm="firecracker",
                options={"api_socket": fc.api_sock, "network_overrides": {"eth0": "tap-{fork}"}},
            )
        message = str(err.value)
        assert re.search(
            r"option 'network_overrides' gives tap name 'tap-web-[0-9a-f]{8}' for fork "
            r"'web-[0-9a-f]{8}': 16 characters, and Linux allows 15 \(use \{fork_hash\}",
            message,
        ), message
        assert "\n" not in message
        assert fc.requests() == []  # refused before the driver touched Firecracker
        assert fc.api.request("GET", "/")["state"] == "Not started"
    assert client.forks() == []


# --- the jailer -------------------------------------------------------------------------------


@pytest.fixture
def jail_base() -> Iterator[Path]:
    """A short chroot base: socket paths inside a jail must fit sun_path (108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pf-jail-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def fake_jailer(
    tmp_path: Path, jail_base: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., dict[str, Any]]:
    """A fake jailer executable; returns the ``jailer`` option for a release."""
    binary = tmp_path / "jailer"
    binary.write_text(FAKE_JAILER.format(python=sys.executable))
    binary.chmod(0o755)
    log = tmp_path / "jailer-argv.jsonl"
    monkeypatch.setenv("FAKE_JAILER_LOG", str(log))

    def option(version: str, **more: Any) -> dict[str, Any]:
        monkeypatch.setenv("FAKE_FC_VERSION", version)
        return {
            "binary": str(binary),
            "exec_file": "/usr/bin/firecracker",
            "chroot_base": str(jail_base),
            "uid": os.getuid(),
            "gid": os.getgid(),
            **more,
        }

    return option


def _argv_log(tmp_path: Path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "jailer-argv.jsonl").read_text().splitlines()]


def test_jailed_fork_reaches_its_files_in_the_chroot_and_is_cleaned_up(
    no_leaks: None,
    make_server: Callable[..., PageServer],
    fake_jailer: Callable[..., dict[str, Any]],
    jail_base: Path,
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    snapshot = _snapshot(tmp_path, mem_file, vsock_uds="/v.sock")
    req, handle = _restore(server, "jf-1", snapshot, None, jailer=fake_jailer("1.10"))
    base = str(jail_base)
    assert _argv_log(tmp_path) == [
        [
            "--id",
            "jf-1",
            "--exec-file",
            "/usr/bin/firecracker",
            "--uid",
            str(os.getuid()),
            "--gid",
            str(os.getgid()),
            "--chroot-base-dir",
            base,
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ]
    ]
    root = Path(base) / "firecracker" / "jf-1" / "root"
    # Hard links: the same inodes as the snapshot and the page server's socket.
    assert (root / "vmstate.json").stat().st_ino == os.stat(snapshot).st_ino
    assert (root / "uffd.sock").stat().st_ino == os.stat(req.uffd_socket).st_ino
    assert (root / "v.sock").is_socket()  # the snapshot's vsock path, inside this jail
    api = FirecrackerApi(str(root / "run" / "firecracker.socket"))
    load = [r for r in api.request("GET", "/pagefork-test/requests") if r["method"] == "PUT"]
    assert load[0]["body"]["snapshot_path"] == "/vmstate.json"
    assert load[0]["body"]["mem_backend"]["backend_path"] == "/uffd.sock"
    result = _run_guest(str(root / "run" / "firecracker.socket"))
    assert (result["touched"], result["bad"]) == (80, 0)

    handle.stop()
    assert server.wait_ended("jf-1", timeout=10).state == "ended"
    # What the driver placed is gone; the originals and the jailer's own files are not.
    assert not (root / "vmstate.json").exists() and not (root / "uffd.sock").exists()
    assert os.path.exists(snapshot) and os.path.exists(req.uffd_socket)
    assert (root / "run" / "firecracker.socket").exists()


def test_jailed_forks_of_an_old_release_share_tap_and_vsock_names_in_their_own_netns(
    make_server: Callable[..., PageServer],
    fake_jailer: Callable[..., dict[str, Any]],
    jail_base: Path,
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    snapshot = _snapshot(
        tmp_path, mem_file, network_interfaces=(("eth0", TAP),), vsock_uds="/v.sock"
    )
    for fork in ("n1", "n2"):
        (tmp_path / f"netns-{fork}").touch()  # stands for /var/run/netns/<fork>
    jailer = fake_jailer("1.10", netns=str(tmp_path / "netns-{fork}"))
    handles = [_restore(server, fork, snapshot, None, jailer=jailer)[1] for fork in ("n1", "n2")]
    assert [a[a.index("--netns") + 1] for a in _argv_log(tmp_path)] == [
        str(tmp_path / "netns-n1"),
        str(tmp_path / "netns-n2"),
    ]
    for fork in ("n1", "n2"):
        sock = jail_base / "firecracker" / fork / "root" / "run" / "firecracker.socket"
        assert _run_guest(str(sock))["bad"] == 0
    for h in handles:
        h.stop()


def test_a_jailed_fork_that_fails_to_load_is_killed_and_its_files_removed(
    make_server: Callable[..., PageServer],
    fake_jailer: Callable[..., dict[str, Any]],
    jail_base: Path,
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    snapshot = _snapshot(tmp_path, mem_file, network_interfaces=(("eth0", TAP),))
    jailer = fake_jailer("1.10")  # no netns: both jails share this network namespace
    _, first = _restore(server, "c1", snapshot, None, jailer=jailer)
    with pytest.raises(FirecrackerApiError, match=f"Open tap device '{TAP}'"):
        _restore(server, "c2", snapshot, None, jailer=jailer)
    root = jail_base / "firecracker" / "c2" / "root"
    assert not (root / "vmstate.json").exists() and not (root / "uffd.sock").exists()
    first.stop()


def test_a_file_in_the_way_in_the_chroot_is_left_alone(
    make_server: Callable[..., PageServer],
    fake_jailer: Callable[..., dict[str, Any]],
    jail_base: Path,
    tmp_path: Path,
    mem_file: Path,
) -> None:
    server = make_server()
    root = jail_base / "firecracker" / "w1" / "root"
    root.mkdir(parents=True)
    (root / "uffd.sock").write_text("someone else's")
    with pytest.raises(VmmError, match=f"{root / 'uffd.sock'} already exists .* not ours"):
        _restore(server, "w1", _snapshot(tmp_path, mem_file), None, jailer=fake_jailer("1.12"))
    assert (root / "uffd.sock").read_text() == "someone else's"
    assert not (root / "vmstate.json").exists()
    assert not (tmp_path / "jailer-argv.jsonl").exists()  # the jailer never started


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"binary": "jailer"}, "'binary' must be an absolute path"),
        ("yes", "must be an object"),
        ({"bogus": 1}, "key 'bogus' is unknown"),
    ],
)
def test_bad_jailer_options_name_the_key(value: Any, message: str) -> None:
    with pytest.raises(FirecrackerOptionError, match=f"^option 'jailer' .*{message}"):
        parse_options({"jailer": value})


def test_jailer_settings_are_checked(tmp_path: Path) -> None:
    good = {
        "binary": "/usr/bin/jailer",
        "exec_file": "/usr/bin/firecracker",
        "chroot_base": "/srv/jailer",
        "uid": 123,
        "gid": 456,
    }
    with pytest.raises(JailerError, match="'uid' must be a numeric id"):
        parse_jailer({**good, "uid": "fc"})
    with pytest.raises(FirecrackerOptionError, match="'api_socket' must not be given with"):
        parse_options({"jailer": good, "api_socket": "/a.sock"})
    with pytest.raises(JailerError, match="cannot be a jailer --id"):
        Jail(parse_jailer(good), "fork_1")
    jail = Jail(parse_jailer({**good, "netns": "/var/run/netns/{fork}"}), "f-1")
    assert jail.command()[-5:] == [
        "--netns",
        "/var/run/netns/f-1",
        "--",
        "--api-sock",
        "/run/firecracker.socket",
    ]
    assert jail.api_socket == "/srv/jailer/firecracker/f-1/root/run/firecracker.socket"
    missing = Jail(parse_jailer({**good, "netns": str(tmp_path / "ns-{fork}")}), "f-1")
    with pytest.raises(JailerError, match=f"network namespace {tmp_path / 'ns-f-1'} does not"):
        missing.prepare(str(tmp_path / "s"), str(tmp_path / "u"))


def test_a_jailer_that_exits_at_once_is_reported_with_its_last_words(
    no_leaks: None,
    make_server: Callable[..., PageServer],
    jail_base: Path,
    tmp_path: Path,
    mem_file: Path,
) -> None:
    binary = tmp_path / "bad-jailer"
    binary.write_text(
        f"#!{sys.executable}\nimport sys\nsys.exit('jailer: uid 99 is not allowed')\n"
    )
    binary.chmod(0o755)
    jailer = {
        "binary": str(binary),
        "exec_file": "/usr/bin/firecracker",
        "chroot_base": str(jail_base),
        "uid": 99,
        "gid": 99,
    }
    with pytest.raises(VmmError, match=r"jailer exited with status 1 .*: jailer: uid 99 is not"):
        _restore(server := make_server(), "x1", _snapshot(tmp_path, mem_file), None, jailer=jailer)
    assert os.listdir(jail_base) == []  # everything the driver made is gone again
    jailer["binary"] = str(tmp_path / "no-such-jailer")
    with pytest.raises(VmmError, match=r"cannot start the jailer .*no-such-jailer: No such file"):
        _restore(server, "x2", _snapshot(tmp_path, mem_file), None, jailer=jailer)
    assert os.listdir(jail_base) == []
