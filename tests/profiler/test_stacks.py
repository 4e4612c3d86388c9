"""Which of a long span's samples names its culprit (``stacks.dominant``).

The watchdog samples a span every half threshold, and may be late on a loaded host: the
handler that blocked can return before the last samples, which then land in the code
that runs after it in the same span, the server writing the response."""

from __future__ import annotations

import gevent._socketcommon

from tafe.profiler.stacks import dominant

GEVENT = gevent._socketcommon.__file__
SERVER = "/srv/app/tafe/server.py"
HANDLER = ("/srv/app/routes.py", 68, "cpu_route")
RESPOND = (SERVER, 300, "_respond")
IN_HANDLER = (RESPOND, (SERVER, 310, "_call_app"), HANDLER)
IN_SEND = (RESPOND, (SERVER, 414, "_send_whole"), (GEVENT, 716, "send"))


def test_a_late_sample_in_the_server_does_not_outvote_the_handler() -> None:
    samples = [(IN_HANDLER, 0.012), (IN_SEND, 0.026), (IN_SEND, 0.031)]
    assert dominant(samples, {SERVER}) == samples[0]
    # Without knowing the server's files, its code counts as the application's.
    assert dominant(samples) == samples[2]


def test_library_code_after_the_handler_is_ranked_below_it() -> None:
    in_library = ((GEVENT, 200, "handle"), (GEVENT, 716, "send"))
    samples = [(IN_HANDLER, 0.012), (in_library, 0.026)]
    assert dominant(samples) == samples[0]


def test_the_frame_most_samples_share_then_the_later_one() -> None:
    other = (RESPOND, (SERVER, 310, "_call_app"), ("/srv/app/routes.py", 90, "log_route"))
    samples = [(IN_HANDLER, 0.006), (IN_HANDLER, 0.011), (other, 0.016)]
    assert dominant(samples, {SERVER}) == samples[1]
    assert dominant(samples[1:], {SERVER}) == samples[2]


def test_a_span_only_in_the_server_is_still_named() -> None:
    samples = [(IN_SEND, 0.012)]
    assert dominant(samples, {SERVER}) == samples[0]
    assert dominant([], {SERVER}) is None
