"""``pagefork serve --mem-file s3://...`` hands over the vmstate pushed with the template: it is
written beside the socket, named in ``listening``, and removed when serve stops, but not when
serve hands over to a successor (which wrote its own)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from procs import PAGEFORK, Serve

from conftest import S3_ENV, needs_uffd


def _push(url: str, mem_file: Path, vmstate: Path, env: dict[str, str]) -> None:
    pushed = subprocess.run(
        [*PAGEFORK, "push", url, "--mem-file", str(mem_file), "--vmstate", str(vmstate)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert pushed.returncode == 0, pushed.stderr


@needs_uffd
def test_serve_writes_the_pushed_vmstate_beside_its_socket_and_names_it(
    short_dir: Path, mem_file: Path, tmp_path: Path, vmms, s3_bucket: str, s3_endpoint: str
) -> None:
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    vmstate = tmp_path / "vmstate"
    vmstate.write_bytes(b"the VM state of this template\x00\xff" * 100)
    url = f"s3://{s3_bucket}/t"
    _push(url, mem_file, vmstate, env)
    sock = short_dir / "h.sock"
    args = ["--mem-file", url, "--socket", str(sock), "--workers", "1",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    old = Serve(*args, env=env)
    (listening,) = old.wait_for("listening", timeout=60)
    written = Path(f"{sock}.vmstate")
    assert listening["vmstate"] == str(written)
    assert written.read_bytes() == vmstate.read_bytes()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    guest = vmms(str(sock))
    assert guest.send(cmd="touch", pages=[[0, 0]])["bad"] == 0

    # A successor writes its own and keeps it: the old side leaves it when it hands over.
    new = Serve(*args, "--takeover", env=env)
    assert new.wait_for("took_over", timeout=60)[0]["forks"] == 1
    assert old.proc.wait(60) == 0
    (listening,) = new.wait_for("listening")
    assert listening["vmstate"] == str(written)
    assert written.read_bytes() == vmstate.read_bytes()
    guest.close()
    assert new.wait_for("fork_end")[0]["errors"] == 0
    assert new.stop() == 0
    assert not written.exists()  # removed by the serve that stopped
    assert not sock.exists()


@needs_uffd
def test_a_local_mem_file_names_no_vmstate(short_dir: Path, mem_file: Path) -> None:
    sock = short_dir / "h.sock"
    serve = Serve("--mem-file", str(mem_file), "--socket", str(sock), "--workers", "1")
    (listening,) = serve.wait_for("listening")
    assert listening["vmstate"] is None
    assert not Path(f"{sock}.vmstate").exists()
    assert serve.stop() == 0


def test_an_unwritable_vmstate_place_is_refused_before_the_store_is_read(
    tmp_path: Path,
) -> None:
    """The vmstate goes beside the socket: a directory there is refused in one line, before
    any request to the store (none could be answered: the endpoint is closed)."""
    sock = tmp_path / "h.sock"
    Path(f"{sock}.vmstate").mkdir()
    serve = ["serve", "--mem-file", "s3://bucket/t", "--socket", str(sock)]
    got = subprocess.run(
        [*PAGEFORK, *serve, "--endpoint-url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **S3_ENV},
    )
    assert got.returncode == 2
    assert got.stderr == (
        f"pagefork: error: vmstate {sock}.vmstate: cannot write: Is a directory, "
        "not a regular file; left untouched\n"
    )
