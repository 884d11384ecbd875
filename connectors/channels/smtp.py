"""Email over SMTP (any relay: Postfix, Mailgun/Postmark/SES SMTP endpoints). SMTP answers in reply
codes, not ids: our Message-ID is the provider id, and 4xx means "try later" while 5xx means never.
Channel.url is an HttpUrl (http/https only), so the relay's host and port live in options instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr

import aiosmtplib
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    ChannelAdapter,
    DeliveryResult,
    Limits,
    accepted,
    flag_option,
    malformed,
    rejected,
    transport_failure,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

# Headers the copy engine may set through extra["headers"]; anything else (Received, DKIM-Signature,
# Content-*) is the relay's business or would break the MIME structure we build.
PASSED_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post", "list-id", "reply-to", "x-campaign-id"})
# A reused connection idle longer than this gets a NOOP first: relays drop idle clients (Postfix after 300 s).
IDLE_CHECK_S = 10.0
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,200}$")


def message_id_header(message_id: str, domain: str) -> str:
    """A stable Message-ID for our message id: a retry carries the same one, so the receiving side
    (and a DKIM signature over it) sees one message, not two."""
    local = message_id if _DOT_ATOM.match(message_id) and ".." not in message_id else None
    local = local.strip(".") if local else hashlib.sha256(message_id.encode()).hexdigest()[:32]
    return f"<{local}@{domain}>"


def build_email(message: RenderedMessage, sender: Address) -> EmailMessage:
    """multipart/alternative (text, then html — clients show the last one they can) with every header
    set before any signing; the Date is the trigger time so a retry's bytes are identical."""
    mail = EmailMessage(policy=SMTP_POLICY)
    mail["From"] = sender
    mail["To"] = message.address
    mail["Subject"] = message.title or ""
    mail["Date"] = format_datetime(message.triggered_at)
    mail["Message-ID"] = message_id_header(message.message_id, sender.domain)
    extra = json.loads(message.extra) if message.extra else {}
    for name, value in (extra.get("headers") or {}).items():
        if name.lower() in PASSED_HEADERS and value:
            mail[name] = str(value)
    mail.set_content(message.body)
    if message.html:
        mail.add_alternative(message.html, subtype="html")
        # The generator would pick a random boundary: derive it, so a retry's bytes stay identical.
        mail.set_boundary(f"==lc_{hashlib.sha256(message.message_id.encode()).hexdigest()[:32]}")
    return mail


class SmtpAdapter(ChannelAdapter):
    """Options: `host` (required), `port` (default 587 with STARTTLS, else 25), `starttls` ("true"/"false",
    default true), `from` (an RFC 5322 mailbox; default "<brand> <no-reply@example.com>").

    DKIM hook: with `dkim_private_key` in the credentials and `options["dkim_selector"]`, the raw message is
    signed with dkimpy (relaxed/relaxed over From, To, Subject, Date, Message-ID, List-Unsubscribe*). dkimpy
    is not a dependency: configuring a key without it fails at construction rather than sending unsigned.
    The message is built once, signed, and sent as bytes, so nothing rewrites a signed header.
    """

    scheme = "smtp"
    channel_kind = "email"
    # RFC 5321: 998 characters per line bounds the Subject; relays cap the message size (commonly
    # 10–35 MB: SES 40 MB, Gmail 25 MB), a bound on the body here.
    limits = Limits(title_maxlen=998, body_maxlen=10_000_000)
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        username: str = "loopcast"
        password: SecretStr = SecretStr("loopcast-dev-smtp-password")
        dkim_private_key: SecretStr | None = None

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        options = channel.options
        if not options.get("host"):
            raise ValueError(f"channel {channel.id!r}: the smtp provider needs options['host'] (and 'port')")
        self.host = options["host"]
        self.starttls = flag_option(options.get("starttls"), True)
        self.port = int(options.get("port") or (587 if self.starttls else 25))
        name, address = parseaddr(options.get("from") or f"{channel.brand or 'Loopcast'} <no-reply@example.com>")
        if "@" not in address or not address.split("@", 1)[1]:
            raise ValueError(f"channel {channel.id!r}: options['from'] is not a mailbox: {options.get('from')!r}")
        user, domain = address.rsplit("@", 1)
        self.sender = Address(display_name=name, username=user, domain=domain)
        self.dkim_selector = options.get("dkim_selector")
        self._dkim = None
        if credentials.dkim_private_key is not None:
            try:
                import dkim  # type: ignore[import-not-found]  # dkimpy, optional
            except ImportError:
                raise ValueError("a DKIM key is configured but dkimpy is not installed") from None
            if not self.dkim_selector:
                raise ValueError(f"channel {channel.id!r}: DKIM needs options['dkim_selector']")
            self._dkim = dkim
        self._lock = asyncio.Lock()
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0

    def sign(self, raw: bytes) -> bytes:
        """Prepend a DKIM-Signature when a key is configured (see the class docstring)."""
        if self._dkim is None:
            return raw
        signature = self._dkim.sign(
            raw,
            self.dkim_selector.encode(),
            self.sender.domain.encode(),
            self.credentials.dkim_private_key.get_secret_value().encode(),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[
                b"from",
                b"to",
                b"subject",
                b"date",
                b"message-id",
                b"list-unsubscribe",
                b"list-unsubscribe-post",
            ],
        )
        return signature + raw

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            if time.monotonic() - self._last_used < IDLE_CHECK_S:
                return self._smtp
            try:
                await self._smtp.noop()
                return self._smtp
            except aiosmtplib.SMTPException:
                await self._drop()
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self.credentials.username or None,
            password=self.credentials.password.get_secret_value() or None,
            start_tls=self.starttls,
            timeout=self.channel.timeout_s,
        )
        await smtp.connect()  # EHLO, STARTTLS and AUTH, as configured
        self._smtp = smtp
        return smtp

    async def _drop(self) -> None:
        """After any error the session state is unknown (a 421 even closes it): start afresh next time."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        mail = build_email(message, self.sender)
        raw = self.sign(mail.as_bytes())
        message_id = mail["Message-ID"]
        async with self._lock:
            try:
                async with asyncio.timeout(self.channel.timeout_s):
                    smtp = await self._connection()
                    _, reply = await smtp.sendmail(self.sender.addr_spec, [message.address], raw)
                self._last_used = time.monotonic()
                return accepted(message_id, reply)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                await self._drop()
                return self._refused(exc.recipients[0].code, exc.recipients[0].message)
            except aiosmtplib.SMTPResponseException as exc:
                await self._drop()
                if exc.code < 0:  # an unreadable reply: whether the relay queued it is unknown
                    return malformed(exc.message)
                return self._refused(exc.code, exc.message)
            except (TimeoutError, OSError, aiosmtplib.SMTPException) as exc:
                await self._drop()
                return transport_failure(exc)

    @staticmethod
    def _refused(code: int, text: str) -> DeliveryResult:
        # RFC 5321 §4.2.1: 4yz is a transient failure (421 closing, 451 throttled, 452 full), 5yz permanent.
        return rejected(f"smtp_{code}", f"{code} {text}", retryable=400 <= code < 500)

    async def close(self) -> None:
        async with self._lock:
            if self._smtp is not None and self._smtp.is_connected:
                try:
                    await asyncio.wait_for(self._smtp.quit(), timeout=1)
                except (TimeoutError, OSError, aiosmtplib.SMTPException):
                    pass
            await self._drop()
