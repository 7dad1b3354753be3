"""Templates in S3-compatible object storage: push once, fork lazily on any host.

- :mod:`~pagefork.store.layout`: the manifest and chunk layout (pure: bytes in, values out).
- :mod:`~pagefork.store.client`: the S3 client (boto3: the standard credentials chain,
  ``AWS_ENDPOINT_URL`` or an explicit endpoint, retries with backoff) and its errors.
- :mod:`~pagefork.store.cache`: the host's content-addressed chunk cache (bounded, LRU).
- :mod:`~pagefork.store.push`: uploading a template.
- :mod:`~pagefork.store.lazy`: a template served lazily: a sparse memory view filled chunk by
  chunk, after verification, by a coalescing fetcher.
"""

from __future__ import annotations

from pagefork.store.layout import S3Url, is_s3_url, parse_s3_url

__all__ = ["S3Url", "is_s3_url", "parse_s3_url"]
