"""Every Kafka topic Loopcast uses, declared once: name, partitions, retention or compaction.

Stages, the stack launcher and tests take names from here; nothing else spells a topic name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    # None means the settings' default partition count.
    partitions: int | None = None
    config: dict[str, str] = field(default_factory=dict)


EVENTS = TopicSpec("loopcast.events", config={"retention.ms": str(7 * DAY_MS)})
MATCHED = TopicSpec("loopcast.matched", config={"retention.ms": str(3 * DAY_MS)})
RENDERED = TopicSpec("loopcast.rendered", config={"retention.ms": str(3 * DAY_MS)})
DISPATCH_HIGH = TopicSpec("loopcast.dispatch.high", config={"retention.ms": str(3 * DAY_MS)})
DISPATCH_NORMAL = TopicSpec("loopcast.dispatch.normal", config={"retention.ms": str(3 * DAY_MS)})
DISPATCH_LOW = TopicSpec("loopcast.dispatch.low", config={"retention.ms": str(3 * DAY_MS)})
OUTCOMES = TopicSpec("loopcast.outcomes", config={"retention.ms": str(14 * DAY_MS)})
# Tags users gained or lost (tag rules, jobs): history for ClickHouse user_tag_changes.
TAG_CHANGES = TopicSpec("loopcast.tag_changes", config={"retention.ms": str(7 * DAY_MS)})
DLQ = TopicSpec("loopcast.dlq", partitions=1, config={"retention.ms": str(30 * DAY_MS)})
ALERTS = TopicSpec("loopcast.alerts", partitions=1, config={"retention.ms": str(30 * DAY_MS)})
# Campaigns, templates and channel settings: keyed by "<kind>:<id>", latest value wins.
CONFIG = TopicSpec(
    "loopcast.config",
    partitions=1,
    config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3600 * 1000)},
)

DISPATCH = {"high": DISPATCH_HIGH, "normal": DISPATCH_NORMAL, "low": DISPATCH_LOW}
ALL = (
    EVENTS, MATCHED, RENDERED, DISPATCH_HIGH, DISPATCH_NORMAL, DISPATCH_LOW, OUTCOMES, TAG_CHANGES, DLQ, ALERTS, CONFIG,
)  # fmt: skip
