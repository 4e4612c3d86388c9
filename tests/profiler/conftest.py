"""The profiler's own pytest plugin (fixture ``no_blocking_spans``, marker ``block_limit_ms``)."""

from tafe.profiler.testing import no_blocking_spans, pytest_configure, pytest_runtest_call  # noqa: F401
