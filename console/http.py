"""The worker's HTTP side: tracked-link redirects, provider receipts, event ingest, and the
read-only SQL endpoint over the chDB this process owns.

Everything that happens here becomes a Kafka record (an outcome or an event); nothing is
written anywhere else, so the loop stays replayable.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from connectors.channels.base import ReceiptRejected, ReceiptRequest, adapter_class
from connectors.inbox_store import InboxStore
from connectors.kafka import send_keyed
from connectors.policy_store import PolicyStore
from connectors.state import State
from infra import topics
from infra.settings import Settings
from schemas.contracts import encode
from schemas.models import Event, Outcome, OutcomeCode, assemble, now_utc
from streams.dispatch import fall_back
from streams.links import LinkClaims, read_token, read_unsubscribe_token
from streams.policy import Category, Preferences, apply_unsubscribe, unsubscribe_keyword

log = logging.getLogger("loopcast.http")
MAX_INGEST_BATCH = 1000


def _ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


class Endpoints:
    def __init__(
        self,
        settings: Settings,
        state: State,
        producer: AIOKafkaProducer,
        policy: PolicyStore,
        ready: Callable[[], bool] = lambda: True,
        warehouse=None,
    ) -> None:
        self.settings = settings
        # The warehouse this process owns (None elsewhere): the knowledge base copy generation learns from.
        self.warehouse = warehouse
        self.state = state
        self.policy = policy
        self.producer = producer
        self.ready = ready
        self._credentials: dict[str, object] = {}
        self.inbox = InboxStore(settings.redis)

    async def publish(self, topic: str, key: str, value) -> None:
        await self.producer.send_and_wait(topic, encode(value), key=key.encode())

    async def health(self, request: web.Request) -> web.Response:
        ready = self.ready()
        # ?ready=1 asks "can you process yet" (config caught up), for process supervisors.
        status = 503 if request.query.get("ready") and not ready else 200
        return web.json_response({"ok": True, "ready": ready}, status=status)

    async def click(self, request: web.Request) -> web.Response:
        try:
            claims = read_token(self.settings.link_secret.get_secret_value(), request.match_info["token"])
        except (ValueError, json.JSONDecodeError, ValidationError) as exc:
            raise web.HTTPNotFound(text=f"unknown link: {exc}") from None
        return await self.clicked(claims)

    async def short_click(self, request: web.Request) -> web.Response:
        stored = await self.state.short_link(request.match_info["code"])
        if stored is None:
            raise web.HTTPNotFound(text="unknown or expired link")
        return await self.clicked(LinkClaims.model_validate_json(stored))

    async def clicked(self, claims: LinkClaims) -> web.Response:
        outcome = Outcome(
            message_id=claims.message_id,
            campaign_id=claims.campaign_id,
            user_id=claims.user_id,
            channel=claims.channel,
            code=OutcomeCode.clicked,
            stage="tracking",
            triggered_at=_ms(claims.triggered_at_ms),
        )
        await self.publish(topics.OUTCOMES.name, outcome.user_id, outcome)
        raise web.HTTPFound(claims.url)

    async def unsubscribe_link(self, request: web.Request) -> web.Response:
        """GET shows the result, POST is RFC 8058 one-click (mail providers POST without a person)."""
        try:
            user_id, channel = read_unsubscribe_token(
                self.settings.link_secret.get_secret_value(), request.match_info["token"]
            )
        except (ValueError, json.JSONDecodeError) as exc:
            raise web.HTTPNotFound(text=f"unknown link: {exc}") from None
        await self.unsubscribe(user_id, channel=channel, category=None)
        return web.Response(text=f"You will no longer receive messages on {channel}.")

    async def inbound_sms(self, request: web.Request) -> web.Response:
        """A user's SMS reply; a whole-message keyword (TD, 退订, STOP…) opts them out of marketing."""
        try:
            body = await request.json()
            user_id, text = str(body["user_id"]), str(body["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise web.HTTPBadRequest(text=f"malformed inbound SMS: {exc!r}") from None
        if not unsubscribe_keyword(text):
            return web.json_response({"unsubscribed": False})
        # Marketing only: blocking the SMS channel would also stop the user's one-time codes.
        await self.unsubscribe(user_id, channel=None, category=Category.marketing)
        return web.json_response({"unsubscribed": True})

    async def unsubscribe_api(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
            category = Category(body["category"]) if body.get("category") else None
        except (ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(text=f"bad request: {exc}") from None
        prefs = await self.unsubscribe(request.match_info["user_id"], channel=body.get("channel"), category=category)
        return web.json_response(prefs.model_dump(mode="json"))

    async def unsubscribe(self, user_id: str, *, channel: str | None, category: Category | None) -> Preferences:
        [stored] = await self.policy.preferences([user_id])
        prefs = apply_unsubscribe(Preferences.model_validate(stored or {}), channel=channel, category=category)
        await self.policy.put_preferences(user_id, prefs.model_dump(mode="json"))
        log.info("unsubscribed %s (channel=%s, category=%s)", user_id, channel, category)
        return prefs

    async def receipt(self, request: web.Request) -> web.Response:
        """Any provider's delivery callback: its adapter verifies and parses it; each receipt
        becomes a `delivered` / `undelivered` outcome of the message it belongs to."""
        scheme = request.match_info["scheme"]
        try:
            cls = adapter_class(scheme)
        except LookupError:
            raise web.HTTPNotFound(text=f"no provider {scheme!r}") from None
        credentials = self._credentials.get(scheme)
        if credentials is None:
            credentials = self._credentials[scheme] = cls.credentials_from(self.settings)
        call = ReceiptRequest(
            method=request.method,
            url=str(request.url),
            headers=request.headers,
            body=await request.read(),
            query=request.query,
        )
        try:
            receipts = cls.parse_receipts(credentials, call)
        except ReceiptRejected as exc:
            log.warning("receipt from %s refused (%s): %s", scheme, exc.status, exc)
            return web.json_response({"ok": False, "reason": str(exc)}, status=exc.status)
        unknown, outcomes, settling = 0, [], []
        targets = await self.state.receipt_targets(scheme, [r.provider_message_id for r in receipts])
        for receipt, target in zip(receipts, targets, strict=True):
            if target is None:
                unknown += 1
                continue
            # Assembled from what dispatch recorded of the send (strings it wrote), not validated again.
            outcome = assemble(
                Outcome,
                {
                    "message_id": target["message_id"],
                    "campaign_id": target["campaign_id"],
                    "user_id": target["user_id"],
                    "channel": target["channel"],
                    "code": OutcomeCode.delivered if receipt.delivered else OutcomeCode.undelivered,
                    "stage": "receipt",
                    "reason": None if receipt.delivered else receipt.error_code or "undelivered",
                    "provider": scheme,
                    "provider_message_id": receipt.provider_message_id,
                    "triggered_at": datetime.fromisoformat(target["triggered_at"]),
                    "occurred_at": now_utc(),
                    "variant": None,
                    "attempt": None,
                    "fallback_of": target.get("fallback_of"),
                },
            )
            outcomes.append((outcome.user_id.encode(), encode(outcome)))
            if target.get("fallback"):
                settling.append((outcome.message_id, receipt.delivered))
        # A callback's receipts as whole record batches (a send per receipt cost more than the receipt).
        published = await send_keyed(self.producer, topics.OUTCOMES.name, outcomes) if outcomes else []
        for message_id, delivered in settling:
            await self.settle_fallback(message_id, delivered)
        # Answered only once every outcome is in Kafka: a provider retries a receipt we did not take.
        await asyncio.gather(*published)
        if unknown:
            # A receipt can overtake our record of the send; a 404 makes the provider retry,
            # as SMS gateways and push services do for any non-2xx answer.
            log.info("%d receipt(s) from %s for message ids not known yet", unknown, scheme)
            return web.json_response({"ok": False, "reason": "unknown message id"}, status=404)
        status, body, content_type = cls.receipt_answer()
        return web.Response(status=status, text=body, content_type=content_type)

    # The in-app inbox: what an app shows in its message centre --------------------------------
    async def inbox_list(self, request: web.Request) -> web.Response:
        try:
            limit = min(int(request.query.get("limit", 50)), 200)
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be a number") from None
        user_id = request.match_info["user_id"]
        items = await self.inbox.list(user_id, limit=limit, before=request.query.get("before"))
        return web.json_response(
            {
                "items": [i.model_dump(mode="json") for i in items],
                "unread": await self.inbox.unread_count(user_id),
                # The next page starts after the last item of this one.
                "next_before": items[-1].message_id if len(items) == limit else None,
            }
        )

    async def inbox_unread(self, request: web.Request) -> web.Response:
        return web.json_response({"unread": await self.inbox.unread_count(request.match_info["user_id"])})

    async def inbox_read(self, request: web.Request) -> web.Response:
        """Body {"message_ids": [...]} marks those read; no body (or no ids) marks all read."""
        try:
            body = await request.json() if request.can_read_body else {}
            ids = body.get("message_ids")
            if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
                raise ValueError("message_ids must be a list of strings")
        except (ValueError, AttributeError) as exc:
            raise web.HTTPBadRequest(text=f"bad request: {exc}") from None
        user_id = request.match_info["user_id"]
        changed = await self.inbox.mark_read(user_id, ids)
        return web.json_response({"marked_read": changed, "unread": await self.inbox.unread_count(user_id)})

    async def settle_fallback(self, message_id: str, delivered: bool) -> None:
        """A delivered message needs no fallback channel; an undelivered one starts it."""
        if delivered:
            await self.state.drop_fallbacks([message_id])
            return
        following: list[tuple[str, str, object]] = []
        await fall_back(self.state, lambda topic, key, value: following.append((topic, key, value)), message_id)
        for topic, key, value in following:
            await self.publish(topic, key, value)

    async def ingest(self, request: web.Request) -> web.Response:
        """POST one event or a list of events as JSON; invalid ones are refused with reasons."""
        try:
            payload = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"invalid JSON: {exc}") from None
        items = payload if isinstance(payload, list) else [payload]
        if len(items) > MAX_INGEST_BATCH:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_INGEST_BATCH, actual_size=len(items))
        events, errors = [], []
        for index, item in enumerate(items):
            try:
                events.append(Event.model_validate(item))
            except ValidationError as exc:
                errors.append({"index": index, "errors": exc.errors(include_url=False, include_context=False)})
        if errors:
            return web.json_response({"accepted": 0, "errors": errors}, status=400, dumps=_dumps)
        for event in events:
            await self.producer.send(topics.EVENTS.name, encode(event), key=event.user_id.encode())
        await self.producer.flush()
        return web.json_response({"accepted": len(events)}, status=202)

    async def copy_generate(self, request: web.Request) -> web.Response:
        """POST a copy brief (streams.copy.generate.CopyBrief as JSON); the generated and rejected copy come back.
        The best copy sent (on ?trigger_event=…, else on any) is shown to the writer as examples."""
        from connectors.knowledge import examples_for
        from connectors.llm import LlmError, writer_for
        from streams.copy.generate import CopyBrief, generate

        try:
            brief = CopyBrief.model_validate_json(await request.read())
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            return web.json_response({"errors": errors}, status=400, dumps=_dumps)
        examples = []
        if self.warehouse is not None:
            trigger = request.query.get("trigger_event")
            examples = await asyncio.to_thread(examples_for, self.warehouse, trigger_event=trigger)
        writer = writer_for(self.settings)
        try:
            result = await generate(brief, writer, examples, attempts=self.settings.llm_attempts)
        except LlmError as exc:
            return web.json_response({"error": str(exc)}, status=502)
        finally:
            await writer.close()
        body = {**result.model_dump(mode="json"), "examples": [e.model_dump(mode="json") for e in examples]}
        return web.json_response(body, dumps=_dumps)


def _dumps(value) -> str:
    return json.dumps(value, default=str)


def build_app(endpoints: Endpoints, warehouse=None) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.add_routes(
        [
            web.get("/healthz", endpoints.health),
            web.get("/c/{token}", endpoints.click),
            web.get("/s/{code}", endpoints.short_click),
            web.post("/receipts/{scheme}", endpoints.receipt),
            web.get("/receipts/{scheme}", endpoints.receipt),
            web.post("/v1/events", endpoints.ingest),
            web.post("/v1/copy/generate", endpoints.copy_generate),
            web.get("/u/{token}", endpoints.unsubscribe_link),
            web.post("/u/{token}", endpoints.unsubscribe_link),
            web.post("/inbound/sms", endpoints.inbound_sms),
            web.post("/v1/users/{user_id}/unsubscribe", endpoints.unsubscribe_api),
            web.get("/v1/users/{user_id}/inbox", endpoints.inbox_list),
            web.get("/v1/users/{user_id}/inbox/unread", endpoints.inbox_unread),
            web.post("/v1/users/{user_id}/inbox/read", endpoints.inbox_read),
        ]
    )
    if warehouse is not None:
        from connectors.warehouse import sql_routes

        app.add_routes(sql_routes(warehouse))

    async def close(_: web.Application) -> None:
        await endpoints.inbox.close()

    app.on_cleanup.append(close)
    return app


async def start_http(
    settings: Settings,
    state: State,
    producer: AIOKafkaProducer,
    policy: PolicyStore,
    warehouse=None,
    ready=lambda: True,
) -> web.AppRunner:
    endpoints = Endpoints(settings, state, producer, policy, ready, warehouse)
    runner = web.AppRunner(build_app(endpoints, warehouse), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.http_port).start()
    log.info("HTTP endpoints on %s", settings.http_base)
    return runner
