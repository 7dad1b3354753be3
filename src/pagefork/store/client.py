"""The S3 client: boto3, configured the standard way, with errors made one line.

Credentials and region come from boto3's standard chain (environment, ``~/.aws/config`` and
``credentials``, instance roles); the endpoint from ``--endpoint-url``, else
``AWS_ENDPOINT_URL``/the config files, else AWS itself. boto3 is imported on first use, so
serving a local mem-file never pays for it.

Transient errors (throttling, 5xx, timeouts, connection resets, a refused connection) are
retried here, not by botocore: its ``standard`` mode shares one retry quota per client, which a
503 storm drains, after which a single 503 fails a page fault outright; its ``legacy`` mode
bounds attempts, not time. Every call below retries with exponential backoff and full jitter
until it succeeds, fails for good, or its deadline passes (:data:`DEADLINE`, a minute by
default), whatever failed before. A call a command makes gives a refused connection only
:data:`_REFUSED_ATTEMPTS` quick tries (a wrong URL should not cost a minute); a chunk a page
fault waits for (``patient``) waits out a store that restarts, until its deadline.

The deadline bounds the whole GET, not only each read: a socket waits at most
:data:`CONNECT_TIMEOUT` to connect and :data:`READ_TIMEOUT` for each read, and a response still
arriving at the deadline (a store that trickles its headers or its body a byte at a time, so
that no single read ever times out) is cut off there, by shutting down its socket from a
timer. botocore offers no way to abort a request, so each client's connection pools are given
a connection class that notes which connection a thread sends its request on
(:func:`_track_connections`); the body's urllib3 response (``HTTPResponse.shutdown``, urllib3
2.3 and later) is cut too. A client made elsewhere, without that class, has its headers
bounded by :data:`READ_TIMEOUT` per read only.

An object whose transfer botocore finds corrupt (its CRC from the store does not match:
flexible checksums) raises :class:`TransferCorruptError`, which :func:`get_verified` retries as
it retries bytes that fail their SHA-256: one corrupt transfer costs one more GET, and only an
object that stays wrong fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pagefork.errors import StoreError
from pagefork.store.layout import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PINNED_MANIFESTS,
    Manifest,
    S3Url,
    parse_manifest,
    sha256,
)

#: Seconds one request (every attempt and backoff included) may take before it fails.
DEADLINE = 60.0
#: Seconds to connect, and to wait for each read of a socket.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 20.0
#: First backoff and the most any backoff waits (full jitter: a random share of it).
_BACKOFF = 0.1
_BACKOFF_CAP = 5.0
#: Body bytes read at once.
_READ_PIECE = 1 << 20
#: GETs of an object whose bytes do not match their checksum before it is declared corrupt (a
#: second try rules out a one-off corruption on the way).
VERIFY_ATTEMPTS = 2
#: Error codes worth another attempt (besides every 5xx status).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
#: Attempts when nothing listens at the endpoint (a wrong URL, or a store restarting), for a
#: call that is not ``patient``.
_REFUSED_ATTEMPTS = 3
T = TypeVar("T")
log = logging.getLogger("pagefork.store")


class TransferCorruptError(StoreError):
    """An object's bytes arrived corrupt (the store's checksum of them did not match)."""


class CorruptObjectError(StoreError):
    """An object's bytes did not match their SHA-256 in every attempt: corrupt in the store."""


class MissingObjectError(StoreError):
    """The store has no object under the key asked for (deleted, or never pushed)."""


def _refused(exc: BaseException) -> bool:
    import botocore.exceptions

    return isinstance(exc, botocore.exceptions.EndpointConnectionError)


#: Concurrent connections per client: the fetcher's and the uploader's thread pools.
MAX_CONNECTIONS = 32


def make_client(endpoint_url: str | None = None, *, read_timeout: float = READ_TIMEOUT) -> Any:
    """An S3 client for ``endpoint_url`` (None: from the environment or AWS); it does not
    retry by itself (the calls below do). A socket read waits at most ``read_timeout``."""
    import boto3
    import botocore.config
    import botocore.exceptions

    config = botocore.config.Config(
        # One attempt in all ("max_attempts" would count retries only): see with_retries.
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=MAX_CONNECTIONS,
        connect_timeout=min(CONNECT_TIMEOUT, read_timeout),
        read_timeout=read_timeout,
        # Path-style addressing works with every S3-compatible store (MinIO, Ceph, moto).
        s3={"addressing_style": "path"},
    )
    try:
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        client = session.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region, config=config
        )
    except (botocore.exceptions.BotoCoreError, ValueError) as exc:
        raise StoreError(f"cannot make an S3 client: {exc}") from None
    _track_connections(client)
    return client


