"""Render: the campaign's copy for one user — variant chosen, template rendered on the profile and
the event, the link tracked, the content adapted to the channel's format rules.

A message that cannot be rendered ends here with outcome render_failed and the reason (the
missing field's name, the channel's unmet requirement); one with no address ends with no_address.
In a test-then-winner experiment, users outside the test share wait (held) for the winner.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from jinja2 import TemplateError

from connectors.channels.base import adapter_class
from infra import topics
from schemas.config import Campaign, Channel, Template
from schemas.contracts import encode
from schemas.models import MatchedMessage, Outcome, OutcomeCode, Priority, RenderedMessage
from streams.copy.channels import RULES, AdaptationError, Content, adapt
from streams.copy.language import MissingField, RenderTimeout, TemplateSyntaxError, compiled
from streams.copy.variants import Variant, assign
from streams.links import LinkClaims, short_code, short_url, tracked_url, unsubscribe_token
from streams.match import fallback_message

WAIT = "wait"  # a test-then-winner user outside the test share: held until the winner is known


@dataclass(frozen=True)
class RenderSettings:
    link_base: str
    link_secret: str


@dataclass
class ShortLinks:
    """Short codes a batch issued; stored in Redis before any of the batch's messages goes out."""

    issued: list[tuple[str, str]] = field(default_factory=list)

    def issue(self, base: str, claims: LinkClaims) -> str:
        code = short_code(claims.message_id)
        self.issued.append((code, claims.model_dump_json()))
        return short_url(base, code)


def context(message: MatchedMessage, profile: dict[str, Any]) -> dict[str, Any]:
    return values_for(message.user_id, message.event_type, message.properties, profile)


