"""docker-compose.yml stays a complete production shape: every service is runnable and checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streams.topology import BULK_LANE, URGENT_LANE

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"kafka", "clickhouse", "redis", "spark", "loopcast-worker", "loopcast-worker-urgent"}
# Workers that serve no HTTP say they are ready by a file instead of a port.
NO_PORTS = {"loopcast-worker-urgent"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose["services"]


def test_expected_services_present(services: dict[str, dict]) -> None:
    assert EXPECTED <= set(services)


def test_every_service_has_image_or_build_ports_and_healthcheck(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        assert svc.get("ports") or name in NO_PORTS, name
        health = svc.get("healthcheck") or {}
        assert health.get("test") and not health.get("disable"), name


def test_host_ports_do_not_collide(services: dict[str, dict]) -> None:
    host_ports = [str(p).rsplit(":", 1)[0] for svc in services.values() for p in svc.get("ports", []) if ":" in str(p)]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_loopcast_services_are_built_here_and_wired(services: dict[str, dict]) -> None:
    assert (ROOT / "Dockerfile").exists()
    for name, command in (("loopcast-worker", "worker"), ("loopcast-worker-urgent", "worker")):
        svc = services[name]
        assert svc["build"] == "."
        cmd = svc["command"]
        assert (cmd if isinstance(cmd, list) else cmd.split()) == ["loopcast", command]
        env = svc["environment"]
        for key in ("LOOPCAST_KAFKA_BOOTSTRAP", "LOOPCAST_REDIS_URL", "LOOPCAST_CLICKHOUSE_URL"):
            assert env.get(key), (name, key)
    lanes = [
        services[n]["environment"]["LOOPCAST_STAGES"].split(",") for n in ("loopcast-worker-urgent", "loopcast-worker")
    ]
    assert lanes == [list(URGENT_LANE), list(BULK_LANE)]


def test_depends_on_targets_exist(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
