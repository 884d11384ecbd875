"""Sandbox for SendGrid Mail Send: Bearer key check, SendGrid's validation errors, 202 with
X-Message-Id, then an Event Webhook batch (processed + delivered/bounce) signed with the dev EC key."""

from __future__ import annotations

import json
import time

from aiohttp import web

from connectors.channels.devkeys import dev_private_key
from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext
from connectors.channels.sendgrid import DEV_KEY_NAME, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_events

DOCS = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"


def errors(status: int, message: str, field: str | None = None, help_anchor: str | None = None) -> web.Response:
    help_url = f"{DOCS}#{help_anchor}" if help_anchor else None
    return web.json_response({"errors": [{"message": message, "field": field, "help": help_url}]}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        response = errors(429, "too many requests")
        response.headers.update({"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0"})
        response.headers["X-RateLimit-Reset"] = str(int(time.time()) + 1)
        return response
    return errors(status, "Service Unavailable" if fault == "outage" else "Internal Server Error")


def validate(body: dict) -> web.Response | None:
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        return errors(
            400,
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
            "-Personalizations-Errors",
        )
    for p in personalizations:
        if not p.get("to") or not all(isinstance(t, dict) and "@" in str(t.get("email", "")) for t in p["to"]):
            return errors(
                400,
                "The to array is required for all personalization objects, and must have at least one email "
                "object with a valid email address.",
                "personalizations.0.to",
                "message.personalizations.to",
            )
    if "@" not in str((body.get("from") or {}).get("email", "")):
        return errors(400, "The from object must be provided for every email send.", "from", "message.from")
    if not body.get("subject") and not all(p.get("subject") for p in personalizations):
        return errors(400, "The subject is required.", "subject", "message.subject")
    content = body.get("content")
    if not content or not all(c.get("type") and c.get("value") for c in content):
        return errors(400, "Unless a valid template_id is provided, the content parameter is required.", "content")
    if len(content) > 1 and content[0]["type"] != "text/plain":
        return errors(400, "If present, text/plain must be first, followed by text/html.", "content")
    return None


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    api_key = ctx.credentials.api_key.get_secret_value()
    private_pem = dev_private_key(ctx.settings.home, DEV_KEY_NAME, "ec")

    async def send_receipt(item: Received, status: str) -> None:
        now = int(time.time())
        common = {
            "email": item.body["personalizations"][0]["to"][0]["email"],
            "timestamp": now,
            "smtp-id": f"<{item.provider_message_id}@ismtpd0001p1lon1.sendgrid.net>",
            "sg_message_id": f"{item.provider_message_id}.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
            "message_id": item.body.get("message_id"),  # our custom arg comes back on every event
        }
        outcome = (
            {"event": "delivered", "response": "250 OK"}
            if status == "delivered"
            else {"event": "bounce", "type": "bounce", "status": "5.1.1", "reason": "550 5.1.1 User Unknown"}
        )
        events = [
            {**common, "event": "processed", "sg_event_id": f"p-{item.provider_message_id}"},
            {**common, **outcome, "sg_event_id": f"d-{item.provider_message_id}"},
        ]
        body, timestamp = json.dumps(events).encode(), str(now)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_events(private_pem, body, timestamp),
            TIMESTAMP_HEADER: timestamp,
        }
        async with box.client().post(ctx.receipt_url, data=body, headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"receipt endpoint answered {response.status}")

    async def mail_send(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            box.rejected += 1
            return errors(401, "Permission denied, wrong credentials")
        if authorization.removeprefix("Bearer ") != api_key:
            box.rejected += 1
            return errors(401, "The provided authorization grant is invalid, expired, or revoked")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        raw = await request.read()
        if len(raw) > 30 * 1024 * 1024:
            return errors(413, "The JSON payload you have included in your request is too large.")
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            box.rejected += 1
            return errors(400, "Bad Request", None, "-Request-Body-Parameters")
        invalid = validate(body)
        if invalid is not None:
            box.rejected += 1
            return invalid
        custom = body["personalizations"][0].get("custom_args") or {}
        item = box.record({**body, "message_id": custom.get("message_id")}, None)
        box.schedule_receipt(item, send_receipt)
        return web.Response(status=202, headers={"X-Message-Id": item.provider_message_id})

    return [web.post("/v3/mail/send", mail_send)]
