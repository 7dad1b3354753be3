"""What a daemon template made from object storage keeps locally: the manifest's size, the
vmstate and the hot-page list (verified), fetched once at creation, and the URL pinned to the
manifest's SHA-256 (``s3://BUCKET/PREFIX#sha256=HEX``), so a later push to the same prefix never
changes the memory its forks are served. The mem-file itself stays in the store and is served
lazily."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagefork.store import client as s3
from pagefork.store.layout import parse_s3_url
from pagefork.store.lazy import StoreOptions, client_of


@dataclass(frozen=True)
class PushedTemplate:
    """A template's manifest facts and side files, as pushed; ``url`` is pinned."""

    url: str
    size: int
    vmstate: bytes | None
    hot_pages: bytes | None


def fetch_pushed(url: str, options: StoreOptions) -> PushedTemplate:
    """Read the manifest at ``url`` and fetch its side files, each checked against its
    SHA-256 (:class:`~pagefork.errors.StoreError` naming what failed)."""
    with client_of(options) as client:
        return _fetch_pushed(url, client)


def _fetch_pushed(url: str, client: Any) -> PushedTemplate:
    u = parse_s3_url(url)
    manifest, sha = s3.read_pinned(client, u)
    side: dict[str, bytes | None] = {}
    for name, blob in (("vmstate", manifest.vmstate), ("hot_pages", manifest.hot_pages)):
        if blob is None:
            side[name] = None
            continue
        side[name] = s3.get_verified(client, u.bucket, blob.key, blob.size, blob.sha256)
    return PushedTemplate(str(u.pinned(sha)), manifest.size, side["vmstate"], side["hot_pages"])
