"""Dispatch: hand a rendered message to one of its channel's providers; the result becomes an outcome.

A retryable failure is tried again on another healthy provider at once, or later through the
durable retry queue (the partition never waits on a backoff); after the last attempt, or a
failure no retry can fix, the message has failed and its campaign's next channel takes over.
Every attempt is an outcome (`retrying`, then `sent` or `failed`), so ClickHouse shows them all.
"""

from __future__ import annotations

import asyncio
import time

from connectors.channels.base import DeliveryResult, DeliveryStatus
from connectors.policy_store import FALLBACK_CHECKS, RETRIES
from infra import topics
from schemas.config import Channel
from schemas.contracts import codec, encode
from schemas.models import MatchedMessage, Outcome, OutcomeCode, RenderedMessage
from streams.failover import MAX_ATTEMPTS, backoff_s
from streams.match import Touch

matched = codec(MatchedMessage)


def claim_id(message: RenderedMessage) -> str:
    """What the send claim is taken on: each attempt is claimed once, so a redelivered record of
    an attempt is never sent twice while a scheduled retry still gets its own go."""
    return message.message_id if message.attempt == 1 else f"{message.message_id}#{message.attempt}"


def route_keys(channel: Channel) -> tuple[list[str], list[float]]:
    """The channel's provider routes as breaker keys, with their weights."""
    routes = channel.routes()
    return [f"{channel.id}/{i}:{r.provider}" for i, r in enumerate(routes)], [r.weight for r in routes]


def outcome_for(message: RenderedMessage, provider: str, result: DeliveryResult, attempt: int) -> Outcome:
    if result.status is DeliveryStatus.accepted:
        code, reason = OutcomeCode.sent, None
    else:
        code = OutcomeCode.retrying if result.retryable and attempt < MAX_ATTEMPTS else OutcomeCode.failed
        reason = f"{result.error_code} at attempt {attempt}: {(result.raw or '')[:200]}"
    return Outcome.of(
        message,
        code,
        "dispatch",
        reason,
        provider=provider,
        provider_message_id=result.provider_message_id,
        attempt=attempt,
    )


def failed_without_provider(message: RenderedMessage, reason: str, attempt: int | None = None) -> Outcome:
    return Outcome.of(message, OutcomeCode.failed, "dispatch", reason, attempt=attempt)


