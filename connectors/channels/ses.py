"""Amazon SES v2 SendEmail and SendBulkEmail, signed with AWS Signature Version 4 (no SDK: one POST does
not need boto). Delivery and bounce events arrive through SNS HTTP notifications, RSA-signed with a
certificate SNS names by URL; the receipt parser is synchronous, so the certificate is configured, never fetched.

With the channel option `batch_max` (2-50) the messages being sent at the same moment go as one SendBulkEmail
call: an inline template whose subject, text and html are each one variable ({{subject}}, {{text}}, {{html}};
SES does not HTML-escape what it substitutes), and per recipient an entry with that message's values, its
message_id tag and its headers. SES answers one result per entry with its own MessageId, so a message's
provider id and its receipts are the same as through SendEmail. A template has one set of parts: messages
with an html part go in other calls than those without, and a lone message goes as SendEmail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import BaseModel, SecretStr
from yarl import URL

from connectors.channels.base import (
    Answer,
    CallBatching,
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRejected,
    ReceiptRequest,
    accepted,
    bad_signature,
    calls_of,
    malformed,
    message_extra,
    rejected,
)
from connectors.channels.devkeys import dev_private_key
from schemas.config import Channel
from schemas.models import RenderedMessage

SERVICE = "ses"
ALGORITHM = "AWS4-HMAC-SHA256"
SEND_PATH = "/v2/email/outbound-emails"
BULK_PATH = "/v2/email/outbound-bulk-emails"
# SendBulkEmail takes at most this many entries in one call.
BATCH_MOST = 50
# The most an entry's ReplacementTemplateData may hold: a message longer than that goes alone, as SendEmail.
TEMPLATE_DATA_MOST = 262_144
DEV_SNS_KEY = "ses-sns-signing"
# SES error types worth retrying although they come as 400: quota and rate limits reset.
RETRYABLE_ERRORS = frozenset(
    {"TooManyRequestsException", "LimitExceededException", "Throttling", "ThrottlingException"}
)
# Message headers SES sets itself or refuses in Content.Simple.Headers.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "date", "message-id", "content-type", "mime-version"}
)
# SendBulkEmail's per-entry statuses that a later try can get past: rate and daily quota reset. The others
# (MESSAGE_REJECTED, ACCOUNT_SUSPENDED, *_SENDING_PAUSED, INVALID_PARAMETER, FAILED ...) are final, as the
# matching SendEmail errors are.
RETRYABLE_STATUSES = frozenset({"ACCOUNT_THROTTLED", "ACCOUNT_DAILY_QUOTA_EXCEEDED", "TRANSIENT_FAILURE"})
_TAG_VALUE = re.compile(r"[^A-Za-z0-9_.@-]")


# --- Signature Version 4 -------------------------------------------------------------------------


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date_stamp: str, region: str, service: str) -> bytes:
    return _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), date_stamp), region), service), "aws4_request")


def canonical_request(
    method: str, raw_path: str, query: str, headers: dict[str, str], signed: list[str], payload_hash: str
) -> str:
    # Non-S3 services URI-encode each path segment twice: the path as sent is encoded once, encode it again.
    path = quote(raw_path or "/", safe="/-_.~")
    pairs = sorted(
        (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
        for k, _, v in (item.partition("=") for item in query.split("&") if item)
    )
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed)
    return "\n".join(
        [method, path, "&".join(f"{k}={v}" for k, v in pairs), canonical_headers, ";".join(signed), payload_hash]
    )


def signature(secret: str, region: str, service: str, amz_date: str, request: str) -> tuple[str, str]:
    """(credential scope, hex signature) of a canonical request."""
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    return scope, hmac.new(
        signing_key(secret, amz_date[:8], region, service), to_sign.encode(), hashlib.sha256
    ).hexdigest()


def sign_request(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    *,
    access_key_id: str,
    secret: str,
    region: str,
    service: str = SERVICE,
    now: datetime | None = None,
    session_token: str | None = None,
) -> dict[str, str]:
    """The headers to send: `headers` plus Host, X-Amz-Date (and the session token) and Authorization."""
    target = URL(url)
    amz_date = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    host = target.raw_host if target.is_default_port() else f"{target.raw_host}:{target.port}"
    out = {**headers, "Host": host, "X-Amz-Date": amz_date}
    if session_token:
        out["X-Amz-Security-Token"] = session_token
    lowered = {k.lower(): v for k, v in out.items()}
    signed = sorted(lowered)
    request = canonical_request(
        method, target.raw_path, target.raw_query_string, lowered, signed, hashlib.sha256(body).hexdigest()
    )
    scope, sig = signature(secret, region, service, amz_date, request)
    out["Authorization"] = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={';'.join(signed)}, Signature={sig}"
    )
    return out


def parse_authorization(header: str) -> dict[str, str] | None:
    if not header.startswith(f"{ALGORITHM} "):
        return None
    fields = dict(part.strip().split("=", 1) for part in header[len(ALGORITHM) + 1 :].split(",") if "=" in part)
    return fields if {"Credential", "SignedHeaders", "Signature"} <= fields.keys() else None


# --- SNS message signatures ----------------------------------------------------------------------

NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
SUBSCRIPTION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")


def sns_string_to_sign(message: dict) -> bytes:
    """SNS's canonical form: "Key\\nValue\\n" for the type's keys in order, Subject only when present."""
    keys = NOTIFICATION_KEYS if message.get("Type") == "Notification" else SUBSCRIPTION_KEYS
    return "".join(f"{k}\n{message[k]}\n" for k in keys if k in message and message[k] is not None).encode()


def sns_sign(private_pem: str, message: dict) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return base64.b64encode(key.sign(sns_string_to_sign(message), padding.PKCS1v15(), hashes.SHA256())).decode()


def sns_verify(certificate_pem: str, message: dict) -> bool:
    """SignatureVersion 1 is SHA1withRSA, 2 SHA256withRSA, over `sns_string_to_sign`."""
    algorithm = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(str(message.get("SignatureVersion")))
    if algorithm is None or not message.get("Signature"):
        return False
    try:
        public = x509.load_pem_x509_certificate(certificate_pem.encode()).public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(
            base64.b64decode(message["Signature"]), sns_string_to_sign(message), padding.PKCS1v15(), algorithm
        )
    except (InvalidSignature, ValueError, AssertionError, KeyError, TypeError):
        return False
    return True


def dev_certificate(private_pem: str) -> str:
    """A self-signed certificate for the dev SNS key. Fixed names, serial and validity and a deterministic
    RSA PKCS#1 v1.5 signature make it the same bytes in every process that derives it."""
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "sns.loopcast-sandbox.local")])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365 * 30))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


