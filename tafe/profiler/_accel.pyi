"""Types of the C extension ``_accel.c`` (its header comment says what each does);
``stubtest`` in .ci/run checks them against the built module. Names with ``_`` exist
only here, for annotations."""

from collections.abc import Callable
from typing import Any, Literal, TypedDict, final

# greenlet's tracer: called as tracer(event, (origin, target)) after every switch.
_TraceFunc = Callable[[Literal["switch", "throw"], tuple[Any, Any]], object]

class _WatchStats(TypedDict):
    wakeups: int
    errors: int
    native_id: int
    realtime: bool

@final
class Hook:
    threshold: float
    previous: _TraceFunc | None
    def __new__(
        cls, hub: Any, threshold_s: float, on_block: Callable[[Any, float, float], object] | None, sampled: dict[Any, list[float]]
    ) -> Hook: ...
    def __call__(self, event: str, args: tuple[Any, Any], /) -> object: ...
    def __getitem__(self, i: Literal[0], /) -> tuple[float, Any]:
        """(start of the running span, greenlet running it), read together."""
    def __len__(self) -> int: ...
    def restart(self, running: Any, /) -> None: ...
    def over(self) -> bool: ...

@final
class Watch:
    def __new__(cls, hook: Hook, period_s: float, threshold_s: float, on_long: Callable[[], float], schedstat_fd: int) -> Watch: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def readings(self) -> tuple[tuple[float, int | None], tuple[float, int | None]]:
        """(time, run-queue wait ns or None) at the last wake-up, and at the one before."""
    def stats(self) -> _WatchStats: ...
