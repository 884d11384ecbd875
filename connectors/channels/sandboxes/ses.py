"""Sandbox for Amazon SES v2 SendEmail and SendBulkEmail: verifies Signature Version 4 in full (scope, signed
headers, clock skew, HMAC) with the adapter's secret, answers SES's REST-JSON errors (x-amzn-ErrorType), and
publishes Delivery/Bounce events as SNS HTTP notifications signed with the dev RSA key; the matching
self-signed certificate is served at /ses/_sns/cert.pem (the notifications' SigningCertURL).

SendBulkEmail takes inline template content only (no stored templates here) and renders it per entry by
simple substitution of {{name}} with the entry's ReplacementTemplateData (else the default TemplateData),
without HTML-escaping, as SES documents; each entry arrives as its own message with its own MessageId,
recorded in SendEmail's shape with "batch": True. A recipient whose local part starts with "reject" is
refused as an unverified address would be in SES's own sandbox: SendEmail answers 400 MessageRejected,
SendBulkEmail that entry's result MESSAGE_REJECTED."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from datetime import UTC, datetime

from aiohttp import web

from connectors.channels.devkeys import dev_private_key
from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext
from connectors.channels.ses import (
    BATCH_MOST,
    BULK_PATH,
    DEV_SNS_KEY,
    SEND_PATH,
    SERVICE,
    TEMPLATE_DATA_MOST,
    canonical_request,
    dev_certificate,
    parse_authorization,
    signature,
    sns_sign,
)

TOPIC_ARN = "arn:aws:sns:us-east-1:000000000000:loopcast-ses-events"
MAX_SKEW_S = 300
PLACEHOLDER = re.compile(r"\{\{\s*([\w-]+)\s*\}\}")


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


def refused(addresses: list) -> list[str]:
    """The recipients this sandbox treats as unverified (SES's own sandbox refuses those)."""
    return [str(a) for a in addresses if str(a).split("@", 1)[0].lower().startswith("reject")]


def not_verified(addresses: list[str]) -> str:
    failed = ", ".join(addresses)
    return f"Email address is not verified. The following identities failed the check in region US-EAST-1: {failed}"


def addressed(destination: object) -> list | None:
    """The ToAddresses of a Destination, or None when there are none or one is not a mailbox."""
    to = (destination.get("ToAddresses") if isinstance(destination, dict) else None) or []
    return to if isinstance(to, list) and to and all("@" in str(a) for a in to) else None


def validate(body: dict) -> web.Response | None:
    if not body.get("FromEmailAddress"):
        return error(400, "BadRequestException", "Missing required parameter FromEmailAddress")
    to = addressed(body.get("Destination"))
    if to is None:
        return error(400, "BadRequestException", "Missing final '@domain'")
    simple = (body.get("Content") or {}).get("Simple")
    if not simple:
        return error(400, "BadRequestException", "Either Simple, Raw or Template content must be specified")
    if not (simple.get("Subject") or {}).get("Data"):
        return error(400, "MessageRejected", "Email subject is missing")
    if not ((simple.get("Body") or {}).get("Text") or (simple.get("Body") or {}).get("Html")):
        return error(400, "MessageRejected", "Email body is missing")
    unverified = refused(to)
    if unverified:
        return error(400, "MessageRejected", not_verified(unverified))
    return None


def template_values(text: object, name: str) -> dict | web.Response:
    """Template data as SES takes it: a JSON object in a string of at most TEMPLATE_DATA_MOST characters."""
    try:
        if not isinstance(text, str) or len(text) > TEMPLATE_DATA_MOST:
            raise ValueError
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError
    except ValueError:
        return error(
            400, "BadRequestException", f"{name} must be a JSON object of at most {TEMPLATE_DATA_MOST} characters"
        )
    return values


def validate_bulk(body: dict) -> tuple[dict, list[dict]] | web.Response:
    """(template content, each entry's values) of a valid SendBulkEmail request."""
    if not body.get("FromEmailAddress"):
        return error(400, "BadRequestException", "Missing required parameter FromEmailAddress")
    entries = body.get("BulkEmailEntries")
    if not isinstance(entries, list) or not entries:
        return error(400, "BadRequestException", "BulkEmailEntries must contain at least one entry")
    if len(entries) > BATCH_MOST:
        return error(400, "BadRequestException", f"BulkEmailEntries must contain at most {BATCH_MOST} entries")
    template = (body.get("DefaultContent") or {}).get("Template") or {}
    if template.get("TemplateName") or template.get("TemplateArn"):
        return error(404, "NotFoundException", "Template does not exist (this sandbox keeps no stored templates)")
    content = template.get("TemplateContent")
    if not isinstance(content, dict) or not content:
        return error(400, "BadRequestException", "Template content, name or ARN must be specified")
    if not content.get("Subject"):
        return error(400, "BadRequestException", "Template subject is missing")
    if not (content.get("Text") or content.get("Html")):
        return error(400, "BadRequestException", "Template must have a text or an html part")
    defaults = template_values(template.get("TemplateData", "{}"), "TemplateData")
    if isinstance(defaults, web.Response):
        return defaults
    values = []
    for entry in entries:
        if not isinstance(entry, dict) or addressed(entry.get("Destination")) is None:
            return error(400, "BadRequestException", "Missing final '@domain'")
        replacement = ((entry.get("ReplacementEmailContent") or {}).get("ReplacementTemplate") or {}).get(
            "ReplacementTemplateData"
        )
        if replacement is None:  # SES uses the default values for an entry without its own
            values.append(defaults)
            continue
        own = template_values(replacement, "ReplacementTemplateData")
        if isinstance(own, web.Response):
            return own
        values.append(own)
    return content, values


def render(part: str, values: dict) -> str:
    """Simple substitution, no escaping; a variable without a value renders empty (this sandbox does not
    simulate SES's Rendering Failure events)."""
    return PLACEHOLDER.sub(lambda m: "" if values.get(m.group(1)) is None else str(values[m.group(1)]), part)


def merged(default: object, replacement: object) -> list[dict]:
    """Name/value lists (headers, tags): the entry's own replace the default's of the same name."""
    by_name = {str(x.get("Name")).lower(): x for x in (default or []) if isinstance(x, dict)}
    by_name |= {str(x.get("Name")).lower(): x for x in (replacement or []) if isinstance(x, dict)}
    return list(by_name.values())


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

    async def receive(request: web.Request) -> dict | web.Response:
        """The request's JSON body once the signature and the injected faults let it through."""
        raw = await request.read()
        refused_call = check_signature(request, raw, access_key_id, secret)
        if refused_call is not None:
            box.rejected += 1
            return refused_call
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            box.rejected += 1
            return error(400, "BadRequestException", "Could not parse request body into json")
        return body

    async def send_email(request: web.Request) -> web.Response:
        body = await receive(request)
        if isinstance(body, web.Response):
            return body
        invalid = validate(body)
        if invalid is not None:
            box.rejected += 1
            return invalid
        request_id = str(uuid.uuid4())
        tags = {t.get("Name"): t.get("Value") for t in body.get("EmailTags") or []}
        item = box.record({**body, "message_id": tags.get("message_id"), "request_id": request_id}, None)
        box.schedule_receipt(item, send_receipt)
        return web.json_response({"MessageId": item.provider_message_id}, headers={"x-amzn-RequestId": request_id})

    async def send_bulk_email(request: web.Request) -> web.Response:
        body = await receive(request)
        if isinstance(body, web.Response):
            return body
        valid = validate_bulk(body)
        if isinstance(valid, web.Response):
            box.rejected += 1
            return valid
        content, values = valid
        template = body["DefaultContent"]["Template"]
        request_id = str(uuid.uuid4())
        results = []
        for entry, own in zip(body["BulkEmailEntries"], values, strict=True):
            unverified = refused(entry["Destination"]["ToAddresses"])
            if unverified:
                box.rejected += 1
                results.append({"Status": "MESSAGE_REJECTED", "Error": not_verified(unverified)})
                continue
            parts = {
                name: {"Data": render(content[name], own), "Charset": "UTF-8"}
                for name in ("Text", "Html")
                if content.get(name)
            }
            simple: dict = {"Subject": {"Data": render(content["Subject"], own), "Charset": "UTF-8"}, "Body": parts}
            headers = merged(template.get("Headers"), entry.get("ReplacementHeaders"))
            if headers:
                simple["Headers"] = headers
            tags = merged(body.get("DefaultEmailTags"), entry.get("ReplacementTags"))
            arrived = {
                "FromEmailAddress": body["FromEmailAddress"],
                "Destination": entry["Destination"],
                "Content": {"Simple": simple},
                "EmailTags": tags,
                "message_id": next((t.get("Value") for t in tags if t.get("Name") == "message_id"), None),
                "request_id": request_id,
                "batch": True,
            }
            if body.get("ConfigurationSetName"):
                arrived["ConfigurationSetName"] = body["ConfigurationSetName"]
            item = box.record(arrived, None)
            # SNS posts one notification per event, however the messages were sent.
            box.schedule_receipt(item, send_receipt)
            results.append({"Status": "SUCCESS", "MessageId": item.provider_message_id})
        return web.json_response({"BulkEmailEntryResults": results}, headers={"x-amzn-RequestId": request_id})

    async def cert(request: web.Request) -> web.Response:
        return web.Response(text=certificate, content_type="application/x-pem-file")

    return [web.post(SEND_PATH, send_email), web.post(BULK_PATH, send_bulk_email), web.get("/_sns/cert.pem", cert)]
