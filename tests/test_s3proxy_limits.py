"""The fault-injecting proxy's store model: a bandwidth cap shared by all connections, and the
bytes it counts (GET answers, PUT bodies), against a real moto server."""

from __future__ import annotations

import concurrent.futures
import time

from procs import proxy_fixture, s3_env_fixture  # noqa: F401

from pagefork.store.client import get_bytes, make_client, put_bytes

KIB = 1 << 10


def test_a_bandwidth_cap_is_shared_by_parallel_gets_and_bytes_are_counted(proxy, s3_bucket):
    client = make_client(proxy.url)
    put_bytes(client, s3_bucket, "a", b"a" * (128 * KIB))
    put_bytes(client, s3_bucket, "b", b"b" * (128 * KIB))
    assert proxy.put_bytes[f"/{s3_bucket}/a"] == 128 * KIB
    proxy.reset_counts()
    proxy.bandwidth = 512 * KIB  # bytes per second, over every connection
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda k: get_bytes(client, s3_bucket, k), ["a", "b"]))
    elapsed = time.monotonic() - started
    assert got == [b"a" * (128 * KIB), b"b" * (128 * KIB)]
    # 256 KiB through a 512 KiB/s link: at least half a second, however the two overlap
    # (a lower bound: the cap only ever adds waiting).
    assert elapsed >= 0.5
    assert proxy.got_bytes == 256 * KIB and sum(proxy.gets.values()) == 2
    proxy.reset_counts()
    assert proxy.got_bytes == 0 and not proxy.gets and not proxy.put_bytes
