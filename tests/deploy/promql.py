"""Metric names in PromQL expressions, for checking them against a node's /metrics."""

from __future__ import annotations

import re

# A metric name in an expression: TAFE's all start with tafe_. Label values are quoted, so a
# tafe_-looking label value is removed first.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_NAME = re.compile(r"\btafe_[a-z0-9_]+\b")


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(_QUOTED.sub('""', expr)))
