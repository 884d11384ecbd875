"""The real local stack for integration and e2e tests: started once per session on free ports in
a temporary home, stopped at the end, whatever happened."""

from __future__ import annotations

import os
import socket

import pytest

from infra.settings import Settings
from tests.ports import free_port_block

PORT_VARS = ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "REDIS_PORT", "HTTP_PORT")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory) -> Settings:
    """Environment for this session's stack; child processes (sandbox, worker, CLI) inherit it."""
    env = {f"LOOPCAST_{name}": str(port) for name, port in zip(PORT_VARS, _free_ports(len(PORT_VARS)), strict=True)}
    # The sandbox also serves SMTP, APNs and FCM (HTTP/2) on its port + 1, + 2 and + 3.
    env["LOOPCAST_SANDBOX_PORT"] = str(free_port_block(4, avoid={int(p) for p in env.values()}))
    env |= {
        "LOOPCAST_HOME": str(tmp_path_factory.mktemp("loopcast-home")),
        "LOOPCAST_APP_ID": "loopcast-test",
        "LOOPCAST_PARTITIONS": "2",
        "LOOPCAST_REDIS_AOF": "false",
        # One worker process: the tests that need two start them themselves.
        "LOOPCAST_WORKER_PROCESSES": "1",
        # The A/B loop decides often, so tests see decisions quickly.
        "LOOPCAST_AB_INTERVAL_S": "0.5",
        # Tests run at any hour; the quiet-hours tests set their own window per campaign.
        "LOOPCAST_QUIET_HOURS": "off",
        # The delivery-rate monitor on second-sized windows, so a drop shows within seconds.
        "LOOPCAST_MONITOR_BUCKET_S": "1",
        "LOOPCAST_MONITOR_WINDOW_S": "10",
        "LOOPCAST_MONITOR_BASELINE_S": "60",
        "LOOPCAST_MONITOR_MIN_SAMPLES": "20",
        "LOOPCAST_MONITOR_MIN_BASELINE_SAMPLES": "50",
        "LOOPCAST_MONITOR_RECOVER_S": "10",
    }
    os.environ.update(env)
    return Settings()


@pytest.fixture(scope="session")
def local_stack(stack_env: Settings):
    from console.services import INFRA, stack

    s = stack(stack_env)
    try:
        s.up([*INFRA, "sandbox"])
        yield s
    finally:
        s.down()


@pytest.fixture(scope="session")
def worker(local_stack, stack_env: Settings) -> Settings:
    """One background worker with every stage, shared by the integration and e2e tests."""
    local_stack.up(["worker"])
    return stack_env