def touch_of(outcome: Outcome, fallback: bool = False) -> Touch:
    return Touch(
        message_id=outcome.message_id,
        campaign_id=outcome.campaign_id,
        channel=outcome.channel,
        triggered_at=outcome.triggered_at,
        sent_at=outcome.occurred_at,
        fallback=fallback,
        fallback_of=outcome.fallback_of,
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


async def fall_back(state, send, message_id: str) -> bool:
    """Start the campaign's next channel for a message that will not arrive, if it has one.
    `send(topic, key, value)` publishes; the stash is taken atomically, so this happens once."""
    raw = await state.take_fallback(message_id)
    if raw is None:
        return False
    following = matched.decode(raw)
    send(topics.MATCHED.name, following.user_id, following)
    return True


def has_fallback(rt, message: RenderedMessage) -> bool:
    """Whether the campaign has a channel after this message's (render stashed it, to be settled)."""
    campaign = rt.config.campaign(message.campaign_id)
    return campaign is not None and campaign.next_channel(message.channel) is not None


async def settle(rt, out, message: RenderedMessage, outcome: Outcome, sends_receipts: bool) -> None:
    """After a final outcome: a failure falls back to the next channel; a send either waits for its
    receipt (the campaign's window) or is final."""
    if not has_fallback(rt, message):
        return
    campaign = rt.config.campaign(message.campaign_id)
    if outcome.code is OutcomeCode.failed:
        await fall_back(rt.user_state, out.send, message.message_id)
    elif not sends_receipts:
        await rt.user_state.drop_fallbacks([message.message_id])  # sent is all this provider will say
    elif campaign.fallback_after_s:
        # The stash stays for an undelivered receipt; without any receipt by then, the check fires.
        due_ms = int((time.time() + campaign.fallback_after_s) * 1000)
        await rt.policy.defer([(due_ms, message.message_id.encode())], queue=FALLBACK_CHECKS)


async def schedule_retry(rt, message: RenderedMessage, attempt: int, failed: set[str], wait_s: float) -> None:
    """Back through dispatch later, durably (Redis, like quiet-hours deferrals), with what it learnt."""
    retry = message.model_copy(update={"attempt": attempt, "failed_providers": sorted(failed)})
    await rt.policy.defer([(int((time.time() + wait_s) * 1000), encode(retry))], queue=RETRIES)


async def deliver(rt, out, message: RenderedMessage) -> None:
    claim = claim_id(message)
    # Handed over already by this process (a batch retried after a blip): the same outcome, no resend.
    if (done := rt.handed_over.get(claim)) is not None:
        out.send_encoded(topics.OUTCOMES.name, message.user_id, done)
        return
    channel = rt.config.channel(message.channel)
    if channel is None:
        outcome = failed_without_provider(message, f"channel {message.channel!r} not configured")
        out.outcome(outcome)
        await settle(rt, out, message, outcome, False)
        return
    keys, weights = route_keys(channel)
    failed = set(message.failed_providers) & set(keys)
    attempt, retry_after, tried = message.attempt, None, False
    while True:
        if failed >= set(keys):
            failed = set()  # every provider failed it once: all may try again, after a pause
            index = None
        else:
            index = rt.routes.choose(keys, weights, message.message_id, failed, time.monotonic())
        if index is None:
            if not tried:
                # No provider to try at all (every breaker open): the pass counts as an attempt, so
                # even an outage of every provider ends in `failed` after MAX_ATTEMPTS passes.
                if attempt >= MAX_ATTEMPTS:
                    outcome = failed_without_provider(message, f"no healthy provider after {attempt} attempts", attempt)
                    rt.handed_over.remember(claim, out.outcome(outcome))
                    await settle(rt, out, message, outcome, False)
                    return
                attempt += 1
            wait_s = backoff_s(attempt - 1, retry_after)
            await schedule_retry(rt, message, attempt, failed, wait_s)
            pending = Outcome.of(
                message, OutcomeCode.retrying, "dispatch", f"attempt {attempt} in {wait_s:.1f} s", attempt=attempt - 1
            )
            # After a send, that send's own `retrying` outcome already says it: this one is only remembered.
            rt.handed_over.remember(claim, encode(pending) if tried else out.outcome(pending))
            return
        try:
            adapter = rt.adapter(channel.id, index)
        except (LookupError, ValueError) as exc:
            outcome = failed_without_provider(message, str(exc), attempt)
            out.outcome(outcome)
            await settle(rt, out, message, outcome, False)
            return
        if adapter.channel.rate_per_s:
            await wait_for_token(rt, adapter.channel)
        result = await adapter.send(message)
        tried = True
        # A provider that answers "no" to one message is healthy; only retryable failures count against it.
        rt.routes.record(
            keys[index], result.status is DeliveryStatus.accepted or not result.retryable, time.monotonic()
        )
        outcome = outcome_for(message, adapter.scheme, result, attempt)
        sent = out.outcome(outcome)
        if outcome.code is not OutcomeCode.retrying:
            rt.handed_over.remember(claim, sent)
            if outcome.code is OutcomeCode.sent and adapter.delivers_on_accept:
                out.outcome(Outcome.of(message, OutcomeCode.delivered, "dispatch", provider=adapter.scheme))
            if outcome.code is OutcomeCode.sent:
                # Right away, not at the end of the batch: a provider's receipt can come back
                # within milliseconds and must find its message.
                touch = touch_of(outcome, fallback=has_fallback(rt, message))
                await rt.record_send((outcome.user_id, touch, outcome.provider, outcome.provider_message_id))
            await settle(rt, out, message, outcome, adapter.sends_receipts)
            return
        failed.add(keys[index])
        attempt += 1
        retry_after = result.retry_after_s


async def handle(rt, out, messages: list[RenderedMessage]) -> None:
    async def bounded(message: RenderedMessage) -> None:
        # One provider slot per send, urgent tiers first (streams.priority).
        async with rt.gate.slot(message.priority.value):
            await deliver(rt, out, message)

    claims = await rt.user_state.claim_sends([claim_id(m) for m in messages])
    fresh = [m for m, claimed in zip(messages, claims, strict=True) if claimed]
    for message, claimed in zip(messages, claims, strict=True):
        if not claimed:
            out.outcome(Outcome.of(message, OutcomeCode.deduplicated, "dispatch", "already handed to the provider"))
    await asyncio.gather(*(bounded(m) for m in fresh))