#: The connection each thread last sent a request on (see :func:`_track_connections`).
_SENDING: dict[int, Any] = {}


def _track_connections(client: Any) -> None:
    """Have ``client``'s connection pools note, per thread, the connection a request is sent
    on, so that a GET's deadline can cut it while its headers still arrive. botocore keeps its
    pool classes in one dict its pool managers share (created lazily, at the first request):
    each is replaced by a subclass whose connection class notes itself. Without that dict (a
    botocore that changed), nothing is replaced and only the body is cut at the deadline."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    classes = getattr(session, "_pool_classes_by_scheme", None)
    if not isinstance(classes, dict):
        return
    for scheme, pool in list(classes.items()):
        conn_cls = getattr(pool, "ConnectionCls", None)
        if conn_cls is None or getattr(conn_cls, "_pagefork_tracked", False):
            continue

        def request(self: Any, *args: Any, _base: Any = conn_cls, **kwargs: Any) -> Any:
            _SENDING[threading.get_ident()] = self
            return _base.request(self, *args, **kwargs)

        tracked = type(conn_cls.__name__, (conn_cls,), {"request": request,
                                                        "_pagefork_tracked": True})  # fmt: skip
        classes[scheme] = type(pool.__name__, (pool,), {"ConnectionCls": tracked})


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
            return MissingObjectError(f"{what}: no such object")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"{what}: access denied ({code})")
        message = str(err.get("Message", "")).splitlines()[0] if err.get("Message") else ""
        return StoreError(f"{what}: {code or 'error'} {message}".rstrip())
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return StoreError(f"{what}: cannot connect to {exc.kwargs.get('endpoint_url', '?')}")
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
        return StoreError(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return StoreError(f"{what}: {exc!r}")


def is_transient(exc: BaseException) -> bool:
    """True when another attempt may succeed (throttling, 5xx, a timeout, a lost connection)."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or status == 429 or str(err.get("Code", "")) in _TRANSIENT_CODES
    return isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ResponseStreamingError
        | botocore.exceptions.IncompleteReadError
        | ConnectionError
        | TimeoutError,
    )


def with_retries(
    call: Callable[[], T], what: str, deadline: float | None = None, *, patient: bool = False
) -> T:
    """``call()``, retried on transient errors with exponential backoff and full jitter until
    ``deadline`` (a :func:`time.monotonic` time; default :data:`DEADLINE` from now). Any other
    error, or the last transient one, is raised as a one-line :class:`StoreError` about
    ``what``. A refused connection is tried :data:`_REFUSED_ATTEMPTS` times, or, ``patient``,
    until the deadline like any other transient error."""
    end = time.monotonic() + DEADLINE if deadline is None else deadline
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if isinstance(exc, StoreError) or not is_transient(exc):
                raise store_error(exc, what) from None
            attempt += 1
            if not patient and attempt >= _REFUSED_ATTEMPTS and _refused(exc):
                raise store_error(exc, what) from None  # nothing listens: do not wait a minute
            pause = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF * 2**attempt))
            if time.monotonic() + pause >= end:
                err = store_error(exc, what)
                raise StoreError(f"{err} (gave up after {attempt} attempts)") from None
            time.sleep(pause)


def check_bucket(client: Any, bucket: str) -> None:
    """Raise :class:`StoreError` unless ``bucket`` exists and these credentials reach it."""
    import botocore.exceptions

    def head() -> None:
        try:
            client.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"s3://{bucket}: the bucket does not exist") from None
            raise

    with_retries(head, f"s3://{bucket}")


