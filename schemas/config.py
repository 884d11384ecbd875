"""Documents on the loopcast.config topic: campaigns, templates and channel settings.

They travel as JSON inside a ConfigRecord; these models validate them when they are published
and again when a worker materialises them.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from schemas.models import ConfigKind, ConfigRecord, Priority
from schemas.segments import Node, Segment
from streams.copy.variants import BetaPrior, Experiment
from streams.inventory import STOCK_CHANGED
from streams.policy import CapRule, Category, QuietHours


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ConfigKind
    id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    version: int = 1

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(kind=self.kind, id=self.id, version=self.version, body=self.model_dump_json())


class InventoryTrigger(BaseModel):
    """Scarcity pushes from live stock: when a product's stock falls to or below one of these
    thresholds, everyone who has it in their cart hears once per threshold (streams.inventory)."""

    model_config = ConfigDict(extra="forbid")
    thresholds: list[int] = Field(min_length=1, max_length=20)

    @model_validator(mode="after")
    def _positive_and_distinct(self) -> InventoryTrigger:
        if any(t < 1 for t in self.thresholds) or len(set(self.thresholds)) != len(self.thresholds):
            raise ValueError(f"thresholds must be distinct whole numbers ≥ 1, got {self.thresholds}")
        return self


class Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: str
    # Set: the campaign fans out to a product's carters when its stock crosses a threshold,
    # instead of messaging the user of the triggering event.
    inventory: InventoryTrigger | None = None

    @model_validator(mode="after")
    def _inventory_on_stock_events(self) -> Trigger:
        if self.inventory is not None and self.event_type != STOCK_CHANGED:
            raise ValueError(f"an inventory trigger fires on {STOCK_CHANGED!r} events, not {self.event_type!r}")
        return self


class Audience(BaseModel):
    """Who a campaign may reach: everyone who triggers it, only listed users, or the members of a
    segment (judged on the user's live profile when the trigger arrives)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["all", "users", "segment"] = "all"
    user_ids: list[str] = Field(default_factory=list)
    segment_id: str | None = None

    @model_validator(mode="after")
    def _segment_named(self) -> Audience:
        if (self.kind == "segment") != (self.segment_id is not None):
            raise ValueError("an audience of kind 'segment' names its segment_id (and only that kind does)")
        return self


class CampaignVariant(BaseModel):
    """One copy of an A/B test: its own template, a share of the test traffic."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=50)
    template_id: str
    weight: float = Field(default=1.0, gt=0)
    # What similar copy says of this one before it is sent (connectors.knowledge.prior_for): the bandit's
    # allocation starts from it instead of Beta(1, 1); winner decisions never use it.
    prior: BetaPrior | None = None


class Campaign(Document):
    kind: Literal[ConfigKind.campaign] = ConfigKind.campaign
    name: str
    status: Literal["active", "paused"] = "active"
    trigger: Trigger
    audience: Audience = Field(default_factory=Audience)
    channel: str
    # Channel failover, in order (e.g. push → sms): the next is tried once when a message fails, is
    # reported undelivered, gets no receipt within fallback_after_s, or the user has no address.
    fallback_channels: list[str] = Field(default_factory=list, max_length=4)
    fallback_after_s: float | None = Field(default=None, gt=0)
    # One template, or 2–5 variants of which the experiment picks a winner.
    template_id: str | None = None
    variants: list[CampaignVariant] = Field(default_factory=list, max_length=5)
    experiment: Experiment | None = None
    # After this, an undecided experiment falls back to experiment.fallback.
    decide_by: datetime | None = None
    # A field missing at send time: use a default (inline `${x!"d"}` first, then these), or suppress.
    missing_fields: Literal["use_default", "suppress"] = "use_default"
    field_defaults: dict[str, str] = Field(default_factory=dict)
    priority: Priority = Priority.normal
    # Transactional messages ignore marketing opt-outs and caps (never a channel block) and quiet hours.
    category: Category = Category.marketing
    # Replace the global quiet hours for this campaign; None uses the global ones.
    quiet_hours: QuietHours | None = None
    # A message older than this (from its trigger) is not worth sending: it expires instead.
    max_age_minutes: int | None = Field(default=None, ge=1)
    # Extra caps for this campaign (per channel, per campaign, rolling windows), on top of the daily cap.
    caps: list[CapRule] = Field(default_factory=list)
    # Messages per user per local day across all campaigns; None uses the global setting.
    daily_cap: int | None = Field(default=None, ge=0)
    # A later event of this type by the same user counts as a conversion of this campaign.
    conversion_event: str | None = None
    attribution_window_hours: int = Field(default=72, ge=1)

    @property
    def channels(self) -> list[str]:
        """The channel, then its fallbacks: the order failover walks."""
        return [self.channel, *self.fallback_channels]

    def next_channel(self, channel: str) -> str | None:
        order = self.channels
        return order[order.index(channel) + 1] if channel in order and order.index(channel) + 1 < len(order) else None

    @model_validator(mode="after")
    def _copy_is_declared(self) -> Campaign:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels repeat in {self.channels}: each is tried once")
        if bool(self.template_id) == bool(self.variants):
            raise ValueError("a campaign has either template_id or variants (2 to 5), not both or neither")
        if self.variants:
            ids = [v.id for v in self.variants]
            if len(ids) < 2 or len(set(ids)) != len(ids):
                raise ValueError("variants: 2 to 5, with distinct ids")
            if self.experiment is None:
                self.experiment = Experiment(fallback=ids[0])
            if self.experiment.fallback not in ids:
                raise ValueError(f"experiment.fallback {self.experiment.fallback!r} is not one of the variants {ids}")
        return self

    def template_for(self, variant: str | None) -> str | None:
        if variant is None:
            return self.template_id
        return next((v.template_id for v in self.variants if v.id == variant), None)


class Template(Document):
    """One content, written once, adapted to every channel by its format rules at render time."""

    kind: Literal[ConfigKind.template] = ConfigKind.template
    title: str | None = None
    # The short text: what small channels (SMS, push) show.
    body: str
    long_text: str | None = None
    image_url: str | None = None
    # Where a click should land; rendered like the body, then wrapped in a tracked redirect.
    link: str | None = None
    cta: str | None = None
    # Who wrote it: a person, a model ("llm:<model>") or the offline fallback writer; the knowledge base
    # (copy_library) keeps it beside the copy's numbers.
    source: str = Field(default="human", pattern=r"^(human|offline|llm:.+)$")

    PARTS: ClassVar[tuple[str, ...]] = ("title", "body", "long_text", "image_url", "link", "cta")

    def parts(self) -> dict[str, str]:
        return {part: getattr(self, part) for part in self.PARTS if getattr(self, part)}

    @model_validator(mode="after")
    def _compiles(self) -> Template:
        """Authoring errors surface when the template is saved, with part, line and column."""
        from streams.copy.language import TemplateSyntaxError, compile_template

        for part, source in self.parts().items():
            try:
                compile_template(source)
            except TemplateSyntaxError as exc:
                raise ValueError(f"{part}: {exc}") from None
        return self


class ProviderRoute(BaseModel):
    """One provider behind a channel; several with weights share the traffic and back each other up."""

    model_config = ConfigDict(extra="forbid")
    provider: str
    url: HttpUrl | None = None
    options: dict[str, str] = Field(default_factory=dict)
    # Share of the channel's traffic; 0 makes it a standby, used only while no weighted route can be.
    weight: float = Field(default=1.0, ge=0)


class Channel(Document):
    kind: Literal[ConfigKind.channel] = ConfigKind.channel
    provider: str = Field(description="A scheme from the channel registry, e.g. 'webhook'.")
    # The provider's API root (its public default when unset; a sandbox in tests and the demo).
    # Secrets never travel here: they come from settings.
    url: HttpUrl | None = None
    # The provider's non-secret settings: sender number, SMS sign name and template code, FCM
    # project id, APNs topic, Slack channel … each adapter documents the keys it reads.
    options: dict[str, str] = Field(default_factory=dict)
    # Several providers (failover and weighted sharing); empty: just `provider` above.
    providers: list[ProviderRoute] = Field(default_factory=list, max_length=8)
    timeout_s: float = Field(default=5.0, gt=0)
    # The profile field holding the user's address on this channel.
    address_field: str = "user_id"
    # The provider's rate limit, shared by every worker (a token bucket in Redis); None: unlimited.
    rate_per_s: float | None = Field(default=None, gt=0)
    # Which format rules shape the content for this channel (streams.copy.channels.RULES).
    format: str = "webhook"
    # Shown as the SMS signature (【Brand】 on Chinese SMS) and similar.
    brand: str | None = None
    unsubscribe_url: str | None = None

    def routes(self) -> list[ProviderRoute]:
        """Every provider of the channel, the first being `provider` itself unless routes are listed."""
        return self.providers or [ProviderRoute(provider=self.provider, url=self.url, options=self.options)]

    def for_route(self, index: int) -> Channel:
        """This channel as seen by one of its providers (its url and options over the channel's)."""
        route = self.routes()[index]
        return self.model_copy(
            update={
                "provider": route.provider,
                "url": route.url or self.url,
                "options": {**self.options, **route.options},
            }
        )

    @model_validator(mode="after")
    def _known_format(self) -> Channel:
        from streams.copy.channels import RULES

        if self.format not in RULES:
            raise ValueError(f"format {self.format!r} is not one of {sorted(RULES)}")
        return self


class SegmentDocument(Document):
    """A segment (schemas.segments) as published on the config topic."""

    kind: Literal[ConfigKind.segment] = ConfigKind.segment
    name: str
    root: Node
    description: str | None = None
    status: Literal["active", "paused"] = "active"

    @property
    def segment(self) -> Segment:
        return Segment(id=self.id, name=self.name, root=self.root, description=self.description)

    @model_validator(mode="after")
    def _valid_segment(self) -> SegmentDocument:
        self.segment  # noqa: B018 - the Segment's own checks (depth) apply here too
        return self


class TagRule(Document):
    """Tags that follow from behaviour, as data: an event (optionally with matching properties)
    adds and removes tags, e.g. coupon_claimed → +price_sensitive."""

    kind: Literal[ConfigKind.tag_rule] = ConfigKind.tag_rule
    event_type: str
    # Every listed property must equal the event's (e.g. {"price_type": "full"}).
    when: dict[str, str | int | float | bool] = Field(default_factory=dict)
    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _does_something(self) -> TagRule:
        if not self.add and not self.remove:
            raise ValueError("a tag rule adds or removes at least one tag")
        if set(self.add) & set(self.remove):
            raise ValueError(f"tags both added and removed: {sorted(set(self.add) & set(self.remove))}")
        return self


DOCUMENT_TYPES: dict[ConfigKind, type[Document]] = {
    ConfigKind.campaign: Campaign,
    ConfigKind.template: Template,
    ConfigKind.channel: Channel,
    ConfigKind.segment: SegmentDocument,
    ConfigKind.tag_rule: TagRule,
}


def parse_document(record: ConfigRecord) -> Document:
    return DOCUMENT_TYPES[record.kind].model_validate_json(record.body)
