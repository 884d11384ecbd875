"""Dispatch: hand a rendered message to its channel's provider; the result becomes an outcome."""

from __future__ import annotations

import asyncio
import time

from connectors.channels.base import DeliveryResult, DeliveryStatus
from schemas.config import Channel
from schemas.models import Outcome, OutcomeCode, RenderedMessage
from streams.match import Touch

MAX_ATTEMPTS = 3
BACKOFF_BASE_S = 0.2


def backoff_s(attempt: int) -> float:
    """Exponential: 0.2 s, 0.4 s, … between attempts of a retryable failure."""
    return BACKOFF_BASE_S * (2 ** (attempt - 1))


def outcome_for(message: RenderedMessage, provider: str, result: DeliveryResult, attempts: int) -> Outcome:
    accepted = result.status is DeliveryStatus.accepted
    return Outcome.of(
        message,
        OutcomeCode.sent if accepted else OutcomeCode.failed,
        "dispatch",
        None if accepted else f"{result.error_code} after {attempts} attempt(s): {(result.raw or '')[:200]}",
        provider=provider,
        provider_message_id=result.provider_message_id,
    )


def failed_without_provider(message: RenderedMessage, reason: str) -> Outcome:
    return Outcome.of(message, OutcomeCode.failed, "dispatch", reason)


def touch_of(outcome: Outcome) -> Touch:
    return Touch(
        message_id=outcome.message_id,
        campaign_id=outcome.campaign_id,
        channel=outcome.channel,
        triggered_at=outcome.triggered_at,
        sent_at=outcome.occurred_at,
    )


async def wait_for_token(rt, channel: Channel) -> None:
    """The provider's rate, shared by all workers: a throttled message waits, it is not failed."""
    rate = channel.rate_per_s
    burst = max(1, int(rate))
    while True:
        granted, wait_ms = await rt.policy.take_tokens(
            f"provider:{channel.id}", rate, burst, 1, int(time.time() * 1000)
        )
        if granted:
            return
        await asyncio.sleep(wait_ms / 1000)  # the bucket says when the next token exists


async def deliver(rt, message: RenderedMessage) -> Outcome:
    # Handed over already by this process (a batch retried after a blip): the same outcome, no resend.
    if (done := rt.handed_over.get(message.message_id)) is not None:
        return done
    try:
        adapter = rt.adapter(message.channel)
    except (LookupError, ValueError) as exc:
        return failed_without_provider(message, str(exc))
    attempt = 1
    while True:
        if adapter.channel.rate_per_s:
            await wait_for_token(rt, adapter.channel)
        result = await adapter.send(message)
        if result.status is DeliveryStatus.accepted or not result.retryable or attempt >= MAX_ATTEMPTS:
            outcome = outcome_for(message, adapter.scheme, result, attempt)
            rt.handed_over.remember(message.message_id, outcome)
            if outcome.code is OutcomeCode.sent:
                # Right away, not at the end of the batch: a provider's receipt can come back
                # within milliseconds and must find its message.
                await rt.user_state.record_sends(
                    [(outcome.user_id, touch_of(outcome), outcome.provider, outcome.provider_message_id)]
                )
            return outcome
        await asyncio.sleep(backoff_s(attempt))
        attempt += 1


async def handle(rt, out, messages: list[RenderedMessage]) -> None:
    async def bounded(message: RenderedMessage) -> Outcome:
        # One provider slot per send, urgent tiers first (streams.priority).
        async with rt.gate.slot(message.priority.value):
            return await deliver(rt, message)

    claims = await rt.user_state.claim_sends([m.message_id for m in messages])
    fresh = [m for m, claimed in zip(messages, claims, strict=True) if claimed]
    for message, claimed in zip(messages, claims, strict=True):
        if not claimed:
            out.outcome(Outcome.of(message, OutcomeCode.deduplicated, "dispatch", "already handed to the provider"))
    for outcome in await asyncio.gather(*(bounded(m) for m in fresh)):
        out.outcome(outcome)
