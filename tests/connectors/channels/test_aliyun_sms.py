"""The Aliyun SMS adapter against its sandbox over real HTTP on loopback: a table of cases, the RPC signature
against Aliyun's documented examples, the receipt token both ways, and receipt correlation."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.aliyun_sms import AliyunSmsAdapter, rpc_signature, string_to_sign
from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, assert_refuses_batch_max, send_once

pytestmark = pytest.mark.integration

PHONE = "13800138000"
OPTIONS = {"template_code": "SMS_123456789", "sign_name": "Loopcast"}
WRONG_SECRET = {"access_key_secret": SecretStr("wrong")}
WRONG_KEY = {"access_key_id": "LTAI-unknown"}

# case: (faults, credential changes, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, {}, {}, {}, (DeliveryStatus.accepted, None, False)),
    "bad signature": ({}, WRONG_SECRET, {}, {}, (DeliveryStatus.failed, "SignatureDoesNotMatch", False)),
    "unknown key": ({}, WRONG_KEY, {}, {}, (DeliveryStatus.failed, "InvalidAccessKeyId.NotFound", False)),
    "illegal number": ({}, {}, {}, {"address": "u1"}, (DeliveryStatus.failed, "isv.MOBILE_NUMBER_ILLEGAL", False)),
    "bad template": (
        {},
        {},
        {"options": {**OPTIONS, "template_code": "welcome"}},
        {},
        (DeliveryStatus.failed, "isv.SMS_TEMPLATE_ILLEGAL", False),
    ),
    "throttled": ({"throttle_rate": 1.0}, {}, {}, {}, (DeliveryStatus.failed, "isv.BUSINESS_LIMIT_CONTROL", True)),
    "outage": ({"outage": True}, {}, {}, {}, (DeliveryStatus.failed, "ServiceUnavailable", True)),
    "server error": ({"error_rate": 1.0}, {}, {}, {}, (DeliveryStatus.failed, "InternalError", True)),
    "malformed response": ({"malformed_rate": 1.0}, {}, {}, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, {}, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, changes, channel, overrides, (status, code, retryable) = CASES[case]
    channel = {"format": "sms-cn", "options": OPTIONS, **channel}
    message = {"address": PHONE, **overrides}
    result, box = send_once("aliyun-sms", tmp_path, faults=faults, credentials=changes, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 60  # 分钟级流控: the minute window, not the gateway's Retry-After
    if case == "success":
        assert result.provider_message_id.endswith(f"^0:{PHONE}")  # the call's BizId and the number
        [arrived] = box.received
        assert arrived.body["message_id"] == "m1" and arrived.body["PhoneNumbers"] == PHONE
        assert arrived.body["TemplateParam"] == {"content": "你好 — only 3 left"}
    if case in ("bad signature", "unknown key"):
        assert box.rejected == 1 and not box.received


def test_receipt_correlates_and_the_token_is_checked_both_ways(tmp_path) -> None:
    async def run():
        async with ProviderHarness("aliyun-sms", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0})
            options = {**OPTIONS, "template_param_field": "msg"}
            message = h.message(address="+8613800138000", body="【Loopcast】限时特惠 回T退订")
            sent = await h.adapter(format="sms-cn", options=options).send(message)
            [receipt] = await h.receipts(1)
            return sent, receipt, h.box.received[0].body, h.refused

    sent, receipt, arrived, refused = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert (receipt.delivered, receipt.error_code) == (False, "MK:0001")
    assert not refused
    # Aliyun adds 【SignName】 itself: the copy engine's prefix is not sent twice.
    assert arrived["TemplateParam"] == {"msg": "限时特惠 回T退订"}


BATCH = {**OPTIONS, "batch_max": "100"}


def test_a_batch_goes_as_one_call_with_each_recipients_number_and_words(tmp_path) -> None:
    numbers = [f"1380013800{i}" for i in range(5)]

    async def run():
        async with ProviderHarness("aliyun-sms", tmp_path) as h:
            adapter = h.adapter(format="sms-cn", options=BATCH)
            messages = [h.message(message_id=f"m{i}", address=n, body=f"你好 {i}") for i, n in enumerate(numbers)]
            results = await h.send_together(adapter, messages)
            receipts = await h.receipts(len(numbers))
            return results, receipts, [r.body for r in h.box.received], {r.provider_message_id for r in h.box.received}

    results, receipts, arrived, biz_ids = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    [biz_id] = biz_ids  # one SendBatchSms call: one BizId
    assert [r.provider_message_id for r in results] == [f"{biz_id}:{n}" for n in numbers]
    assert [(a["PhoneNumbers"], a["TemplateParam"], a["batch"]) for a in arrived] == [
        (n, {"content": f"你好 {i}"}, True) for i, n in enumerate(numbers)
    ]
    # Each report finds its own message.
    assert sorted(r.provider_message_id for r in receipts) == sorted(r.provider_message_id for r in results)


def test_a_number_twice_in_one_turn_goes_in_two_calls(tmp_path) -> None:
    async def run():
        async with ProviderHarness("aliyun-sms", tmp_path) as h:
            adapter = h.adapter(format="sms-cn", options=BATCH)
            same = ["13800138000", "+8613800138000", "13900139000"]
            messages = [h.message(message_id=f"m{i}", address=n) for i, n in enumerate(same)]
            return await h.send_together(adapter, messages), h.box.received

    results, arrived = asyncio.run(run())
    ids = [r.provider_message_id for r in results]
    assert len(set(ids)) == 3 and len({r.provider_message_id for r in arrived}) == 2
    # The repeated number (the same one, with +86) went alone, as SendSms with its OutId.
    assert [a.body.get("batch", False) for a in arrived].count(True) == 2
    assert any(a.body["message_id"] == "m1" for a in arrived)


def test_a_refused_batch_fails_every_message_in_it(tmp_path) -> None:
    async def run():
        async with ProviderHarness("aliyun-sms", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"throttle_rate": 1.0})
            adapter = h.adapter(format="sms-cn", options=BATCH)
            messages = [h.message(message_id=f"m{i}", address=f"1380013800{i}") for i in range(3)]
            return await h.send_together(adapter, messages)

    results = asyncio.run(run())
    assert [(r.status, r.error_code, r.retryable) for r in results] == [
        (DeliveryStatus.failed, "isv.BUSINESS_LIMIT_CONTROL", True)
    ] * 3


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "101", "many"])
def test_batch_max_is_what_sendbatchsms_takes(value: str) -> None:
    assert_refuses_batch_max("aliyun-sms", value, "sms-cn", OPTIONS)


@pytest.mark.unit
def test_receipt_token_and_shape() -> None:
    credentials = AliyunSmsAdapter.Credentials()
    token = credentials.receipt_token.get_secret_value()
    report = [
        {"biz_id": "1^0", "phone_number": "13800138000", "success": True, "err_code": "DELIVERED", "out_id": "m1"}
    ]
    body = json.dumps(report).encode()
    base = "http://127.0.0.1/receipts/aliyun-sms"
    for url, query in ((base, {}), (f"{base}?token=wrong", {"token": "wrong"})):
        with pytest.raises(ReceiptRejected) as refused:
            AliyunSmsAdapter.parse_receipts(credentials, ReceiptRequest("POST", url, {}, body, query))
        assert refused.value.status == 401
    [receipt] = AliyunSmsAdapter.parse_receipts(credentials, ReceiptRequest("POST", f"{base}?token={token}", {}, body))
    assert (receipt.provider_message_id, receipt.delivered) == ("1^0:13800138000", True)
    with pytest.raises(ReceiptRejected) as malformed:
        AliyunSmsAdapter.parse_receipts(credentials, ReceiptRequest("POST", base, {}, b"{}", {"token": token}))
    assert malformed.value.status == 400
    assert json.loads(AliyunSmsAdapter.receipt_answer()[1]) == {"code": 0, "msg": "成功"}


@pytest.mark.unit
def test_signature_matches_aliyuns_documented_examples() -> None:
    ecs = {
        "AccessKeyId": "testid",
        "Action": "DescribeRegions",
        "Format": "XML",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        "SignatureVersion": "1.0",
        "Timestamp": "2016-02-23T12:46:24Z",
        "Version": "2014-05-26",
    }
    assert string_to_sign(ecs, "GET").startswith("GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions")
    assert rpc_signature("testsecret", ecs, "GET") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    sms = {
        "AccessKeyId": "testId",
        "Action": "SendSms",
        "Format": "XML",
        "OutId": "123",
        "PhoneNumbers": "15300000001",
        "RegionId": "cn-hangzhou",
        "SignName": "阿里云短信测试专用",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
        "SignatureVersion": "1.0",
        "TemplateCode": "SMS_71390007",
        "TemplateParam": '{"customer":"test"}',
        "Timestamp": "2017-07-12T02:42:19Z",
        "Version": "2017-05-25",
    }
    assert rpc_signature("testSecret", sms, "GET") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="


@pytest.mark.unit
def test_registry_and_options() -> None:
    assert adapter_class("aliyun-sms") is AliyunSmsAdapter
    credentials = AliyunSmsAdapter.Credentials()
    with pytest.raises(ValueError, match="template_code"):
        AliyunSmsAdapter(Channel(id="ch", provider="aliyun-sms", format="sms-cn"), credentials)
    with pytest.raises(ValueError, match="sign_name"):
        AliyunSmsAdapter(
            Channel(id="ch", provider="aliyun-sms", format="sms-cn", options={"template_code": "SMS_1"}), credentials
        )


def test_a_seeded_batch_gives_each_recipient_its_own_fate_and_counts_each(tmp_path) -> None:
    numbers = [f"1380013801{i}" for i in range(10)]

    async def run():
        async with ProviderHarness("aliyun-sms", tmp_path) as h:
            # SendBatchSms carries no per-recipient id: the fate must still be each recipient's own.
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 0.5, "seed": 3})
            adapter = h.adapter(format="sms-cn", options=BATCH)
            messages = [h.message(message_id=f"m{i}", address=n, body=f"你好 {i}") for i, n in enumerate(numbers)]
            await h.send_together(adapter, messages)
            return await h.receipts(len(numbers)), h.box.stats()

    receipts, stats = asyncio.run(run())
    assert {r.delivered for r in receipts} == {True, False}
    assert stats["unique_messages"] == len(numbers)
