"""Microsoft Teams through a Power Automate "Workflows" webhook (the successor of Office 365 connectors):
the URL's SAS `sig` query parameter is the secret, the body is an Adaptive Card wrapped as a message
attachment, and the flow answers 202 Accepted with no id - posting happens later, inside the flow.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    accepted,
    malformed,
    message_extra,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

API_VERSION = "2016-06-01"
TRIGGER = "/triggers/manual/run"
CARD_TYPE = "application/vnd.microsoft.card.adaptive"
MESSAGE_MAX = 28 * 1024  # Teams refuses messages over about 28 KB


def card(message: RenderedMessage, button_text: str = "Open") -> dict[str, Any]:
    text = message_extra(message).get("body_text") or message.body
    body: list[dict[str, Any]] = []
    if message.title:
        body.append({"type": "TextBlock", "text": message.title, "weight": "Bolder", "size": "Medium", "wrap": True})
    if message.image_url:
        body.append({"type": "Image", "url": message.image_url})
    body.append({"type": "TextBlock", "text": text, "wrap": True})
    content: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    if message.link:
        content["actions"] = [{"type": "Action.OpenUrl", "title": button_text, "url": message.link}]
    return {"type": "message", "attachments": [{"contentType": CARD_TYPE, "contentUrl": None, "content": content}]}


class TeamsAdapter(HttpAdapter):
    """The channel's `url` is the workflow's host (e.g. https://prod-12.westus.logic.azure.com:443 or an
    environment.api.powerplatform.com host) - there is no single public root. Options: `workflow_id`
    (required, from the workflow URL); `button_text` (default "Open"). The flow decides where the card
    goes, so the address is not used."""

    scheme = "teams"
    channel_kind = "im"
    # Teams webhooks are throttled past about 4 requests a second.
    limits = Limits(body_maxlen=MESSAGE_MAX, rate_per_s=4)
    returns_provider_ids = False
    sends_receipts = False

    class Credentials(BaseModel):
        sig: SecretStr = SecretStr("loopcast-dev-teams-sig")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        workflow = channel.options.get("workflow_id")
        if channel.url is None or not workflow:
            raise ValueError(f"channel {channel.id!r}: teams needs a url (the workflow host) and options.workflow_id")
        root = str(channel.url).rstrip("/")
        query = f"api-version={API_VERSION}&sp={quote(TRIGGER, safe='')}&sv=1.0&sig="
        self.url = f"{root}/workflows/{quote(workflow, safe='')}/triggers/manual/paths/invoke?{query}"

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(card(message, self.channel.options.get("button_text", "Open")), ensure_ascii=False).encode()
        url = self.url + quote(self.credentials.sig.get_secret_value(), safe="")
        answer = await self.request("POST", url, data=body, headers={"Content-Type": "application/json"})
        if isinstance(answer, DeliveryResult):
            return answer
        if not answer.ok:
            try:
                code = str(answer.json()["error"]["code"])
            except (ValueError, KeyError, TypeError):
                code = None
            return answer.failure(code=code)
        if answer.text.strip():
            try:
                answer.json()
            except ValueError:
                return malformed(answer.text)
        return accepted(None, answer.text)
