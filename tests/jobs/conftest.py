"""Fixtures for the batch job tests: the session's chDB warehouse, one local[1] Spark session, and a
throwaway redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.redis_server import running_redis


@pytest.fixture(scope="package")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """chDB opens one data directory per process, and tests/connectors/conftest.py has its own
    session fixture: re-exporting it here would make pytest build it twice, on two directories. So
    join the directory already open in this process (the same directory may be opened again, and
    closing one handle leaves the other working), or open one for this package only and close it
    after, so that fixture can still open its own directory later in the session."""
    from connectors.warehouse import EmbeddedWarehouse, _open_paths, migrate

    opened = sorted(_open_paths())
    path = opened[0] if opened else tmp_path_factory.mktemp("loopcast-warehouse") / "chdb"
    embedded = EmbeddedWarehouse(path)
    try:
        migrate(embedded)
        yield embedded
    finally:
        embedded.close()


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from jobs.common import spark_session

    session = spark_session("local[1]", app_name="loopcast-job-tests")
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    with running_redis() as url:
        yield url


@pytest.fixture
def redis_client(redis_server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    client.flushall()
    try:
        yield client
    finally:
        client.close()