# --- The adapter ---------------------------------------------------------------------------------


def message_headers(message: RenderedMessage) -> list[dict]:
    """The copy engine's extra headers (List-Unsubscribe ...), less those SES sets itself or refuses."""
    return [
        {"Name": str(k), "Value": str(v)}
        for k, v in (message_extra(message).get("headers") or {}).items()
        if v and k.lower() not in RESERVED_HEADERS
    ]


def message_tags(message: RenderedMessage) -> list[dict]:
    # Tag values allow letters, digits, _ - . @ only; our ids are hex already.
    return [{"Name": "message_id", "Value": _TAG_VALUE.sub("_", message.message_id)[:256]}]


def send_body(message: RenderedMessage, sender: str, configuration_set: str | None) -> dict:
    body: dict = {"Text": {"Data": message.body, "Charset": "UTF-8"}}
    if message.html:
        body["Html"] = {"Data": message.html, "Charset": "UTF-8"}
    simple: dict = {"Subject": {"Data": message.title or "", "Charset": "UTF-8"}, "Body": body}
    headers = message_headers(message)
    if headers:
        simple["Headers"] = headers
    request: dict = {
        "FromEmailAddress": sender,
        "Destination": {"ToAddresses": [message.address]},
        "Content": {"Simple": simple},
        "EmailTags": message_tags(message),
    }
    if configuration_set:
        request["ConfigurationSetName"] = configuration_set
    return request


def template_data(message: RenderedMessage) -> str:
    """A message's values for the bulk template's variables, as the JSON string an entry carries."""
    data = {"subject": message.title or "", "text": message.body}
    if message.html:
        data["html"] = message.html
    return json.dumps(data, ensure_ascii=False)


