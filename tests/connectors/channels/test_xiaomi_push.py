"""The Xiaomi Mi Push adapter against its sandbox (regid send + callback receipts) over real HTTP."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.xiaomi_push import XiaomiPushAdapter, with_token
from tests.connectors.channels.harness import ProviderHarness

pytestmark = pytest.mark.integration

REGID = "hY3x8qK2mP0sL5vN7rT9wB1cD4fG6jZ+xiaomi/regid="
OPTIONS = {"package_name": "com.example.loopcast", "channel_id": "marketing"}

# case: (faults, wrong app secret?, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, (DeliveryStatus.failed, "21301", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, (DeliveryStatus.failed, "10027", True)),
    "outage": ({"outage": True}, False, {}, (DeliveryStatus.failed, "10002", True)),
    "malformed response": ({"malformed_rate": 1.0}, False, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, forged, channel, (status, code, retryable) = CASES[case]

    async def run():
        async with ProviderHarness("xiaomi-push", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            credentials = h.credentials.model_copy(update={"app_secret": SecretStr("wrong")}) if forged else None
            adapter = h.adapter(credentials, format="push-xiaomi", options=OPTIONS, **channel)
            return await adapter.send(h.message(address=REGID)), h.box, h.settings.http_base

    result, box, http_base = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        item = box.received[0]
        assert result.provider_message_id == item.provider_message_id and item.provider_message_id.startswith("slm")
        form = item.body
        assert (form["registration_id"], form["title"], form["description"]) == (
            REGID,
            "Flash sale",
            "你好 — only 3 left",
        )
        assert form["restricted_package_name"] == "com.example.loopcast" and form["extra.channel_id"] == "marketing"
        assert json.loads(form["payload"]) == {"message_id": "m1", "link": "http://127.0.0.1/c/abc"}
        assert (form["extra.notify_effect"], form["extra.web_uri"]) == ("3", "http://127.0.0.1/c/abc")
        callback = urlsplit(form["extra.callback"])
        assert f"{callback.scheme}://{callback.netloc}{callback.path}" == f"{http_base}/receipts/xiaomi-push"
        assert parse_qs(callback.query) == {"token": ["loopcast-dev-xiaomi-receipt"]}
        assert (form["extra.callback.param"], form["extra.callback.type"]) == ("m1", "17")
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


@pytest.mark.parametrize("fate", ["delivered", "undelivered"])
def test_receipts_correlate_and_the_callback_token_is_checked(fate: str, tmp_path) -> None:
    async def run():
        async with ProviderHarness("xiaomi-push", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0 if fate == "undelivered" else 0})
            sent = await h.adapter(format="push-xiaomi", options=OPTIONS).send(h.message(address=REGID))
            [receipt] = await h.receipts(1)
            body = urlencode({"data": json.dumps({sent.provider_message_id: {"type": 1}})}).encode()
            forged = ReceiptRequest("POST", "/", {}, body, {"token": "guess"})
            with pytest.raises(ReceiptRejected) as refused:
                XiaomiPushAdapter.parse_receipts(h.credentials, forged)
            return sent, receipt, refused.value.status

    sent, receipt, refused_status = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert (receipt.delivered, receipt.error_code) == ((True, None) if fate == "delivered" else (False, "type_16"))
    assert refused_status == 401


@pytest.mark.unit
def test_receipt_parsing_skips_clicks_and_rejects_malformed() -> None:
    credentials = XiaomiPushAdapter.Credentials()
    data = {"slm1": {"type": 1, "targets": "r1"}, "slm2": {"type": 2}, "slm3": {"type": 16, "targets": "r3"}}
    call = ReceiptRequest(
        "POST", "/", {}, urlencode({"data": json.dumps(data)}).encode(), {"token": "loopcast-dev-xiaomi-receipt"}
    )
    receipts = XiaomiPushAdapter.parse_receipts(credentials, call)
    assert [(r.provider_message_id, r.delivered) for r in receipts] == [("slm1", True), ("slm3", False)]
    with pytest.raises(ReceiptRejected) as malformed:
        XiaomiPushAdapter.parse_receipts(credentials, ReceiptRequest("POST", "/", {}, b"data=nope", call.query))
    assert malformed.value.status == 400


@pytest.mark.unit
def test_options_and_registry() -> None:
    from schemas.config import Channel

    with pytest.raises(ValueError, match="package_name"):
        XiaomiPushAdapter(
            Channel(id="ch", provider="xiaomi-push", format="push-xiaomi"), XiaomiPushAdapter.Credentials()
        )
    assert with_token("https://x.test/r?a=1", "t") == "https://x.test/r?a=1&token=t"
    assert adapter_class("xiaomi-push") is XiaomiPushAdapter
