"""The Tencent Cloud SMS adapter against its sandbox over real HTTP on loopback: a table of cases, TC3 signing
against Tencent's documented example, the receipt token both ways, receipt correlation, and `batch_max`: the
same copy shares a call, each number's status and receipt finds its own message."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import Answer, DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.tencent_sms import TencentSmsAdapter, e164, tc3_signature
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, assert_refuses_batch_max, send_once
from tests.connectors.channels.harness import message as rendered

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


BATCH = {**OPTIONS, "batch_max": "200"}


async def send_all(h: ProviderHarness, messages: list) -> list:
    """The messages sent in one turn of the event loop through a batching adapter."""
    adapter = h.adapter(format="sms-cn", options=BATCH)
    return await h.send_together(adapter, messages)


def calls(box) -> dict[str, list[dict]]:
    """What arrived, by the SendSms call it came in."""
    by_call: dict[str, list[dict]] = {}
    for item in box.received:
        by_call.setdefault(item.body["RequestId"], []).append(item.body)
    return by_call


def test_the_same_copy_goes_as_one_call_and_each_receipt_finds_its_message(tmp_path) -> None:
    numbers = [f"1380013800{i}" for i in range(5)]

    async def run():
        async with ProviderHarness("tencent-sms", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 0.5})
            messages = [h.message(message_id=f"m{i}", address=n) for i, n in enumerate(numbers)]
            results = await send_all(h, messages)
            return results, await h.receipts(len(numbers)), h.box

    results, receipts, box = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    [call] = calls(box).values()  # one SendSms call
    assert [(a["PhoneNumber"], a["TemplateParamSet"], a["batch"], a["message_id"]) for a in call] == [
        ("+86" + n, ["你好 — only 3 left"], True, None) for n in numbers
    ]
    # Each message's provider id is the SerialNo its own number got.
    serial_of = {item.body["PhoneNumber"]: item.provider_message_id for item in box.received}
    assert [r.provider_message_id for r in results] == [serial_of["+86" + n] for n in numbers]
    # Each receipt names one message and says what happened to that number.
    fate_of = {item.provider_message_id: item.receipt_status == "delivered" for item in box.received}
    assert sorted(r.provider_message_id for r in receipts) == sorted(r.provider_message_id for r in results)
    assert all(r.delivered is fate_of[r.provider_message_id] for r in receipts)


def test_different_copy_or_mainland_and_global_numbers_go_in_separate_calls(tmp_path) -> None:
    sends = [
        ("13800138000", "A"),
        ("13900139000", "B"),
        ("13700137000", "【Loopcast】A"),  # the same copy once the platform's sign is off
        ("13600136000", "B"),
        ("+14155550100", "A"),  # a global number never shares a call with mainland ones
        ("13500135000", "C"),
    ]

    async def run():
        async with ProviderHarness("tencent-sms", tmp_path) as h:
            messages = [h.message(message_id=f"m{i}", address=a, body=b) for i, (a, b) in enumerate(sends)]
            return await send_all(h, messages), h.box

    results, box = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    arrived = sorted(
        (tuple(a["PhoneNumber"] for a in call), call[0]["TemplateParamSet"], call[0].get("batch", False))
        for call in calls(box).values()
    )
    assert arrived == [
        (("+14155550100",), ["A"], False),
        (("+8613500135000",), ["C"], False),
        (("+8613800138000", "+8613700137000"), ["A"], True),
        (("+8613900139000", "+8613600136000"), ["B"], True),
    ]
    # A message alone in its call goes as without batching: its id rides in SessionContext.
    ids = {i.body["PhoneNumber"]: i.body["message_id"] for i in box.received}
    assert (ids["+14155550100"], ids["+8613500135000"], ids["+8613800138000"]) == ("m4", "m5", None)


def test_a_number_twice_in_one_turn_goes_in_two_calls(tmp_path) -> None:
    async def run():
        async with ProviderHarness("tencent-sms", tmp_path) as h:
            same = ["13800138000", "+8613800138000", "13900139000"]
            return await send_all(h, [h.message(message_id=f"m{i}", address=n) for i, n in enumerate(same)]), h.box

    results, box = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    assert len({r.provider_message_id for r in results}) == 3
    assert sorted(len(call) for call in calls(box).values()) == [1, 2]
    # The repeated number went alone, with its message id.
    assert [i.body["message_id"] for i in box.received if not i.body.get("batch")] == ["m1"]


def test_a_number_the_gateway_refuses_fails_only_its_message(tmp_path) -> None:
    async def run():
        async with ProviderHarness("tencent-sms", tmp_path) as h:
            numbers = ["13800138000", "+86123", "13900139000"]  # +86 but not a mainland mobile
            results = await send_all(h, [h.message(message_id=f"m{i}", address=n) for i, n in enumerate(numbers)])
            return results, await h.receipts(2), h.box

    results, receipts, box = asyncio.run(run())
    assert [(r.status, r.error_code, r.retryable) for r in results] == [
        (DeliveryStatus.accepted, None, False),
        (DeliveryStatus.failed, "InvalidParameterValue.IncorrectPhoneNumber", False),
        (DeliveryStatus.accepted, None, False),
    ]
    [call] = calls(box).values()  # one call; the gateway took the other two
    assert [a["PhoneNumber"] for a in call] == ["+8613800138000", "+8613900139000"]
    assert sorted(r.provider_message_id for r in receipts) == sorted(
        r.provider_message_id for r in results if r.status is DeliveryStatus.accepted
    )


@pytest.mark.parametrize(
    ("faults", "channel", "outcome"),
    [
        ({"throttle_rate": 1.0}, {}, ("RequestLimitExceeded", True, 1)),
        ({"latency_ms": 400}, {"timeout_s": 0.1}, ("timeout", True, None)),
    ],
    ids=["refused", "no answer"],
)
def test_a_failed_call_fails_every_message_in_it(faults, channel, outcome, tmp_path) -> None:
    async def run():
        async with ProviderHarness("tencent-sms", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            adapter = h.adapter(format="sms-cn", options=BATCH, **channel)
            messages = [h.message(message_id=f"m{i}", address=f"1380013800{i}") for i in range(3)]
            return await h.send_together(adapter, messages), h.box

    results, box = asyncio.run(run())
    assert [(r.status, r.error_code, r.retryable, r.retry_after_s) for r in results] == [
        (DeliveryStatus.failed, *outcome)
    ] * 3
    if "throttle_rate" in faults:  # refused: nothing sent (a timed-out call may still have gone: hence retryable)
        assert not box.received


@pytest.mark.parametrize(
    ("numbers", "code"),
    [
        ([f"138{i:08d}" for i in range(201)], "LimitExceeded.PhoneNumberCountLimit"),
        (["13800138000", "+14155550100"], "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber"),
    ],
    ids=["201 numbers", "mainland and global"],
)
def test_the_sandbox_holds_a_call_to_tencents_limits(numbers, code, tmp_path) -> None:
    async def run():
        async with ProviderHarness("tencent-sms", tmp_path) as h:
            adapter = h.adapter(format="sms-cn", options=BATCH)
            messages = [h.message(message_id=f"m{i}", address=n) for i, n in enumerate(numbers)]
            return await adapter.send_call(messages), h.box

    results, box = asyncio.run(run())
    assert {(r.status, r.error_code) for r in results} == {(DeliveryStatus.failed, code)}
    assert len(results) == len(numbers) and not box.received


@pytest.mark.unit
def test_each_numbers_status_is_its_messages_result() -> None:
    channel = Channel(id="ch", provider="tencent-sms", format="sms-cn", options=BATCH)
    adapter = TencentSmsAdapter(channel, TencentSmsAdapter.Credentials())
    messages = [rendered(address=a) for a in ("13800138000", "8613900139000", "13700137000")]
    statuses = [  # in Tencent's order, not ours: matched by number
        {"PhoneNumber": "+8613900139000", "Code": "LimitExceeded.PhoneNumberDailyLimit", "SerialNo": ""},
        {"PhoneNumber": "+8613800138000", "Code": "Ok", "SerialNo": "2640:1"},
    ]
    answer = Answer(200, json.dumps({"Response": {"SendStatusSet": statuses, "RequestId": "r1"}}), {})
    ok, limited, missing = adapter.results(answer, messages)
    assert (ok.status, ok.provider_message_id, json.loads(ok.raw)["RequestId"]) == (
        DeliveryStatus.accepted,
        "2640:1",
        "r1",
    )
    assert (limited.error_code, limited.retryable, limited.retry_after_s) == (
        "LimitExceeded.PhoneNumberDailyLimit",
        True,
        86400,
    )
    assert (missing.error_code, missing.retryable) == ("malformed_response", False)  # no word on it: maybe sent


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "201", "many"])
def test_batch_max_is_what_sendsms_takes(value: str) -> None:
    assert_refuses_batch_max("tencent-sms", value, "sms-cn", OPTIONS)


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
    assert {e164(n) for n in ("8613800138000", "008613800138000", " +8613800138000")} == {"+8613800138000"}
