"""The Apprise adapter through Apprise's json:// service into the sandbox over HTTP on loopback."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from connectors.channels.apprise_adapter import AppriseAdapter, split_urls
from connectors.channels.base import DeliveryStatus
from connectors.channels.sandboxes.apprise import SANDBOX_PASSWORD, SANDBOX_USER
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness

pytestmark = pytest.mark.integration

# case: (faults, password, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, SANDBOX_PASSWORD, {}, (DeliveryStatus.accepted, None, False)),
    # Apprise reports only failure: a refused token is indistinguishable from an outage, so it is retried.
    "auth failure": ({}, "wrong", {}, (DeliveryStatus.failed, "apprise_failed", True)),
    "throttled": ({"throttle_rate": 1.0}, SANDBOX_PASSWORD, {}, (DeliveryStatus.failed, "apprise_failed", True)),
    "outage": ({"outage": True}, SANDBOX_PASSWORD, {}, (DeliveryStatus.failed, "apprise_failed", True)),
    # json:// judges by the status code alone: a 200 with an unreadable body counts as delivered.
    "malformed response": ({"malformed_rate": 1.0}, SANDBOX_PASSWORD, {}, (DeliveryStatus.accepted, None, False)),
    "timeout": ({"latency_ms": 400}, SANDBOX_PASSWORD, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


def target(h: ProviderHarness, password: str = SANDBOX_PASSWORD) -> str:
    return f"json://{SANDBOX_USER}:{password}@127.0.0.1:{h.settings.sandbox_port}/apprise/notify"


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, password, channel, (status, code, retryable) = CASES[case]

    async def run():
        async with ProviderHarness("apprise", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            credentials = AppriseAdapter.Credentials(urls=SecretStr(target(h, password)))
            return await h.adapter(credentials, url=None, **channel).send(h.message()), h.box

    result, box = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    assert result.provider_message_id is None
    if case == "success":
        [item] = box.received
        assert item.body["title"] == "Flash sale" and item.body["type"] == "info"
        assert item.body["message"] == "你好 — only 3 left\nhttp://127.0.0.1/c/abc"
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_every_target_is_notified_and_options_url_works(tmp_path) -> None:
    async def run():
        async with ProviderHarness("apprise", tmp_path) as h:
            both = AppriseAdapter.Credentials(urls=SecretStr(f"{target(h)}, {target(h)}"))
            twice = await h.adapter(both, url=None).send(h.message())
            once = await h.adapter(url=None, options={"url": target(h)}).send(h.message())
            return twice, once, len(h.box.received)

    twice, once, arrived = asyncio.run(run())
    assert twice.status == once.status == DeliveryStatus.accepted and arrived == 3


def test_partial_delivery_is_not_retried(tmp_path) -> None:
    async def run():
        async with ProviderHarness("apprise", tmp_path) as h:
            mixed = AppriseAdapter.Credentials(urls=SecretStr(f"{target(h)} {target(h, 'wrong')}"))
            return await h.adapter(mixed, url=None).send(h.message())

    result = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (DeliveryStatus.failed, "apprise_partial", False)


@pytest.mark.unit
def test_configuration_is_validated_without_leaking_tokens() -> None:
    with pytest.raises(ValueError, match="needs credentials urls"):
        AppriseAdapter(Channel(id="a", provider="apprise"), AppriseAdapter.Credentials())
    with pytest.raises(ValueError, match="not understood") as refused:
        AppriseAdapter(Channel(id="a", provider="apprise"), AppriseAdapter.Credentials(urls=SecretStr("nope://tok3n")))
    assert "tok3n" not in str(refused.value)
    assert split_urls("json://a/b?x=1,2, discord://id/tok\nntfy://t") == [
        "json://a/b?x=1,2",
        "discord://id/tok",
        "ntfy://t",
    ]
