"""``pagefork push``: upload a template to S3-compatible object storage.

The mem-file is cut into fixed-size chunks; all-zero chunks are not stored, and every other
chunk is stored once, content-addressed, under the bucket's chunk prefix, so templates that
share content share chunks and a push uploads only what the bucket lacks (a chunk whose size or
recorded SHA-256 is wrong is uploaded again; ``--verify`` also reads back and hashes every chunk
the bucket has, repairing any corrupt one). With ``--layer`` and ``--parent``, only the top
layer's own pages are uploaded (one packed object) with a manifest that points to the parent
template's. The manifest goes last. A progress bar shows on
stderr when it is a terminal; a summary line (or ``--json``) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task
from rich.text import Text

from pagefork.cli.display import examples
from pagefork.cli.store_options import add_endpoint_argument, check_endpoint_environment
from pagefork.errors import PageforkError
from pagefork.store.cache import parse_size
from pagefork.store.client import make_client
from pagefork.store.layerpush import push_layer
from pagefork.store.layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CHUNKS_PREFIX,
    S3Url,
    parse_s3_url,
    valid_chunks_prefix,
)
from pagefork.store.push import DEFAULT_JOBS, PushResult, push


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``push``."""
    p = sub.add_parser(
        "push",
        help="upload a template (mem-file, hot pages, vmstate) to s3://BUCKET/PREFIX",
        description=(
            "Upload a template to S3-compatible storage, to be served lazily on any host with "
            "'pagefork serve --mem-file s3://BUCKET/PREFIX' or the daemon. Chunks are "
            "content-addressed under the bucket's chunk prefix: all-zero chunks and chunks "
            "the bucket already has are not uploaded."
        ),
    )
    p.add_argument("url", metavar="s3://BUCKET/PREFIX", help="where the template goes")
    p.add_argument("--mem-file", required=True, help="the template's guest memory file")
    p.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="PATH",
        help="a layer file over the mem-file (repeat, bottom first): push the layered template; "
        "with --parent only the top layer's pages are uploaded",
    )
    p.add_argument(
        "--parent",
        metavar="s3://BUCKET/PREFIX",
        help="the template already pushed from the mem-file and the layers below the top one: "
        "push the top layer alone (its pages, packed) over it, not the whole memory",
    )
    p.add_argument("--hot-pages", metavar="FILE", help="a hot-page file to push with it")
    p.add_argument("--vmstate", metavar="FILE", help="the VM state file to push with it")
    p.add_argument(
        "--chunk-size",
        default=f"{DEFAULT_CHUNK_SIZE >> 20}M",
        metavar="SIZE",
        help=f"chunk size, a power of two from 64K to 64M (default {DEFAULT_CHUNK_SIZE >> 20}M)",
    )
    p.add_argument(
        "--chunks-prefix",
        default=DEFAULT_CHUNKS_PREFIX,
        metavar="KEYPREFIX",
        help=f"where chunks go in the bucket, shared by its templates (default "
        f"{DEFAULT_CHUNKS_PREFIX})",
    )
    p.add_argument(
        "--jobs", type=int, default=DEFAULT_JOBS, help=f"parallel uploads (default {DEFAULT_JOBS})"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="read back and hash every chunk the bucket already has, and upload again any that "
        "is corrupt (repairs a template whose forks report a chunk failing its SHA-256)",
    )
    add_endpoint_argument(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.epilog = examples(
        "pagefork push s3://my-bucket/templates/web --mem-file snap/mem --vmstate snap/vmstate",
        "pagefork push s3://my-bucket/templates/web --mem-file snap/mem --hot-pages hot.hpl "
        "--endpoint-url http://127.0.0.1:9000",
        "pagefork push s3://my-bucket/templates/web-warm --mem-file snap/mem --layer warm.layer "
        "--parent s3://my-bucket/templates/web",
    )
    p.set_defaults(func=run)


class BinarySpeedColumn(ProgressColumn):
    """Transfer speed in binary units (MiB/s), matching the bar's MiB amounts (rich's own
    speed column counts in decimal MB/s)."""

    def render(self, task: Task) -> Text:
        """The speed so far, or ``?`` before there is one."""
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("?", style="progress.data.speed")
        value, unit = float(speed), "B/s"
        for prefix in ("KiB/s", "MiB/s", "GiB/s", "TiB/s"):
            if value < 1024:
                break
            value, unit = value / 1024, prefix
        return Text(f"{value:.1f} {unit}", style="progress.data.speed")


def push_progress(console: Console, disable: bool) -> Progress:
    """The push's progress bar: bytes done and total, and speed, all in binary units."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        BinarySpeedColumn(),
        transient=True,
        console=console,
        disable=disable,
    )


def run(args: argparse.Namespace) -> int:
    """Push, with a progress bar on a terminal; print what was uploaded."""
    url = parse_s3_url(args.url)
    chunk_size = parse_size(args.chunk_size)
    if args.jobs < 1:
        raise PageforkError(f"--jobs must be at least 1, not {args.jobs}")
    if not valid_chunks_prefix(args.chunks_prefix):  # the check every reader makes
        raise PageforkError(
            f"--chunks-prefix {args.chunks_prefix!r} must be a key prefix ending in '/' with no "
            "empty, '.' or '..' part"
        )
    parent = parse_s3_url(args.parent) if args.parent is not None else None
    if parent is not None and not args.layer:
        raise PageforkError("--parent needs the layer to push over it (--layer PATH)")
    if parent is not None and (
        args.verify
        or args.chunks_prefix != DEFAULT_CHUNKS_PREFIX
        or chunk_size != DEFAULT_CHUNK_SIZE
    ):
        raise PageforkError(
            "--parent pushes the layer's pages alone, over the parent's chunks: --verify, "
            "--chunk-size and --chunks-prefix do not apply (push the parent with them)"
        )
    check_endpoint_environment()
    client = make_client(args.endpoint_url)
    # stdout keeps the summary (or --json) alone
    bar = push_progress(Console(stderr=True), disable=not sys.stderr.isatty())
    with bar:
        task = bar.add_task(f"push {url}", total=None)
        if parent is not None:
            result = push_layer(
                url,
                args.mem_file,
                args.layer,
                parent,
                client,
                hot_pages=args.hot_pages,
                vmstate=args.vmstate,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
            return _report_layer(args, url, parent, result)
        result = push(
            url,
            args.mem_file,
            client,
            hot_pages=args.hot_pages,
            vmstate=args.vmstate,
            chunk_size=chunk_size,
            chunks_prefix=args.chunks_prefix,
            jobs=args.jobs,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            layers=args.layer,
            verify=args.verify,
        )
    doc = {
        "url": str(url),
        "size": result.manifest.size,
        "chunk_size": result.manifest.chunk_size,
        "chunks": result.chunks,
        "zero_chunks": result.zero_chunks,
        "present_chunks": result.present_chunks,
        "uploaded_chunks": result.uploaded_chunks,
        "uploaded_bytes": result.uploaded_bytes,
        "repaired_chunks": result.repaired_chunks,
        "hot_pack_bytes": result.pack_bytes,
        "seconds": round(result.seconds, 3),
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"pushed {url}: {result.chunks} chunks of {result.manifest.chunk_size >> 10} KiB, "
            f"{result.uploaded_chunks} uploaded ({result.uploaded_bytes / (1 << 20):.1f} MiB), "
            f"{result.present_chunks} already in the bucket, {result.zero_chunks} all zero, "
            f"{result.repaired_chunks} repaired, "
            + (f"hot pack of {result.pack_bytes >> 12} pages, " if result.pack_bytes else "")
            + f"in {result.seconds:.2f}s"
        )
    return 0


def _report_layer(args: argparse.Namespace, url: S3Url, parent: S3Url, result: PushResult) -> int:
    """Print what a layer push uploaded."""
    doc = {
        "url": str(url),
        "parent": str(parent),
        "size": result.manifest.size,
        "layer_pages": result.layer_pages,
        "layer_bytes": result.layer_bytes,
        "hot_pack_bytes": result.pack_bytes,
        "seconds": round(result.seconds, 3),
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"pushed layer {url} over {parent}: {result.layer_pages} pages "
            f"({result.layer_bytes / (1 << 20):.2f} MiB) uploaded, "
            + (f"hot pack of {result.pack_bytes >> 12} pages, " if result.pack_bytes else "")
            + f"in {result.seconds:.2f}s"
        )
    return 0