def bulk_body(messages: list[RenderedMessage], sender: str, configuration_set: str | None) -> dict:
    """One SendBulkEmail request: the messages share one inline template (all with an html part, or none)."""
    # Each part is a whole variable, so what arrives is each message as rendered; SES substitutes without
    # HTML-escaping. The default data is empty on purpose: every entry carries its own values, and no
    # message could ever fall back to another's words.
    content = {"Subject": "{{subject}}", "Text": "{{text}}"}
    if messages[0].html:
        content["Html"] = "{{html}}"
    entries = []
    for message in messages:
        entry: dict = {
            "Destination": {"ToAddresses": [message.address]},
            "ReplacementEmailContent": {"ReplacementTemplate": {"ReplacementTemplateData": template_data(message)}},
            "ReplacementTags": message_tags(message),
        }
        headers = message_headers(message)
        if headers:
            entry["ReplacementHeaders"] = headers
        entries.append(entry)
    request: dict = {
        "FromEmailAddress": sender,
        "DefaultContent": {"Template": {"TemplateContent": content, "TemplateData": "{}"}},
        "BulkEmailEntries": entries,
    }
    if configuration_set:
        request["ConfigurationSetName"] = configuration_set
    return request


def bulk_calls(messages: list[RenderedMessage]) -> list[list[RenderedMessage]]:
    """The messages as calls: one template per call, so those with an html part apart from those without;
    a message too long for an entry's template data alone (it goes as SendEmail)."""
    return calls_of(
        messages, kind=lambda m: bool(m.html) if len(template_data(m).encode()) <= TEMPLATE_DATA_MOST else None
    )


def entry_result(entry: object) -> DeliveryResult:
    """One BulkEmailEntryResult: SUCCESS with its MessageId, or the entry's Status as the error code."""
    if not isinstance(entry, dict):
        raise TypeError("a BulkEmailEntryResult is a JSON object")
    raw = json.dumps(entry, ensure_ascii=False)
    status, message_id = entry.get("Status"), entry.get("MessageId")
    if status == "SUCCESS":
        return accepted(str(message_id), raw) if message_id else malformed(raw)
    if not isinstance(status, str) or not status:
        return malformed(raw)  # whether it was sent is unknown: never twice wins
    return rejected(status, raw, retryable=status in RETRYABLE_STATUSES)


