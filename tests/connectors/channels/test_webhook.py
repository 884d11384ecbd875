"""The webhook adapter against its sandbox over real HTTP on loopback: the model for every
provider's test file (a table of cases, then signatures both ways and receipt correlation)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.webhook import SIGNATURE_HEADER, WebhookAdapter, sign, verify
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness

pytestmark = pytest.mark.integration

SECRET = "test-secret"

# case: (faults set on the sandbox, wrong credentials?, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, (DeliveryStatus.failed, "http_401", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, (DeliveryStatus.failed, "http_429", True)),
    "outage": ({"outage": True}, False, {}, (DeliveryStatus.failed, "http_503", True)),
    "malformed response": ({"malformed_rate": 1.0}, False, {}, (DeliveryStatus.failed, "malformed_response", True)),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, forged, channel, (status, code, retryable) = CASES[case]

    async def run():
        async with ProviderHarness("webhook", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            credentials = WebhookAdapter.Credentials(secret=SecretStr("wrong")) if forged else None
            return await h.adapter(credentials, url=f"{h.base_url}/app", **channel).send(h.message()), h.box

    result, box = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert result.provider_message_id == "webhook-0000000001"
        assert box.received[0].body["body"] == "你好 — only 3 left"
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_receipt_correlates_and_signatures_verify_both_ways(tmp_path) -> None:
    async def run():
        async with ProviderHarness("webhook", tmp_path) as h:
            sent = await h.adapter(url=f"{h.base_url}/app").send(h.message())
            [receipt] = await h.receipts(1)
            forged = ReceiptRequest("POST", "/", {SIGNATURE_HEADER: sign("wrong", b"{}", 1)}, b"{}")
            with pytest.raises(ReceiptRejected) as refused:
                WebhookAdapter.parse_receipts(h.credentials, forged)
            return sent, receipt, refused.value.status

    sent, receipt, refused_status = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id and receipt.delivered
    assert refused_status == 401


@pytest.mark.unit
@pytest.mark.parametrize(
    ("secret", "body", "shift_s", "ok"),
    [(SECRET, b"{}", 0, True), ("other", b"{}", 0, False), (SECRET, b"{} ", 0, False), (SECRET, b"{}", 3600, False)],
)
def test_signature(secret, body, shift_s, ok) -> None:
    header = sign(secret, b"{}", 1_700_000_000)
    assert verify(SECRET, body, header, now=1_700_000_000 + shift_s) is ok


@pytest.mark.unit
def test_registry_finds_the_webhook() -> None:
    assert adapter_class("webhook") is WebhookAdapter
    with pytest.raises(LookupError):
        adapter_class("carrier-pigeon")


@pytest.mark.unit
def test_credentials_come_from_settings() -> None:
    credentials = WebhookAdapter.credentials_from(Settings(webhook_secret=SecretStr("from-env")))
    assert credentials.secret.get_secret_value() == "from-env"
