"""Greenlet request profiler: finds code that holds a gevent event loop, names the
request it hurt and the line that did it. Cheap enough to leave on in production.

It works on any gevent WSGI app and imports nothing else from ``tafe``::

    from gevent import monkey; monkey.patch_all()
    from tafe import profiler
    prof = profiler.install(threshold_ms=10, sample=0.01, registry=None)
    app = profiler.middleware(app, prof)       # attribute spans to requests
    debug = profiler.debug_app(prof)           # serve it at /debug/blocking

Modules: ``tracer`` (the greenlet switch hook), ``watchdog`` (the OS thread that takes
the blocked stack), ``aggregate`` (bounded per-site statistics), ``outputs`` (JSON log,
Prometheus), ``wsgi`` (middleware, debug app), ``testing`` (``no_blocking``).
"""

from .aggregate import BlockEvent
from .profiler import Profiler, install
from .testing import BlockingSpanError, no_blocking
from .wsgi import debug_app, middleware

__all__ = ["BlockEvent", "BlockingSpanError", "Profiler", "debug_app", "install", "middleware", "no_blocking"]
