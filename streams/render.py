"""Render: the campaign's template on the user's profile and the event, in a sandbox, for one channel.

A message that cannot be rendered ends here with outcome render_failed and the reason; one with
no address on its channel ends with no_address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from schemas.config import Channel, Template
from schemas.models import MatchedMessage, Outcome, OutcomeCode, RenderedMessage
from streams.links import LinkClaims, tracked_url

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_COMPILED: dict[tuple[str, int, str], Any] = {}


def compile_part(template: Template, part: str, source: str):
    """Compiled once per template version and part; rendering is per message."""
    key = (template.id, template.version, part)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _ENV.from_string(source)
    return compiled


def context(message: MatchedMessage, profile: dict[str, Any]) -> dict[str, Any]:
    user = {"user_id": message.user_id, **profile}
    event = {"event_type": message.event_type, **message.properties}
    # Top-level names are for short templates ({{ name }}); user./event. disambiguate.
    return {**event, **user, "user": user, "event": event}


@dataclass(frozen=True)
class RenderSettings:
    link_base: str
    link_secret: str


def render_message(
    message: MatchedMessage,
    profile: dict[str, Any] | None,
    template: Template | None,
    channel: Channel | None,
    settings: RenderSettings,
) -> RenderedMessage | Outcome:
    def failed(code: OutcomeCode, reason: str) -> Outcome:
        return Outcome.of(message, code, "render", reason)

    if template is None:
        return failed(OutcomeCode.render_failed, "template not found")
    if channel is None:
        return failed(OutcomeCode.render_failed, f"channel {message.channel!r} not configured")
    profile = profile or {}
    values = context(message, profile)
    address = values["user"].get(channel.address_field)
    if address in (None, ""):
        return failed(OutcomeCode.no_address, f"profile has no {channel.address_field}")
    try:
        title = compile_part(template, "title", template.title).render(values) if template.title else None
        body = compile_part(template, "body", template.body).render(values)
        link = compile_part(template, "link", template.link).render(values) if template.link else None
    except UndefinedError as exc:
        return failed(OutcomeCode.render_failed, f"missing field: {exc.message}")
    except TemplateError as exc:
        return failed(OutcomeCode.render_failed, f"template error: {exc}")
    if not body.strip():
        return failed(OutcomeCode.render_failed, "empty body")
    if link:
        link = tracked_url(
            settings.link_base,
            settings.link_secret,
            LinkClaims(
                message_id=message.message_id,
                campaign_id=message.campaign_id,
                user_id=message.user_id,
                channel=message.channel,
                triggered_at_ms=int(message.triggered_at.timestamp() * 1000),
                url=link,
            ),
        )
    return RenderedMessage(
        message_id=message.message_id,
        campaign_id=message.campaign_id,
        user_id=message.user_id,
        channel=message.channel,
        priority=message.priority,
        triggered_at=message.triggered_at,
        address=str(address),
        title=title,
        body=body,
        link=link,
    )


async def handle(rt, out, messages: list[MatchedMessage]) -> None:
    from infra import topics

    profiles = await rt.user_state.profiles([m.user_id for m in messages])
    for message, profile in zip(messages, profiles, strict=True):
        campaign = rt.config.campaign(message.campaign_id)
        template = rt.config.template(campaign.template_id) if campaign else None
        result = render_message(message, profile, template, rt.config.channel(message.channel), rt.render_settings)
        if isinstance(result, Outcome):
            out.outcome(result)
        else:
            out.send(topics.RENDERED.name, result.user_id, result)