def get_bytes(
    client: Any,
    bucket: str,
    key: str,
    limit: int | None = None,
    deadline: float | None = None,
    *,
    patient: bool = False,
    byte_range: tuple[int, int] | None = None,
) -> bytes:
    """The whole object ``bucket/key``, refused when larger than ``limit`` bytes (raises
    :class:`StoreError`); retried until ``deadline`` (see :func:`with_retries`), which bounds
    every attempt's reads too. A transfer botocore finds corrupt raises
    :class:`TransferCorruptError` (not retried here: see :func:`get_verified`). With
    ``byte_range`` (start, length), only those bytes (one ranged GET)."""
    import botocore.exceptions

    end = time.monotonic() + DEADLINE if deadline is None else deadline
    where = f"s3://{bucket}/{key}"

    def too_late() -> StoreError:
        return StoreError(f"{where}: not read within its deadline")

    def get() -> bytes:
        if time.monotonic() >= end:
            raise too_late()
        me = threading.get_ident()
        _SENDING.pop(me, None)  # an earlier request's connection: never cut
        bodies: list[Any] = []
        cut = threading.Event()
        timer = threading.Timer(max(0.0, end - time.monotonic()), _cut_off, (me, bodies, cut))
        timer.daemon = True
        timer.start()
        try:
            # Headers that trickle in are cut at the deadline too: the timer runs already.
            extra = {}
            if byte_range is not None:
                extra["Range"] = f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"
            response = client.get_object(Bucket=bucket, Key=key, **extra)
            body = response["Body"]
            bodies.append(body)
            if cut.is_set():
                raise too_late()
            if limit is not None and int(response.get("ContentLength", 0)) > limit:
                if byte_range is not None:
                    raise StoreError(
                        f"{where}: the store answered a {limit}-byte range with "
                        f"{response.get('ContentLength')} bytes (it does not honour byte ranges)"
                    )
                raise StoreError(f"{where}: larger than {limit} bytes, the most pagefork reads")
            out = bytearray()
            while True:
                left = end - time.monotonic()
                if left <= 0 or cut.is_set():
                    raise too_late()
                piece = body.read(_READ_PIECE)
                if not piece:
                    break
                out += piece
                if limit is not None and len(out) > limit:
                    raise StoreError(f"{where}: larger than {limit} bytes, the most pagefork reads")
            return bytes(out)
        except botocore.exceptions.FlexibleChecksumError:
            raise TransferCorruptError(
                f"{where}: the transfer arrived corrupt (its checksum does not match)"
            ) from None
        except Exception:
            if cut.is_set():  # the read failed because the timer cut it off
                raise too_late() from None
            raise
        finally:
            timer.cancel()
            timer.join()
            _SENDING.pop(me, None)
            for body in bodies:
                body.close()

    return with_retries(get, where, end, patient=patient)


def _cut_off(thread: int, bodies: list[Any], cut: threading.Event) -> None:
    """At a GET's deadline: make its blocked read fail, by shutting its socket down (the
    connection ``thread`` sends on while the headers arrive; the body's after)."""
    cut.set()
    conn = _SENDING.get(thread)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    for body in bodies:
        stream = getattr(body, "_raw_stream", None)  # urllib3's response: botocore has no abort
        shutdown = getattr(stream, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):  # already released, closed: nothing to cut
                shutdown()


def get_verified(
    client: Any,
    bucket: str,
    key: str,
    size: int,
    sha: str,
    deadline: float | None = None,
    *,
    patient: bool = False,
    on_get: Callable[[int], None] | None = None,
) -> bytes:
    """Object ``bucket/key``, which must be ``size`` bytes with SHA-256 ``sha``: fetched again
    (up to :data:`VERIFY_ATTEMPTS` GETs in all, within ``deadline``) while it arrives corrupt
    or does not match, then :class:`CorruptObjectError`. ``on_get(n)`` is told of each GET
    that brought ``n`` bytes."""
    end = time.monotonic() + DEADLINE if deadline is None else deadline
    where = f"s3://{bucket}/{key}"
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        try:
            data = get_bytes(client, bucket, key, size, end, patient=patient)
        except TransferCorruptError as exc:
            why = str(exc)
            if on_get is not None:
                on_get(0)
        else:
            if on_get is not None:
                on_get(len(data))
            if len(data) == size and sha256(data) == sha:
                return data
            why = f"{where}: does not match its SHA-256"
        log.warning("%s (attempt %d of %d)", why, attempt, VERIFY_ATTEMPTS)
    raise CorruptObjectError(f"{where} does not match its SHA-256")


def head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """``bucket/key``'s HEAD response (size in ``ContentLength``, ``Metadata``), or None when
    it does not exist."""
    import botocore.exceptions

    def call() -> dict[str, Any] | None:
        try:
            return dict(client.head_object(Bucket=bucket, Key=key))
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    return with_retries(call, f"s3://{bucket}/{key}")


