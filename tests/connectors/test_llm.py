"""The LLM client against the LLM sandbox over loopback: both structured-output modes, streaming, recovery from
429/500, auth errors; and the acceptance run — 200+ generations with a sandbox that often answers wrong copy, of
which every accepted one compiles, keeps its fields and fits every target channel, and every rejected one was
asked for again with its reasons."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from connectors.channels.sandboxes import build_app
from connectors.channels.sandboxes.core import Sandbox
from connectors.llm import LlmClient, LlmError, LlmWriter
from connectors.llm_sandbox import BAD_KINDS
from infra.settings import Settings
from streams.copy.channels import Content, adapt
from streams.copy.generate import (
    BRIEF_LINE,
    SAMPLE_LINK,
    SAMPLE_UNSUBSCRIBE,
    TEXT_PARTS,
    CopyBrief,
    brief_payload,
    bundle_schema,
    check,
    generate,
    messages_for,
    sample_values,
)
from streams.copy.language import compile_template
from tests.ports import free_port

pytestmark = pytest.mark.integration

BRIEF = {
    "product": {"name": "Loopcast 降噪耳机 Pro", "price": "299", "selling_points": ["40 小时续航", "主动降噪"]},
    "campaign": {"goal": "清库存", "phase": "peak", "offer": "满300减50", "tone": "活泼", "language": "zh"},
    "persona": "25-35 岁通勤白领",
    "fields": ["name", "product_name", "stock"],
    "channels": ["sms-cn", "push-fcm", "email", "wecom"],
    "variants": 3,
}


@dataclass
class Served:
    settings: Settings
    box: Sandbox
    http: aiohttp.ClientSession

    @property
    def base_url(self) -> str:
        return f"{self.settings.sandbox_base}/llm/v1"

    def client(self, mode: str = "json_schema", **kwargs) -> LlmClient:
        return LlmClient(
            self.base_url, self.settings.llm_api_key.get_secret_value(), "sandbox-model", mode=mode, **kwargs
        )

    async def faults(self, **faults) -> None:
        async with self.http.post(f"{self.settings.sandbox_base}/_sandbox/llm/faults", json=faults) as response:
            assert response.status == 200

    async def requests(self) -> list[dict]:
        async with self.http.get(f"{self.settings.sandbox_base}/_sandbox/llm/requests?limit=100000") as response:
            return [item["body"] for item in (await response.json())["items"]]


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[Served]:
    port = free_port()
    settings = Settings(sandbox_port=port)
    app, boxes = build_app(settings, [], llm=True)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, port).start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Served(settings, boxes["llm"], http)
    finally:
        await runner.cleanup()


def chat() -> list[dict[str, str]]:
    return messages_for(CopyBrief.model_validate(BRIEF))


@pytest.mark.parametrize("mode", ["json_schema", "tools"])
def test_structured_output_in_both_modes(mode: str) -> None:
    async def run() -> None:
        async with served() as s:
            client = s.client(mode)
            completion = await client.complete_json(chat(), bundle_schema())
            await client.close()
            assert json.loads(completion.text)["short_text"]
            assert (
                completion.usage["total_tokens"]
                == completion.usage["prompt_tokens"] + completion.usage["completion_tokens"]
                > 0
            )
            [request] = await s.requests()
            if mode == "json_schema":
                assert request["response_format"]["type"] == "json_schema"
                assert request["response_format"]["json_schema"]["schema"] == bundle_schema()
            else:
                assert "response_format" not in request
                assert request["tools"][0]["function"]["parameters"] == bundle_schema()
                assert request["tool_choice"] == {"type": "function", "function": {"name": "copy_bundle"}}

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["json_schema", "tools"])
def test_streaming_reports_progress_and_gives_the_same_answer(mode: str) -> None:
    async def run() -> None:
        async with served() as s:
            await s.faults(seed=5)
            client = s.client(mode)
            whole = await client.complete_json(chat(), bundle_schema())
            seen: list[int] = []
            streamed = await client.complete_json(chat(), bundle_schema(), on_delta=seen.append)
            await client.close()
            assert streamed.text == whole.text
            assert len(seen) > 3 and seen == sorted(seen) and seen[-1] == len(whole.text)
            assert streamed.usage["completion_tokens"] > 0
            assert (await s.requests())[-1]["stream"] is True

    asyncio.run(run())


def test_the_sdk_recovers_from_429_and_500() -> None:
    async def run() -> None:
        async with served() as s:
            await s.faults(throttle_rate=0.4, error_rate=0.2, seed=3)
            async with s.http.post(
                f"{s.base_url}/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {s.settings.llm_api_key.get_secret_value()}"},
            ) as response:
                first = (response.status, response.headers.get("Retry-After"), await response.json())
            client = s.client(max_retries=8)
            texts = [(await client.complete_json(chat(), bundle_schema())).text for _ in range(12)]
            await client.close()
            assert all(json.loads(t)["title"] for t in texts)
            assert s.box.faulted >= 3  # 429s and 500s really were answered, and retried
            assert first[0] in (200, 429, 500)
            if first[0] == 429:
                assert first[1] == "1" and first[2]["error"]["code"] == "rate_limit"

    asyncio.run(run())


def test_a_throttled_answer_is_openai_shaped_with_retry_after() -> None:
    async def run() -> None:
        async with served() as s:
            await s.faults(throttle_rate=1.0)
            async with s.http.post(
                f"{s.base_url}/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {s.settings.llm_api_key.get_secret_value()}"},
            ) as response:
                assert response.status == 429 and response.headers["Retry-After"] == "1"
                assert (await response.json())["error"]["type"] == "requests"
            client = s.client(max_retries=1)
            with pytest.raises(LlmError, match="429"):
                await client.complete_json(chat(), bundle_schema())
            await client.close()

    asyncio.run(run())


def test_a_wrong_key_is_a_clear_error() -> None:
    async def run() -> None:
        async with served() as s:
            client = LlmClient(s.base_url, "not-the-key", "m")
            with pytest.raises(LlmError, match="401: Incorrect API key"):
                await client.complete_json(chat(), bundle_schema())
            await client.close()
            assert s.box.rejected == 1

    asyncio.run(run())


# --- acceptance -------------------------------------------------------------------------------------------------

PRODUCTS = [
    {"name": "Loopcast 降噪耳机 Pro", "price": "299", "selling_points": ["40 小时续航", "主动降噪"]},
    {"name": "山茶花精华液", "price": "168", "selling_points": ["温和不刺激", "三天见效"]},
    {"name": "Trail Runner 3", "price": "89", "selling_points": ["Light as air", "Grippy sole"]},
]
CHANNEL_SETS = [
    ["sms-cn", "push-fcm", "email", "wecom"],
    ["sms-cn", "push-huawei", "push-apns"],
    ["sms", "push-apns", "telegram", "slack", "email"],
    ["push-xiaomi", "feishu", "dingtalk", "inbox", "webhook"],
]
FIELD_SETS = [["name", "product_name", "stock"], ["name", "lastPurchaseDate"], ["name", "price"], []]


def acceptance_briefs(count: int) -> list[CopyBrief]:
    briefs = []
    for i in range(count):
        language = "en" if i % 3 == 2 else "zh"
        briefs.append(
            CopyBrief.model_validate(
                {
                    "product": PRODUCTS[i % len(PRODUCTS)],
                    "campaign": {
                        "goal": "clear stock" if language == "en" else "清库存",
                        "phase": ("warm-up", "peak", "long-tail")[i % 3],
                        "offer": "20% off" if language == "en" else "满300减50",
                        "tone": "warm",
                        "language": language,
                    },
                    # Each brief differs, so that a request can be traced back to its brief and variant.
                    "persona": f"shoppers of cohort {i}",
                    "fields": FIELD_SETS[i % len(FIELD_SETS)],
                    "channels": CHANNEL_SETS[i % len(CHANNEL_SETS)],
                    "variants": 5,
                }
            )
        )
    return briefs


_ATTEMPT = re.compile(r"^Attempt (\d+):", re.M)


def test_acceptance_200_generations_with_bad_output() -> None:
    attempts = 6
    briefs = acceptance_briefs(42)  # 210 variants

    async def run():
        async with served() as s:
            await s.faults(malformed_rate=0.45, throttle_rate=0.05, error_rate=0.05, seed=11)
            writers = [LlmWriter(s.client("json_schema")), LlmWriter(s.client("tools"))]
            results = []
            for start in range(0, len(briefs), 6):
                chunk = briefs[start : start + 6]
                results += await asyncio.gather(
                    *(generate(b, writers[(start + i) % 2], attempts=attempts) for i, b in enumerate(chunk))
                )
            for writer in writers:
                await writer.close()
            return results, await s.requests(), s.box.faulted

    results, requests, faulted = asyncio.run(run())
    generations = sum(b.variants for b in briefs)
    accepted = [(brief, copy) for brief, result in zip(briefs, results, strict=True) for copy in result.accepted]
    assert generations >= 200 and len(accepted) >= 0.95 * generations
    assert faulted > 0

    # 100 % of accepted copy compiles, keeps its fields and fits every target channel without being cut.
    for brief, copy in accepted:
        bundle = copy.bundle
        compiled = {p: compile_template(getattr(bundle, p)) for p in ("title", "short_text", "long_text", "cta")}
        for part in TEXT_PARTS:
            names = {f.removeprefix("user.").removeprefix("event.") for f in compiled[part].fields}
            assert set(brief.fields) <= names, (part, bundle)
        for values in sample_values(brief):
            parts = {p: t.render(values) for p, t in compiled.items()}
            for long_text in (parts["long_text"], None):
                content = Content(**{**parts, "long_text": long_text, "link": SAMPLE_LINK})
                for kind in brief.channels:
                    adapted = adapt(content, kind, brand=brief.brand, unsubscribe_url=SAMPLE_UNSUBSCRIBE)
                    assert not adapted.extra["truncated"] and "cta" not in adapted.extra.get("dropped", []), kind
        assert check(bundle, brief) == []

    # Every kind of wrong copy was served, and each but the fenced one (read anyway) led to a rejection.
    served_kinds = {r["_answer"]["bad"] for r in requests if r["_answer"]["bad"]}
    assert served_kinds == set(BAD_KINDS)
    rejected_outputs = {r.output for result in results for r in result.rejected}
    for request in requests:
        kind = request["_answer"]["bad"]
        if kind and kind != "markdown_fences":
            assert request["_answer"]["text"] in rejected_outputs, kind

    # Each rejected attempt was followed by a request carrying its reasons to the sandbox.
    followups: dict[tuple[str, int], str] = {}
    for request in requests:
        user = [m["content"] for m in request["messages"] if m["role"] == "user"]
        brief_line = next(line for line in user[0].splitlines() if line.startswith(BRIEF_LINE))
        found = _ATTEMPT.search(user[-1])
        followups[(brief_line, int(found.group(1)) if found else 1)] = user[-1]
    retried = 0
    for brief, result in zip(briefs, results, strict=True):
        for rejected in result.rejected:
            if rejected.attempt == attempts:
                continue
            line = BRIEF_LINE + json.dumps(brief_payload(brief, rejected.variant), ensure_ascii=False)
            followup = followups[(line, rejected.attempt + 1)]
            assert all(problem in followup for problem in rejected.problems), (rejected, followup)
            retried += 1
    assert retried >= 50
