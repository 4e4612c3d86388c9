"""Fixtures for the money tests: a real redis-server per test that asks for one."""

from __future__ import annotations

import pytest

from .redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
