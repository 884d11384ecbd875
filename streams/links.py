"""Tracked links: the click target and the message it belongs to, signed, so the redirect
endpoint needs no lookup and cannot be used as an open redirect."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import orjson
from pydantic import BaseModel


class LinkClaims(BaseModel):
    message_id: str
    campaign_id: str
    user_id: str
    channel: str
    triggered_at_ms: int
    url: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, body: str) -> str:
    return _b64(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16])


def make_token(secret: str, claims: LinkClaims) -> str:
    compact = [
        claims.message_id,
        claims.campaign_id,
        claims.user_id,
        claims.channel,
        claims.triggered_at_ms,
        claims.url,
    ]
    body = _b64(orjson.dumps(compact))  # compact JSON; tokens are made per message
    return f"{body}.{_mac(secret, body)}"


def read_token(secret: str, token: str) -> LinkClaims:
    """Raises ValueError for a token that was not signed by us or is malformed."""
    body, _, mac = token.partition(".")
    if not body or not hmac.compare_digest(_mac(secret, body), mac):
        raise ValueError("bad link signature")
    message_id, campaign_id, user_id, channel, triggered_at_ms, url = json.loads(_unb64(body))
    return LinkClaims(
        message_id=message_id,
        campaign_id=campaign_id,
        user_id=user_id,
        channel=channel,
        triggered_at_ms=triggered_at_ms,
        url=url,
    )


def tracked_url(base: str, secret: str, claims: LinkClaims) -> str:
    return f"{base}/c/{make_token(secret, claims)}"


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def short_code(message_id: str, length: int = 10) -> str:
    """A short, deterministic code per message (62^10 ≈ 8e17): SMS pays for every character."""
    number = int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=8).digest(), "big")
    code = []
    for _ in range(length):
        number, digit = divmod(number, 62)
        code.append(_BASE62[digit])
    return "".join(code)


def short_url(base: str, code: str) -> str:
    return f"{base}/s/{code}"


def unsubscribe_token(secret: str, user_id: str, channel: str) -> str:
    """For one-click unsubscribe links (List-Unsubscribe): who, from which channel, signed."""
    body = _b64(orjson.dumps([user_id, channel]))
    return f"{body}.{_mac(secret, 'unsubscribe:' + body)}"


def read_unsubscribe_token(secret: str, token: str) -> tuple[str, str]:
    body, _, mac = token.partition(".")
    if not body or not hmac.compare_digest(_mac(secret, "unsubscribe:" + body), mac):
        raise ValueError("bad unsubscribe link")
    user_id, channel = json.loads(_unb64(body))
    return user_id, channel
