"""Process health shared by the server shell and the handlers, without gevent.

The server flips ``draining`` on SIGTERM; ``/ping`` reads it and answers 503 so a
load balancer rotates the node out before connections start being refused.
"""

from __future__ import annotations


class Lifecycle:
    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False

    def start_draining(self) -> None:
        self.draining = True
