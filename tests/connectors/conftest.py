"""Fixtures for the warehouse tests.

chDB opens one data directory per process, so the whole pytest session shares ONE embedded
warehouse (`warehouse`); anything needing another directory or a second opener runs in a
subprocess. `warehouse_settings` points settings.chdb_path at that directory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.settings import Settings


@pytest.fixture(scope="session")
def warehouse_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("loopcast-warehouse")
    # No external ClickHouse, whatever the environment says.
    return Settings(home=home, clickhouse_url=None)


@pytest.fixture(scope="session")
def warehouse(warehouse_settings: Settings) -> Iterator[object]:
    from connectors.warehouse import EmbeddedWarehouse, migrate

    embedded = EmbeddedWarehouse(warehouse_settings.chdb_path)
    try:
        migrate(embedded)
        yield embedded
    finally:
        embedded.close()
