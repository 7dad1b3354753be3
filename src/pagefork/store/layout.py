"""The layout of a template in object storage (pure: no I/O).

A template pushed to ``s3://BUCKET/PREFIX`` is:

- ``BUCKET/PREFIX/manifest.json``: format version, mem-file size, page and chunk size, per
  chunk its SHA-256 (``null`` for an all-zero chunk, which is never stored), a zlib-compressed
  per-page zero map (so a zero page never needs a fetch), and the optional hot-page list and
  vmstate objects (each named by key, SHA-256 and size).
- ``BUCKET/PREFIX/manifests/<sha256>.json``: the same manifest, named by its own SHA-256, so a
  template pinned to it (``s3://BUCKET/PREFIX#sha256=HEX``) is served the memory it was made
  from even after a new push to the prefix. Side files are content-addressed too
  (``PREFIX/vmstate-<sha256>``), so a new push never changes what an older manifest names.
- ``BUCKET/PREFIX/hot-pack-<sha256>`` (manifest version 2, optional): the hot set's pages in
  one object, in first-touch order, so a cold host fetches exactly them in a few ranged GETs.
  The manifest's ``hot_pack`` names it and holds its index: per packed page its page number in
  the template and its SHA-256 (a page is verified on its own, whatever range brought it).
  A manifest without a pack is written as version 1, so older readers still load it.
- A *layer* manifest (version 3) describes a template as its parent plus the pages it changed.
  It names its parent's manifest by key and SHA-256 (``parent``: the parent's pinned
  ``manifests/<sha256>.json``, in the same bucket), and holds the layer pack
  (``layer_pack``, ``PREFIX/layer-pack-<sha256>``: the changed pages, in page order, indexed
  as a hot pack is). It stores no chunk: ``memory_chunks`` lists the SHA-256 of each chunk of
  the memory it describes (``null`` for an all-zero one) so that a layer pushed over it can
  check it is the memory below, and ``zero_pages`` is the zero map of that memory. Every page
  no layer of the chain holds comes from the chunks of the first manifest down the chain that
  is not a layer (version 1 or 2).
- Per-block digests (optional, versions 1 and 2): ``block_size`` and ``block_digests``, the
  SHA-256 of each ``block_size`` piece of every stored chunk, in chunk order (zlib, base64). A
  page fault on a chunk not yet on the host fetches and verifies the one block around it first
  (see :mod:`pagefork.store.coldfault`). A manifest without them is served a whole chunk at a
  time; a reader that does not know them ignores them.
- ``BUCKET/<chunks_prefix><sha256>``: each chunk, content-addressed. The chunk prefix is the
  same for every template pushed into a bucket (``chunks/`` unless chosen otherwise), so
  templates that share content share chunks, and a push uploads only what the bucket lacks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from pagefork.errors import StoreError
from pagefork.regions import PAGE_SIZE

FORMAT = "pagefork-template"
VERSION = 1
#: The version of a manifest that names a hot pack; both are read.
PACK_VERSION = 2
#: The version of a layer manifest (a parent and the pages changed over it).
LAYER_VERSION = 3
#: The versions this code reads; a newer one is refused with a clear error.
KNOWN_VERSIONS = (VERSION, PACK_VERSION, LAYER_VERSION)
#: One index entry of a hot pack: the page number (little-endian u64) and its SHA-256.
PACK_ENTRY = 8 + 32
#: Chunk size of a push unless chosen otherwise (measured: see bench/bench_s3.py).
DEFAULT_CHUNK_SIZE = 2 << 20
MIN_CHUNK_SIZE = 64 << 10
#: Block size of the per-block digests a push records unless chosen otherwise (0: none).
DEFAULT_BLOCK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_CHUNKS_PREFIX = "chunks/"
MANIFEST_NAME = "manifest.json"
#: The folder, under a template's prefix, of its manifests named by their SHA-256.
PINNED_MANIFESTS = "manifests/"
#: Object metadata key holding an uploaded chunk's SHA-256 (``x-amz-meta-sha256``).
SHA_METADATA = "sha256"
#: The largest manifest read (a 1 TiB template in 64 KiB chunks lists 16 Mi chunks).
MAX_MANIFEST_BYTES = 1 << 30
#: The largest template: its zero-page map alone is a byte per 4 KiB page.
MAX_TEMPLATE_SIZE = 1 << 40
_SHA = re.compile(r"[0-9a-f]{64}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Url:
    """``s3://BUCKET/PREFIX`` (optionally ``#sha256=HEX``): where one template lives."""

    bucket: str
    prefix: str
    #: The SHA-256 of the manifest this URL is pinned to (``#sha256=HEX``), or None: the
    #: prefix's current ``manifest.json``.
    pin: str | None = None

    def key(self, name: str) -> str:
        """The key of ``name`` under this template's prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def pinned(self, sha: str) -> S3Url:
        """This template pinned to the manifest whose SHA-256 is ``sha``."""
        return S3Url(self.bucket, self.prefix, sha)

    def __str__(self) -> str:
        pin = f"#sha256={self.pin}" if self.pin else ""
        return f"s3://{self.bucket}/{self.prefix}{pin}"


def is_s3_url(text: str) -> bool:
    """True when ``text`` names object storage rather than a local file."""
    return text.startswith("s3://")


def parse_s3_url(text: str) -> S3Url:
    """Parse ``s3://BUCKET/PREFIX`` (a prefix is required: a template is a folder)."""
    if not is_s3_url(text):
        raise StoreError(f"{text!r} is not an s3://BUCKET/PREFIX URL")
    rest, pin = text[len("s3://") :], None
    m = re.search(r"#sha256=([0-9a-f]{64})\Z", rest)
    if m:
        rest, pin = rest[: m.start()], m.group(1)
    if not rest.isprintable():  # a newline, a tab, an escape: never part of a key here
        raise StoreError(f"{text!r}: the URL holds a control character")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket):
        raise StoreError(f"{text!r}: {bucket!r} is not a valid bucket name")
    if not prefix:
        raise StoreError(f"{text!r}: give a prefix for the template (s3://BUCKET/PREFIX)")
    if any(part in ("", ".", "..") for part in prefix.split("/")):
        raise StoreError(f"{text!r}: the prefix has an empty, '.' or '..' part")
    if "#" in prefix:
        raise StoreError(f"{text!r}: '#' may only start a pin, '#sha256=' and 64 hex digits")
    return S3Url(bucket, prefix, pin)


