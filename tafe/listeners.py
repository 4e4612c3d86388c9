"""Listening sockets, opened before any worker exists (the master's, shared by its
workers) or by a single-process ``tafe serve``. No gevent here: the master is not
patched, and a socket made here works in a worker once inherited.

A listener that cannot be opened is a ``ListenError``: a one-line ``SettingsError``
naming the address.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tafe.settings import SettingsError


class ListenError(SettingsError):
    """A listener could not be opened; the message names the address."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR); port 0 picks a free port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


# sun_path holds 108 bytes, the last one a NUL.
UNIX_PATH_MAX = 107


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, for Nginx in front (``tafe up``): no TCP/IP
    stack on the hop, so each bid and answer costs the kernel less than on loopback TCP.
    A socket file left by a run that was killed is replaced."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        os.chmod(path, 0o666)  # Nginx's workers run as "nobody" under root
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    return sock
