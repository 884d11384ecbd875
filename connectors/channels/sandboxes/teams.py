"""Sandbox for a Teams Power Automate workflow trigger: the api-version and SAS `sig` query parameters
checked like Logic Apps (401 with an {"error": {"code", "message"}} body), the message/Adaptive Card
shape checked like the Teams trigger's schema, and 202 Accepted with an empty body."""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext
from connectors.channels.teams import API_VERSION, CARD_TYPE, MESSAGE_MAX, TRIGGER


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return error(429, "WorkflowRequestsThrottled", "Rate limit is exceeded. Try again in 1 seconds.")
    if fault == "error":
        return error(500, "InternalServerError", "Encountered internal server error.")
    return error(503, "ServiceUnavailable", "The service is temporarily unavailable.")


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    sig = ctx.credentials.sig.get_secret_value()

    async def invoke(request: web.Request) -> web.Response:
        query = request.query
        if query.get("api-version") != API_VERSION:
            return error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        if "sig" not in query:
            box.rejected += 1
            return error(401, "DirectApiAuthorizationRequired", "The request must be authenticated.")
        if not hmac.compare_digest(query["sig"], sig) or query.get("sp") != TRIGGER or query.get("sv") != "1.0":
            box.rejected += 1
            return error(401, "DirectApiInvalidAuthorizationSignature", "The provided signature is not valid.")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        raw = await request.read()
        if len(raw) > MESSAGE_MAX:
            return error(413, "MessageTooLarge", "The message is larger than Teams accepts.")
        try:
            body = json.loads(raw)
            attachments = body["attachments"]
            content = attachments[0]["content"]
            ok = (
                body.get("type") == "message"
                and attachments[0].get("contentType") == CARD_TYPE
                and content.get("type") == "AdaptiveCard"
                and isinstance(content.get("body"), list)
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            ok = False
        if not ok:
            return error(400, "TriggerInputSchemaMismatch", "The input body does not match the trigger's schema.")
        body["workflow_id"] = request.match_info["workflow_id"]
        box.record(body, None)
        return web.Response(status=202)

    return [web.post("/workflows/{workflow_id}/triggers/manual/paths/invoke", invoke)]