def values_for(user_id: str, event_type: str, properties: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    user = {"user_id": user_id, **profile}
    event = {"event_type": event_type, **properties}
    # Top-level names are for short templates (${name}); user./event. disambiguate.
    return {**event, **user, "user": user, "event": event}


def choose_variant(campaign: Campaign, user_id: str, ab_state: dict[str, Any] | None) -> str | None:
    """None for a campaign without variants; WAIT while a held user's winner is unknown."""
    if not campaign.variants:
        return None
    state = ab_state or {}
    winner = state.get("winner") if state.get("status") in ("winner", "fallback") else None
    chosen = assign(
        campaign.id,
        user_id,
        [Variant(id=v.id, weight=v.weight) for v in campaign.variants],
        campaign.experiment,
        winner=winner,
        bandit_shares=state.get("shares"),
    )
    return WAIT if chosen is None else chosen


def render_content(template: Template, values: dict[str, Any], defaults: dict[str, str] | None) -> dict[str, str]:
    return {
        part: compiled((template.id, template.version, part), source).render(values, defaults=defaults)
        for part, source in template.parts().items()
    }


_PROVIDER_MAX: dict[str, tuple[Channel, tuple[int | None, int | None]]] = {}


def provider_max(channel: Channel) -> tuple[int | None, int | None]:
    """The tightest title and body limits among the channel's providers (any of them may send);
    worked out once per version of a channel (the config store keeps one object per version)."""
    cached = _PROVIDER_MAX.get(channel.id)
    if cached is not None and cached[0] is channel:
        return cached[1]
    titles, bodies = [], []
    for route in channel.routes():
        try:
            limits = adapter_class(route.provider).limits
        except LookupError:
            continue
        titles.append(limits.title_maxlen)
        bodies.append(limits.body_maxlen)
    result = (
        min((t for t in titles if t is not None), default=None),
        min((b for b in bodies if b is not None), default=None),
    )
    _PROVIDER_MAX[channel.id] = (channel, result)
    return result


def render_message(
    message: MatchedMessage,
    profile: dict[str, Any] | None,
    campaign: Campaign | None,
    template: Template | None,
    channel: Channel | None,
    settings: RenderSettings,
    short_links: ShortLinks | None = None,
) -> RenderedMessage | Outcome:
    def failed(code: OutcomeCode, reason: str) -> Outcome:
        return Outcome.of(message, code, "render", reason)

    if campaign is None:
        return failed(OutcomeCode.render_failed, "campaign not found")
    if template is None:
        return failed(OutcomeCode.render_failed, "template not found")
    if channel is None:
        return failed(OutcomeCode.render_failed, f"channel {message.channel!r} not configured")
    values = context(message, profile or {})
    address = values["user"].get(channel.address_field)
    if address in (None, ""):
        return failed(OutcomeCode.no_address, f"profile has no {channel.address_field}")
    defaults = campaign.field_defaults if campaign.missing_fields == "use_default" else None
    try:
        parts = render_content(template, values, defaults)
    except MissingField as exc:
        return failed(OutcomeCode.render_failed, f"missing field: {exc.field}")
    except RenderTimeout as exc:
        return failed(OutcomeCode.render_failed, f"render time limit: {exc}")
    except (TemplateSyntaxError, TemplateError) as exc:
        return failed(OutcomeCode.render_failed, f"template error: {exc}")
    link = parts.get("link")
    if link:
        claims = LinkClaims(
            message_id=message.message_id,
            campaign_id=message.campaign_id,
            user_id=message.user_id,
            channel=message.channel,
            triggered_at_ms=int(message.triggered_at.timestamp() * 1000),
            url=link,
        )
        if short_links is not None and RULES[channel.format].layout == "sms":
            # SMS pays per character: a short code resolved through Redis instead of the signed token.
            link = short_links.issue(settings.link_base, claims)
        else:
            link = tracked_url(settings.link_base, settings.link_secret, claims)
    content = Content(
        title=parts.get("title"),
        short_text=parts.get("body"),
        long_text=parts.get("long_text"),
        image_url=parts.get("image_url"),
        link=link,
        cta=parts.get("cta"),
    )
    try:
        # A per-user one-click link unless the channel names its own unsubscribe page.
        unsubscribe = channel.unsubscribe_url or (
            f"{settings.link_base}/u/{unsubscribe_token(settings.link_secret, message.user_id, channel.id)}"
        )
        adapted = adapt(
            content,
            channel.format,
            brand=channel.brand,
            unsubscribe_url=unsubscribe,
            provider_max=provider_max(channel),
        )
    except AdaptationError as exc:
        return failed(OutcomeCode.render_failed, f"{channel.format}: {exc}")
    return RenderedMessage(
        message_id=message.message_id,
        campaign_id=message.campaign_id,
        user_id=message.user_id,
        channel=message.channel,
        priority=message.priority,
        triggered_at=message.triggered_at,
        address=str(address),
        title=adapted.title,
        body=adapted.body,
        link=adapted.link,
        variant=message.variant,
        fallback_of=message.fallback_of,
        html=adapted.html,
        image_url=adapted.image_url,
        extra=extra_json(adapted.extra),
        inventory_product=inventory_product(message, campaign),
    )


def extra_json(extra: dict[str, Any]) -> str | None:
    # UTF-8 and compact, as json.dumps(ensure_ascii=False) gave with spaces, at a tenth of its cost.
    return orjson.dumps(extra, default=str, option=orjson.OPT_NON_STR_KEYS).decode() if extra else None


def inventory_product(message: MatchedMessage, campaign: Campaign | None) -> str | None:
    """The product an inventory campaign's message quotes the stock of (None for every other message)."""
    if campaign is None or campaign.trigger.inventory is None:
        return None
    product = message.properties.get("product_id")
    return None if product in (None, "") else str(product)


def with_live_stock(message: MatchedMessage, stock: int | None) -> MatchedMessage:
    """The message with the product's stock as it is now, so "only ${stock} left" is today's number,
    not the trigger's; without a recorded stock the trigger's number stays."""
    if stock is None:
        return message
    return message.model_copy(update={"properties": {**message.properties, "stock": stock}})


def preview(template: Template, profile: dict[str, Any], event: dict[str, Any], channel_format: str, **channel) -> dict:
    """What `loopcast render` prints: the content adapted to one channel, without sending anything."""
    values = values_for(
        str(profile.get("user_id", "preview-user")),
        str(event.get("event_type", "preview")),
        event.get("properties", event),
        profile,
    )
    parts = render_content(template, values, None)
    content = Content(
        title=parts.get("title"),
        short_text=parts.get("body"),
        long_text=parts.get("long_text"),
        image_url=parts.get("image_url"),
        link=parts.get("link"),
        cta=parts.get("cta"),
    )
    return adapt(content, channel_format, **channel).model_dump(mode="json")


async def handle(rt, out, messages: list[MatchedMessage]) -> None:
    campaigns = {m.campaign_id: rt.config.campaign(m.campaign_id) for m in messages}
    ab_states = await rt.user_state.ab_states([cid for cid, c in campaigns.items() if c is not None and c.variants])
    profiles = await rt.user_state.profiles([m.user_id for m in messages])
    quoting = {m.message_id: p for m in messages if (p := inventory_product(m, campaigns[m.campaign_id]))}
    live = await rt.user_state.inventory.stocks(list(quoting.values())) if quoting else {}
    held: dict[str, list[bytes]] = defaultdict(list)
    short_links = ShortLinks()
    fallbacks: list[tuple[str, bytes]] = []
    if any(m.priority is Priority.high for m in messages):
        rt.gate.note_urgent()
    for message, profile in zip(messages, profiles, strict=True):
        campaign = campaigns[message.campaign_id]
        if campaign is not None:
            variant = choose_variant(campaign, message.user_id, ab_states.get(campaign.id))
            if variant == WAIT:
                held[campaign.id].append(encode(message))
                continue
            if variant != message.variant:  # a copy per message only where a variant was chosen
                message = message.model_copy(update={"variant": variant})
        if message.message_id in quoting:
            message = with_live_stock(message, live[quoting[message.message_id]])
        template_id = campaign.template_for(message.variant) if campaign else None
        template = rt.config.template(template_id) if template_id else None
        result = render_message(
            message, profile, campaign, template, rt.config.channel(message.channel), rt.render_settings, short_links
        )
        following = fallback_message(message, campaign) if campaign is not None else None
        if isinstance(result, Outcome):
            out.outcome(result)
            if following is not None:  # no address, or the content cannot go on this channel: next one
                out.send(topics.MATCHED.name, following.user_id, following)
        else:
            out.send(topics.RENDERED.name, result.user_id, result)
            if following is not None:
                fallbacks.append((message.message_id, encode(following)))
    await rt.user_state.stash_fallbacks(fallbacks)
    await rt.user_state.put_short_links(short_links.issued)
    for campaign_id, waiting in held.items():
        await rt.user_state.hold(campaign_id, waiting)
