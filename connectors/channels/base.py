"""The contract every channel provider implements, and the registry that finds them by scheme.

Adding a provider is one module here plus one registry entry: no central switch elsewhere.
"""

from __future__ import annotations

import abc
import importlib
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from schemas.config import Channel
from schemas.models import RenderedMessage


class DeliveryStatus(StrEnum):
    accepted = "accepted"  # the provider took it; a receipt may follow
    failed = "failed"


class DeliveryResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    status: DeliveryStatus
    provider_message_id: str | None = None
    retryable: bool = False
    error_code: str | None = None
    raw: str | None = None


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True)
    body_maxlen: int | None = None
    title_maxlen: int | None = None
    rate_per_s: float | None = None


class ChannelAdapter(abc.ABC):
    scheme: ClassVar[str]
    channel_kind: ClassVar[str]
    limits: ClassVar[Limits] = Limits()
    returns_provider_ids: ClassVar[bool] = False
    sends_receipts: ClassVar[bool] = False

    class Credentials(BaseModel):
        """Secrets come from settings, never from a Kafka message."""

    @classmethod
    def credentials_from(cls, settings) -> BaseModel:
        """The provider's secrets, read from settings (never from a Kafka message); each provider
        says which settings it needs, so the runtime has no per-provider code."""
        return cls.Credentials()

    def __init__(self, channel: Channel, credentials: BaseModel) -> None:
        self.channel = channel
        self.credentials = credentials

    @abc.abstractmethod
    async def send(self, message: RenderedMessage) -> DeliveryResult: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


# scheme -> "module:Class"; imported on first use so a provider's SDK loads only when configured.
REGISTRY: dict[str, str] = {
    "webhook": "connectors.channels.webhook:WebhookAdapter",
}


def adapter_class(scheme: str) -> type[ChannelAdapter]:
    try:
        module_name, class_name = REGISTRY[scheme].split(":")
    except KeyError:
        raise LookupError(f"no channel provider registered for scheme {scheme!r}") from None
    return getattr(importlib.import_module(module_name), class_name)
