"""Sandbox for Twilio's Messages API: Basic auth against the account SID and auth token, Twilio's error
JSON and codes, and signed status callbacks (an intermediate `sent`, then the final status) posted to the
request's StatusCallback or, without one, to Loopcast's receipt endpoint."""

from __future__ import annotations

import base64
import hashlib
import re
from email.utils import formatdate

from aiohttp import web

from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext
from connectors.channels.twilio import API_VERSION, SIGNATURE_HEADER, signature

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
SENDER = re.compile(r"^(\+[1-9]\d{6,14}|[A-Za-z0-9 ]{1,11})$")  # a number or an alphanumeric sender ID


def error(code: int, message: str, status: int) -> web.Response:
    return web.json_response(
        {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status},
        status=status,
    )


def answer(fault: str, status: int) -> web.Response:
    code, message = {
        "outage": (20503, "Service Unavailable"),
        "throttled": (20429, "Too Many Requests"),
        "error": (20500, "Internal Server Error"),
    }[fault]
    return error(code, message, status)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    account_sid, token = ctx.credentials.account_sid, ctx.credentials.auth_token.get_secret_value()

    def authorized(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return user == account_sid == request.match_info["sid"] and password == token

    async def send_receipt(item: Received, status: str) -> None:
        final = "delivered" if status == "delivered" else "undelivered"
        url = item.body.get("StatusCallback") or ctx.receipt_url
        for state in ("sent", final):
            fields = {
                "AccountSid": account_sid,
                "ApiVersion": API_VERSION,
                "From": item.body.get("From", ""),
                "To": item.body["To"],
                "MessageSid": item.provider_message_id,
                "SmsSid": item.provider_message_id,
                "MessageStatus": state,
                "SmsStatus": state,
            }
            if state == "undelivered":
                fields["ErrorCode"] = "30003"  # unreachable destination handset
            headers = {SIGNATURE_HEADER: signature(token, url, fields.items())}
            async with box.client().post(url, data=fields, headers=headers) as response:
                if response.status >= 300:
                    raise RuntimeError(f"status callback answered {response.status}")

    async def create(request: web.Request) -> web.Response:
        if not authorized(request):
            box.rejected += 1
            return error(20003, "Authenticate", 401)
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        form = {key: value for key, value in (await request.post()).items() if isinstance(value, str)}
        to, sender, service = form.get("To"), form.get("From"), form.get("MessagingServiceSid")
        if not to:
            return error(21604, "A 'To' phone number is required.", 400)
        if not E164.match(to):
            return error(21211, f"Invalid 'To' Phone Number: {to}", 400)
        if not sender and not service:
            return error(21603, "A 'From' phone number is required.", 400)
        if sender and not SENDER.match(sender):
            return error(21212, f"Invalid From Number (caller ID): {sender}", 400)
        body = form.get("Body", "")
        if not body and not form.get("MediaUrl"):
            return error(21602, "Message body is required.", 400)
        if len(body) > 1600:
            return error(21617, "The concatenated message body exceeds the 1600 character limit.", 400)
        item = box.record(form, None)
        # Message SIDs are "SM" + 32 hex digits; derived from the sandbox's id so it stays unique.
        item.provider_message_id = "SM" + hashlib.md5(item.provider_message_id.encode()).hexdigest()
        box.schedule_receipt(item, send_receipt)
        now = formatdate(usegmt=True)
        return web.json_response(
            {
                "sid": item.provider_message_id,
                "account_sid": account_sid,
                "api_version": API_VERSION,
                "body": body,
                "date_created": now,
                "date_updated": now,
                "date_sent": None,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": sender,
                "messaging_service_sid": service,
                "num_media": "0",
                "num_segments": "1",
                "price": None,
                "price_unit": "USD",
                "status": "accepted" if service else "queued",
                "to": to,
                "uri": f"/{API_VERSION}/Accounts/{account_sid}/Messages/{item.provider_message_id}.json",
            },
            status=201,
        )

    return [web.post(f"/{API_VERSION}/Accounts/{{sid}}/Messages.json", create)]
