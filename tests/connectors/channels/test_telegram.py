"""The Telegram Bot API adapter against its sandbox over loopback HTTP: the case table (401 for a wrong
token, 429 with parameters.retry_after), then the "chat_id:message_id" id, the MarkdownV2 extras and the
link button that arrived."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.telegram import TelegramAdapter
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

WRONG = TelegramAdapter.Credentials(token=SecretStr("123456789:wrong"))
MARKDOWN = "*Flash sale*\n\n你好 — only 3 left\n\n[Open](http://127.0.0.1/c/abc)"
EXTRA = json.dumps({"parse_mode": "MarkdownV2"})

# case: (faults, wrong token?, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, {}, (DeliveryStatus.failed, "unauthorized", False)),
    "chat not found": ({}, False, {}, {"address": "0"}, (DeliveryStatus.failed, "chat_not_found", False)),
    "blocked": ({}, False, {}, {"address": "403403403"}, (DeliveryStatus.failed, "bot_was_blocked_by_the_user", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "too_many_requests", True)),
    "server error": ({"error_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "internal_server_error", True)),
    "outage": ({"outage": True}, False, {}, {}, (DeliveryStatus.failed, "http_503", True)),
    "malformed response": (
        {"malformed_rate": 1.0},
        False,
        {},
        {},
        (DeliveryStatus.failed, "malformed_response", False),
    ),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, wrong, channel, overrides, (status, code, retryable) = CASES[case]
    message = {"address": "4242", "body": MARKDOWN, "extra": EXTRA, **overrides}
    channel = {"format": "telegram", **channel}
    credentials = WRONG if wrong else None
    result, box = send_once("telegram", tmp_path, faults=faults, credentials=credentials, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 3  # from parameters.retry_after, not the header
    if case == "success":
        assert result.provider_message_id == "4242:1"
        assert box.received[0].body == {
            "chat_id": "4242",
            "text": MARKDOWN,
            "parse_mode": "MarkdownV2",
            "link_preview_options": {"is_disabled": True},
            "reply_markup": {"inline_keyboard": [[{"text": "Open", "url": "http://127.0.0.1/c/abc"}]]},
        }
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_ids_count_per_chat_and_plain_text_without_parse_mode(tmp_path) -> None:
    async def run():
        async with ProviderHarness("telegram", tmp_path) as h:
            adapter = h.adapter(options={"button_text": "Shop", "link_preview": "on"})
            ids = [(await adapter.send(h.message(address=chat))).provider_message_id for chat in ("1", "2", "1")]
            async with adapter.session.post(f"{h.base_url}/bot{h.credentials.token.get_secret_value()}/nope") as r:
                unknown_status = r.status
            return ids, unknown_status, h.box

    ids, unknown_status, box = asyncio.run(run())
    assert ids == ["1:1", "2:1", "1:2"] and unknown_status == 404
    body = box.received[0].body
    assert body["text"] == "Flash sale\n\n你好 — only 3 left" and "parse_mode" not in body
    assert body["link_preview_options"] == {"is_disabled": False}
    assert body["reply_markup"]["inline_keyboard"][0][0]["text"] == "Shop"


@pytest.mark.unit
def test_declares_limits_and_no_receipts() -> None:
    assert adapter_class("telegram") is TelegramAdapter
    assert TelegramAdapter.limits.rate_per_s == 30 and TelegramAdapter.limits.body_maxlen == 4096
    with pytest.raises(ReceiptRejected) as refused:
        TelegramAdapter.parse_receipts(TelegramAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404
