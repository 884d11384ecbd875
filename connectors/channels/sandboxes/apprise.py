"""Sandbox target for the Apprise provider: Apprise's json:// service posts {version, title, message,
type} to a URL, so json://loopcast:<password>@127.0.0.1:<port>/apprise/notify lands here. Basic auth
(the user and password inside that URL) stands in for a real target's token check. (This module is
named after the scheme; imports of the library elsewhere are absolute, so it shadows nothing.)"""

from __future__ import annotations

import base64
import binascii
import hmac
import json

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext

SANDBOX_USER = "loopcast"
SANDBOX_PASSWORD = "loopcast-dev-apprise"


def authorized(header: str) -> bool:
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return user == SANDBOX_USER and hmac.compare_digest(password, SANDBOX_PASSWORD)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    async def notify(request: web.Request) -> web.Response:
        if not authorized(request.headers.get("Authorization", "")):
            box.rejected += 1
            return web.json_response({"error": "unauthorized"}, status=401)
        injected = await box.inject()
        if injected is not None:
            return injected
        try:
            body = json.loads(await request.read())
            assert isinstance(body, dict) and "message" in body
        except (ValueError, AssertionError):
            box.rejected += 1
            return web.json_response({"error": "expected Apprise's JSON notification"}, status=400)
        box.record(body, None)
        return web.json_response({"ok": True})

    return [web.post("/notify", notify)]
