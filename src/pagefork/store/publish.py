"""Publishing a hot set recorded on a lazily served template, so that cold hosts prefetch it.

The hot-page list and its hot pack (:mod:`pagefork.store.hotpack`; the pages read from the
template's view, where every one of them was verified) are uploaded, then a manifest that is
the template's own plus them. The new manifest is always kept as ``manifests/<sha256>.json``;
it also becomes the prefix's ``manifest.json`` only while that is still the manifest the
template was opened from, so a newer push is never replaced.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Protocol

from pagefork.errors import StoreError
from pagefork.hotpages import HotPageList, encode
from pagefork.regions import PAGE_SIZE, Region
from pagefork.store import client as s3
from pagefork.store.hotpack import build_pack, hot_file_pages
from pagefork.store.layout import MANIFEST_NAME, Blob, Manifest, S3Url, sha256

__all__ = ["PublishedTemplate", "publish_hot_set"]


class PublishedTemplate(Protocol):
    """What publishing needs of a lazily served template (a
    :class:`~pagefork.store.lazy.LazyTemplate`): where it is, the manifest it was opened from,
    and its view."""

    url: S3Url
    manifest: Manifest
    manifest_sha: str
    npages: int
    fd: int

    @property
    def client(self) -> Any: ...

    def page_present(self, page: int) -> bool: ...


def publish_hot_set(
    template: PublishedTemplate, hot: HotPageList, regions: Sequence[Region]
) -> str:
    """Push ``hot`` (recorded by a fork of ``template`` on ``regions``) with its hot pack;
    returns the URL pinned to the new manifest. Pages not in the view (not faulted by the
    recording fork) are left out of the pack. :class:`StoreError` names what failed."""
    url, client, m = template.url, template.client, template.manifest
    pages = [p for p in hot_file_pages(hot, template.npages, regions) if template.page_present(p)]
    packed = build_pack(
        url, pages, lambda p: os.pread(template.fd, PAGE_SIZE, p * PAGE_SIZE), m.zero_pages
    )
    listing = encode(hot, "hpl2")
    list_sha = sha256(listing)
    blob = Blob(url.key(f"hot-pages-{list_sha}.hpl"), list_sha, len(listing))
    s3.put_bytes(client, url.bucket, blob.key, listing)
    if packed is not None:
        s3.put_bytes(client, url.bucket, packed[0].key, packed[1])
    new = dataclasses.replace(m, hot_pages=blob, hot_pack=None if packed is None else packed[0])
    doc = new.to_json()
    digest = sha256(doc)
    s3.put_bytes(client, url.bucket, s3.pinned_key(url, digest), doc)
    current = url.key(MANIFEST_NAME)
    try:
        now = s3.get_bytes(client, url.bucket, current)
    except StoreError:
        now = b""
    if sha256(now) == template.manifest_sha:
        s3.put_bytes(client, url.bucket, current, doc)
    return str(url.pinned(digest))
