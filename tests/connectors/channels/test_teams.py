"""The Teams Workflows-webhook adapter against its sandbox over loopback HTTP: the case table (401 for a
wrong SAS sig, 202 with no id), then the Adaptive Card that arrived and the required settings."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.teams import CARD_TYPE, TeamsAdapter
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

OPTIONS = {"workflow_id": "0a1b2c3d4e5f"}
WRONG = TeamsAdapter.Credentials(sig=SecretStr("wrong+sig/="))

# case: (faults, wrong sig?, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, (DeliveryStatus.failed, "DirectApiInvalidAuthorizationSignature", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, (DeliveryStatus.failed, "WorkflowRequestsThrottled", True)),
    "outage": ({"outage": True}, False, {}, (DeliveryStatus.failed, "ServiceUnavailable", True)),
    "malformed response": ({"malformed_rate": 1.0}, False, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, wrong, channel, (status, code, retryable) = CASES[case]
    channel = {"options": OPTIONS, **channel}
    result, box = send_once("teams", tmp_path, faults=faults, credentials=WRONG if wrong else None, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    assert result.provider_message_id is None
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        body = box.received[0].body
        assert body["type"] == "message" and body["workflow_id"] == "0a1b2c3d4e5f"
        [attachment] = body["attachments"]
        content = attachment["content"]
        assert attachment["contentType"] == CARD_TYPE and content["type"] == "AdaptiveCard"
        assert [b["text"] for b in content["body"]] == ["Flash sale", "你好 — only 3 left"]
        assert content["actions"] == [{"type": "Action.OpenUrl", "title": "Open", "url": "http://127.0.0.1/c/abc"}]
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_missing_sig_is_refused_and_sig_survives_url_encoding(tmp_path) -> None:
    async def run():
        async with ProviderHarness("teams", tmp_path, providers={"teams": {"sig": "a+b/c="}}) as h:
            adapter = h.adapter(options=OPTIONS)
            sent = await adapter.send(h.message(link=None, image_url="http://127.0.0.1/i.png"))
            bare = adapter.url.split("&sig=")[0]
            async with adapter.session.post(bare, json={"type": "message", "attachments": []}) as response:
                refused = response.status, await response.json()
            return sent, refused, h.box

    sent, (status, refused), box = asyncio.run(run())
    assert sent.status is DeliveryStatus.accepted
    content = box.received[0].body["attachments"][0]["content"]
    assert content["body"][1] == {"type": "Image", "url": "http://127.0.0.1/i.png"} and "actions" not in content
    assert status == 401 and refused["error"]["code"] == "DirectApiAuthorizationRequired" and box.rejected == 1


@pytest.mark.unit
def test_needs_url_and_workflow_id_and_sends_no_receipts() -> None:
    assert adapter_class("teams") is TeamsAdapter
    with pytest.raises(ValueError, match="workflow_id"):
        TeamsAdapter(Channel(id="ch", provider="teams", options=OPTIONS), TeamsAdapter.Credentials())
    with pytest.raises(ValueError, match="workflow_id"):
        TeamsAdapter(Channel(id="ch", provider="teams", url="https://example.invalid"), TeamsAdapter.Credentials())
    with pytest.raises(ReceiptRejected) as refused:
        TeamsAdapter.parse_receipts(TeamsAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404
