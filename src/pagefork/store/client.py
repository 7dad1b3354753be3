"""The S3 client: boto3, configured the standard way, with errors made one line.

Credentials and region come from boto3's standard chain (environment, ``~/.aws/config`` and
``credentials``, instance roles); the endpoint from ``--endpoint-url``, else
``AWS_ENDPOINT_URL``/the config files, else AWS itself. Transient errors (throttling, 5xx,
connection resets) are retried by botocore's ``standard`` retry mode, with exponential backoff
and jitter. boto3 is imported on first use, so serving a local mem-file never pays for it.
"""

from __future__ import annotations

import os
from typing import Any

from pagefork.errors import StoreError
from pagefork.store.layout import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    S3Url,
    parse_manifest,
)

#: Attempts per request (the first and the retries) on transient errors.
MAX_ATTEMPTS = 6
#: Concurrent connections per client: the fetcher's and the uploader's thread pools.
MAX_CONNECTIONS = 32


def make_client(endpoint_url: str | None = None, *, max_attempts: int = MAX_ATTEMPTS) -> Any:
    """An S3 client for ``endpoint_url`` (None: from the environment or AWS)."""
    import boto3
    import botocore.config
    import botocore.exceptions

    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=MAX_CONNECTIONS,
        connect_timeout=10,
        read_timeout=60,
        # Path-style addressing works with every S3-compatible store (MinIO, Ceph, moto).
        s3={"addressing_style": "path"},
    )
    try:
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        return session.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region, config=config
        )
    except (botocore.exceptions.BotoCoreError, ValueError) as exc:
        raise StoreError(f"cannot make an S3 client: {exc}") from None


def store_error(exc: BaseException, what: str) -> StoreError:
    """``exc`` from boto3 as a one-line :class:`StoreError` about ``what``."""
    import botocore.exceptions

    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StoreError(
            f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or configure ~/.aws/credentials)"
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchBucket":
            return StoreError(f"{what}: the bucket does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StoreError(f"{what}: no such object")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"{what}: access denied ({code})")
        message = str(err.get("Message", "")).splitlines()[0] if err.get("Message") else ""
        return StoreError(f"{what}: {code or 'error'} {message}".rstrip())
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return StoreError(f"{what}: cannot connect to {exc.kwargs.get('endpoint_url', '?')}")
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
        return StoreError(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return StoreError(f"{what}: {exc!r}")


def check_bucket(client: Any, bucket: str) -> None:
    """Raise :class:`StoreError` unless ``bucket`` exists and these credentials reach it."""
    import botocore.exceptions

    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StoreError(f"s3://{bucket}: the bucket does not exist") from None
        raise store_error(exc, f"s3://{bucket}") from None
    except Exception as exc:
        raise store_error(exc, f"s3://{bucket}") from None


def get_bytes(client: Any, bucket: str, key: str, limit: int | None = None) -> bytes:
    """The whole object ``bucket/key``, refused when larger than ``limit`` bytes (raises
    :class:`StoreError`)."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            if limit is not None and int(response.get("ContentLength", 0)) > limit:
                raise StoreError(
                    f"s3://{bucket}/{key}: larger than {limit} bytes, the most pagefork reads"
                )
            return bytes(body.read())
        finally:
            body.close()
    except Exception as exc:
        raise store_error(exc, f"s3://{bucket}/{key}") from None


def exists(client: Any, bucket: str, key: str) -> bool:
    """True when ``bucket/key`` exists (a HEAD)."""
    import botocore.exceptions

    try:
        client.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return False
        raise store_error(exc, f"s3://{bucket}/{key}") from None
    except Exception as exc:
        raise store_error(exc, f"s3://{bucket}/{key}") from None
    return True


def put_bytes(client: Any, bucket: str, key: str, data: bytes | memoryview) -> None:
    """Store ``data`` at ``bucket/key``."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    except Exception as exc:
        raise store_error(exc, f"s3://{bucket}/{key}") from None


def read_manifest(client: Any, url: S3Url) -> Manifest:
    """The manifest of the template at ``url``, fetched and checked."""
    where = f"s3://{url.bucket}/{url.key(MANIFEST_NAME)}"
    data = get_bytes(client, url.bucket, url.key(MANIFEST_NAME), MAX_MANIFEST_BYTES)
    return parse_manifest(data, where)
