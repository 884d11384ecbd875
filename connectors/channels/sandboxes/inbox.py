"""The inbox has no sandbox: Loopcast is its own provider and writes straight to Redis, so there is
no external service to stand in for. `routes` exists because every registered scheme needs one."""

from __future__ import annotations

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    return []
