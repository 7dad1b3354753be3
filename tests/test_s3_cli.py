"""``pagefork push`` and ``pagefork serve --mem-file s3://...`` as a user runs them: real
processes, a real S3 server over HTTP, a test VMM checking every byte; errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_serve import Serve

from conftest import PAGE, S3_ENV, needs_uffd
from pagefork.hotpages import HotPageList

PAGEFORK = [sys.executable, "-m", "pagefork"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PAGEFORK, *args], capture_output=True, text=True, timeout=120, env=env)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without AWS settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(extra)
    return env


@needs_uffd
def test_push_on_one_host_serve_on_another(tmp_path: Path, mem_file, vmms, s3_bucket, s3_endpoint):
    hot = HotPageList.from_pages([(0, 4 * PAGE * i + PAGE) for i in range(50)])
    hot.save(tmp_path / "hot.hpl")
    env = clean_env(**S3_ENV, AWS_ENDPOINT_URL=s3_endpoint)  # the standard way
    url = f"s3://{s3_bucket}/base"
    pushed = run(
        "push",
        url,
        "--mem-file",
        str(mem_file),
        "--hot-pages",
        str(tmp_path / "hot.hpl"),
        "--json",
        env=env,
    )
    assert pushed.returncode == 0, pushed.stderr
    doc = json.loads(pushed.stdout)
    assert doc["chunks"] == 6 and doc["uploaded_chunks"] == 6  # 12 MiB in 2 MiB chunks
    again = run(
        "push",
        url,
        "--mem-file",
        str(mem_file),
        "--hot-pages",
        str(tmp_path / "hot.hpl"),
        env=env,
    )
    assert again.returncode == 0 and "0 uploaded (0.0 MiB), 6 already in the bucket" in again.stdout

    # The other host: only the URL, a cache directory and an explicit endpoint.
    serve = Serve(
        "--mem-file",
        url,
        "--socket",
        str(tmp_path / "s.sock"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--cache-size",
        "64M",
        "--endpoint-url",
        s3_endpoint,
        "--workers",
        "1",
    )
    try:
        (listening,) = serve.wait_for("listening", timeout=60)
        # Pinned at start: the memory served and the hot set come from the same push.
        assert listening["mem_file"].startswith(f"{url}#sha256=")
        vmm = vmms(str(tmp_path / "s.sock"))
        (done,) = serve.wait_for("prefetch_done")  # the hot set pushed with the template
        # The hot pack pushed with it: the 50 hot pages' bytes alone, not the chunk they are in.
        assert done["pages"] == 50 and done["fetched_bytes"] == 50 * PAGE
        assert doc["hot_pack_bytes"] == 50 * PAGE
        assert vmm.send(cmd="touch", all=True)["bad"] == 0
        vmm.close()
        (end,) = serve.wait_for("fork_end")
        assert end["errors"] == 0 and end["faults"] == 3072 - 50
    finally:
        code, err = serve.stop()
    assert code == 0, err
    assert len(list((tmp_path / "cache").iterdir())) == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["s3://bucket"], "give a prefix for the template"),
        (["/tmp/x"], "is not an s3://BUCKET/PREFIX URL"),
        (["s3://no-such-bucket-here/t"], "s3://no-such-bucket-here: the bucket does not exist"),
        (["s3://b-x/t", "--chunk-size", "3M"], "must be a power of two"),
        (["s3://b-x/t", "--chunks-prefix", "../"], "--chunks-prefix '../' must be a key prefix"),
        (["s3://b-x/t", "--chunks-prefix", "a//"], "--chunks-prefix 'a//' must be a key prefix"),
    ],
)
def test_push_errors_are_one_line(args, message, mem_file, s3_endpoint):
    env = clean_env(**S3_ENV, AWS_ENDPOINT_URL=s3_endpoint)
    got = run("push", *args, "--mem-file", str(mem_file), env=env)
    assert got.returncode == 2
    assert got.stderr.count("\n") == 1 and message in got.stderr, got.stderr
    assert "Traceback" not in got.stderr


def test_no_credentials_is_one_line(mem_file, s3_endpoint, tmp_path):
    env = clean_env(HOME=str(tmp_path), AWS_ENDPOINT_URL=s3_endpoint)
    got = run("push", "s3://bucket/t", "--mem-file", str(mem_file), env=env)
    assert got.returncode == 2 and got.stderr.count("\n") == 1, got.stderr
    assert "no AWS credentials found" in got.stderr
    served = run(
        "serve",
        "--mem-file",
        "s3://bucket/t",
        "--socket",
        str(tmp_path / "s.sock"),
        "--cache-dir",
        str(tmp_path / "c"),
        env=env,
    )
    assert served.returncode == 2 and served.stderr.count("\n") == 1, served.stderr
    assert "no AWS credentials found" in served.stderr
    assert not (tmp_path / "s.sock").exists()


def test_serve_of_a_missing_template_is_one_line(tmp_path, s3_bucket, s3_endpoint):
    env = clean_env(**S3_ENV)
    got = run(
        "serve",
        "--mem-file",
        f"s3://{s3_bucket}/nothing",
        "--socket",
        str(tmp_path / "s"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--endpoint-url",
        s3_endpoint,
        env=env,
    )
    assert got.returncode == 2 and got.stderr.count("\n") == 1, got.stderr
    assert f"s3://{s3_bucket}/nothing/manifest.json: no such object" in got.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-size", "lots"], "cache size 'lots' is not a positive size"),
        (["--cache-dir", "{file}"], "cache directory {file}: "),
        ([], "'s3://bucket': give a prefix"),
    ],
)
def test_serve_option_errors_are_one_line(args, message, tmp_path, s3_endpoint):
    (tmp_path / "plain").write_bytes(b"mine")
    args = [a.replace("{file}", str(tmp_path / "plain")) for a in args]
    url = "s3://bucket" if not args else "s3://bucket/t"
    got = run(
        "serve", "--mem-file", url, "--socket", str(tmp_path / "s"), *args,
        env=clean_env(**S3_ENV, AWS_ENDPOINT_URL=s3_endpoint),
    )  # fmt: skip
    assert got.returncode == 2 and got.stderr.count("\n") == 1, got.stderr
    assert message.replace("{file}", str(tmp_path / "plain")) in got.stderr
    assert (tmp_path / "plain").read_bytes() == b"mine"  # never touched


@needs_uffd
def test_a_pushed_layer_uploads_only_the_chunks_it_changed(
    tmp_path: Path, mem_file, s3_bucket, s3_endpoint
):
    from pagefork.layers.format import write_layer
    from pagefork.layers.source import flatten
    from pagefork.testing.vmm import VmmProcess

    size = mem_file.stat().st_size
    layer = tmp_path / "child.layer"
    # New bytes in chunk 0 (pages 3..12) and a removed range in chunk 3 (pages 1600..1615):
    # every other chunk is the parent's.
    changed = [(i, bytes([i % 251 + 1]) * PAGE) for i in range(3, 13)]
    write_layer(str(layer), size=size, pages=changed, zero_runs=[(1600, 16)])
    env = clean_env(**S3_ENV, AWS_ENDPOINT_URL=s3_endpoint)
    base = run("push", f"s3://{s3_bucket}/base", "--mem-file", str(mem_file), "--json", env=env)
    assert base.returncode == 0, base.stderr
    child_url = f"s3://{s3_bucket}/child"
    child = run(
        "push", child_url, "--mem-file", str(mem_file), "--layer", str(layer), "--json", env=env
    )
    assert child.returncode == 0, child.stderr
    doc = json.loads(child.stdout)
    assert (doc["chunks"], doc["uploaded_chunks"], doc["present_chunks"]) == (6, 2, 4)

    # Served from the store on another host, a fork reads the layered template byte for byte.
    flat = tmp_path / "flat.mem"
    flatten(str(mem_file), [str(layer)], str(flat))
    assert flat.read_bytes() != mem_file.read_bytes()
    serve = Serve(
        "--mem-file",
        child_url,
        "--socket",
        str(tmp_path / "s.sock"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--endpoint-url",
        s3_endpoint,
        "--workers",
        "1",
    )
    vmm = None
    try:
        serve.wait_for("listening", timeout=60)
        vmm = VmmProcess(str(tmp_path / "s.sock"), str(flat), ("8M", "4M"))
        assert vmm.send(cmd="touch", all=True)["bad"] == 0
        vmm.close()
        (end,) = serve.wait_for("fork_end")
        assert end["errors"] == 0
    finally:
        if vmm is not None:
            vmm.kill()
        code, err = serve.stop()
    assert code == 0, err


def test_push_of_a_bad_layer_is_one_line(tmp_path: Path, mem_file, s3_bucket, s3_endpoint):
    bogus = tmp_path / "bogus.layer"
    bogus.write_bytes(b"not a layer" * 100)
    env = clean_env(**S3_ENV, AWS_ENDPOINT_URL=s3_endpoint)
    r = run(
        "push", f"s3://{s3_bucket}/x", "--mem-file", str(mem_file), "--layer", str(bogus), env=env
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert str(bogus) in r.stderr
