"""The local stack as Loopcast runs it: Kafka and Redis from infra.stack, plus the provider
sandboxes and a background worker as managed processes."""

from __future__ import annotations

import sys
from collections.abc import Callable

import httpx

from infra.settings import Settings
from infra.stack import Stack
from streams.topology import URGENT_LANE

INFRA = ("kafka", "redis")


def _answers(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def stack(
    settings: Settings, progress: Callable[[str], None] | None = None, worker_env: dict[str, str] | None = None
) -> Stack:
    s = Stack(settings, progress=progress)
    s.register(
        "sandbox",
        [sys.executable, "-m", "connectors.channels.sandboxes"],
        health=_answers(f"{settings.sandbox_base}/_sandbox/health"),
        timeout_s=30,
    )
    # A worker with the feedback stage serves HTTP; one without says it is ready by a file.
    stages = (worker_env or {}).get("LOOPCAST_STAGES", settings.stages)
    serves_http = not stages or "feedback" in stages
    s.register(
        "worker",
        [sys.executable, "-m", "console", "worker"],
        health=_answers(f"{settings.http_base}/healthz?ready=1") if serves_http else lambda: _owns_partitions(settings),
        env=worker_env,
        timeout_s=90,
    )
    # The urgent lane, when a deployment splits it off: its own process and consumer group, while
    # "worker" then runs the bulk lane (start it with worker_env {"LOOPCAST_STAGES": BULK_LANE}).
    lane = settings.model_copy(update={"app_id": f"{settings.app_id}-urgent"})
    s.register(
        "worker-urgent",
        [sys.executable, "-m", "console", "worker"],
        health=lambda: _owns_partitions(lane),
        env={
            **(worker_env or {}),
            "LOOPCAST_APP_ID": lane.app_id,
            "LOOPCAST_STAGES": ",".join(URGENT_LANE),
            # A few stages at a trickle: one process is plenty, the cores go to the bulk lane.
            "LOOPCAST_WORKER_PROCESSES": "1",
        },
        timeout_s=90,
    )
    return s


def leave(settings: Settings, local: Stack, keep_running: bool) -> None:
    """How a benchmark leaves the stack it started: stopped, as the demo does, or (kept running) with the
    configured deployment of workers, not the last one the benchmark tried."""
    if keep_running:
        local.stop(["worker", "worker-urgent"])
        stack(settings).up(["worker"])
    else:
        local.down()


def bulk_lane_env(settings: Settings) -> dict[str, str]:
    """The bulk lane's worker beside an urgent lane: the rest of the stages, on all cores but one —
    that one is the urgent lane's, so a marketing backlog never takes the CPU urgent messages need."""
    from streams.topology import BULK_LANE

    return {"LOOPCAST_STAGES": ",".join(BULK_LANE), "LOOPCAST_WORKER_PROCESSES": str(max(1, settings.processes - 1))}


def _owns_partitions(settings: Settings) -> bool:
    from streams.app import ready_file

    return ready_file(settings).exists()
