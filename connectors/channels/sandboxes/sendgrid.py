"""Sandbox for SendGrid Mail Send: Bearer key check, SendGrid's validation errors, 202 with
X-Message-Id, then an Event Webhook batch (processed + delivered/bounce) signed with the dev EC key.

A request may carry up to 1000 personalizations, each a message of its own: its substitutions
(at most 10,000 bytes) fill the subject and content, one item is recorded per personalization, and
their events share the request's X-Message-Id with a suffix of their own, in one signed batch."""

from __future__ import annotations

import json
import re
import time

from aiohttp import web

from connectors.channels.devkeys import dev_private_key
from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext
from connectors.channels.sendgrid import (
    BATCH_MOST,
    DEV_KEY_NAME,
    SIGNATURE_HEADER,
    SUBSTITUTIONS_MOST,
    TIMESTAMP_HEADER,
    sign_events,
)

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
    if len(personalizations) > BATCH_MOST:
        return errors(
            400,
            f"The personalization block is limited to {BATCH_MOST} personalizations per API request. You have "
            f"provided {len(personalizations)} personalizations. Please consider splitting this into multiple "
            "requests and resending your request.",
            "personalizations",
            "message.personalizations",
        )
    seen: set[str] = set()
    for i, p in enumerate(personalizations):
        to = p.get("to") if isinstance(p, dict) else None
        if (
            not isinstance(to, list)
            or not to
            or not all(isinstance(t, dict) and "@" in str(t.get("email", "")) for t in to)
        ):
            return errors(
                400,
                "The to array is required for all personalization objects, and must have at least one email "
                "object with a valid email address.",
                f"personalizations.{i}.to",
                "message.personalizations.to",
            )
        for t in to:
            address = str(t["email"]).strip().lower()
            if address in seen:
                return errors(
                    400,
                    "Each unique email address in the personalizations array should only be included once. "
                    f"You have included {t['email']} more than once.",
                    f"personalizations.{i}.to",
                    "message.personalizations.to",
                )
            seen.add(address)
        values = p.get("substitutions", {})
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            return errors(
                400,
                "The substitutions must be an object of string keys and string values.",
                f"personalizations.{i}.substitutions",
                "message.personalizations.substitutions",
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
        if size > SUBSTITUTIONS_MOST:
            return errors(
                400,
                f"The substitutions of a personalization are limited to {SUBSTITUTIONS_MOST} bytes. You have "
                f"provided {size} bytes.",
                f"personalizations.{i}.substitutions",
                "message.personalizations.substitutions",
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


def substitute(text: str | None, values: dict[str, str]) -> str | None:
    """Every tag replaced by its value in one pass (a value is not searched again)."""
    tags = sorted((k for k in values if k), key=len, reverse=True)
    if not text or not tags:
        return text
    return re.sub("|".join(map(re.escape, tags)), lambda m: values[m.group(0)], text)


def email(body: dict, p: dict, index: int) -> dict:
    """The email one personalization makes: its recipient, its subject and content with its
    substitutions made, the headers and custom args that apply to it."""
    values = p.get("substitutions") or {}
    content = {c["type"]: c["value"] for c in body["content"]}
    headers = {**(body.get("headers") or {}), **(p.get("headers") or {})}
    custom = {**(body.get("custom_args") or {}), **(p.get("custom_args") or {})}
    return {
        "message_id": custom.get("message_id"),
        "to": p["to"][0]["email"],
        "subject": substitute(p.get("subject") or body.get("subject"), values),
        "text": substitute(content.get("text/plain"), values),
        "html": substitute(content.get("text/html"), values),
        "custom_args": custom,
        "personalization": index,
        **({"headers": headers} if headers else {}),
    }


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    api_key = ctx.credentials.api_key.get_secret_value()
    private_pem = dev_private_key(ctx.settings.home, DEV_KEY_NAME, "ec")

    def events(item: Received, status: str, now: int) -> list[dict]:
        x_message_id, index = item.provider_message_id, item.body["personalization"]
        common = {
            **item.body["custom_args"],  # custom args come back as top-level fields of every event
            "email": item.body["to"],
            "timestamp": now,
            "smtp-id": f"<{x_message_id}@ismtpd0001p1lon1.sendgrid.net>",
            # One request's messages share the X-Message-Id; the suffix tells them apart.
            "sg_message_id": f"{x_message_id}.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-{9 + index}.0",
        }
        outcome = (
            {"event": "delivered", "response": "250 OK"}
            if status == "delivered"
            else {"event": "bounce", "type": "bounce", "status": "5.1.1", "reason": "550 5.1.1 User Unknown"}
        )
        return [
            {**common, "event": "processed", "sg_event_id": f"p-{x_message_id}-{index}"},
            {**common, **outcome, "sg_event_id": f"d-{x_message_id}-{index}"},
        ]

    async def send_receipts(fates: list[tuple[Received, str]]) -> None:
        now = int(time.time())
        body = json.dumps([event for item, status in fates for event in events(item, status, now)]).encode()
        timestamp = str(now)
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
        personalizations = body["personalizations"]
        if len(personalizations) == 1:
            items = [box.record({**body, **email(body, personalizations[0], 0)}, None)]
        else:
            # One item per personalization: each is a message of its own, with its own receipt.
            shared = {"from": body["from"], "batch": True}
            items = [box.record({**shared, **email(body, p, i)}, None) for i, p in enumerate(personalizations)]
        x_message_id = items[0].provider_message_id
        for item in items:
            item.provider_message_id = x_message_id
        box.schedule_receipts(items, send_receipts)
        return web.Response(status=202, headers={"X-Message-Id": x_message_id})

    return [web.post("/v3/mail/send", mail_send)]
