"""The Tencent Cloud SMS adapter against its sandbox over real HTTP on loopback: a table of cases, TC3 signing
against Tencent's documented example, the receipt token both ways, and receipt correlation."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.tencent_sms import TencentSmsAdapter, e164, tc3_signature
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

PHONE = "13800138000"
OPTIONS = {"sdk_app_id": "1400006666", "template_id": "449739", "sign_name": "Loopcast"}
WRONG_SECRET = {"secret_key": SecretStr("wrong")}
WRONG_ID = {"secret_id": "AKID-unknown"}

# case: (faults, credential changes, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, {}, {}, {}, (DeliveryStatus.accepted, None, False)),
    "bad signature": ({}, WRONG_SECRET, {}, {}, (DeliveryStatus.failed, "AuthFailure.SignatureFailure", False)),
    "unknown secret id": ({}, WRONG_ID, {}, {}, (DeliveryStatus.failed, "AuthFailure.SecretIdNotFound", False)),
    "incorrect number": (
        {},
        {},
        {},
        {"address": "u1"},
        (DeliveryStatus.failed, "InvalidParameterValue.IncorrectPhoneNumber", False),
    ),
    "throttled": ({"throttle_rate": 1.0}, {}, {}, {}, (DeliveryStatus.failed, "RequestLimitExceeded", True)),
    "outage": ({"outage": True}, {}, {}, {}, (DeliveryStatus.failed, "InternalError", True)),
    "malformed response": ({"malformed_rate": 1.0}, {}, {}, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, {}, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, changes, channel, overrides, (status, code, retryable) = CASES[case]
    channel = {"format": "sms-cn", "options": OPTIONS, **channel}
    message = {"address": PHONE, **overrides}
    result, box = send_once("tencent-sms", tmp_path, faults=faults, credentials=changes, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert result.provider_message_id.startswith("2640:")
        [arrived] = box.received
        assert arrived.body["message_id"] == "m1" and arrived.body["PhoneNumber"] == "+86" + PHONE
        assert arrived.body["TemplateParamSet"] == ["你好 — only 3 left"]
    if case in ("bad signature", "unknown secret id"):
        assert box.rejected == 1 and not box.received


def test_receipt_correlates_and_the_token_is_checked_both_ways(tmp_path) -> None:
    async def run():
        async with ProviderHarness("tencent-sms", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0})
            message = h.message(address="+8613800138000", body="【Loopcast】限时特惠 回T退订")
            sent = await h.adapter(format="sms-cn", options=OPTIONS).send(message)
            [receipt] = await h.receipts(1)
            return sent, receipt, h.box.received[0].body, h.refused

    sent, receipt, arrived, refused = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert (receipt.delivered, receipt.error_code) == (False, "UNDELIV")
    assert not refused
    # Tencent adds 【SignName】 itself: the copy engine's prefix is not sent twice.
    assert arrived["TemplateParamSet"] == ["限时特惠 回T退订"]


@pytest.mark.unit
def test_per_number_limit_is_retryable_after_its_window() -> None:
    raw = json.dumps(
        {"Response": {"SendStatusSet": [{"Code": "LimitExceeded.PhoneNumberThirtySecondLimit"}], "RequestId": "r"}}
    )
    result = TencentSmsAdapter._refused("LimitExceeded.PhoneNumberThirtySecondLimit", raw, None)
    assert (result.retryable, result.retry_after_s) == (True, 30)
    assert not TencentSmsAdapter._refused("AuthFailure.SignatureFailure", raw, "1").retryable


@pytest.mark.unit
def test_receipt_token_and_shape() -> None:
    credentials = TencentSmsAdapter.Credentials()
    token = credentials.receipt_token.get_secret_value()
    report = [
        {"mobile": "13800138000", "nationcode": "86", "report_status": "SUCCESS", "errmsg": "DELIVRD", "sid": "s1"}
    ]
    body = json.dumps(report).encode()
    base = "http://127.0.0.1/receipts/tencent-sms"
    for query in ({}, {"token": "wrong"}):
        with pytest.raises(ReceiptRejected) as refused:
            TencentSmsAdapter.parse_receipts(credentials, ReceiptRequest("POST", base, {}, body, query))
        assert refused.value.status == 401
    [receipt] = TencentSmsAdapter.parse_receipts(credentials, ReceiptRequest("POST", f"{base}?token={token}", {}, body))
    assert (receipt.provider_message_id, receipt.delivered, receipt.error_code) == ("s1", True, None)
    with pytest.raises(ReceiptRejected) as malformed:
        TencentSmsAdapter.parse_receipts(credentials, ReceiptRequest("POST", base, {}, b"[{}]", {"token": token}))
    assert malformed.value.status == 400


@pytest.mark.unit
def test_tc3_signature_matches_tencents_documented_example() -> None:
    headers = {"Content-Type": "application/json; charset=utf-8", "Host": "cvm.tencentcloudapi.com"}
    payload = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
    signature = tc3_signature(
        "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", headers, ["content-type", "host"], payload, 1551113065, service="cvm"
    )
    assert signature == "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"


@pytest.mark.unit
def test_registry_options_and_numbers() -> None:
    assert adapter_class("tencent-sms") is TencentSmsAdapter
    with pytest.raises(ValueError, match="sdk_app_id"):
        TencentSmsAdapter(Channel(id="ch", provider="tencent-sms", format="sms-cn"), TencentSmsAdapter.Credentials())
    assert (e164("13800138000"), e164("+14155550100")) == ("+8613800138000", "+14155550100")
