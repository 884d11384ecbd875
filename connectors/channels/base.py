"""The contract every channel provider implements, and the registry that finds them by scheme.

Adding a provider is one module here plus one registry entry: no central switch elsewhere.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from schemas.config import Channel
from schemas.models import RenderedMessage


class DeliveryStatus(StrEnum):
    accepted = "accepted"  # the provider took it; a receipt may follow
    failed = "failed"


class DeliveryResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    status: DeliveryStatus
    provider_message_id: str | None = None
    retryable: bool = False
    error_code: str | None = None
    raw: str | None = None
    # A throttling provider's Retry-After, in seconds: the retry waits at least this long.
    retry_after_s: float | None = None


def accepted(provider_message_id: str | None, raw: str | None = None) -> DeliveryResult:
    return DeliveryResult(
        status=DeliveryStatus.accepted, provider_message_id=provider_message_id, raw=(raw or "")[:500]
    )


def rejected(error_code: str, raw: str | None = None, *, retryable: bool = False) -> DeliveryResult:
    """The provider answered and said no (a business error code in its own format)."""
    return DeliveryResult(
        status=DeliveryStatus.failed, error_code=error_code, retryable=retryable, raw=(raw or "")[:500]
    )


def http_failure(
    status: int, raw: str | None = None, retry_after: str | None = None, code: str | None = None
) -> DeliveryResult:
    """A non-2xx answer: 429 and 5xx are worth retrying (429 after its Retry-After), other 4xx are not."""
    try:
        wait = float(retry_after) if retry_after else None
    except ValueError:
        wait = None  # an HTTP date; the retry's own backoff applies
    return DeliveryResult(
        status=DeliveryStatus.failed,
        retryable=status == 429 or status >= 500,
        error_code=code or f"http_{status}",
        raw=(raw or "")[:500],
        retry_after_s=wait,
    )


def transport_failure(exc: BaseException) -> DeliveryResult:
    """No answer (timeout, refused connection): retryable; the provider may not have seen it."""
    code = "timeout" if isinstance(exc, TimeoutError) else "transport"
    return DeliveryResult(status=DeliveryStatus.failed, retryable=True, error_code=code, raw=repr(exc)[:500])


def malformed(raw: str | None, *, retryable: bool = False) -> DeliveryResult:
    """A success status with a body we cannot read: whether it was sent is unknown, so it is
    retried only where the provider dedups retries (an idempotency key); never twice wins."""
    return DeliveryResult(
        status=DeliveryStatus.failed, retryable=retryable, error_code="malformed_response", raw=(raw or "")[:500]
    )


class Receipt(BaseModel):
    """One delivery report from a provider, correlated to our message by the provider's id."""

    model_config = ConfigDict(frozen=True)
    provider_message_id: str
    delivered: bool
    error_code: str | None = None


@dataclass(frozen=True)
class ReceiptRequest:
    """A provider's callback as it arrived: what a signature check needs (URL, headers, raw body)."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)


class ReceiptRejected(Exception):
    """A callback we will not take: `status` is what the provider is answered (401 bad signature,
    400 malformed)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def bad_signature(reason: str = "signature does not verify") -> ReceiptRejected:
    return ReceiptRejected(reason, status=401)


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True)
    body_maxlen: int | None = None
    title_maxlen: int | None = None
    rate_per_s: float | None = None


class ChannelAdapter(abc.ABC):
    scheme: ClassVar[str]
    channel_kind: ClassVar[str]
    limits: ClassVar[Limits] = Limits()
    returns_provider_ids: ClassVar[bool] = False
    sends_receipts: ClassVar[bool] = False
    # A phone maker's push service caps marketing pushes per device per day (streams.policy
    # DEFAULT_VENDOR_LIMITS); its name here makes the throttle count them.
    push_vendor: ClassVar[str | None] = None

    class Credentials(BaseModel):
        """Secrets come from settings, never from a Kafka message."""

    @classmethod
    def settings_key(cls) -> str:
        return cls.scheme.replace("-", "_")

    @classmethod
    def credentials_from(cls, settings) -> BaseModel:
        """The provider's secrets from settings (never from a Kafka message): env
        LOOPCAST_PROVIDERS__<SCHEME>__<FIELD>, e.g. LOOPCAST_PROVIDERS__TWILIO__AUTH_TOKEN. A field's
        default is the sandbox's value, so a local stack needs no setup; production sets them all."""
        return cls.Credentials.model_validate(settings.providers.get(cls.settings_key(), {}))

    @classmethod
    def parse_receipts(cls, credentials: BaseModel, request: ReceiptRequest) -> list[Receipt]:
        """Turn a provider's delivery callback into receipts, verifying its signature first
        (raise `bad_signature()`); only providers with `sends_receipts` implement it."""
        raise ReceiptRejected(f"{cls.scheme} sends no receipts", status=404)

    @classmethod
    def receipt_answer(cls) -> tuple[int, str, str]:
        """What the provider expects back from a receipt callback: status, body, content type."""
        return 200, '{"ok":true}', "application/json"

    def __init__(self, channel: Channel, credentials: BaseModel) -> None:
        self.channel = channel
        self.credentials = credentials

    @abc.abstractmethod
    async def send(self, message: RenderedMessage) -> DeliveryResult: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


# scheme -> "module:Class"; imported on first use so a provider's SDK loads only when configured.
REGISTRY: dict[str, str] = {
    "webhook": "connectors.channels.webhook:WebhookAdapter",
    "inbox": "connectors.channels.inbox:InboxAdapter",
    "xiaomi-push": "connectors.channels.xiaomi_push:XiaomiPushAdapter",
    "apprise": "connectors.channels.apprise_adapter:AppriseAdapter",
    "huawei-push": "connectors.channels.huawei_push:HuaweiPushAdapter",
    "ses": "connectors.channels.ses:SesAdapter",
    "webpush": "connectors.channels.webpush:WebPushAdapter",
    "sendgrid": "connectors.channels.sendgrid:SendgridAdapter",
    "wecom-app": "connectors.channels.wecom_app:WecomAppAdapter",
    "wecom-bot": "connectors.channels.wecom_bot:WecomBotAdapter",
    "dingtalk": "connectors.channels.dingtalk:DingtalkAdapter",
    "feishu": "connectors.channels.feishu:FeishuAdapter",
    "slack-webhook": "connectors.channels.slack_webhook:SlackWebhookAdapter",
    "slack": "connectors.channels.slack:SlackAdapter",
    "telegram": "connectors.channels.telegram:TelegramAdapter",
    "teams": "connectors.channels.teams:TeamsAdapter",
    "twilio": "connectors.channels.twilio:TwilioAdapter",
    "aliyun-sms": "connectors.channels.aliyun_sms:AliyunSmsAdapter",
    "tencent-sms": "connectors.channels.tencent_sms:TencentSmsAdapter",
    "http-sms": "connectors.channels.http_sms:HttpSmsAdapter",
    "apns": "connectors.channels.apns:ApnsAdapter",
    "smtp": "connectors.channels.smtp:SmtpAdapter",
    "fcm": "connectors.channels.fcm:FcmAdapter",
}


def adapter_class(scheme: str) -> type[ChannelAdapter]:
    try:
        module_name, class_name = REGISTRY[scheme].split(":")
    except KeyError:
        raise LookupError(f"no channel provider registered for scheme {scheme!r}") from None
    return getattr(importlib.import_module(module_name), class_name)
