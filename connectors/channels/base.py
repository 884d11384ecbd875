"""The contract every channel provider implements, and the registry that finds them by scheme.

Adding a provider is one module here plus one registry entry: no central switch elsewhere.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import hmac
import importlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx
from pydantic import BaseModel, ConfigDict

from schemas.config import Channel
from schemas.models import RenderedMessage


class DeliveryStatus(StrEnum):
    accepted = "accepted"  # the provider took it; a receipt may follow
    failed = "failed"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What a provider said to one send. A dataclass, not a model: one is made per message sent, and
    everything that makes one is our own adapter code (nothing to validate)."""

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


def seconds(value: str | float | None) -> float | None:
    """A Retry-After in seconds; None when absent or an HTTP date (the retry's own backoff applies)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return None


def rejected(
    error_code: str, raw: str | None = None, *, retryable: bool = False, retry_after: str | float | None = None
) -> DeliveryResult:
    """The provider answered and said no (a business error code in its own format); a retryable one
    waits at least `retry_after` seconds when given."""
    return DeliveryResult(
        status=DeliveryStatus.failed,
        error_code=error_code,
        retryable=retryable,
        raw=(raw or "")[:500],
        retry_after_s=seconds(retry_after) if retryable else None,
    )


def http_failure(
    status: int,
    raw: str | None = None,
    retry_after: str | None = None,
    code: str | None = None,
    *,
    transient: bool = False,
) -> DeliveryResult:
    """A non-2xx answer: 429 and 5xx are worth retrying (429 after its Retry-After), other 4xx are not
    unless `transient` (the provider's error code says a retry can succeed, e.g. a quota that resets)."""
    return DeliveryResult(
        status=DeliveryStatus.failed,
        retryable=status == 429 or status >= 500 or transient,
        error_code=code or f"http_{status}",
        raw=(raw or "")[:500],
        retry_after_s=seconds(retry_after),
    )


def transport_failure(exc: BaseException) -> DeliveryResult:
    """No answer (timeout, refused connection): retryable; the provider may not have seen it."""
    code = "timeout" if isinstance(exc, TimeoutError | httpx.TimeoutException) else "transport"
    return DeliveryResult(status=DeliveryStatus.failed, retryable=True, error_code=code, raw=repr(exc)[:500])


def malformed(raw: str | None, *, retryable: bool = False) -> DeliveryResult:
    """A success status with a body we cannot read: whether it was sent is unknown, so it is
    retried only where the provider dedups retries (an idempotency key); never twice wins."""
    return DeliveryResult(
        status=DeliveryStatus.failed, retryable=retryable, error_code="malformed_response", raw=(raw or "")[:500]
    )


# --- HTTP mechanics shared by the adapters that speak HTTP through aiohttp -------------------------


def http_session(channel: Channel) -> aiohttp.ClientSession:
    """One pooled session per adapter: the channel's timeout bounds each request."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=channel.timeout_s),
        connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
    )


@dataclass(frozen=True)
class Answer:
    """A provider's HTTP answer, read in full; what it means is the provider module's business."""

    status: int
    text: str
    headers: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("Retry-After")

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.text)

    def json_object(self) -> dict[str, Any] | None:
        """The body as a JSON object, or None when it is anything else (an HTML error page, say)."""
        try:
            body = json.loads(self.text)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def failure(self, code: str | None = None, *, transient: bool = False) -> DeliveryResult:
        """This (non-2xx) answer as a failed delivery: see `http_failure`."""
        return http_failure(self.status, self.text, self.retry_after, code=code, transient=transient)

    def unreadable(self, *, retryable: bool = False) -> DeliveryResult:
        """A body we cannot read: the status decides on an error status, else it is `malformed`."""
        return self.failure() if not self.ok else malformed(self.text, retryable=retryable)


async def request(session: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> Answer | DeliveryResult:
    """One HTTP exchange: the provider's answer, or a `transport_failure` when none came."""
    try:
        async with session.request(method, url, **kwargs) as response:
            text = await response.text()
            return Answer(response.status, text, response.headers)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return transport_failure(exc)


def errcode_result(answer: Answer, retryable: set[int]) -> DeliveryResult:
    """The answer in the `errcode` convention (WeCom, DingTalk): HTTP 200 with {"errcode": 0} on success,
    another errcode for a business error; a `retryable` one waits for the Retry-After when there is one."""
    if not answer.ok:
        return answer.failure()
    try:
        code = int(answer.json()["errcode"])
    except (ValueError, KeyError, TypeError):
        return malformed(answer.text)
    if code == 0:
        return accepted(None, answer.text)
    return rejected(str(code), answer.text, retryable=code in retryable, retry_after=answer.retry_after)


def root_url(channel: Channel, default: str) -> str:
    """The provider's API root: the channel's `url` (a sandbox, a proxy, a region) or the public one."""
    return str(channel.url).rstrip("/") if channel.url else default


def flag_option(value: str | None, default: bool) -> bool:
    """A true/false channel option (options are strings); `default` when unset."""
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def message_extra(message: RenderedMessage) -> dict[str, Any]:
    """The copy engine's `extra` object; {} when absent or not a JSON object."""
    try:
        extra = json.loads(message.extra) if message.extra else {}
    except ValueError:
        return {}
    return extra if isinstance(extra, dict) else {}


T = TypeVar("T")


class TokenCache:
    """An access token shared by an adapter's concurrent sends: fetched when missing or past its
    lifetime, and fetched afresh once when the provider refuses the one it was given.

    `fetch()` returns (token, seconds it may be kept: the provider's lifetime less a safety margin), or a
    DeliveryResult saying why there is none (the send fails with it)."""

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float] | DeliveryResult]]) -> None:
        self._fetch = fetch
        self._lock = asyncio.Lock()
        self.value: str | None = None
        self.expires = 0.0  # time.monotonic()

    async def get(self, stale: str | None = None) -> str | DeliveryResult:
        """The cached token, or a new one; `stale` is one the provider refused (renewed once, whoever asks)."""
        async with self._lock:
            if self.value and self.value != stale and time.monotonic() < self.expires:
                return self.value
            fetched = await self._fetch()
            if isinstance(fetched, DeliveryResult):
                return fetched
            self.value, lifetime = fetched
            self.expires = time.monotonic() + lifetime
            return self.value

    async def call(self, use: Callable[[str], Awaitable[T]], refused: Callable[[T], bool]) -> T | DeliveryResult:
        """`use(token)`; once more with a fresh token when `refused(outcome)` says the token was the problem."""
        stale: str | None = None
        while True:
            token = await self.get(stale)
            if isinstance(token, DeliveryResult):
                return token
            outcome = await use(token)
            if stale is not None or not refused(outcome):
                return outcome
            stale = token


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery report from a provider, correlated to our message by the provider's id. A dataclass, as
    `DeliveryResult` is: one is made per report, by our own parsers (building a model was a twentieth of the
    warehouse owner's CPU in a burst)."""

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


def batched_receipts(body: bytes, what: str, read: Callable[[dict[str, Any]], Receipt | None]) -> list[Receipt]:
    """Receipts from a gateway that pushes its delivery reports as a JSON array: each report read by
    `read` (None for one that is not final yet); anything malformed refuses the whole callback."""
    try:
        reports = json.loads(body)
        if not isinstance(reports, list):
            raise TypeError(f"{what} is a JSON array")
        return [receipt for receipt in map(read, reports) if receipt is not None]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReceiptRejected(f"malformed {what}: {exc!r}") from None


def bad_signature(reason: str = "signature does not verify") -> ReceiptRejected:
    return ReceiptRejected(reason, status=401)


def query_value(request: ReceiptRequest, name: str) -> str | None:
    """A query parameter of the callback URL (from the parsed query, else from the URL itself)."""
    value = request.query.get(name) if request.query else None
    if value is None:
        value = (parse_qs(urlsplit(request.url).query).get(name) or [None])[0]
    return value


def require_secret(given: str | None, *expected: str, reason: str) -> None:
    """For providers that do not sign callbacks: the shared secret the callback carries (in its URL or an
    Authorization header) must be one of `expected`, compared in constant time; else `bad_signature`."""
    if not given or not any(hmac.compare_digest(given.encode(), e.encode()) for e in expected):
        raise bad_signature(reason)


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
    # The provider is the destination itself (the in-app inbox): accepted is delivered.
    delivers_on_accept: ClassVar[bool] = False

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


def batch_max_option(channel: Channel, most: int) -> int:
    """The channel option `batch_max`: how many messages one request may carry (1: a request each), at
    most what the provider's API takes in one call."""
    try:
        value = int(channel.options.get("batch_max", "1"))
    except ValueError:
        raise ValueError(f"channel {channel.id!r}: batch_max must be a whole number") from None
    if not 1 <= value <= most:
        raise ValueError(f"channel {channel.id!r}: batch_max must be between 1 and {most}")
    return value


class LoopTurnBatches:
    """The sends made in the same turn of the event loop, handed to `send_many` as one list (a request
    to a provider API that takes many recipients) when the turn ends or `most` are waiting. Each sender
    still gets its own result, in order; a failure of the whole call reaches every sender in it."""

    def __init__(self, most: int, send_many: Callable[[list[RenderedMessage]], Awaitable[list[DeliveryResult]]]):
        self.most, self.send_many = most, send_many
        self._waiting: list[tuple[RenderedMessage, asyncio.Future]] = []
        self._flush_soon: asyncio.Handle | None = None

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiting.append((message, done))
        if len(self._waiting) >= self.most:
            self._flush()
        elif self._flush_soon is None:
            self._flush_soon = loop.call_soon(self._flush)
        return await done

    def _flush(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # results reach each caller

    async def _send(self, batch: list[tuple[RenderedMessage, asyncio.Future]]) -> None:
        try:
            results = await self.send_many([m for m, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiting sender must hear, whatever happened
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), result in zip(batch, results, strict=True):
            if not done.done():
                done.set_result(result)


def calls_of(
    messages: list[RenderedMessage],
    kind: Callable[[RenderedMessage], Any],
    key: Callable[[RenderedMessage], str] | None = None,
) -> list[list[RenderedMessage]]:
    """A loop turn's messages as provider calls: those of one `kind` together (a call has one shape: one
    template, one set of parts), a message whose kind is None alone, and never the same `key` (a number, an
    address) twice in one call, where the provider would refuse it or its reports could not be told apart."""
    calls: list[list[RenderedMessage]] = []
    open_calls: dict[Any, list[tuple[list[RenderedMessage], set[str]]]] = {}
    for message in messages:
        shape = kind(message)
        if shape is None:
            calls.append([message])
            continue
        taken_key = key(message) if key else ""
        rounds = open_calls.setdefault(shape, [])
        free = next((c for c in rounds if not key or taken_key not in c[1]), None)
        if free is None:
            free = ([], set())
            rounds.append(free)
            calls.append(free[0])
        free[0].append(message)
        free[1].add(taken_key)
    return calls


def as_messages(
    call: list[RenderedMessage], result: DeliveryResult, provider_id: Callable[[str, RenderedMessage], str]
) -> list[DeliveryResult]:
    """One answer to a whole call as each of its messages' results: where the provider names the call (one
    id for all), an accepted message's id is `provider_id(the call's id, the message)`."""
    if result.status is not DeliveryStatus.accepted:
        return [result] * len(call)
    return [accepted(provider_id(result.provider_message_id, m), result.raw) for m in call]


class CallBatching:
    """For an adapter whose provider takes many recipients in one call: with the channel option `batch_max`
    above 1, the sends of one loop turn go as `calls(messages)`; otherwise each message is a call of one.
    The adapter says how a turn splits (`calls`, default: one call for all) and sends one call
    (`send_call`, a result per message, in order; a call of one goes the provider's single way)."""

    batch_most: ClassVar[int]

    def start_batching(self, channel: Channel) -> None:
        self.batch_max = batch_max_option(channel, self.batch_most)
        self.batches = LoopTurnBatches(self.batch_max, self._send_turn)

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        if self.batch_max > 1:
            return await self.batches.send(message)
        [result] = await self.send_call([message])
        return result

    def calls(self, messages: list[RenderedMessage]) -> list[list[RenderedMessage]]:
        return [messages]

    async def send_call(self, call: list[RenderedMessage]) -> list[DeliveryResult]:
        raise NotImplementedError

    async def _send_turn(self, messages: list[RenderedMessage]) -> list[DeliveryResult]:
        """Each message's result, in the order of `messages`: the turn's calls go at once."""
        calls = self.calls(messages)
        answers = await asyncio.gather(*(self.send_call(c) for c in calls))
        by_message = {
            id(message): result
            for sent, results in zip(calls, answers, strict=True)
            for message, result in zip(sent, results, strict=True)
        }
        return [by_message[id(m)] for m in messages]


class HttpAdapter(ChannelAdapter):
    """An adapter that speaks HTTP: one pooled aiohttp session (opened on first use, closed by `close`)."""

    @functools.cached_property
    def session(self) -> aiohttp.ClientSession:
        return http_session(self.channel)

    async def request(self, method: str, url: Any, **kwargs: Any) -> Answer | DeliveryResult:
        return await request(self.session, method, url, **kwargs)

    async def close(self) -> None:
        if "session" in self.__dict__:
            await self.session.close()


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
