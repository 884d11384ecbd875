"""The local stack as Loopcast runs it: Kafka and Redis from infra.stack, plus the provider
sandboxes and a background worker as managed processes."""

from __future__ import annotations

import sys
from collections.abc import Callable

import httpx

from infra.settings import Settings
from infra.stack import Stack

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
    s.register(
        "worker",
        [sys.executable, "-m", "console", "worker"],
        health=_answers(f"{settings.http_base}/healthz?ready=1"),
        env=worker_env,
        timeout_s=90,
    )
    return s
