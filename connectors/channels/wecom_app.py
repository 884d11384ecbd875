"""WeCom (企业微信) application messages: an access token from corpid + corpsecret, cached for its
`expires_in` and fetched again once when a send says it is invalid (40014) or expired (42001).
WeCom answers HTTP 200 for business errors, so the `errcode` in the body decides, not the status.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    Answer,
    DeliveryResult,
    DeliveryStatus,
    HttpAdapter,
    Limits,
    TokenCache,
    accepted,
    errcode_result,
    malformed,
    message_extra,
    rejected,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage
from streams.copy.channels import truncate

API_ROOT = "https://qyapi.weixin.qq.com"
TOKEN_ERRORS = {40014, 42001}  # invalid / expired access_token: fetch a new one, retry once
RETRYABLE = {-1, 45009, 45033}  # system busy, api freq out of limit, too many concurrent calls
MARKDOWN_FORMATS = {"wecom", "dingtalk", "slack", "telegram"}


def _bytes(text: str, limit: int) -> str:
    return truncate(text, limit, unit="bytes")


class WecomAppAdapter(HttpAdapter):
    """Options: `agent_id` (required, the application's AgentId); `button_text` (textcard button, default 详情)."""

    scheme = "wecom-app"
    channel_kind = "im"
    # Application text and markdown content: 2048 bytes (the group robot's markdown allows 4096).
    limits = Limits(body_maxlen=2048, title_maxlen=128, rate_per_s=None)
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        corp_id: str = "ww-loopcast-dev"
        corp_secret: SecretStr = SecretStr("loopcast-dev-wecom-secret")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        agent_id = channel.options.get("agent_id")
        if not agent_id or not agent_id.isdigit():
            raise ValueError(f"channel {channel.id!r}: wecom-app needs options.agent_id (the numeric AgentId)")
        self.agent_id = int(agent_id)
        self.root = root_url(channel, API_ROOT)
        self.token = TokenCache(self._fetch_token)

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        body: dict[str, Any] = {"touser": message.address, "agentid": self.agent_id}
        plain = message_extra(message).get("body_text") or message.body
        title = _bytes(message.title or plain.split("\n", 1)[0], 128)
        if message.link and message.image_url:
            article = {"title": title, "description": _bytes(plain, 512), "url": message.link}
            body.update(msgtype="news", news={"articles": [{**article, "picurl": message.image_url}]})
        elif message.link:
            card = {
                "title": title,
                "description": _bytes(plain, 512),
                "url": message.link,
                "btntxt": self.channel.options.get("button_text", "详情"),
            }
            body.update(msgtype="textcard", textcard=card)
        elif self.channel.format in MARKDOWN_FORMATS:
            body.update(msgtype="markdown", markdown={"content": _bytes(message.body, 2048)})
        else:
            body.update(msgtype="text", text={"content": _bytes(message.body, 2048)})
        return body

    async def _fetch_token(self) -> tuple[str, float] | DeliveryResult:
        params = {"corpid": self.credentials.corp_id, "corpsecret": self.credentials.corp_secret.get_secret_value()}
        response = await self.request("GET", f"{self.root}/cgi-bin/gettoken", params=params)
        if isinstance(response, DeliveryResult):
            return response
        if not response.ok:
            return response.failure()
        try:
            answer = response.json()
            code = int(answer.get("errcode", 0))
            if code:
                return rejected(str(code), response.text, retryable=code in RETRYABLE)
            token = str(answer["access_token"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return malformed(response.text, retryable=True)  # nothing was sent yet
        # Refresh a minute early so a token never expires between our check and WeCom's.
        return token, max(int(answer.get("expires_in", 7200)) - 60, 1)

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()

        async def post(token: str) -> DeliveryResult:
            url, headers = f"{self.root}/cgi-bin/message/send", {"Content-Type": "application/json"}
            answer = await self.request("POST", url, params={"access_token": token}, data=body, headers=headers)
            return answer if isinstance(answer, DeliveryResult) else self._result(message, answer)

        return await self.token.call(post, lambda result: result.error_code in {str(c) for c in TOKEN_ERRORS})

    def _result(self, message: RenderedMessage, answer: Answer) -> DeliveryResult:
        result = errcode_result(answer, RETRYABLE)
        if result.status == DeliveryStatus.failed:
            return result
        fields = answer.json()
        # errcode 0 can still name our one recipient as invalid (unknown user or outside the app's visibility).
        if message.address in str(fields.get("invaliduser") or "").split("|"):
            return rejected("invaliduser", answer.text)
        return accepted(str(fields.get("msgid") or "") or None, answer.text)
