"""Types of the C extension ``_fastpath.c`` (its header comment gives the rules);
``stubtest`` in .ci/run checks them against the built module."""

from collections.abc import Callable
from typing import Any, Final, final

DONE: Final[int]
CLOSE: Final[int]
WAIT: Final[int]
GONE: Final[int]
GENERAL: Final[int]
WSGI: Final[int]
UNSENT: Final[int]

def parse(
    data: bytes, max_head: int, max_body: int, /
) -> tuple[int, str, bytes, list[tuple[bytes, bytes]], bytes, bool, bool] | int:
    """(end, method, target, headers, body, keep_alive, http11) of a whole simple request
    at the start of data, else 0 (not whole yet) or -1 (not simple)."""

@final
class Outbox:
    """Answers of many connections sent together, each held about ``hold`` seconds at
    most (the rules are in ``_fastpath.c``)."""

    def __init__(self, hold: float) -> None: ...
    def flush(self) -> None: ...
    @property
    def held(self) -> int: ...
    @property
    def answers(self) -> int: ...
    @property
    def batches(self) -> int: ...

@final
class Conn:
    def __init__(
        self,
        fd: int,
        handle: Callable[[str, str, dict[str, Any]], tuple[str, list[tuple[str, str]], bytes] | None],
        base: dict[str, Any],
        server: Any,
        max_head: int,
        max_body: int,
        outbox: Outbox | None = None,
    ) -> None: ...
    def step(self) -> int: ...
    def take(self, n: int = -1, /) -> bytes: ...
    def take_unsent(self) -> bytes: ...
    def send_held(self) -> bool: ...
    @property
    def held(self) -> bool: ...
    @property
    def buffered(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def arrival(self) -> float: ...
    @property
    def request_end(self) -> int: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def http11(self) -> bool: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def method(self) -> str | None: ...
    @property
    def target(self) -> bytes | None: ...
    @property
    def status(self) -> str | None: ...