class SesAdapter(CallBatching, HttpAdapter):
    """Options: `region` (default us-east-1; the API root is https://email.<region>.amazonaws.com),
    `from` (a verified identity; default "<brand> <no-reply@example.com>"), `configuration_set` (the
    one whose event destination publishes Delivery/Bounce events to SNS), `batch_max` (1-50, default 1:
    more sends the messages of one moment as SendBulkEmail calls of up to that many).

    Receipts: SNS Notifications whose Message is an SES event: Delivery → delivered; Bounce, Reject and
    RenderingFailure → undelivered; Send, DeliveryDelay, Open, Click, Complaint … ignored. The signature is
    verified against `sns_certificate_pem` (pinned: rotate it when SNS rotates its signing certificate;
    the dev default is the sandbox's self-signed one). SubscriptionConfirmation messages are verified and
    answered with no receipts: confirm the subscription out of band (console, or `aws sns
    confirm-subscription` with the token), since fetching SubscribeURL needs I/O a parser must not do.
    """

    scheme = "ses"
    batch_most = BATCH_MOST
    channel_kind = "email"
    # A message is at most 40 MB; the sending rate is per account (14/s when production access starts,
    # raised on request), so it belongs on the channel's rate_per_s, not here.
    limits = Limits(title_maxlen=998, body_maxlen=40_000_000)
    returns_provider_ids = True
    sends_receipts = True

    class Credentials(BaseModel):
        access_key_id: str = "AKIALOOPCASTSANDBOX"
        secret_access_key: SecretStr = SecretStr("loopcast-dev-ses-secret-access-key")
        session_token: SecretStr | None = None
        # PEM of the certificate SNS signs notifications with; dev default: the sandbox's self-signed one.
        sns_certificate_pem: str | None = None

    @classmethod
    def credentials_from(cls, settings) -> Credentials:
        credentials = cls.Credentials.model_validate(settings.providers.get(cls.settings_key(), {}))
        if credentials.sns_certificate_pem is None:
            pem = dev_certificate(dev_private_key(settings.home, DEV_SNS_KEY, "rsa"))
            credentials = credentials.model_copy(update={"sns_certificate_pem": pem})
        return credentials

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        try:
            notification = json.loads(request.body)
            if not isinstance(notification, dict):
                raise TypeError("an SNS message is a JSON object")
        except (ValueError, TypeError) as exc:
            raise ReceiptRejected(f"malformed SNS message: {exc!r}") from None
        if not credentials.sns_certificate_pem or not sns_verify(credentials.sns_certificate_pem, notification):
            raise bad_signature()
        if notification.get("Type") != "Notification":
            return []  # SubscriptionConfirmation / UnsubscribeConfirmation: see the class docstring
        try:
            event = json.loads(notification["Message"])
            kind = event.get("eventType") or event.get("notificationType")  # event publishing / identity feedback
            provider_id = str(event["mail"]["messageId"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ReceiptRejected(f"malformed SES event: {exc!r}") from None
        if kind == "Delivery":
            return [Receipt(provider_message_id=provider_id, delivered=True)]
        if kind == "Bounce":
            bounce = event.get("bounce") or {}
            code = f"bounce_{bounce.get('bounceType', 'Undetermined')}_{bounce.get('bounceSubType', 'General')}"
            return [Receipt(provider_message_id=provider_id, delivered=False, error_code=code.lower())]
        if kind in ("Reject", "Rendering Failure", "RenderingFailure"):
            return [
                Receipt(provider_message_id=provider_id, delivered=False, error_code=kind.lower().replace(" ", "_"))
            ]
        return []

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.region = channel.options.get("region") or "us-east-1"
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", self.region):
            raise ValueError(f"channel {channel.id!r}: options['region'] is not an AWS region: {self.region!r}")
        name, address = parseaddr(
            channel.options.get("from") or f"{channel.brand or 'Loopcast'} <no-reply@example.com>"
        )
        if "@" not in address:
            raise ValueError(
                f"channel {channel.id!r}: options['from'] is not a mailbox: {channel.options.get('from')!r}"
            )
        self.sender = channel.options.get("from") or f"{name} <{address}>"
        self.configuration_set = channel.options.get("configuration_set")
        root = str(channel.url) if channel.url else f"https://email.{self.region}.amazonaws.com"
        self.url = f"{root.rstrip('/')}{SEND_PATH}"
        self.bulk_url = f"{root.rstrip('/')}{BULK_PATH}"
        self.start_batching(channel)

    async def _post(self, url: str, request: dict) -> Answer | DeliveryResult:
        """One signed call: SES's 2xx answer, or the failed delivery its error (or no answer) means."""
        body = json.dumps(request, ensure_ascii=False).encode()
        token = self.credentials.session_token
        headers = sign_request(
            "POST",
            url,
            {"Content-Type": "application/json"},
            body,
            access_key_id=self.credentials.access_key_id,
            secret=self.credentials.secret_access_key.get_secret_value(),
            region=self.region,
            session_token=token.get_secret_value() if token else None,
        )
        answer = await self.request("POST", url, data=body, headers=headers)
        if isinstance(answer, DeliveryResult):
            return answer
        if not answer.ok:
            error_type = answer.headers.get("x-amzn-ErrorType", "").split(":", 1)[0] or None
            return answer.failure(code=error_type, transient=error_type in RETRYABLE_ERRORS)
        return answer

    async def _send_one(self, message: RenderedMessage) -> DeliveryResult:
        answer = await self._post(self.url, send_body(message, self.sender, self.configuration_set))
        if isinstance(answer, DeliveryResult):
            return answer
        try:
            return accepted(str(answer.json()["MessageId"]), answer.text)
        except (ValueError, KeyError, TypeError):
            return malformed(answer.text)  # SendEmail takes no idempotency token: a retry could send twice

    async def send_call(self, messages: list[RenderedMessage]) -> list[DeliveryResult]:
        if len(messages) == 1:  # a lone message: SendEmail, as with batch_max 1
            return [await self._send_one(messages[0])]
        answer = await self._post(self.bulk_url, bulk_body(messages, self.sender, self.configuration_set))
        if isinstance(answer, DeliveryResult):
            return [answer] * len(messages)  # the whole call failed: every message in it did
        try:
            entries = answer.json()["BulkEmailEntryResults"]
            if not isinstance(entries, list) or len(entries) != len(messages):
                raise ValueError(f"{len(messages)} entries sent, results do not match")
            return [entry_result(entry) for entry in entries]
        except (ValueError, KeyError, TypeError):
            return [malformed(answer.text)] * len(messages)  # no idempotency token here either

    def calls(self, messages: list[RenderedMessage]) -> list[list[RenderedMessage]]:
        return bulk_calls(messages)
