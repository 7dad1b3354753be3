"""Telling systemd where the daemon stands (``sd_notify``), in a few lines, without a library.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a Unix datagram socket (a name
starting with ``@`` is in the abstract namespace). A daemon that took over sends
``MAINPID=<its pid>`` with ``READY=1``, so systemd follows the new process as the service's
main one (the unit needs ``NotifyAccess=all``: the sender is not the main process yet).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger("pagefork")


def notify(**fields: object) -> bool:
    """Send ``KEY=value`` lines to ``$NOTIFY_SOCKET``; False when unset or unreachable."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc.strerror or exc)
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    return True
