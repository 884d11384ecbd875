"""Tencent Cloud SMS (SendSms, API 3.0 version 2021-01-11): TC3-HMAC-SHA256 signed JSON; every answer, errors
included, is HTTP 200 with a Response envelope, and each number has its own status in SendStatusSet.
The status callback is unsigned, so the callback URL carries a shared token instead.

With the channel option `batch_max` (2-200) the messages being sent at the same moment share SendSms calls of
up to 200 numbers. A call has one TemplateParamSet, SignName and SessionContext for all its numbers, so only
messages with the same copy can share one (and only numbers all in the mainland or all outside it, as Tencent
requires); one call never carries the same number twice. The shared SessionContext cannot carry each message's
id, so a message is known by the SerialNo its number gets in SendStatusSet (the status callback's `sid`), its
status found by its E.164 number. A message alone in its call goes as before, its id as SessionContext.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    Answer,
    CallBatching,
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRequest,
    accepted,
    batched_receipts,
    calls_of,
    malformed,
    query_value,
    rejected,
    require_secret,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

API_ROOT = "https://sms.tencentcloudapi.com"
API_VERSION = "2021-01-11"
SERVICE = "sms"
ALGORITHM = "TC3-HMAC-SHA256"
CONTENT_TYPE = "application/json; charset=utf-8"
# Per-number frequency limits name their window; RequestLimitExceeded is the API's per-second throttle.
LIMIT_WAITS_S = {
    "RequestLimitExceeded": 1.0,
    "LimitExceeded.PhoneNumberThirtySecondLimit": 30.0,
    "LimitExceeded.PhoneNumberOneHourLimit": 3600.0,
    "LimitExceeded.PhoneNumberDailyLimit": 86400.0,
    "LimitExceeded.PhoneNumberSameContentDailyLimit": 86400.0,
}
# SendSms takes at most this many numbers in one call.
BATCH_MOST = 200
# The spellings of a mainland mobile Tencent takes (bare, 86, 0086, +86): a batch splits by the E.164 number, so
# a number comes once per call whichever way it is written.
MAINLAND = re.compile(r"^(?:\+86|0086|86)?(1\d{10})$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def tc3_signature(
    secret_key: str,
    headers: Mapping[str, str],
    signed: list[str],
    payload: bytes,
    timestamp: int,
    method: str = "POST",
    service: str = SERVICE,
) -> str:
    """Canonical request (URI "/", empty query, the signed headers lower-cased and trimmed, the payload's hash),
    then the string to sign under the scope date/sms/tc3_request, signed with the key derived from the date."""
    lowered = {k.lower(): v for k, v in headers.items()}
    canonical_headers = "".join(f"{name}:{lowered.get(name, '').strip().lower()}\n" for name in signed)
    canonical = "\n".join([method, "/", "", canonical_headers, ";".join(signed), sha256_hex(payload)])
    date = time.strftime("%Y-%m-%d", time.gmtime(timestamp))
    scope = f"{date}/{service}/tc3_request"
    to_sign = "\n".join([ALGORITHM, str(timestamp), scope, sha256_hex(canonical.encode())])
    key = _hmac(_hmac(_hmac(f"TC3{secret_key}".encode(), date), service), "tc3_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def authorization(secret_id: str, secret_key: str, headers: Mapping[str, str], payload: bytes, timestamp: int) -> str:
    signed = sorted(name.lower() for name in headers)
    date = time.strftime("%Y-%m-%d", time.gmtime(timestamp))
    signature = tc3_signature(secret_key, headers, signed, payload, timestamp)
    return (
        f"{ALGORITHM} Credential={secret_id}/{date}/{SERVICE}/tc3_request, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )


def e164(address: str) -> str:
    """Tencent wants +<country><number>, and answers with it: a mainland mobile becomes +86<11 digits>."""
    address = address.strip()
    match = MAINLAND.match(address)
    return f"+86{match[1]}" if match else address


def retryable(code: str) -> bool:
    return code.startswith(("LimitExceeded", "RequestLimitExceeded", "InternalError"))


class TencentSmsAdapter(CallBatching, HttpAdapter):
    """Options: `sdk_app_id` (required, SmsSdkAppId), `template_id` (required, an approved template whose
    one variable takes the body), `sign_name` (default: the channel's brand; global SMS may omit it),
    `region` (X-TC-Region, default ap-guangzhou). Receipts: set the status callback URL to
    <loopcast>/receipts/tencent-sms?token=<receipt_token>."""

    scheme = "tencent-sms"
    batch_most = BATCH_MOST
    channel_kind = "sms"
    # Sign + body up to 500 characters (billed per 70, or 67 when long); SendSms allows 3,000 requests/s.
    limits = Limits(body_maxlen=500, rate_per_s=3000)
    returns_provider_ids = True
    sends_receipts = True

    class Credentials(BaseModel):
        secret_id: str = "AKID-sandbox"
        secret_key: SecretStr = SecretStr("loopcast-dev-tencent-secret")
        # Our own choice, not Tencent's: the shared token the status callback URL must carry.
        receipt_token: SecretStr = SecretStr("loopcast-dev-tencent-receipt-token")

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        expected = credentials.receipt_token.get_secret_value()
        require_secret(query_value(request, "token"), expected, reason="receipt token missing or wrong")

        def read(report: dict) -> Receipt:
            delivered = report["report_status"] == "SUCCESS"
            return Receipt(
                provider_message_id=str(report["sid"]),
                delivered=delivered,
                error_code=None if delivered else str(report.get("errmsg") or report["report_status"]),
            )

        return batched_receipts(request.body, "status callback", read)

    @classmethod
    def receipt_answer(cls) -> tuple[int, str, str]:
        return 200, '{"result":0,"errmsg":"OK"}', "application/json"

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        options = channel.options
        self.sdk_app_id, self.template_id = options.get("sdk_app_id"), options.get("template_id")
        if not self.sdk_app_id or not self.template_id:
            raise ValueError(f"channel {channel.id!r}: tencent-sms needs options 'sdk_app_id' and 'template_id'")
        self.sign_name = options.get("sign_name") or channel.brand
        self.region = options.get("region") or "ap-guangzhou"
        root = root_url(channel, API_ROOT)
        self.url = root + "/"
        self.host = urlsplit(root).netloc
        self.start_batching(channel)

    def template_param(self, message: RenderedMessage) -> str:
        """The template's one variable: the body without the copy engine's 【SignName】 (the platform adds it)."""
        body = message.body
        if self.sign_name and body.startswith(f"【{self.sign_name}】"):
            body = body[len(self.sign_name) + 2 :]
        return body

    def payload(self, messages: list[RenderedMessage]) -> bytes:
        """One SendSms call for `messages`, which share their copy (see `calls`)."""
        request = {
            "PhoneNumberSet": [e164(m.address) for m in messages],
            "SmsSdkAppId": self.sdk_app_id,
            "TemplateId": self.template_id,
            "TemplateParamSet": [self.template_param(messages[0])],
        }
        if len(messages) == 1:
            request["SessionContext"] = messages[0].message_id  # echoed back in SendStatusSet; one per call
        if self.sign_name:
            request["SignName"] = self.sign_name
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()

    def headers(self, payload: bytes, timestamp: int) -> dict[str, str]:
        signed = {"Content-Type": CONTENT_TYPE, "Host": self.host, "X-TC-Action": "SendSms"}
        secret_key = self.credentials.secret_key.get_secret_value()
        return {
            **signed,
            "Authorization": authorization(self.credentials.secret_id, secret_key, signed, payload, timestamp),
            "X-TC-Timestamp": str(timestamp),
            "X-TC-Version": API_VERSION,
            "X-TC-Region": self.region,
        }

    def calls(self, messages: list[RenderedMessage]) -> list[list[RenderedMessage]]:
        # One TemplateParamSet per call: only the same copy shares one, and mainland numbers apart from others
        # (Tencent refuses a mix).
        return calls_of(
            messages,
            kind=lambda m: (self.template_param(m), e164(m.address).startswith("+86")),
            key=lambda m: e164(m.address),
        )

    async def send_call(self, messages: list[RenderedMessage]) -> list[DeliveryResult]:
        """One SendSms call: each message's result, in order."""
        payload = self.payload(messages)
        response = await self.request("POST", self.url, data=payload, headers=self.headers(payload, int(time.time())))
        if isinstance(response, DeliveryResult):
            return [response] * len(messages)  # no answer: every number in the call is in doubt
        return self.results(response, messages)

    def results(self, response: Answer, messages: list[RenderedMessage]) -> list[DeliveryResult]:
        """A whole-call failure (Response.Error, an HTTP error, an unreadable body) is every message's; else each
        message's is its number's status in SendStatusSet."""
        text = response.text
        try:
            envelope = json.loads(text)["Response"]
            error = envelope.get("Error")
        except (ValueError, KeyError, TypeError, AttributeError):
            envelope = error = None
        if not response.ok:
            return [response.failure(code=error.get("Code") if isinstance(error, dict) else None)] * len(messages)
        if isinstance(error, dict) and isinstance(error.get("Code"), str):
            return [self._refused(error["Code"], text, response.retry_after)] * len(messages)
        try:
            statuses = {e164(str(status["PhoneNumber"])): status for status in envelope["SendStatusSet"]}
        except (KeyError, TypeError, AttributeError):
            return [malformed(text)] * len(messages)  # SendSms has no idempotency key: a retry could send twice
        request_id = envelope.get("RequestId")
        return [self._status(statuses.get(e164(m.address)), request_id, text, response.retry_after) for m in messages]

    @classmethod
    def _status(cls, status: dict | None, request_id: str | None, text: str, retry_after: str | None) -> DeliveryResult:
        if not isinstance(status, dict) or not isinstance(status.get("Code"), str):
            return malformed(text)  # no word on this number: whether it was sent is unknown
        # The number's own status (with the call's RequestId): a batch's whole answer would not fit in `raw`.
        raw = json.dumps({"RequestId": request_id, **status}, ensure_ascii=False)
        if status["Code"] != "Ok":
            return cls._refused(status["Code"], raw, retry_after)
        serial = status.get("SerialNo")
        return accepted(serial, raw) if isinstance(serial, str) and serial else malformed(raw)

    @staticmethod
    def _refused(code: str, raw: str, retry_after: str | None) -> DeliveryResult:
        """AuthFailure.* and InvalidParameter* are final; throttling waits for the window it names."""
        return rejected(code, raw, retryable=retryable(code), retry_after=LIMIT_WAITS_S.get(code) or retry_after)
