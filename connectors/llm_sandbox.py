"""An OpenAI-compatible Chat Completions endpoint on loopback, for tests and the demo: Bearer auth, response_format
(json_schema, json_object), tools, streaming (SSE chunks, then [DONE]), usage counts, and the sandbox's faults —
429 with Retry-After, 500, and a malformed share answered with each kind of wrong copy.

Served under /llm by the provider sandbox server (base URL <sandbox_base>/llm/v1); it is not a channel provider.
Good copy is written from the brief in the prompt by the offline phrase tables, seeded by the sandbox's seed.
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext, json_object
from streams.copy.generate import BRIEF_LINE, CopyBrief
from streams.copy.offline import LEVELS, compose

NAME = "llm"
# Every kind of wrong copy the malformed share answers with, in turn.
BAD_KINDS = ("invalid_json", "missing_field", "dropped_field", "unclosed_if", "sms_too_long", "markdown_fences")
_BRIEF = re.compile("^" + re.escape(BRIEF_LINE) + r"(\{.*\})$", re.M)
_RETRY = re.compile(r"^Attempt \d+: your previous answer was rejected:$", re.M)


def context(settings: Any) -> SandboxContext:
    return SandboxContext(scheme=NAME, credentials=settings.llm_api_key, receipt_url="", settings=settings)


def error(message: str, status: int, kind: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        response = error("Rate limit reached for requests. Please try again shortly.", 429, "requests", "rate_limit")
        # The SDK prefers the millisecond header OpenAI also sends; Retry-After is the standard one.
        response.headers["retry-after-ms"] = "50"
        response.headers["Retry-After"] = "1"
        return response
    if fault == "outage":
        return error("The engine is currently overloaded, please try again later.", 503, "server_error")
    return error("The server had an error while processing your request.", 500, "server_error")


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _wrong(kind: str, bundle: dict[str, Any], brief: CopyBrief | None) -> str:
    """One kind of wrong copy made from a good bundle."""
    bundle = dict(bundle)
    if kind == "invalid_json":
        return json.dumps(bundle, ensure_ascii=False)[:-7]
    if kind == "missing_field":
        bundle.pop("long_text", None)
    elif kind == "dropped_field":
        fields = brief.fields if brief else []
        for field in fields:
            bundle["short_text"] = bundle["short_text"].replace(f"${{{field}}}", "").replace(f"{{{field}}}", "")
        if not fields:
            bundle["short_text"] += "${coupon_code}"  # a field nobody supplies
    elif kind == "unclosed_if":
        bundle["short_text"] += "<#if stock < 5>快抢！" if brief and brief.campaign.language == "zh" else "<#if x>hurry"
    elif kind == "sms_too_long":
        # Past what any SMS (3 parts of GSM-7: 459) or push body takes.
        bundle["short_text"] = (bundle["short_text"] + " ") * (1 + 600 // len(bundle["short_text"]))
    elif kind == "markdown_fences":
        return "```json\n" + json.dumps(bundle, ensure_ascii=False, indent=2) + "\n```"
    return json.dumps(bundle, ensure_ascii=False)


def write(box: Sandbox, messages: list[dict[str, Any]], bad: bool) -> tuple[str, str | None]:
    """(the answer's text, the kind of wrong copy or None): copy for the brief in the prompt, plain text without one."""
    prompt = "\n".join(_text(m) for m in messages if isinstance(m, dict))
    found = _BRIEF.search(prompt)
    if found is None:
        return "Hello from the Loopcast LLM sandbox.", None
    payload = json.loads(found.group(1))
    variant = int(payload.pop("variant", 0))
    payload.pop("angle", None)
    brief = CopyBrief.model_validate(payload)
    retries = len(_RETRY.findall(prompt))
    rng = random.Random(f"{box.faults.seed}:{found.group(1)}:{retries}")
    bundle = compose(brief, variant, min(retries, LEVELS - 1), rng).model_dump()
    if not bad:
        return json.dumps(bundle, ensure_ascii=False), None
    kind = BAD_KINDS[box.rng.randrange(len(BAD_KINDS))]
    return _wrong(kind, bundle, brief), kind


def _chunks(text: str, size: int = 16) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    key = ctx.credentials.get_secret_value()

    async def completions(request: web.Request) -> web.Response | web.StreamResponse:
        if request.headers.get("Authorization", "") != f"Bearer {key}":
            box.rejected += 1
            return error("Incorrect API key provided.", 401, "invalid_request_error", "invalid_api_key")
        body = await json_object(request)
        if body is None:
            return error("We could not parse the JSON body of your request.", 400, "invalid_request_error")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not body.get("model"):
            return error(
                "'model' and a non-empty 'messages' are required.", 400, "invalid_request_error", None, "messages"
            )
        tools = body.get("tools") or []
        fmt = body.get("response_format") or {"type": "text"}
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            return error(f"Invalid response_format type {fmt.get('type')!r}.", 400, "invalid_request_error")
        if fmt.get("type") == "json_schema" and not isinstance((fmt.get("json_schema") or {}).get("schema"), dict):
            return error("response_format.json_schema.schema is required.", 400, "invalid_request_error")
        injected = await box.inject(answer)
        if injected is not None and injected.status != 200:
            return injected
        # The malformed share (a 200 the client cannot use): for a model, that is wrong copy in a good envelope.
        text, wrong = write(box, messages, bad=injected is not None)
        # What was answered rides along with the request, for tests to compare with what the client made of it.
        item = box.record({**body, "_answer": {"bad": wrong, "text": text}}, None)
        tool = next((t for t in tools if isinstance(t, dict) and t.get("type") == "function"), None)
        call = None
        if tool is not None and body.get("tool_choice") != "none":
            call = {"id": f"call_{item.provider_message_id}", "type": "function",
                    "function": {"name": tool["function"]["name"], "arguments": text}}  # fmt: skip
        completion_id, created, model = f"chatcmpl-{item.provider_message_id}", int(time.time()), body["model"]
        prompt_tokens = _tokens(json.dumps(messages, ensure_ascii=False))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _tokens(text),
            "total_tokens": prompt_tokens + _tokens(text),
        }
        finish = "tool_calls" if call else "stop"
        if not body.get("stream"):
            message = {"role": "assistant", "content": None if call else text, "refusal": None}
            if call:
                message["tool_calls"] = [call]
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                    "usage": usage,
                    "system_fingerprint": "fp_loopcast_sandbox",
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                chunk["usage"] = None
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

        if call:
            head = {**call, "index": 0, "function": {"name": call["function"]["name"], "arguments": ""}}
            await send({"role": "assistant", "content": None, "tool_calls": [head]})
            for piece in _chunks(text):
                await send({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            await send({"role": "assistant", "content": ""})
            for piece in _chunks(text):
                await send({"content": piece})
        await send({}, finish)
        if include_usage:
            tail = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage}  # fmt: skip
            await response.write(f"data: {json.dumps(tail)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(request: web.Request) -> web.Response:
        if request.headers.get("Authorization", "") != f"Bearer {key}":
            return error("Incorrect API key provided.", 401, "invalid_request_error", "invalid_api_key")
        return web.json_response({"object": "list", "data": [{"id": "loopcast-sandbox", "object": "model"}]})

    return [web.post("/v1/chat/completions", completions), web.get("/v1/models", models)]
