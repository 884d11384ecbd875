"""Alibaba Cloud SMS (dysmsapi SendSms, SendBatchSms): RPC-style HMAC-SHA1 signed requests; content only through
an approved template, and business errors (throttling included) come back as HTTP 200 with a Code other than "OK".
Aliyun's HTTP batch push of SmsReport carries no signature, so the receipt URL carries a shared token instead.

With the channel option `batch_max` (2-100) the messages being sent at the same moment go as one SendBatchSms
call: per recipient its number, signature and template variables, one BizId for the call. A report names the
BizId and the number, so a message's provider id is "<BizId>:<number>" (for SendSms too), and one call never
carries the same number twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Mapping
from urllib.parse import quote

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    CallBatching,
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRequest,
    accepted,
    as_messages,
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

API_ROOT = "https://dysmsapi.aliyuncs.com"
API_VERSION = "2017-05-25"
# Per-recipient flow control (分钟级 1/min, 小时级 5/h, 天级 10/day by default) and the API gateway's own throttle.
THROTTLED = {"isv.BUSINESS_LIMIT_CONTROL", "Throttling", "Throttling.User", "Throttling.Api"}
TRANSIENT = {"isp.SYSTEM_ERROR", "InternalError", "ServiceUnavailable"}
# SendBatchSms takes at most this many numbers in one call.
BATCH_MOST = 100
MAINLAND_PREFIX = re.compile(r"^(?:\+|00)?86(?=1\d{10}$)")
# Which flow-control window the message names: the earliest a retry can succeed.
LIMIT_WINDOWS_S = {"分钟级": 60.0, "小时级": 3600.0, "天级": 86400.0}


def percent_encode(value: str) -> str:
    """Aliyun's encoding: RFC 3986 over UTF-8, only A-Z a-z 0-9 - _ . ~ left as they are (space is %20)."""
    return quote(value, safe="~")


def string_to_sign(params: Mapping[str, str], method: str = "POST") -> str:
    canonical = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params.items()))
    return f"{method}&{percent_encode('/')}&{percent_encode(canonical)}"


