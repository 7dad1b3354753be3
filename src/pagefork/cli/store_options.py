"""Options for templates in object storage, shared by ``serve``, ``push`` and ``daemon``."""

from __future__ import annotations

import argparse
import os
from urllib.parse import urlsplit

from pagefork.errors import PageforkError
from pagefork.store.cache import ChunkCache, default_cache_dir, parse_size
from pagefork.store.lazy import StoreOptions

#: The host chunk cache's bound unless chosen otherwise.
DEFAULT_CACHE_SIZE = "10G"


def endpoint_url(text: str) -> str:
    """``--endpoint-url`` (or ``$AWS_ENDPOINT_URL``): an ``http://`` or ``https://`` URL with
    a host, checked here so that a mistake is one line naming the fix."""
    where = urlsplit(text) if text.isprintable() else None
    if where is None or where.scheme not in ("http", "https") or not where.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:9000)"
        )
    try:
        where.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text


def add_endpoint_argument(p: argparse.ArgumentParser) -> None:
    """``--endpoint-url``."""
    p.add_argument(
        "--endpoint-url",
        type=endpoint_url,
        metavar="URL",
        help="the S3-compatible endpoint (MinIO, Ceph, R2...); default $AWS_ENDPOINT_URL, "
        "else AWS. Credentials come from the AWS environment and config files",
    )


def add_cache_arguments(p: argparse.ArgumentParser, default_dir: str | None = None) -> None:
    """``--cache-dir``, ``--cache-size`` and ``--endpoint-url``."""
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the host's chunk cache for s3:// templates, shared by every template and fork "
        f"(default {default_dir or default_cache_dir()})",
    )
    p.add_argument(
        "--cache-size",
        default=DEFAULT_CACHE_SIZE,
        metavar="SIZE",
        help=f"bound of the chunk cache, e.g. 512M or 20G (default {DEFAULT_CACHE_SIZE}); the "
        "least recently used chunks are evicted first",
    )
    add_endpoint_argument(p)


def store_options(args: argparse.Namespace, default_dir: str | None = None) -> StoreOptions:
    """The :class:`StoreOptions` the parsed options give (the cache directory is made and
    checked now, so a bad one is an error at start)."""
    check_endpoint_environment()
    cache = ChunkCache(
        args.cache_dir or default_dir or default_cache_dir(), parse_size(args.cache_size)
    )
    return StoreOptions(cache=cache, endpoint_url=args.endpoint_url)


def check_endpoint_environment() -> None:
    """Refuse an ``$AWS_ENDPOINT_URL`` that is no URL (one line naming it), as
    ``--endpoint-url`` is refused."""
    text = os.environ.get("AWS_ENDPOINT_URL")
    if text:
        try:
            endpoint_url(text)
        except argparse.ArgumentTypeError as exc:
            raise PageforkError(f"$AWS_ENDPOINT_URL: {exc}") from None
