"""Stage outputs go to the partition any keyed send would pick, so a user's records keep their order."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from connectors.kafka import _index_of

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("count", [1, 4, 7, 12])
def test_keys_land_where_the_default_partitioner_puts_them(count: int) -> None:
    partitioner = DefaultPartitioner()
    partitions = list(range(count))
    for i in range(2_000):
        key = f"user-{i}-用户".encode()
        assert partitions[_index_of(key, count)] == partitioner(key, partitions, partitions)
        assert _index_of(key, count) == _index_of(key, count)  # remembered, the same answer
