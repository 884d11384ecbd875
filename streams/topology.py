"""The loop, declared once: each stage, the topics it reads and what it writes, in order.

Workers, docs and tests take the stage list from here (like austin's chain or arroyo's strategies).
"""

from __future__ import annotations

from dataclasses import dataclass

from infra import topics
from infra.topics import TopicSpec
from schemas import models


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TopicSpec, ...]
    value: type
    outputs: tuple[str, ...]
    # JSON is accepted only where outside producers write (the events topic).
    accepts_json: bool = False
    # A second reader of a topic leaves undecodable records to the first, which dead-letters them once.
    dead_letters: bool = True
    # The stage where outside triggers enter: each batch waits for the config published before it.
    config_barrier: bool = False

    @property
    def trusted_input(self) -> bool:
        """Its topics are written only by Loopcast's stages and endpoints, from validated models."""
        return not self.accepts_json

    @property
    def send_path(self) -> bool:
        """On the way from a trigger to the provider, where every millisecond is the user's."""
        return self.name.split(".")[0] not in ("feedback", "monitor")

    def group(self, app_id: str) -> str:
        """The consumer group: the deployment's, except for a second reader of a topic, which needs
        one of its own — in one group the two would split the topic's partitions between them."""
        return app_id if self.dead_letters else f"{app_id}.{self.name}"


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "match",
        (topics.EVENTS,),
        models.Event,
        (topics.MATCHED.name, topics.OUTCOMES.name, topics.TAG_CHANGES.name),
        True,
        config_barrier=True,
    ),
    StageSpec("render", (topics.MATCHED,), models.MatchedMessage, (topics.RENDERED.name, topics.OUTCOMES.name)),
    StageSpec(
        "throttle",
        (topics.RENDERED,),
        models.RenderedMessage,
        tuple(t.name for t in topics.DISPATCH.values()) + (topics.OUTCOMES.name,),
    ),
    # One dispatch stage per tier, so urgent messages never queue behind a marketing backlog.
    *(
        StageSpec(f"dispatch.{tier}", (spec,), models.RenderedMessage, (topics.OUTCOMES.name,))
        for tier, spec in topics.DISPATCH.items()
    ),
    StageSpec("feedback", (topics.OUTCOMES,), models.Outcome, ("clickhouse:outcomes",)),
    StageSpec("feedback.dlq", (topics.DLQ,), models.DeadLetter, ("clickhouse:dead_letters",)),
    # Behaviour and tag history for segments counted in ClickHouse and rebuilt by the Spark jobs.
    StageSpec("feedback.events", (topics.EVENTS,), models.Event, ("clickhouse:user_events",), True, False),
    StageSpec("feedback.tags", (topics.TAG_CHANGES,), models.TagChange, ("clickhouse:user_tag_changes",)),
    StageSpec("feedback.alerts", (topics.ALERTS,), models.Alert, ("clickhouse:alerts",)),
    # Delivery rates per channel and provider; its operator messages go to dispatch like any other.
    StageSpec(
        "monitor",
        (topics.OUTCOMES,),
        models.Outcome,
        (topics.ALERTS.name, topics.DISPATCH_HIGH.name),
        dead_letters=False,
    ),
)

STAGE_NAMES = tuple(s.name for s in STAGES)
# Names a person passes to `loopcast worker --stages`: a family selects all its members.
FAMILIES = ("match", "render", "throttle", "dispatch", "feedback", "monitor")


def select(names: list[str] | None) -> list[StageSpec]:
    """Stages by family ("dispatch") or by name ("dispatch.high"), in loop order."""
    if not names:
        return list(STAGES)
    unknown = set(names) - set(FAMILIES) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {FAMILIES + STAGE_NAMES}")
    return [s for s in STAGES if s.name in names or s.name.split(".")[0] in names]


# The urgent lane: a deployment may run these in a worker of their own (`loopcast stack up
# --urgent-lane`), so urgent messages never share a CPU with a marketing backlog's follow-up work.
URGENT_LANE = ("match", "render", "throttle", "dispatch.high")
# The send path's first half; the rest (throttle, dispatch) is about as much CPU per message (bench, each
# stage alone: match 52 + render 89 µs, throttle 55 + dispatch 101). Two or more sending processes run the
# halves apart (infra.workers.layout).
FRONT_HALF = ("match", "render")
BULK_LANE = ("dispatch.normal", "dispatch.low", "feedback", "monitor")