def valid_chunks_prefix(prefix: str) -> bool:
    """True when ``prefix`` is a chunk key prefix every reader accepts: empty, or relative
    parts (none empty, '.' or '..') each followed by '/'."""
    if not prefix:
        return True
    if not prefix.endswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in prefix[:-1].split("/"))


def sha256(data: bytes | memoryview) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A side object of the template (hot-page list, vmstate): its key, SHA-256 and size."""

    key: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ParentRef:
    """The manifest a layer manifest is laid over: its key (in the same bucket) and the
    SHA-256 it must have."""

    key: str
    sha256: str


@dataclass(frozen=True)
class HotPack:
    """The hot pack: object ``key`` of ``size`` bytes (SHA-256 ``sha256``), page ``i`` of it
    being template page ``pages[i]``, whose SHA-256 is ``digests[i]`` (raw 32 bytes)."""

    key: str
    sha256: str
    pages: tuple[int, ...]
    digests: tuple[bytes, ...]

    @property
    def size(self) -> int:
        """Bytes in the pack object (whole pages)."""
        return len(self.pages) * PAGE_SIZE

    def index_bytes(self) -> bytes:
        """The index as stored: a page number and a SHA-256 per packed page."""
        return b"".join(
            p.to_bytes(8, "little") + d for p, d in zip(self.pages, self.digests, strict=True)
        )


def parse_pack_index(data: bytes) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
    """Page numbers and digests of an index (:meth:`HotPack.index_bytes`)."""
    if len(data) % PACK_ENTRY:
        raise ValueError(f"{len(data)} bytes is not a whole number of entries")
    pages = tuple(
        int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), PACK_ENTRY)
    )
    digests = tuple(data[i + 8 : i + PACK_ENTRY] for i in range(0, len(data), PACK_ENTRY))
    return pages, digests


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says about one template."""

    size: int
    chunk_size: int
    chunks: tuple[str | None, ...]
    zero_pages: bytes  # one byte per 4 KiB page, 1 where the page is zero
    chunks_prefix: str = DEFAULT_CHUNKS_PREFIX
    page_size: int = PAGE_SIZE
    hot_pages: Blob | None = None
    vmstate: Blob | None = None
    hot_pack: HotPack | None = None
    #: Set in a layer manifest (version 3): the manifest below. Its ``chunks`` then describe
    #: the memory (they are not stored under ``chunks_prefix``).
    parent: ParentRef | None = None
    #: A layer manifest's pages changed over the parent (None when it changed none).
    layer_pack: HotPack | None = None
    #: Per-block digests (0 and empty: none): per chunk, the raw SHA-256 of each of its
    #: ``block_size`` pieces, concatenated (empty for an all-zero chunk).
    block_size: int = 0
    block_digests: tuple[bytes, ...] = ()

    def block_digest(self, chunk: int, block: int) -> bytes:
        """The raw SHA-256 of block ``block`` of chunk ``chunk`` (the manifest must have them)."""
        return self.block_digests[chunk][block * 32 : (block + 1) * 32]

    @property
    def is_layer(self) -> bool:
        """True for a layer manifest: its pages come from its pack and its parent."""
        return self.parent is not None

    def chunk_key(self, index: int) -> str:
        """The object key of chunk ``index`` (which must not be a zero chunk)."""
        sha = self.chunks[index]
        assert sha is not None and self.parent is None
        return self.chunks_prefix + sha

    def chunk_length(self, index: int) -> int:
        """Bytes in chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the distinct chunks this template refers to."""
        seen: dict[str, int] = {}
        for i, sha in enumerate(self.chunks):
            if sha is not None:
                seen[sha] = self.chunk_length(i)
        return sum(seen.values())

    def to_json(self) -> bytes:
        """The manifest as stored (UTF-8 JSON)."""

        def blob(b: Blob | None) -> dict[str, Any] | None:
            return None if b is None else {"key": b.key, "sha256": b.sha256, "size": b.size}

        def packed(pack: HotPack) -> dict[str, Any]:
            return {
                "key": pack.key,
                "sha256": pack.sha256,
                "size": pack.size,
                "index": base64.b64encode(zlib.compress(pack.index_bytes(), 9)).decode(),
            }

        version = VERSION if self.hot_pack is None else PACK_VERSION
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": LAYER_VERSION if self.parent is not None else version,
            "size": self.size,
            "page_size": self.page_size,
            "chunk_size": self.chunk_size,
        }
        if self.parent is None:
            doc["chunks_prefix"] = self.chunks_prefix
            doc["chunks"] = list(self.chunks)
        else:
            doc["parent"] = {"key": self.parent.key, "sha256": self.parent.sha256}
            doc["memory_chunks"] = list(self.chunks)
            doc["layer_pack"] = None if self.layer_pack is None else packed(self.layer_pack)
        doc["zero_pages"] = base64.b64encode(zlib.compress(self.zero_pages, 9)).decode()
        doc["hot_pages"] = blob(self.hot_pages)
        doc["vmstate"] = blob(self.vmstate)
        if self.hot_pack is not None:
            doc["hot_pack"] = packed(self.hot_pack)
        if self.block_size and self.parent is None:  # ignored by readers that do not know them
            doc["block_size"] = self.block_size
            flat = zlib.compress(b"".join(self.block_digests), 9)
            doc["block_digests"] = base64.b64encode(flat).decode()
        return json.dumps(doc, indent=1).encode()


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse and check a manifest; :class:`StoreError` names ``where`` and the bad field."""

    def bad(why: str) -> StoreError:
        return StoreError(f"manifest {where}: {why}")

    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    except RecursionError:  # the parser recurses per level: a hostile store nests deep
        raise bad("not a manifest (JSON nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} manifest")
    version = doc.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > LAYER_VERSION:
        raise bad(
            f"format version {version} is newer than this pagefork reads (1 to "
            f"{LAYER_VERSION}): upgrade pagefork on this host to serve it"
        )
    if version not in KNOWN_VERSIONS or isinstance(version, bool):
        raise bad(f"format version {version!r} is not one of {KNOWN_VERSIONS}")
    layer = version == LAYER_VERSION

    def integer(name: str, low: int, high: int) -> int:
        value = doc.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise bad(f"{name} {value!r} is not a whole number in [{low}, {high}]")
        return value

    size = integer("size", 1, MAX_TEMPLATE_SIZE)
    page_size = integer("page_size", PAGE_SIZE, PAGE_SIZE)
    chunk_size = integer("chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    if chunk_size & (chunk_size - 1):
        raise bad(f"chunk_size {chunk_size} is not a power of two")
    prefix = doc.get("chunks_prefix", DEFAULT_CHUNKS_PREFIX if layer else None)
    if not isinstance(prefix, str) or not valid_chunks_prefix(prefix):
        raise bad(f"chunks_prefix {prefix!r} is not a key prefix")
    chunks_name = "memory_chunks" if layer else "chunks"
    chunks = doc.get(chunks_name)
    nchunks = (size + chunk_size - 1) // chunk_size
    if not isinstance(chunks, list) or len(chunks) != nchunks:
        raise bad(f"{chunks_name} must be a list of {nchunks} entries")
    for i, sha in enumerate(chunks):
        if sha is not None and not (isinstance(sha, str) and _SHA.fullmatch(sha)):
            raise bad(f"chunk {i}: {sha!r} is neither null nor a hex SHA-256")
    npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    try:
        # Bounded: a map that inflates past its size is refused, not held in memory.
        inflate = zlib.decompressobj()
        zeros = inflate.decompress(
            base64.b64decode(doc.get("zero_pages", ""), validate=True), npages + 1
        )
    except (ValueError, TypeError, zlib.error) as exc:
        raise bad(f"zero_pages does not decode ({exc})") from None
    if len(zeros) != npages or zeros.strip(b"\x00\x01"):
        raise bad(f"zero_pages must hold {npages} bytes of 0 or 1")
    per_chunk = chunk_size // PAGE_SIZE
    for i, sha in enumerate(chunks):
        if sha is None and zeros.find(0, i * per_chunk, (i + 1) * per_chunk) >= 0:
            raise bad(f"chunk {i} is null (all zero) but zero_pages marks data in it")

    def blob(name: str) -> Blob | None:
        value = doc.get(name)
        if value is None:
            return None
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("key"), str)
            or not isinstance(value.get("sha256"), str)
            or not _SHA.fullmatch(value["sha256"])
            or not isinstance(value.get("size"), int)
            or value["size"] < 0
        ):
            raise bad(f"{name} must be null or {{key, sha256, size}}")
        return Blob(value["key"], value["sha256"], value["size"])

    hot_pack = None
    if version != VERSION and doc.get("hot_pack") is not None:
        hot_pack = _parse_pack(doc["hot_pack"], npages, zeros, bad)
    parent = layer_pack = None
    if layer:
        ref = doc.get("parent")
        if (
            not isinstance(ref, dict)
            or not isinstance(ref.get("key"), str)
            or not ref["key"]
            or not isinstance(ref.get("sha256"), str)
            or not _SHA.fullmatch(ref["sha256"])
        ):
            raise bad("parent must be {key, sha256} (a layer manifest names its parent)")
        parent = ParentRef(ref["key"], ref["sha256"])
        if doc.get("layer_pack") is not None:
            layer_pack = _parse_pack(doc["layer_pack"], npages, zeros, bad, "layer_pack")
    block_size, block_digests = (
        (0, ()) if layer else _parse_blocks(doc, size, chunk_size, chunks, bad)
    )
    return Manifest(
        size=size,
        chunk_size=chunk_size,
        chunks=tuple(chunks),
        zero_pages=zeros,
        chunks_prefix=prefix,
        page_size=page_size,
        hot_pages=blob("hot_pages"),
        vmstate=blob("vmstate"),
        hot_pack=hot_pack,
        parent=parent,
        layer_pack=layer_pack,
        block_size=block_size,
        block_digests=block_digests,
    )


# --- per-block digests ----------------------------------------------------------------------


def blocks_in(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` in a chunk of ``length`` bytes (the last may be short)."""
    return (length + block_size - 1) // block_size


