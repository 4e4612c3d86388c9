"""Logging set-up: human-readable lines by default, JSON lines with ``log_json``.

Loggers in use: ``tafe`` (life-cycle events), ``tafe.access`` (one line per request
when ``access_log`` is on), ``tafe.bid`` (no-bid reasons at debug level),
``tafe.notice`` (one line per win, bill or loss notice, at debug level: they are
counted in /metrics), ``tafe.profiler`` (blocking events), ``tafe.cqs`` (model and
store swaps).
Extra fields given as ``logger.info(msg, extra={"fields": {...}})`` are kept as
JSON keys, or appended as ``key=value`` in text mode.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from tafe.settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure(settings: Settings) -> None:
    """Route every ``tafe*`` logger to stderr in the chosen format, once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_json else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, settings.log_level.upper()))  # validated by Settings
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
