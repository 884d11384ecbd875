"""Tags that follow from behaviour: which tags an event adds and removes under the tag rules
(data on the config topic). Pure; the match stage applies the result to the live profile before
it judges segments, so the event that earns a tag already counts for it."""

from __future__ import annotations

from schemas.config import TagRule
from schemas.models import Event


def applies(rule: TagRule, event: Event) -> bool:
    return rule.event_type == event.event_type and all(
        event.properties.get(name) == value for name, value in rule.when.items()
    )


def tag_effects(event: Event, rules: list[TagRule]) -> dict[str, tuple[bool, str]]:
    """tag → (present afterwards, the rule that decided), the last matching rule winning per tag."""
    effects: dict[str, tuple[bool, str]] = {}
    for rule in rules:
        if applies(rule, event):
            effects.update({tag: (True, rule.id) for tag in rule.add})
            effects.update({tag: (False, rule.id) for tag in rule.remove})
    return effects
