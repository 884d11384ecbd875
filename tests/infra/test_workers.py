"""Which stages each worker process runs when a deployment has several."""

from __future__ import annotations

import pytest

from infra.workers import layout
from streams.topology import BULK_LANE, URGENT_LANE, select

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_the_warehouse_owner_runs_once_and_every_other_stage_everywhere(processes: int) -> None:
    plan = layout(select(None), processes)
    assert len(plan) == processes
    feedback = [n for n in plan[0] if n.startswith("feedback")]
    assert feedback and all(not any(n.startswith("feedback") for n in names) for names in plan[1:])
    for names in plan[1:]:
        assert set(names) == set(plan[0]) - set(feedback)


def test_lanes_split_the_same_way() -> None:
    assert layout(select(list(URGENT_LANE)), 2) == [list(URGENT_LANE)] * 2
    bulk = layout(select(list(BULK_LANE)), 2)
    assert bulk[1] == [n for n in bulk[0] if not n.startswith("feedback")]
