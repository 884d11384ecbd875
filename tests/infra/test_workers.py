"""Which stages each worker process runs when a deployment has several."""

from __future__ import annotations

import os

import pytest

from infra.workers import layout
from streams.topology import BULK_LANE, URGENT_LANE, select

pytestmark = pytest.mark.unit

SENDING = ["match", "render", "throttle", "dispatch.high", "dispatch.normal", "dispatch.low"]


def test_one_process_runs_everything() -> None:
    assert layout(select(None), 1) == [[s.name for s in select(None)]]


FRONT = ["match", "render"]
BACK = ["throttle", "dispatch.high", "dispatch.normal", "dispatch.low"]


@pytest.mark.parametrize(
    ("processes", "halves", "sending"),
    [
        (2, False, [SENDING]),
        (4, False, [SENDING] * 3),
        (2, True, [SENDING]),
        (3, True, [FRONT, BACK]),
        (4, True, [FRONT, BACK, FRONT]),
    ],
)
def test_the_warehouse_owner_runs_once_and_the_sending_stages_in_every_other_process(
    processes: int, halves: bool, sending: list
) -> None:
    plan = layout(select(None), processes, halves)
    assert len(plan) == processes
    assert all(n.split(".")[0] in ("feedback", "monitor") for n in plan[0])
    assert "feedback" in plan[0] and "monitor" in plan[0]
    # Every sending process runs the whole send path, or with halves two or more take turns at its halves.
    assert plan[1:] == sending
    # Every stage runs somewhere.
    assert {n for names in plan for n in names} == {s.name for s in select(None)}


def test_lanes_split_the_same_way() -> None:
    assert layout(select(list(URGENT_LANE)), 1) == [list(URGENT_LANE)]
    assert layout(select(list(URGENT_LANE)), 2) == [list(URGENT_LANE)] * 2
    assert layout(select(list(URGENT_LANE)), 2, halves=True) == [["match", "render"], ["throttle", "dispatch.high"]]
    bulk = [s.name for s in select(list(BULK_LANE))]
    assert layout(select(list(BULK_LANE)), 1) == [bulk]
    owner = [n for n in bulk if not n.startswith("dispatch")]
    assert layout(select(list(BULK_LANE)), 3) == [owner] + [["dispatch.normal", "dispatch.low"]] * 2


def test_a_deployment_of_the_warehouse_alone_is_one_process() -> None:
    assert layout(select(["feedback"]), 2) == [[s.name for s in select(["feedback"])]]


@pytest.mark.parametrize("count", [1, 2, 8])
def test_by_default_a_sending_process_per_core_beside_the_warehouse_owner(count: int, monkeypatch) -> None:
    import infra.workers

    monkeypatch.setattr(infra.workers, "cores", lambda: count)
    owner = 1 if count > 1 else 0
    assert infra.workers.default_processes() == count + owner
    assert infra.workers.default_processes(select(list(BULK_LANE))) == count + owner
    # Nothing of the owner's: no process for it.
    assert infra.workers.default_processes(select(list(URGENT_LANE))) == count


def test_only_a_separate_warehouse_owner_is_named() -> None:
    from infra.workers import owner_of

    assert owner_of(layout(select(None), 3)) == 0
    assert owner_of(layout(select(None), 1)) is None
    # Sending processes running different stages are not an owner either.
    assert owner_of(layout(select(list(URGENT_LANE)), 2, halves=True)) is None


def test_a_worker_process_starts_at_its_priority() -> None:
    import subprocess
    import sys

    from infra.workers import child_setup

    def niceness(value: int) -> int:
        shown = subprocess.run(
            [sys.executable, "-c", "import os, threading; t = threading.Thread(target=lambda: None); t.start();"
             "print(os.nice(0))"], preexec_fn=child_setup(value), capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(shown.stdout)

    base = os.nice(0)
    assert niceness(0) == base
    assert niceness(10) == min(19, base + 10)
