"""Sandbox for Amazon SES v2: verifies Signature Version 4 in full (scope, signed headers, clock skew,
HMAC) with the adapter's secret, answers SES's REST-JSON errors (x-amzn-ErrorType), and publishes
Delivery/Bounce events as SNS HTTP notifications signed with the dev RSA key; the matching
self-signed certificate is served at /ses/_sns/cert.pem (the notifications' SigningCertURL)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime

from aiohttp import web

from connectors.channels.devkeys import dev_private_key
from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext
from connectors.channels.ses import (
    DEV_SNS_KEY,
    SEND_PATH,
    SERVICE,
    canonical_request,
    dev_certificate,
    parse_authorization,
    signature,
    sns_sign,
)

TOPIC_ARN = "arn:aws:sns:us-east-1:000000000000:loopcast-ses-events"
MAX_SKEW_S = 300


def error(status: int, error_type: str, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status, headers={"x-amzn-ErrorType": error_type})


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return error(429, "TooManyRequestsException", "Maximum sending rate exceeded.")
    if fault == "outage":
        return error(503, "ServiceUnavailable", "Service is unavailable. Please try again later.")
    return error(500, "InternalFailure", "The request processing has failed because of an unknown error.")


def check_signature(request: web.Request, body: bytes, access_key_id: str, secret: str) -> web.Response | None:
    fields = parse_authorization(request.headers.get("Authorization", ""))
    amz_date = request.headers.get("X-Amz-Date", "")
    if fields is None or not amz_date:
        return error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    key_id, _, scope = fields["Credential"].partition("/")
    if key_id != access_key_id:
        return error(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
    date_stamp, region, service, terminal = (scope.split("/") + ["", "", "", ""])[:4]
    signed = fields["SignedHeaders"].split(";")
    if (
        service != SERVICE
        or terminal != "aws4_request"
        or date_stamp != amz_date[:8]
        or not {"host", "x-amz-date"} <= set(signed)
    ):
        return error(403, "IncompleteSignatureException", f"Credential should be scoped correctly: {scope}")
    try:
        skew = abs(time.time() - datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return error(403, "IncompleteSignatureException", "X-Amz-Date must be in ISO 8601 basic format")
    if skew > MAX_SKEW_S:
        return error(403, "InvalidSignatureException", "Signature expired: the request time is too far from now.")
    headers = {name: request.headers.get(name, "") for name in signed}
    canonical = canonical_request(
        request.method,
        request.rel_url.raw_path,
        request.rel_url.raw_query_string,
        headers,
        signed,
        hashlib.sha256(body).hexdigest(),
    )
    _, expected = signature(secret, region, service, amz_date, canonical)
    if not hmac.compare_digest(expected, fields["Signature"]):
        return error(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your AWS "
            "Secret Access Key and signing method. Consult the service documentation for details.",
        )
    return None


def validate(body: dict) -> web.Response | None:
    if not body.get("FromEmailAddress"):
        return error(400, "BadRequestException", "Missing required parameter FromEmailAddress")
    to = (body.get("Destination") or {}).get("ToAddresses") or []
    if not to or not all("@" in str(a) for a in to):
        return error(400, "BadRequestException", "Missing final '@domain'")
    simple = (body.get("Content") or {}).get("Simple")
    if not simple:
        return error(400, "BadRequestException", "Either Simple, Raw or Template content must be specified")
    if not (simple.get("Subject") or {}).get("Data"):
        return error(400, "MessageRejected", "Email subject is missing")
    if not ((simple.get("Body") or {}).get("Text") or (simple.get("Body") or {}).get("Html")):
        return error(400, "MessageRejected", "Email body is missing")
    return None


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    credentials = ctx.credentials
    access_key_id, secret = credentials.access_key_id, credentials.secret_access_key.get_secret_value()
    private_pem = dev_private_key(ctx.settings.home, DEV_SNS_KEY, "rsa")
    certificate = dev_certificate(private_pem)
    cert_url = f"{ctx.base_url}/_sns/cert.pem"

    async def send_receipt(item: Received, status: str) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        mail = {
            "timestamp": now,
            "messageId": item.provider_message_id,
            "source": item.body["FromEmailAddress"],
            "destination": item.body["Destination"]["ToAddresses"],
            "tags": {"message_id": [item.body.get("message_id")]},
        }
        recipients = item.body["Destination"]["ToAddresses"]
        event = (
            {
                "eventType": "Delivery",
                "mail": mail,
                "delivery": {"timestamp": now, "recipients": recipients, "smtpResponse": "250 2.0.0 OK"},
            }
            if status == "delivered"
            else {
                "eventType": "Bounce",
                "mail": mail,
                "bounce": {
                    "bounceType": "Permanent",
                    "bounceSubType": "General",
                    "bouncedRecipients": [
                        {"emailAddress": r, "action": "failed", "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1"}
                        for r in recipients
                    ],
                    "timestamp": now,
                },
            }
        )
        notification = {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": TOPIC_ARN,
            "Message": json.dumps(event),
            "Timestamp": now,
            "SignatureVersion": "2",
            "SigningCertURL": cert_url,
            "UnsubscribeURL": f"{ctx.base_url}/_sns/unsubscribe",
        }
        notification["Signature"] = sns_sign(private_pem, notification)
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": "Notification",
            "x-amz-sns-message-id": notification["MessageId"],
            "x-amz-sns-topic-arn": TOPIC_ARN,
        }
        async with box.client().post(ctx.receipt_url, data=json.dumps(notification), headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"receipt endpoint answered {response.status}")

    async def send_email(request: web.Request) -> web.Response:
        raw = await request.read()
        refused = check_signature(request, raw, access_key_id, secret)
        if refused is not None:
            box.rejected += 1
            return refused
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            box.rejected += 1
            return error(400, "BadRequestException", "Could not parse request body into json")
        invalid = validate(body)
        if invalid is not None:
            box.rejected += 1
            return invalid
        tags = {t.get("Name"): t.get("Value") for t in body.get("EmailTags") or []}
        item = box.record({**body, "message_id": tags.get("message_id")}, None)
        box.schedule_receipt(item, send_receipt)
        return web.json_response({"MessageId": item.provider_message_id})

    async def cert(request: web.Request) -> web.Response:
        return web.Response(text=certificate, content_type="application/x-pem-file")

    return [web.post(SEND_PATH, send_email), web.get("/_sns/cert.pem", cert)]