def rpc_signature(secret: str, params: Mapping[str, str], method: str = "POST") -> str:
    """Signature over every parameter but Signature itself; the key is the secret followed by "&"."""
    mac = hmac.new(f"{secret}&".encode(), string_to_sign(params, method).encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def strip_signature(body: str, sign_name: str) -> str:
    """The copy engine's sms-cn format prefixes 【brand】; the platform adds 【SignName】 itself."""
    prefix = f"【{sign_name}】"
    return body[len(prefix) :] if body.startswith(prefix) else body


def number_key(phone: str) -> str:
    """A number as reports name it: a mainland mobile without its +86 / 0086 / 86 prefix."""
    return MAINLAND_PREFIX.sub("", phone.strip())


def message_key(biz_id: str, phone: str) -> str:
    """A message's provider id: the call's BizId and the recipient's number (a batch shares its BizId)."""
    return f"{biz_id}:{number_key(phone)}"


def flow_control_wait(message: str) -> float | None:
    return next((seconds for word, seconds in LIMIT_WINDOWS_S.items() if word in message), None)


class AliyunSmsAdapter(CallBatching, HttpAdapter):
    """Options: `template_code` (required, an approved template such as SMS_123456789), `sign_name`
    (default: the channel's brand), `template_param_field` (the template variable that carries the body,
    default `content`), `region` (RegionId, default cn-hangzhou). Receipts: configure the HTTP batch push URL
    as <loopcast>/receipts/aliyun-sms?token=<receipt_token>."""

    scheme = "aliyun-sms"
    batch_most = BATCH_MOST
    channel_kind = "sms"
    # Sign + template + variables up to 500 characters (billed per 70, or 67 when long); SendSms allows 5,000 QPS.
    limits = Limits(body_maxlen=500, rate_per_s=5000)
    returns_provider_ids = True
    sends_receipts = True

    class Credentials(BaseModel):
        access_key_id: str = "LTAI-sandbox"
        access_key_secret: SecretStr = SecretStr("loopcast-dev-aliyun-secret")
        # Our own choice, not Aliyun's: the shared token the receipt push URL must carry.
        receipt_token: SecretStr = SecretStr("loopcast-dev-aliyun-receipt-token")

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        expected = credentials.receipt_token.get_secret_value()
        require_secret(query_value(request, "token"), expected, reason="receipt token missing or wrong")

        def read(report: dict) -> Receipt:
            delivered = report["success"] is True
            return Receipt(
                provider_message_id=message_key(str(report["biz_id"]), str(report["phone_number"])),
                delivered=delivered,
                error_code=None if delivered else str(report.get("err_code") or "UNDELIVERED"),
            )

        return batched_receipts(request.body, "SmsReport push", read)

    @classmethod
    def receipt_answer(cls) -> tuple[int, str, str]:
        return 200, json.dumps({"code": 0, "msg": "成功"}, ensure_ascii=False), "application/json"

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        options = channel.options
        self.template_code = options.get("template_code")
        if not self.template_code:
            raise ValueError(f"channel {channel.id!r}: aliyun-sms needs options 'template_code'")
        self.sign_name = options.get("sign_name") or channel.brand
        if not self.sign_name:
            raise ValueError(f"channel {channel.id!r}: aliyun-sms needs options 'sign_name' or a brand")
        self.param_field = options.get("template_param_field") or "content"
        self.region = options.get("region") or "cn-hangzhou"
        self.url = root_url(channel, API_ROOT) + "/"
        self.start_batching(channel)

    def _variables(self, message: RenderedMessage) -> dict[str, str]:
        return {self.param_field: strip_signature(message.body, self.sign_name)}

    def _signed(self, action: str, fields: dict[str, str], now: float | None) -> dict[str, str]:
        params = {
            "AccessKeyId": self.credentials.access_key_id,
            "Action": action,
            "Format": "JSON",
            "RegionId": self.region,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": uuid.uuid4().hex,
            "SignatureVersion": "1.0",
            "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "Version": API_VERSION,
            "TemplateCode": self.template_code,
            **fields,
        }
        params["Signature"] = rpc_signature(self.credentials.access_key_secret.get_secret_value(), params)
        return params

    def params(self, message: RenderedMessage, *, now: float | None = None) -> dict[str, str]:
        return self._signed(
            "SendSms",
            {
                "PhoneNumbers": message.address,
                "SignName": self.sign_name,
                "TemplateParam": json.dumps(self._variables(message), ensure_ascii=False),
                "OutId": message.message_id,  # echoed back as out_id in the SmsReport
            },
            now,
        )

    def batch_params(self, messages: list[RenderedMessage], *, now: float | None = None) -> dict[str, str]:
        def listed(values: list) -> str:
            return json.dumps(values, ensure_ascii=False)

        return self._signed(
            "SendBatchSms",
            {
                "PhoneNumberJson": listed([m.address for m in messages]),
                "SignNameJson": listed([self.sign_name] * len(messages)),
                "TemplateParamJson": listed([self._variables(m) for m in messages]),
            },
            now,
        )

    async def _call(self, params: dict[str, str]) -> DeliveryResult:
        """One signed call; accepted carries the call's BizId as its provider id."""
        form = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in params.items())
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        response = await self.request("POST", self.url, data=form.encode(), headers=headers)
        if isinstance(response, DeliveryResult):
            return response
        text = response.text
        answer = response.json_object()
        code = answer.get("Code") if isinstance(answer, dict) else None
        if code in THROTTLED:
            wait = flow_control_wait(str(answer.get("Message", ""))) or response.retry_after
            return rejected(code, text, retryable=True, retry_after=wait)
        if not response.ok:
            # InvalidAccessKeyId.NotFound (404) and SignatureDoesNotMatch (400) are final; 5xx retries.
            return response.failure(code=code)
        if not isinstance(code, str):
            return malformed(text)  # SendSms has no idempotency key: a retry could send twice
        if code != "OK":
            return rejected(code, text, retryable=code in TRANSIENT)
        biz_id = answer.get("BizId")
        return accepted(biz_id, text) if isinstance(biz_id, str) and biz_id else malformed(text)

    @staticmethod
    def _provider_id(biz_id: str, message: RenderedMessage) -> str:
        return message_key(biz_id, message.address)

    def calls(self, messages: list[RenderedMessage]) -> list[list[RenderedMessage]]:
        return calls_of(messages, kind=lambda m: "sms", key=lambda m: number_key(m.address))

    async def send_call(self, call: list[RenderedMessage]) -> list[DeliveryResult]:
        # A lone message goes as SendSms: its report carries its OutId, and nothing waits for the batch path.
        params = self.params(call[0]) if len(call) == 1 else self.batch_params(call)
        return as_messages(call, await self._call(params), self._provider_id)
