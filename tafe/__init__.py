"""TAFE: a cooperative-concurrency OpenRTB bidding front end.

Layout (one obvious place per concern):

- ``tafe.core``      pure bidding logic: parse, decide, render. No gevent, no prometheus.
- ``tafe.cqs``       customer quality score: model files, user-state store, hot swap, training.
- ``tafe.handlers``  thin WSGI layer over the core: bid, notices, ping, metrics, debug.
- ``tafe.http``      HTTP/1.1 rules as a pure state machine over httptools (no sockets).
- ``tafe.server``    the gevent shell: listeners, draining.
- ``tafe.connection`` one connection's read loops (Python, and C for the usual request) and answers.
- ``tafe.master``    pre-fork master: spawns, restarts and rolls workers.
- ``tafe.listeners`` listening sockets (TCP, and the unix socket behind Nginx); no gevent.
- ``tafe.children``  child processes and signals for the supervisors (master, tafe up, nginx).
- ``tafe.profiler``  greenlet blocking profiler; imports nothing else from tafe.
- ``tafe.settings``  the one frozen Settings object.
- ``tafe.lifecycle`` draining flag and in-flight count shared by server and handlers.
"""

__version__ = "0.1.0"
