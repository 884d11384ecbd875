"""The OpenAI-compatible client copy generation writes with: structured output from a JSON schema (response_format
json_schema, or a forced function call for endpoints without it), optional streaming for progress, and the SDK's
own retries of 429 (after Retry-After) and 5xx answers. `writer_for(settings)` picks it, or the offline writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import openai

from infra.settings import Settings
from streams.copy.generate import CopyBrief, Writer, bundle_schema
from streams.copy.offline import OfflineWriter

Mode = Literal["json_schema", "tools"]
SCHEMA_NAME = "copy_bundle"


class LlmError(RuntimeError):
    """The endpoint did not answer usably after the SDK's retries: unreachable, refused, or no content."""


@dataclass
class Completion:
    text: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)


class LlmClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        mode: Mode = "json_schema",
        timeout_s: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        self.base_url, self.model, self.mode = base_url, model, mode
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)

    @classmethod
    def from_settings(cls, settings: Settings) -> LlmClient:
        if not settings.llm_base_url:
            raise LlmError("no LLM endpoint configured (LOOPCAST_LLM_BASE_URL)")
        return cls(
            settings.llm_base_url,
            settings.llm_api_key.get_secret_value(),
            settings.llm_model,
            mode=settings.llm_output_mode,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_http_retries,
        )

    def _structured(self, schema: dict[str, Any], name: str) -> dict[str, Any]:
        if self.mode == "tools":
            function = {"name": name, "description": "Submit the copy.", "parameters": schema, "strict": True}
            return {
                "tools": [{"type": "function", "function": function}],
                "tool_choice": {"type": "function", "function": {"name": name}},
            }
        return {
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        }

    async def complete_json(
        self,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        name: str = SCHEMA_NAME,
        *,
        on_delta: Callable[[int], None] | None = None,
    ) -> Completion:
        """The model's JSON answer as text (not yet validated: that is the caller's check). Streams when `on_delta`
        is given, calling it with the characters received so far."""
        kwargs = {"model": self.model, "messages": messages, **self._structured(schema, name)}
        try:
            if on_delta is None:
                response = await self.client.chat.completions.create(**kwargs)
                return self._read(response)
            stream = await self.client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
            return await self._collect(stream, on_delta)
        except openai.APIStatusError as exc:
            raise LlmError(f"LLM endpoint {self.base_url} answered {exc.status_code}: {_message(exc)}") from None
        except openai.APITimeoutError:
            raise LlmError(f"LLM endpoint {self.base_url} did not answer in time") from None
        except openai.APIConnectionError as exc:
            raise LlmError(f"LLM endpoint {self.base_url} is unreachable: {exc}") from None

    def _read(self, response: Any) -> Completion:
        if not response.choices:
            raise LlmError(f"LLM endpoint {self.base_url} answered without choices")
        message = response.choices[0].message
        calls = message.tool_calls or []
        text = calls[0].function.arguments if calls else message.content
        if text is None:
            raise LlmError(f"LLM endpoint {self.base_url} answered no content (refusal: {message.refusal})")
        usage = (
            response.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
            if (response.usage)
            else {}
        )
        return Completion(text=text, model=response.model, usage=usage)

    async def _collect(self, stream: Any, on_delta: Callable[[int], None]) -> Completion:
        pieces: list[str] = []
        received, model, usage = 0, self.model, {}
        async for chunk in stream:
            model = chunk.model or model
            if chunk.usage:
                usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
            for choice in chunk.choices:
                delta = choice.delta
                piece = delta.content or "".join(
                    (call.function.arguments or "") for call in (delta.tool_calls or []) if call.function
                )
                if piece:
                    pieces.append(piece)
                    received += len(piece)
                    on_delta(received)
        return Completion(text="".join(pieces), model=model, usage=usage)

    async def close(self) -> None:
        await self.client.close()


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(exc.message)


class LlmWriter:
    """The Writer over an endpoint: each candidate is one chat completion in the bundle's schema."""

    def __init__(self, client: LlmClient) -> None:
        self.client = client
        self.source = f"llm:{client.model}"
        self.usage: dict[str, int] = {}

    async def write(
        self,
        brief: CopyBrief,
        messages: list[dict[str, str]],
        *,
        variant: int,
        attempt: int,
        on_delta: Callable[[int], None] | None = None,
    ) -> str:
        completion = await self.client.complete_json(messages, bundle_schema(), on_delta=on_delta)
        for key, value in completion.usage.items():
            self.usage[key] = self.usage.get(key, 0) + (value or 0)
        return completion.text

    async def close(self) -> None:
        await self.client.close()


def writer_for(settings: Settings) -> Writer:
    """The LLM writer when an endpoint is configured, else the offline one (its results say source "offline")."""
    if settings.llm_base_url:
        return LlmWriter(LlmClient.from_settings(settings))
    return OfflineWriter()