def block_digests_of(data: bytes | memoryview, block_size: int) -> bytes:
    """The raw SHA-256 of each ``block_size`` piece of chunk ``data``, concatenated."""
    view = memoryview(data)
    return b"".join(
        hashlib.sha256(view[i : i + block_size]).digest() for i in range(0, len(view), block_size)
    )


def valid_block_size(block_size: int, chunk_size: int) -> bool:
    """True when ``block_size`` is whole pages, a power of two, and at most a chunk."""
    return PAGE_SIZE <= block_size <= chunk_size and not block_size & (block_size - 1)


def _inflate_digests(packed: bytes, most: int) -> bytes:
    """``packed`` (zlib) inflated, when it holds at most ``most`` bytes and could be a list
    of SHA-256 digests: digests do not compress, so a list of them inflates to little more
    than it was. One that inflates further (a zlib bomb from a hostile store) is refused
    before it is held in memory (:class:`ValueError`); one over ``most`` comes back with a
    byte more, for the caller to refuse by its size."""
    bound = min(most, 2 * len(packed) + 4096)
    inflate = zlib.decompressobj()
    out = inflate.decompress(packed, bound + 1)
    if len(out) > bound and bound < most:
        raise ValueError(
            f"it inflates past {bound} bytes from {len(packed)}: not a list of SHA-256 digests"
        )
    return out


