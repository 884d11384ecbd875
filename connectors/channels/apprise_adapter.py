"""The long tail of chat and push services through Apprise URLs (discord://, mailto://, ntfy://, json:// …).
Apprise reports per call only success, failure, partial or timeout: no provider message ids, no
receipts. (Named apprise_adapter, not apprise, so it never shadows the library.)
"""

from __future__ import annotations

import re

import apprise
from apprise.result import AppriseResultStatus
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    ChannelAdapter,
    DeliveryResult,
    Limits,
    accepted,
    rejected,
)
from schemas.config import Channel
from schemas.models import RenderedMessage


def split_urls(text: str) -> list[str]:
    """Apprise URLs separated by whitespace or commas (commas inside a URL's query are kept)."""
    return [url.strip() for url in re.split(r"\s+|,(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)", text) if url.strip()]


class AppriseAdapter(ChannelAdapter):
    """Targets: the credentials' `urls` (Apprise URLs embed tokens, so they are secrets; env
    LOOPCAST_PROVIDERS__APPRISE__URLS), else `options["url"]` (token-free targets only). Several URLs
    (space- or comma-separated) are all notified; the first configured source wins.

    Results: SUCCESS → accepted (no id); FAILURE → retryable "apprise_failed" (Apprise does not say
    why, so an auth error looks like an outage); TIMEOUT → retryable "timeout"; PARTIAL (some targets
    took it) → not retryable "apprise_partial", as a retry would notify the others twice; NOMATCH → not
    retryable "apprise_no_targets". Title and body are sent as text, with the link appended to the body.
    """

    scheme = "apprise"
    channel_kind = "multi"
    # Targets vary (Discord 2000 chars, Slack 40k …); Apprise splits or truncates per service itself.
    limits = Limits(body_maxlen=32_768, title_maxlen=250)
    returns_provider_ids = False
    sends_receipts = False

    class Credentials(BaseModel):
        urls: SecretStr | None = None

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        source = credentials.urls.get_secret_value() if credentials.urls else channel.options.get("url", "")
        urls = split_urls(source)
        if not urls:
            raise ValueError(f"channel {channel.id!r}: apprise needs credentials urls or options['url']")
        self.apprise = apprise.Apprise()
        for url in urls:
            if not self.apprise.add(url):
                # Never echo the URL: it may carry a token.
                raise ValueError(
                    f"channel {channel.id!r}: an Apprise URL is not understood ({url.split(':', 1)[0]}://…)"
                )

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = message.body
        if message.link and message.link not in body:
            body = f"{body}\n{message.link}"
        result = await self.apprise.async_notify(
            body=body,
            title=message.title or "",
            notify_type=apprise.NotifyType.INFO,
            body_format=apprise.NotifyFormat.TEXT,
            timeout=self.channel.timeout_s,
        )
        raw = (
            f"{result.status.name}: {result.success_count} ok, {result.failed_count} failed,"
            f" {result.timeout_count} timed out"
        )
        match result.status:
            case AppriseResultStatus.SUCCESS:
                return accepted(None, raw)
            case AppriseResultStatus.TIMEOUT:
                return rejected("timeout", raw, retryable=True)
            case AppriseResultStatus.PARTIAL:
                return rejected("apprise_partial", raw)
            case AppriseResultStatus.NOMATCH:
                return rejected("apprise_no_targets", raw)
            case _:
                return rejected("apprise_failed", raw, retryable=True)
