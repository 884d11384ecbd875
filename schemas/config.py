"""Documents on the loopcast.config topic: campaigns, templates and channel settings.

They travel as JSON inside a ConfigRecord; these models validate them when they are published
and again when a worker materialises them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from schemas.models import ConfigKind, ConfigRecord, Priority


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


class Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: str


class Audience(BaseModel):
    """Who a campaign may reach: everyone who triggers it, or only listed users."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["all", "users"] = "all"
    user_ids: list[str] = Field(default_factory=list)


class Campaign(Document):
    kind: Literal[ConfigKind.campaign] = ConfigKind.campaign
    name: str
    status: Literal["active", "paused"] = "active"
    trigger: Trigger
    audience: Audience = Field(default_factory=Audience)
    channel: str
    template_id: str
    priority: Priority = Priority.normal
    # Messages per user per local day across all campaigns; None uses the global setting.
    daily_cap: int | None = Field(default=None, ge=0)
    # A later event of this type by the same user counts as a conversion of this campaign.
    conversion_event: str | None = None
    attribution_window_hours: int = Field(default=72, ge=1)


class Template(Document):
    kind: Literal[ConfigKind.template] = ConfigKind.template
    title: str | None = None
    body: str
    # Where a click should land; rendered like the body, then wrapped in a tracked redirect.
    link: str | None = None


class Channel(Document):
    kind: Literal[ConfigKind.channel] = ConfigKind.channel
    provider: str = Field(description="A scheme from the channel registry, e.g. 'webhook'.")
    # Provider endpoint; secrets never travel here, they come from settings.
    url: HttpUrl | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    # The profile field holding the user's address on this channel.
    address_field: str = "user_id"


DOCUMENT_TYPES: dict[ConfigKind, type[Document]] = {
    ConfigKind.campaign: Campaign,
    ConfigKind.template: Template,
    ConfigKind.channel: Channel,
}


def parse_document(record: ConfigRecord) -> Document:
    return DOCUMENT_TYPES[record.kind].model_validate_json(record.body)