def exists(client: Any, bucket: str, key: str) -> bool:
    """True when ``bucket/key`` exists (a HEAD)."""
    return head(client, bucket, key) is not None


def put_bytes(
    client: Any,
    bucket: str,
    key: str,
    data: bytes | memoryview,
    metadata: dict[str, str] | None = None,
) -> None:
    """Store ``data`` at ``bucket/key`` (with user ``metadata``, if any)."""
    body = bytes(data)
    extra = {"Metadata": metadata} if metadata else {}
    with_retries(
        lambda: client.put_object(Bucket=bucket, Key=key, Body=body, **extra),
        f"s3://{bucket}/{key}",
    )


def pinned_key(url: S3Url, sha: str) -> str:
    """The key of the template's manifest whose SHA-256 is ``sha``."""
    return url.key(f"{PINNED_MANIFESTS}{sha}.json")


def read_pinned(client: Any, url: S3Url) -> tuple[Manifest, str]:
    """The manifest of the template at ``url``, fetched and checked, and its SHA-256.

    An unpinned ``url`` reads the prefix's ``manifest.json``; a pinned one reads the manifest
    with that SHA-256 (``manifests/<sha>.json``, or ``manifest.json`` while it still is that
    one), so a new push to the prefix never changes what it serves.
    """
    key = url.key(MANIFEST_NAME)
    if url.pin is not None:
        pinned = pinned_key(url, url.pin)
        for candidate in (pinned, key):
            try:
                data = get_bytes(client, url.bucket, candidate, MAX_MANIFEST_BYTES)
            except StoreError as exc:
                if isinstance(exc, MissingObjectError):
                    continue
                raise
            if sha256(data) == url.pin:
                return parse_manifest(data, f"s3://{url.bucket}/{candidate}"), url.pin
        raise StoreError(
            f"{url}: the manifest this template is pinned to is gone from the bucket (neither "
            f"s3://{url.bucket}/{pinned} nor the prefix's manifest.json has SHA-256 "
            f"{url.pin[:12]}...): push it again and recreate the template"
        )
    data = get_bytes(client, url.bucket, key, MAX_MANIFEST_BYTES)
    return parse_manifest(data, f"s3://{url.bucket}/{key}"), sha256(data)


def read_manifest(client: Any, url: S3Url) -> Manifest:
    """The manifest of the template at ``url`` (pinned or current), fetched and checked."""
    return read_pinned(client, url)[0]


def get_range(
    client: Any,
    bucket: str,
    key: str,
    start: int,
    length: int,
    deadline: float | None = None,
    *,
    patient: bool = False,
) -> bytes:
    """Bytes ``[start, start + length)`` of object ``bucket/key`` (one ranged GET, retried on
    transient errors until ``deadline``, which bounds its reads as :func:`get_bytes`' does).
    Fewer bytes come back from an object shorter than that: the caller checks. A store that
    ignores the range and sends more is refused (:class:`StoreError`)."""
    return get_bytes(
        client, bucket, key, length, deadline, patient=patient, byte_range=(start, length)
    )


def get_verified_range(
    client: Any,
    bucket: str,
    key: str,
    start: int,
    length: int,
    digest: bytes,
    deadline: float,
    *,
    patient: bool = False,
    on_get: Callable[[int], None] | None = None,
) -> bytes:
    """Bytes ``[start, start + length)`` of ``bucket/key``, which must have the raw SHA-256
    ``digest``: fetched again (up to :data:`VERIFY_ATTEMPTS` ranged GETs) while they arrive
    corrupt or do not match, then :class:`CorruptObjectError`; as :func:`get_verified`."""
    where = f"s3://{bucket}/{key} bytes {start}-{start + length - 1}"
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        try:
            data = get_range(client, bucket, key, start, length, deadline, patient=patient)
        except TransferCorruptError as exc:
            why = str(exc)
            if on_get is not None:
                on_get(0)
        else:
            if on_get is not None:
                on_get(len(data))
            if len(data) == length and hashlib.sha256(data).digest() == digest:
                return data
            why = f"{where}: does not match its SHA-256"
        log.warning("%s (attempt %d of %d)", why, attempt, VERIFY_ATTEMPTS)
    raise CorruptObjectError(f"{where} does not match its SHA-256")
