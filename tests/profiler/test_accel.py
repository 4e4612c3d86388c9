"""The C hook and wake-up loop (tafe/profiler/_accel.c) on their own, called directly."""

from __future__ import annotations

import time

import pytest

from tafe.profiler._accel import Hook, Watch

HUB, A, B = object(), object(), object()


def test_hook_times_spans_reports_long_ones_and_chains() -> None:
    blocks: list[tuple] = []
    chained: list[tuple] = []
    sampled: dict = {}
    hook = Hook(HUB, 0.005, lambda g, start, span: blocks.append((g, start, span)), sampled)
    hook.previous = lambda event, args: chained.append((event, args))
    hook.restart(A)
    start, running = hook[0]
    assert running is A and abs(time.perf_counter() - start) < 1.0  # perf_counter's clock

    hook("switch", (A, B))  # A ran for ~0 s: short, not reported
    assert blocks == [] and hook[0][1] is B and hook[0][0] >= start
    sampled[B] = spans = [0]
    time.sleep(0.01)
    hook("switch", (B, HUB))  # B ran ~10 ms: over the threshold, and sampled
    assert [b[0] for b in blocks] == [B] and blocks[0][2] >= 0.009
    assert len(spans) == 2 and spans[1] == blocks[0][2]
    time.sleep(0.01)
    hook("switch", (HUB, A))  # the hub's own spans are never reported
    assert len(blocks) == 1
    assert [c[0] for c in chained] == ["switch", "switch", "switch"] and chained[-1][1] == (HUB, A)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_hook_survives_a_failing_callback_and_rejects_bad_calls() -> None:
    def boom(*_):
        raise RuntimeError("boom")

    hook = Hook(HUB, 0.0, boom, {})
    hook.restart(A)
    hook("switch", (A, B))  # the error is reported as unraisable, the hook stays usable
    assert hook[0][1] is B
    with pytest.raises(TypeError):
        hook("switch")
    hook.threshold = float("inf")
    assert hook.threshold > 1e9


def test_watch_calls_back_only_for_a_long_span() -> None:
    calls: list[float] = []
    hook = Hook(HUB, 0.004, lambda *_: None, {})

    def on_long() -> float:
        calls.append(time.perf_counter() - hook[0][0])
        return 0.002

    watch = Watch(hook, 0.002, 0.004, on_long, -1)
    hook.restart(HUB)  # the hub waiting: never a blocked span
    watch.start()
    try:
        assert watch.stats()["native_id"] > 0
        time.sleep(0.05)  # this thread sleeps with the GIL released: the watch may call back
        assert calls == []
        hook.restart(A)  # A's span starts and never ends while we sleep
        time.sleep(0.05)
        assert calls and all(age >= 0.002 for age in calls)
        assert watch.stats()["wakeups"] >= 5
    finally:
        watch.stop()
    n = len(calls)
    time.sleep(0.02)
    assert len(calls) == n  # stopped means stopped