def _parse_blocks(
    doc: dict[str, Any], size: int, chunk_size: int, chunks: list[Any], bad: Any
) -> tuple[int, tuple[bytes, ...]]:
    """The manifest's per-block digests, checked: (0, ()) when it has none."""
    if doc.get("block_size") is None and doc.get("block_digests") is None:
        return 0, ()
    block_size = doc.get("block_size")
    if (
        not isinstance(block_size, int)
        or isinstance(block_size, bool)
        or not valid_block_size(block_size, chunk_size)
    ):
        raise bad(f"block_size {block_size!r} is not a power of two in [{PAGE_SIZE}, chunk_size]")
    counts = [
        0 if sha is None else blocks_in(min(chunk_size, size - i * chunk_size), block_size)
        for i, sha in enumerate(chunks)
    ]
    want = 32 * sum(counts)
    try:
        packed = base64.b64decode(doc.get("block_digests") or "", validate=True)
        flat = _inflate_digests(packed, want)
    except (ValueError, TypeError, zlib.error) as exc:
        raise bad(f"block_digests does not decode ({exc})") from None
    if len(flat) != want:
        raise bad(f"block_digests must hold {want} bytes (32 per block), not {len(flat)}")
    out: list[bytes] = []
    at = 0
    for n in counts:
        out.append(flat[at : at + 32 * n])
        at += 32 * n
    return block_size, tuple(out)


