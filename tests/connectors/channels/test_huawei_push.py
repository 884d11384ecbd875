"""The Huawei Push Kit adapter against its sandbox (OAuth + messages:send + receipts) over real HTTP."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.huawei_push import HuaweiPushAdapter, basic_auth
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

DEVICE = "IQAAAACy0kYkAAB-huawei-device-token"

# case: (faults, wrong client secret?, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, {}, (DeliveryStatus.failed, "oauth_20356", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "80100017", True)),
    "outage": ({"outage": True}, False, {}, {}, (DeliveryStatus.failed, "81000001", True)),
    "malformed response": (
        {"malformed_rate": 1.0},
        False,
        {},
        {},
        (DeliveryStatus.failed, "malformed_response", False),
    ),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
    "invalid token": ({}, False, {}, {"address": "invalid-token"}, (DeliveryStatus.failed, "80300007", False)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, forged, channel, overrides, (status, code, retryable) = CASES[case]
    credentials = {"client_secret": SecretStr("wrong")} if forged else None
    message = {"address": DEVICE, "extra": '{"badge": 1}', "link": "https://x.test/c/1", **overrides}
    channel = {"format": "push-huawei", "options": {"category": "MARKETING"}, **channel}
    result, box = send_once("huawei-push", tmp_path, faults=faults, credentials=credentials, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        item = box.received[0]
        assert result.provider_message_id == item.provider_message_id
        assert item.body["token"] == [DEVICE] and item.body["app_id"] == "100000001"
        android = item.body["android"]
        assert android["notification"] == {
            "title": "Flash sale",
            "body": "你好 — only 3 left",
            "click_action": {"type": 2, "url": "https://x.test/c/1"},
            "badge": {"add_num": 1},
        }
        assert (android["category"], android["urgency"], android["bi_tag"]) == ("MARKETING", "HIGH", "m1")
        assert json.loads(item.body["data"]) == {"message_id": "m1", "link": "https://x.test/c/1"}
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_receipts_correlate_and_callback_auth_is_checked(tmp_path) -> None:
    async def run():
        async with ProviderHarness("huawei-push", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0, "seed": 1})
            adapter = h.adapter(format="push-huawei")
            sent = await adapter.send(h.message(address=DEVICE))
            [receipt] = await h.receipts(1)
            body = b'{"statuses": [{"requestId": "x", "status": 0}]}'
            forged = ReceiptRequest("POST", "/", {"Authorization": basic_auth("huawei", "guess")}, body)
            with pytest.raises(ReceiptRejected) as refused:
                HuaweiPushAdapter.parse_receipts(h.credentials, forged)
            return sent, receipt, refused.value.status

    sent, receipt, refused_status = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert (receipt.delivered, receipt.error_code) == (False, "2")
    assert refused_status == 401


def test_token_is_cached_and_renewed_once_when_expired(tmp_path) -> None:
    async def run():
        async with ProviderHarness("huawei-push", tmp_path) as h:
            adapter = h.adapter(format="push-huawei")
            first = await adapter.send(h.message(address=DEVICE, link=None))
            token = adapter.token.value
            second = await adapter.send(h.message(address=DEVICE, message_id="m2"))
            assert adapter.token.value == token
            async with h.box.client().post(f"{h.base_url}/_expire_tokens") as response:
                assert response.status == 200
            third = await adapter.send(h.message(address=DEVICE, message_id="m3"))
            return first, second, third, h.box, adapter.token.value != token

    first, second, third, box, renewed = asyncio.run(run())
    assert all(r.status == DeliveryStatus.accepted for r in (first, second, third)) and renewed
    assert box.rejected == 1  # the expired token's one 80200003
    assert [r.body["message_id"] for r in box.received] == ["m1", "m2", "m3"]
    assert box.received[0].body["android"]["notification"]["click_action"] == {"type": 3}


@pytest.mark.unit
def test_receipt_parsing() -> None:
    credentials = HuaweiPushAdapter.Credentials()
    body = json.dumps(
        {"statuses": [{"requestId": "r1", "status": 0, "token": "t"}, {"requestId": "r2", "status": 5, "token": "u"}]}
    ).encode()
    bearer = {"authorization": "Bearer loopcast-dev-huawei-receipt"}
    receipts = HuaweiPushAdapter.parse_receipts(credentials, ReceiptRequest("POST", "/", bearer, body))
    assert [(r.provider_message_id, r.delivered, r.error_code) for r in receipts] == [
        ("r1", True, None),
        ("r2", False, "5"),
    ]
    with pytest.raises(ReceiptRejected) as malformed:
        HuaweiPushAdapter.parse_receipts(credentials, ReceiptRequest("POST", "/", bearer, b"{}"))
    assert malformed.value.status == 400
    with pytest.raises(ReceiptRejected) as unsigned:
        HuaweiPushAdapter.parse_receipts(credentials, ReceiptRequest("POST", "/", {}, body))
    assert unsigned.value.status == 401
    assert adapter_class("huawei-push") is HuaweiPushAdapter
