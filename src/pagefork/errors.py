"""The one error hierarchy of pagefork.

Every error a caller can act on derives from :class:`PageforkError`; its message says what
was wrong and where (file, entry index, fork id).
"""

from __future__ import annotations


class PageforkError(Exception):
    """Base class of every error pagefork raises on purpose."""


class UffdError(PageforkError):
    """A userfaultfd system call or ioctl failed, or userfaultfd is unavailable."""

    def __init__(self, message: str, errno: int | None = 0) -> None:
        super().__init__(message)
        self.errno = errno or 0


class HandshakeError(PageforkError):
    """A VMM's handshake message (mappings JSON and uffd) is malformed or unusable."""


class MemFileError(PageforkError):
    """The template mem-file is missing, unreadable, or does not fit the regions."""


class ForkError(PageforkError):
    """A fork id is invalid, unknown, duplicated, or its session failed."""


class HotPageFileError(PageforkError):
    """A hot-page file is corrupt: the message names the file and the entry index."""


class PrefetchError(PageforkError):
    """A hot-page list does not fit a fork's regions, or installing it failed.

    ``installed`` counts the pages that were installed before the failure.
    """

    installed: int = 0


class TemplateError(PageforkError):
    """A template (mem-file, vmstate, metadata) is missing or broken."""


class StoreError(PageforkError):
    """Object storage (an S3 URL, bucket, object, credentials, the chunk cache) failed."""


class VmmError(PageforkError):
    """A VMM (the built-in KVM microVM or Firecracker) failed or refused a request."""


class DaemonError(PageforkError):
    """The daemon refused a request (``status`` is the HTTP status, 0 if unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status
