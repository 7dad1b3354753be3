"""pagefork: a userfaultfd page server for microVM fork fan-out.

The public API: :class:`PageServer` and :class:`ServerConfig` serve forks of one template
mem-file over Firecracker's UFFD protocol; :class:`HotPageList` records and stores a warm-up
fork's hot set, which :meth:`PageServer.prefetch` installs into later forks.
"""

__version__ = "0.1.0"
