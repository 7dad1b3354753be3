"""An HTTP proxy in front of an S3 endpoint that adds latency, failures and counts requests.

Tests and benchmarks put it between pagefork and a local S3-compatible server (``moto_server``)
to show what a real object store does: :attr:`S3Proxy.delay` seconds pass before each
request is forwarded (the time to the first byte of a distant store, 10-50 ms), and
:meth:`S3Proxy.fail_next` answers the next requests with an error status (503 SlowDown, say)
instead of forwarding them, and :meth:`S3Proxy.hang` makes requests wait, unanswered, until the
proxy closes (a hung store). :meth:`S3Proxy.trickle` sends chosen bodies, or their headers,
a byte at a time (a store that is slow but never silent), :meth:`S3Proxy.flip_bits` flips one
bit in the first GETs of chosen objects (transfers corrupted on the way) and
:meth:`S3Proxy.refuse_for` stops listening for a while and drops every open connection (a
store restarting).
:attr:`S3Proxy.bandwidth` caps the bytes per second of the answers to GETs, all connections
sharing the one link (a store reached over a slow or busy network).
:attr:`S3Proxy.gets` counts the GETs per object key, so a test can tell how many times a chunk
was fetched; :attr:`S3Proxy.got_bytes` the body bytes they brought, and
:attr:`S3Proxy.put_bytes` the body bytes uploaded per key (what a push really sends).
Request signatures pass through untouched (the ``Host`` header is kept), so any client that
signs for the proxy's address works.

:class:`S3ProxyProcess` runs the proxy in a process of its own (``python -m
pagefork.testing.s3proxy UPSTREAM``), as a benchmark wants: a store's work must not compete
with the page server for this process's interpreter. It is steered through the proxy's control
paths (``/_pagefork_proxy/...``; no bucket name starts with ``_``).
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from types import TracebackType

#: Headers that belong to one hop, not to the request or response.
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}

_CONTROL = "/_pagefork_proxy/"

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's default backlog is 5: a burst of parallel fetches would overflow it and
    # wait a second for the SYN to be retried.
    request_queue_size = 128


class S3Proxy:
    """A proxy on ``127.0.0.1`` (an ephemeral port) forwarding to ``upstream``
    (``http://HOST:PORT``). Start with :meth:`start` or ``with``; :attr:`url` is its address."""

    def __init__(self, upstream: str, delay: float = 0.0, bandwidth: float = 0.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.delay = delay
        #: Bytes per second of GET answers, shared by all connections (0: no cap).
        self.bandwidth = bandwidth
        self._link_free = 0.0  # when the capped link has sent what it was given
        self.gets: collections.Counter[str] = collections.Counter()
        #: Body bytes of the GET answers sent.
        self.got_bytes = 0
        #: Body bytes uploaded (PUT), per path.
        self.put_bytes: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._failures: list[tuple[int, str]] = []  # (status, key substring) to answer next
        self._hang: str | None = None  # key substring of requests left unanswered
        self._hang_whole = False  # only those without a Range header
        self._unhang = threading.Event()  # set: the requests left unanswered go on
        # (key substring, seconds per byte, the headers rather than the body)
        self._trickle: tuple[str, float, bool] | None = None
        self._flip: tuple[str, int] | None = None  # (key substring, GETs per object to flip)
        self._flipped: collections.Counter[str] = collections.Counter()  # flips per path
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()  # open client connections
        #: Set while the proxy listens (cleared during :meth:`refuse_for`).
        self.listening = threading.Event()
        self._reopen: threading.Timer | None = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out as two writes: without this, Nagle holds the body
                # back until the client's delayed ACK of the headers (up to 200 ms a request).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with proxy._lock:
                    proxy._conns.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def log_message(self, format: str, *args: object) -> None:
                pass  # a request log per chunk would drown a test's output

            def _forward(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self._handler = Handler
        self._server = self._listen(0)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    def _listen(self, port: int) -> _Server:
        server = _Server(("127.0.0.1", port), self._handler)
        server.daemon_threads = True
        return server

    def fail_next(self, count: int, status: int = 503, key_contains: str = "") -> None:
        """Answer the next ``count`` requests whose path contains ``key_contains`` with
        ``status`` (a SlowDown error body) instead of forwarding them."""
        with self._lock:
            self._failures.extend([(status, key_contains)] * count)

    def hang(self, key_contains: str | None, *, whole_only: bool = False) -> None:
        """Leave every request whose path contains ``key_contains`` (with ``whole_only``, only
        those without a ``Range`` header: whole objects) unanswered until the proxy closes
        (None: answer them all again, those held so far included)."""
        with self._lock:
            self._hang = key_contains
            self._hang_whole = whole_only
            if key_contains is None:
                self._unhang.set()
            elif self._unhang.is_set():
                self._unhang = threading.Event()

    def trickle(
        self, key_contains: str | None, seconds_per_byte: float = 1.0, *, headers: bool = False
    ) -> None:
        """Send the body of every GET whose path contains ``key_contains`` one byte per
        ``seconds_per_byte`` (headers at once, in full; None: at full speed again). With
        ``headers``, the status line and headers trickle so instead (the body follows at
        once): a client never gets as far as the body."""
        with self._lock:
            self._trickle = (
                None if key_contains is None else (key_contains, seconds_per_byte, headers)
            )

    def flip_bits(self, key_contains: str | None, gets: int = 1) -> None:
        """Flip one bit in the body of the first ``gets`` GETs of each object whose path
        contains ``key_contains`` (headers, checksums included, unchanged); later GETs are
        intact (None: flip no more)."""
        with self._lock:
            self._flip = None if key_contains is None else (key_contains, gets)

    def refuse_for(self, seconds: float) -> None:
        """Stop listening and drop every open connection, so that new ones are refused, for
        ``seconds``; then listen on the same port again (:attr:`listening` is set then)."""
        self._stop_listening()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._reopen = threading.Timer(seconds, self._listen_again)
        self._reopen.daemon = True
        self._reopen.start()

    def _stop_listening(self) -> None:
        self.listening.clear()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def _listen_again(self) -> None:
        if self._closing.is_set():
            return
        self._server = self._listen(self.port)
        self.start()

    def _take_flip(self, h: http.server.BaseHTTPRequestHandler, path: str) -> bool:
        with self._lock:
            if h.command != "GET" or self._flip is None or self._flip[0] not in path:
                return False
            if self._flipped[path] >= self._flip[1]:
                return False
            self._flipped[path] += 1
            return True

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            for i, (status, part) in enumerate(self._failures):
                if part in path:
                    del self._failures[i]
                    return status
        return None

    def _control(self, h: http.server.BaseHTTPRequestHandler, path: str) -> None:
        """``/_pagefork_proxy/stats`` (the counts), ``/_pagefork_proxy/delay?seconds=S``,
        ``/_pagefork_proxy/bandwidth?bytes=B`` (per second; 0: no cap) and
        ``/_pagefork_proxy/reset`` (counts back to zero)."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        if path.endswith("/delay") and "seconds" in query:
            self.delay = float(query["seconds"][0])
        if path.endswith("/bandwidth") and "bytes" in query:
            self.bandwidth = float(query["bytes"][0])
        if path.endswith("/reset"):
            self.reset_counts()
        with self._lock:
            doc = {
                "gets": dict(self.gets),
                "requests": self.requests,
                "delay": self.delay,
                "bandwidth": self.bandwidth,
                "got_bytes": self.got_bytes,
                "put_bytes": dict(self.put_bytes),
            }
        data = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = urllib.parse.urlsplit(h.path).path
        if path.startswith(_CONTROL):
            self._control(h, path)
            return
        with self._lock:
            self.requests += 1
            if h.command == "GET":
                self.gets[path] += 1
            elif h.command == "PUT":
                self.put_bytes[path] += len(body)
        if self.delay > 0:
            time.sleep(self.delay)  # the injected time to first byte (this is the point)
        with self._lock:
            hang = self._hang is not None and self._hang in path
            hang = hang and not (self._hang_whole and h.headers.get("Range"))
            unhang = self._unhang
        if hang:
            while not (self._closing.wait(0.05) or unhang.is_set()):
                pass  # a hung store: the connection stays open, silent
            if self._closing.is_set():
                h.close_connection = True
                return
        status = self._take_failure(path)
        if status is not None:
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(_SLOWDOWN)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(_SLOWDOWN)
            return
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(*self.upstream, timeout=60)
            self._local.conn = conn
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        try:
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._local.conn = None
            h.send_error(502)
            return
        with self._lock:
            trickle = self._trickle
        trickling = h.command == "GET" and trickle is not None and trickle[0] in path
        if trickling and trickle is not None and trickle[2]:
            self._trickle_headers(h, resp, data, trickle[1])
            return
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header(
            "Content-Length",
            str(len(data) if h.command != "HEAD" else resp.getheader("Content-Length") or 0),
        )
        h.end_headers()
        if h.command == "HEAD":
            return
        if data and self._take_flip(h, path):
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x01
            data = bytes(flipped)
        if h.command == "GET":
            with self._lock:
                self.got_bytes += len(data)
            self._pace(len(data))
        if trickling and trickle is not None:
            h.close_connection = True
            with contextlib.suppress(OSError):  # the client gave up: it may
                for i in range(len(data)):  # a byte at a time: no read ever waits long
                    h.wfile.write(data[i : i + 1])
                    h.wfile.flush()
                    if self._closing.wait(trickle[1]):
                        break
            return
        h.wfile.write(data)

    def _pace(self, nbytes: int) -> None:
        """Under a bandwidth cap, wait until the shared link has room for ``nbytes``: each
        answer takes its turn, ``nbytes / bandwidth`` seconds after the one before."""
        with self._lock:
            if self.bandwidth <= 0 or nbytes == 0:
                return
            start = max(time.monotonic(), self._link_free)
            self._link_free = start + nbytes / self.bandwidth
            until = self._link_free
        self._closing.wait(max(0.0, until - time.monotonic()))

    def reset_counts(self) -> None:
        """Set every count (GETs, requests, bytes) back to zero."""
        with self._lock:
            self.gets.clear()
            self.put_bytes.clear()
            self.got_bytes = 0
            self.requests = 0

    def _trickle_headers(
        self,
        h: http.server.BaseHTTPRequestHandler,
        resp: http.client.HTTPResponse,
        data: bytes,
        seconds_per_byte: float,
    ) -> None:
        """Answer with the status line and headers one byte at a time, then ``data``."""
        h.close_connection = True
        lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
        lines += [f"{k}: {v}" for k, v in resp.getheaders() if k.lower() not in _HOP
                  and k.lower() != "content-length"]  # fmt: skip
        lines += [f"Content-Length: {len(data)}", "Connection: close", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        with contextlib.suppress(OSError):  # the client gave up: it may
            for i in range(len(head)):
                h.wfile.write(head[i : i + 1])
                h.wfile.flush()
                if self._closing.wait(seconds_per_byte):
                    return
            h.wfile.write(data)

    def get_count(self, key: str) -> int:
        """GETs seen for the object ``key`` (in any bucket)."""
        with self._lock:
            return sum(n for path, n in self.gets.items() if path.endswith("/" + key))

    def start(self) -> S3Proxy:
        """Serve on a thread of this process."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="s3proxy", daemon=True
        )
        self._thread.start()
        self.listening.set()
        return self

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._closing.set()
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen.join()
        self._stop_listening()

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` while the block runs (a test's or a benchmark's store
    credentials); what was there before, or its absence, is restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MotoServer:
    """A local S3-compatible server: ``python -m moto.server`` on ``127.0.0.1`` and a free
    port (the ``moto[server]`` extra), for tests and benchmarks. :attr:`url` is its endpoint.
    Any credentials are accepted."""

    def __init__(self, timeout: float = 60.0) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        running = threading.Event()

        def drain() -> None:  # werkzeug logs every request: keep its pipe from filling up
            assert self._proc.stderr is not None
            for line in self._proc.stderr:
                if "Running on" in line:
                    running.set()
            running.set()  # it exited: stop waiting

        self._drainer = threading.Thread(target=drain, name="moto-log", daemon=True)
        self._drainer.start()
        if not running.wait(timeout) or self._proc.poll() is not None:
            status = self._proc.poll()
            self.close()
            raise RuntimeError(f"moto_server did not start (exit status {status})")

    def close(self) -> None:
        """Kill the server and reap it."""
        self._proc.kill()
        self._proc.wait()
        self._drainer.join()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class S3ProxyProcess:
    """An :class:`S3Proxy` in its own process, in front of ``upstream``; :attr:`url` is its
    address. :meth:`set_delay` and :meth:`gets` steer and read it over HTTP."""

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pagefork.testing.s3proxy", upstream, str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()  # its URL, once it listens
        if not line.startswith("http://"):
            self.close()
            raise RuntimeError(f"the S3 proxy did not start (exit status {self._proc.poll()})")
        self.url = line

    def _call(self, what: str) -> dict[str, object]:
        with urllib.request.urlopen(f"{self.url}{_CONTROL}{what}", timeout=30) as r:
            doc: dict[str, object] = json.loads(r.read())
        return doc

    def set_delay(self, seconds: float) -> None:
        """Delay every later request by ``seconds`` before forwarding it."""
        self._call(f"delay?seconds={seconds}")

    def gets(self) -> dict[str, int]:
        """GETs seen so far, per path."""
        gets = self._call("stats")["gets"]
        assert isinstance(gets, dict)
        return {str(k): int(v) for k, v in gets.items()}

    def set_bandwidth(self, bytes_per_second: float) -> None:
        """Cap the GET answers at ``bytes_per_second`` over all connections (0: no cap)."""
        self._call(f"bandwidth?bytes={bytes_per_second}")

    def stats(self) -> dict[str, object]:
        """Everything counted: ``gets`` (per path), ``got_bytes``, ``put_bytes`` (per path),
        ``requests``, and the ``delay`` and ``bandwidth`` in force."""
        return self._call("stats")

    def reset(self) -> None:
        """Set every count back to zero."""
        self._call("reset")

    def close(self) -> None:
        """Stop the proxy (it exits when its stdin closes) and reap it."""
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> S3ProxyProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main() -> None:
    """``python -m pagefork.testing.s3proxy UPSTREAM [DELAY]``: print the proxy's URL, serve
    until stdin closes."""
    proxy = S3Proxy(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0).start()
    print(proxy.url, flush=True)
    sys.stdin.read()
    proxy.close()


if __name__ == "__main__":
    main()
