"""Sandbox for Slack incoming webhooks: the path is the secret; answers "ok" or Slack's plain-text
error words with their statuses (no_service 404, invalid_payload / no_text 400, rate_limited 429)."""

from __future__ import annotations

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext, json_object


def answer(fault: str, status: int) -> web.Response:
    words = {"throttled": "rate_limited", "error": "rollup_error", "outage": "service_unavailable"}
    return web.Response(status=status, text=words[fault])


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    path = ctx.credentials.path.get_secret_value().strip("/")

    async def send(request: web.Request) -> web.Response:
        if request.match_info["path"].strip("/") != path:
            box.rejected += 1
            return web.Response(status=404, text="no_service")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        body = await json_object(request)
        if body is None:
            return web.Response(status=400, text="invalid_payload")
        if not body.get("text") and not body.get("blocks"):
            return web.Response(status=400, text="no_text")
        if "blocks" in body and not isinstance(body["blocks"], list):
            return web.Response(status=400, text="invalid_blocks")
        box.record(body, None)
        return web.Response(text="ok")

    return [web.post("/services/{path:.+}", send)]
