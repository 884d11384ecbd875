"""Sandbox for the WeCom group robot webhook: checks the key, answers errcode bodies on HTTP 200 as
WeCom does, and enforces the markdown/text content limits."""

from __future__ import annotations

import json

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext
from connectors.channels.sandboxes.wecom_app import answer, errcode

LIMITS = {"markdown": 4096, "text": 2048}


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    key = ctx.credentials.key.get_secret_value()

    async def send(request: web.Request) -> web.Response:
        if request.query.get("key") != key:
            box.rejected += 1
            return errcode(93000, "invalid webhook url, hint: [key not found]")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        try:
            body = json.loads(await request.read())
        except ValueError:
            return errcode(40008, "invalid message type")
        msgtype = body.get("msgtype")
        if msgtype not in LIMITS or not isinstance(body.get(msgtype), dict):
            return errcode(40008, "invalid message type")
        content = body[msgtype].get("content")
        if not content:
            return errcode(44004, "empty content")
        if len(content.encode()) > LIMITS[msgtype]:
            return errcode(40058, f"markdown.content exceed max length {LIMITS[msgtype]}")
        box.record(body, None)
        return errcode(0, "ok")

    return [web.post("/cgi-bin/webhook/send", send)]
