"""The SES adapter against its sandbox over HTTP on loopback: a table of cases (the sandbox verifies
SigV4 in full), AWS's published SigV4 example, SNS-signed receipts both ways, and SendBulkEmail with
`batch_max` (each message its own entry, result, MessageId and receipts)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest
from connectors.channels.devkeys import dev_private_key
from connectors.channels.ses import (
    SesAdapter,
    canonical_request,
    dev_certificate,
    entry_result,
    sign_request,
    signature,
    sns_sign,
    sns_verify,
)
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness, assert_refuses_batch_max, send_once

pytestmark = pytest.mark.integration

HEADERS = {"List-Unsubscribe": "<http://127.0.0.1/u/tok>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}

# case: (faults, credential overrides, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, {}, {}, (DeliveryStatus.accepted, None, False)),
    "wrong secret": (
        {},
        {"secret_access_key": SecretStr("x")},
        {},
        (DeliveryStatus.failed, "SignatureDoesNotMatch", False),
    ),
    "unknown key id": (
        {},
        {"access_key_id": "AKIAOTHER"},
        {},
        (DeliveryStatus.failed, "UnrecognizedClientException", False),
    ),
    "throttled": ({"throttle_rate": 1.0}, {}, {}, (DeliveryStatus.failed, "TooManyRequestsException", True)),
    "outage": ({"outage": True}, {}, {}, (DeliveryStatus.failed, "ServiceUnavailable", True)),
    "malformed response": ({"malformed_rate": 1.0}, {}, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, {}, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, forged, channel, (status, code, retryable) = CASES[case]
    options = {"from": "Shop <news@shop.example>", "region": "eu-west-1", "configuration_set": "events"}
    message = {"address": "ann@example.org", "html": "<p>你好</p>", "extra": json.dumps({"headers": HEADERS})}
    channel = {"format": "email", "options": options, **channel}
    result, box = send_once("ses", tmp_path, faults=faults, credentials=forged or None, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert result.provider_message_id == "ses-0000000001"
        body = box.received[0].body
        assert body["FromEmailAddress"] == "Shop <news@shop.example>" and body["ConfigurationSetName"] == "events"
        assert body["Destination"] == {"ToAddresses": ["ann@example.org"]}
        simple = body["Content"]["Simple"]
        assert simple["Subject"]["Data"] == "Flash sale" and simple["Body"]["Text"]["Data"] == "你好 — only 3 left"
        assert simple["Body"]["Html"]["Data"] == "<p>你好</p>"
        assert simple["Headers"] == [{"Name": k, "Value": v} for k, v in HEADERS.items()]
        assert body["EmailTags"] == [{"Name": "message_id", "Value": "m1"}]
    if case in ("wrong secret", "unknown key id"):
        assert box.rejected == 1 and not box.received


@pytest.mark.parametrize("undelivered", [False, True])
def test_receipts_correlate_and_signatures_verify_both_ways(undelivered: bool, tmp_path) -> None:
    async def run():
        async with ProviderHarness("ses", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0 if undelivered else 0.0})
            sent = await h.adapter(format="email").send(h.message(address="ann@example.org"))
            [receipt] = await h.receipts(1)
            async with h.box.client().get(f"{h.base_url}/_sns/cert.pem") as response:
                served = await response.text()
            return sent, receipt, served, h.credentials

    sent, receipt, served, credentials = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert (receipt.delivered, receipt.error_code) == (
        (False, "bounce_permanent_general") if undelivered else (True, None)
    )
    assert served == credentials.sns_certificate_pem  # SigningCertURL serves the certificate we pin


@pytest.mark.unit
def test_forged_and_tampered_notifications_are_refused(tmp_path) -> None:
    credentials = SesAdapter.credentials_from(Settings(home=tmp_path))
    event = {"eventType": "Delivery", "mail": {"messageId": "x"}}
    note = {"Type": "Notification", "MessageId": "1", "TopicArn": "arn", "Message": json.dumps(event), "Timestamp": "t"}
    own = dev_private_key(tmp_path, "ses-sns-signing", "rsa")
    stranger = dev_private_key(tmp_path, "someone-else", "rsa")

    def call(message: dict) -> ReceiptRequest:
        return ReceiptRequest("POST", "/", {}, json.dumps(message).encode())

    good = {**note, "SignatureVersion": "2", "Signature": sns_sign(own, note)}
    assert SesAdapter.parse_receipts(credentials, call(good))[0].delivered
    forged = {**note, "SignatureVersion": "2", "Signature": sns_sign(stranger, note)}
    tampered = {**good, "Message": json.dumps({**event, "eventType": "Bounce"})}
    for bad in (
        forged,
        tampered,
        {**good, "SignatureVersion": "3"},
        {k: v for k, v in good.items() if k != "Signature"},
    ):
        with pytest.raises(ReceiptRejected) as refused:
            SesAdapter.parse_receipts(credentials, call(bad))
        assert refused.value.status == 401
    with pytest.raises(ReceiptRejected) as malformed:
        SesAdapter.parse_receipts(credentials, ReceiptRequest("POST", "/", {}, b"not json"))
    assert malformed.value.status == 400
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "2",
        "Token": "t",
        "TopicArn": "arn",
        "Message": "confirm",
        "SubscribeURL": "https://sns/confirm",
        "Timestamp": "t",
    }
    confirmation = {**confirmation, "SignatureVersion": "2", "Signature": sns_sign(own, confirmation)}
    assert SesAdapter.parse_receipts(credentials, call(confirmation)) == []
    assert dev_certificate(own) == credentials.sns_certificate_pem  # deterministic: every process derives the same
    assert sns_verify(credentials.sns_certificate_pem, confirmation)


@pytest.mark.unit
def test_sigv4_matches_the_aws_documented_example() -> None:
    # The GET Object example of the S3 SigV4 documentation (Authenticating Requests: Using the Authorization
    # header); S3 encodes paths once, and this path is the same either way.
    headers = {
        "host": "examplebucket.s3.amazonaws.com",
        "range": "bytes=0-9",
        "x-amz-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "x-amz-date": "20130524T000000Z",
    }
    request = canonical_request("GET", "/test.txt", "", headers, sorted(headers), headers["x-amz-content-sha256"])
    scope, sig = signature("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1", "s3", "20130524T000000Z", request)
    assert scope == "20130524/us-east-1/s3/aws4_request"
    assert sig == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"


@pytest.mark.unit
def test_signed_headers_cover_host_date_and_body() -> None:
    out = sign_request(
        "POST",
        "https://email.us-east-1.amazonaws.com/v2/email/outbound-emails",
        {"Content-Type": "application/json"},
        b"{}",
        access_key_id="AKID",
        secret="s",
        region="us-east-1",
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert out["Host"] == "email.us-east-1.amazonaws.com" and out["X-Amz-Date"] == "20260101T000000Z"
    assert (
        "Credential=AKID/20260101/us-east-1/ses/aws4_request, SignedHeaders=content-type;host;x-amz-date,"
        in (out["Authorization"])
    )


BATCH = {"from": "Shop <news@shop.example>", "configuration_set": "events", "batch_max": "50"}


def arrived_parts(body: dict) -> tuple:
    simple = body["Content"]["Simple"]
    html = simple["Body"].get("Html")
    return simple["Subject"]["Data"], simple["Body"]["Text"]["Data"], html and html["Data"]


def test_a_batch_goes_as_one_call_each_message_with_its_own_words_id_and_receipt(tmp_path) -> None:
    # Characters a template engine could escape or take for its own: they must arrive as rendered.
    words = [
        (f'Deal #{i} <now> & "{i}"', f"Hi {i}: {{{{not_a_var}}}} 你好", f"<p>It&#39;s <b>{i}</b> & more</p>")
        for i in range(5)
    ]

    async def run():
        async with ProviderHarness("ses", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 0.5, "seed": 7})
            adapter = h.adapter(format="email", options=BATCH)
            messages = [
                h.message(
                    message_id=f"m{i}",
                    address=f"user{i}@example.org",
                    title=title,
                    body=text,
                    html=html,
                    extra=json.dumps({"headers": {"List-Unsubscribe": f"<http://127.0.0.1/u/{i}>"}}),
                )
                for i, (title, text, html) in enumerate(words)
            ]
            results = await h.send_together(adapter, messages)
            receipts = await h.receipts(len(messages))
            return results, receipts, list(h.box.received)

    results, receipts, arrived = asyncio.run(run())
    assert [r.status for r in results] == [DeliveryStatus.accepted] * 5
    assert len({a.body["request_id"] for a in arrived}) == 1  # one SendBulkEmail call
    # Each message's provider id is the MessageId of its own entry, and that entry holds its own words.
    by_id = {a.provider_message_id: a for a in arrived}
    assert len(by_id) == 5
    for i, (result, (title, text, html)) in enumerate(zip(results, words, strict=True)):
        body = by_id[result.provider_message_id].body
        assert body["batch"] is True and body["message_id"] == f"m{i}"
        assert body["Destination"] == {"ToAddresses": [f"user{i}@example.org"]}
        assert arrived_parts(body) == (title, text, html)
        assert body["Content"]["Simple"]["Headers"] == [
            {"Name": "List-Unsubscribe", "Value": f"<http://127.0.0.1/u/{i}>"}
        ]
        assert body["EmailTags"] == [{"Name": "message_id", "Value": f"m{i}"}]
        assert body["FromEmailAddress"] == "Shop <news@shop.example>" and body["ConfigurationSetName"] == "events"
    # Each receipt names one message's MessageId and says what the sandbox decided for that message.
    assert sorted(r.provider_message_id for r in receipts) == sorted(r.provider_message_id for r in results)
    fates = {r.provider_message_id: "delivered" if r.delivered else "undelivered" for r in receipts}
    assert fates == {a.provider_message_id: a.receipt_status for a in arrived}
    assert set(fates.values()) == {"delivered", "undelivered"}  # the seed gives both verdicts to tell apart


def test_messages_with_and_without_html_go_in_separate_calls_and_a_lone_one_as_sendemail(tmp_path) -> None:
    async def run():
        async with ProviderHarness("ses", tmp_path) as h:
            adapter = h.adapter(format="email", options=BATCH)
            html = [h.message(message_id=f"h{i}", address=f"h{i}@example.org", html=f"<p>{i}</p>") for i in range(3)]
            plain = [h.message(message_id=f"p{i}", address=f"p{i}@example.org") for i in range(2)]
            first = await asyncio.gather(*(adapter.send(m) for m in [html[0], plain[0], html[1], plain[1], html[2]]))
            # Next turn: two with html and one without, which has nobody to share a template with.
            second = await asyncio.gather(*(adapter.send(m) for m in [html[0], plain[0], html[1]]))
            turns = h.box.received[:5], h.box.received[5:]
            return first + second, [{a.body["message_id"]: a.body for a in turn} for turn in turns]

    results, (first, second) = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    assert len({r.provider_message_id for r in results}) == 8
    # First turn: one call per template, the html part only where the message has one.
    assert {k: arrived_parts(v)[2] for k, v in first.items()} == {
        "h0": "<p>0</p>",
        "h1": "<p>1</p>",
        "h2": "<p>2</p>",
        "p0": None,
        "p1": None,
    }
    calls = {k: v["request_id"] for k, v in first.items()}
    assert calls["h0"] == calls["h1"] == calls["h2"] != calls["p0"] == calls["p1"]
    assert all(v["batch"] for v in first.values())
    # Second turn: the html pair in one call, the lone plain one as SendEmail (its tag as ever).
    assert second["h0"]["request_id"] == second["h1"]["request_id"] != second["p0"]["request_id"]
    assert second["h0"]["batch"] and "batch" not in second["p0"]
    assert second["p0"]["EmailTags"] == [{"Name": "message_id", "Value": "p0"}]


def test_an_unverified_recipient_is_refused_by_sendemail_too(tmp_path) -> None:
    message = {"address": "reject@example.org"}
    result, box = send_once("ses", tmp_path, message=message, format="email")
    assert (result.status, result.error_code, result.retryable) == (DeliveryStatus.failed, "MessageRejected", False)
    assert box.rejected == 1 and not box.received


def test_a_message_too_long_for_an_entry_goes_alone(tmp_path) -> None:
    async def run():
        async with ProviderHarness("ses", tmp_path) as h:
            adapter = h.adapter(format="email", options=BATCH)
            long = h.message(message_id="long", address="l@example.org", html="<p>" + "x" * 300_000 + "</p>")
            short = [h.message(message_id=f"s{i}", address=f"s{i}@example.org", html="<p>hi</p>") for i in range(2)]
            results = await asyncio.gather(*(adapter.send(m) for m in [short[0], long, short[1]]))
            return results, {a.body["message_id"]: a.body for a in h.box.received}

    results, arrived = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    assert "batch" not in arrived["long"] and arrived["s0"]["batch"] and arrived["s1"]["batch"]
    assert len(arrived["long"]["Content"]["Simple"]["Body"]["Html"]["Data"]) == 300_007


def test_a_rejected_entry_fails_only_its_message(tmp_path) -> None:
    async def run():
        async with ProviderHarness("ses", tmp_path) as h:
            adapter = h.adapter(format="email", options=BATCH)
            addresses = ["ann@example.org", "reject-bob@example.org", "cy@example.org"]
            messages = [h.message(message_id=f"m{i}", address=a) for i, a in enumerate(addresses)]
            results = await h.send_together(adapter, messages)
            receipts = await h.receipts(2)
            return results, receipts, list(h.box.received), h.box.rejected

    results, receipts, arrived, rejected = asyncio.run(run())
    assert [(r.status, r.error_code, r.retryable) for r in results] == [
        (DeliveryStatus.accepted, None, False),
        (DeliveryStatus.failed, "MESSAGE_REJECTED", False),
        (DeliveryStatus.accepted, None, False),
    ]
    assert "not verified" in results[1].raw and rejected == 1
    assert [a.body["message_id"] for a in arrived] == ["m0", "m2"]
    assert [a.provider_message_id for a in arrived] == [results[0].provider_message_id, results[2].provider_message_id]
    assert sorted(r.provider_message_id for r in receipts) == sorted(a.provider_message_id for a in arrived)


@pytest.mark.parametrize(
    ("faults", "address", "expected"),
    [
        ({"throttle_rate": 1.0}, "ann@example.org", ("TooManyRequestsException", True)),
        ({"outage": True}, "ann@example.org", ("ServiceUnavailable", True)),
        ({}, "not-a-mailbox", ("BadRequestException", False)),
    ],
    ids=["throttled", "outage", "bad request"],
)
def test_a_failed_call_fails_every_message_in_it(faults: dict, address: str, expected: tuple, tmp_path) -> None:
    async def run():
        async with ProviderHarness("ses", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            adapter = h.adapter(format="email", options=BATCH)
            # One malformed address spoils the whole request, as SES validates it before any entry is sent.
            addresses = ["zed@example.org", address, "cy@example.org"]
            messages = [h.message(message_id=f"m{i}", address=a) for i, a in enumerate(addresses)]
            return await h.send_together(adapter, messages), h.box.received

    results, arrived = asyncio.run(run())
    assert [(r.status, r.error_code, r.retryable) for r in results] == [(DeliveryStatus.failed, *expected)] * 3
    if expected[0] == "TooManyRequestsException":
        assert all(r.retry_after_s == 1 for r in results)
    assert not arrived


@pytest.mark.unit
def test_entry_results_map_to_deliveries() -> None:
    ok = entry_result({"Status": "SUCCESS", "MessageId": "0100-abc"})
    assert (ok.status, ok.provider_message_id) == (DeliveryStatus.accepted, "0100-abc")
    for status, retryable in [
        ("ACCOUNT_THROTTLED", True),
        ("ACCOUNT_DAILY_QUOTA_EXCEEDED", True),
        ("TRANSIENT_FAILURE", True),
        ("MESSAGE_REJECTED", False),
        ("ACCOUNT_SENDING_PAUSED", False),
        ("FAILED", False),
    ]:
        failed = entry_result({"Status": status, "Error": "why"})
        assert (failed.status, failed.error_code, failed.retryable) == (DeliveryStatus.failed, status, retryable)
    # SUCCESS without a MessageId, or no status: whether it went is unknown, and a retry could send it twice.
    for unknown in ({"Status": "SUCCESS"}, {"MessageId": "x"}):
        assert (entry_result(unknown).error_code, entry_result(unknown).retryable) == ("malformed_response", False)


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "51", "many"])
def test_batch_max_is_what_sendbulkemail_takes(value: str) -> None:
    assert_refuses_batch_max("ses", value, "email")