def _parse_pack(value: Any, npages: int, zeros: bytes, bad: Any, name: str = "hot_pack") -> HotPack:
    """The manifest's ``hot_pack``, checked: its pages are distinct, in the template and not
    zero (a zero page is never fetched), and the index matches the object's size."""
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("key"), str)
        or not isinstance(value.get("sha256"), str)
        or not _SHA.fullmatch(value["sha256"])
        or not isinstance(value.get("size"), int)
        or not isinstance(value.get("index"), str)
    ):
        raise bad(f"{name} must be {{key, sha256, size, index}}")
    try:
        packed = base64.b64decode(value["index"], validate=True)
        index = _inflate_digests(packed, npages * PACK_ENTRY)
        pages, digests = parse_pack_index(index)
    except (ValueError, TypeError, zlib.error) as exc:
        raise bad(f"{name} index does not decode ({exc})") from None
    if len(pages) * PAGE_SIZE != value["size"]:
        raise bad(f"{name} lists {len(pages)} pages but its size is {value['size']}")
    if len(set(pages)) != len(pages):
        raise bad(f"{name} lists a page twice")
    for p in pages:
        if p >= npages or zeros[p]:
            raise bad(f"{name} page {p} is outside the template or marked zero")
    return HotPack(value["key"], value["sha256"], pages, digests)
