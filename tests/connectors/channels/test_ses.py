"""The SES adapter against its sandbox over HTTP on loopback: a table of cases (the sandbox verifies
SigV4 in full), AWS's published SigV4 example, and SNS-signed receipts both ways."""

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
    sign_request,
    signature,
    sns_sign,
    sns_verify,
)
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness, send_once

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
