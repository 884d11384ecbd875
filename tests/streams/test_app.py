"""The shared batch loop: a poisoned item is isolated and dead-lettered, the rest flow on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from infra import topics
from schemas.contracts import codec
from schemas.models import DeadLetter, Event
from streams.app import _handle
from streams.runtime import Output
from streams.topology import STAGES

pytestmark = pytest.mark.unit


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


def event(user: str) -> Event:
    return Event(event_id=f"e-{user}", event_type="t", user_id=user, occurred_at=datetime(2026, 1, 1, tzinfo=UTC))


async def picky_handler(rt, out: Output, events: list[Event]) -> None:
    for e in events:
        if e.user_id == "poison":
            raise KeyError("no such thing")
        out.send(topics.MATCHED.name, e.user_id, e)


def test_poisoned_item_is_dead_lettered_and_the_rest_pass() -> None:
    spec = next(s for s in STAGES if s.name == "match")
    good = [
        (Message("loopcast.events", 0, n, b"k", f"raw{n}".encode()), event(u))
        for n, u in enumerate(["a", "poison", "b"])
    ]
    out = Output()
    asyncio.run(_handle(None, out, spec, picky_handler, good))
    sent = [(topic, key) for topic, key, _ in out.items]
    assert sent == [(topics.MATCHED.name, b"a"), (topics.DLQ.name, b"match"), (topics.MATCHED.name, b"b")]
    letter = codec(DeadLetter).decode(out.items[1][2])
    assert (letter.offset, letter.original, letter.stage) == (1, b"raw1", "match")
    assert "KeyError" in letter.reason and "no such thing" in letter.reason


def test_a_record_two_stages_read_is_decoded_once_and_shared() -> None:
    from schemas.contracts import encode
    from streams.runtime import SharedDecodes

    shared = SharedDecodes({topics.OUTCOMES.name: 2, topics.MATCHED.name: 1})
    calls: list[bytes] = []

    def decode(data: bytes) -> Event:
        calls.append(data)
        return codec(Event).decode(data)

    first = Message(topics.OUTCOMES.name, 0, 7, None, encode(event("a")))
    value = shared.decode(first, decode)
    assert shared.decode(first, decode) is value  # the second reader: no decode
    assert len(calls) == 1
    assert not shared.values  # both readers had it: nothing kept
    # A topic only one stage reads is never kept.
    alone = Message(topics.MATCHED.name, 0, 7, None, encode(event("b")))
    shared.decode(alone, decode)
    assert len(calls) == 2 and not shared.values


def test_shared_decodes_forget_the_oldest_beyond_their_size() -> None:
    from schemas.contracts import encode
    from streams.runtime import SharedDecodes

    shared = SharedDecodes({topics.OUTCOMES.name: 2}, size=3)
    for offset in range(5):
        shared.decode(Message(topics.OUTCOMES.name, 0, offset, None, encode(event(f"u{offset}"))), codec(Event).decode)
    assert [key[2] for key in shared.values] == [2, 3, 4]


def test_a_value_passed_on_unchanged_goes_out_as_the_bytes_it_came_in() -> None:
    from schemas.contracts import encode

    spec = next(s for s in STAGES if s.name == "match")
    original = encode(event("a"))
    value = codec(Event).decode(original)

    async def pass_on(rt, out: Output, events: list[Event]) -> None:
        for e in events:
            out.send(topics.MATCHED.name, e.user_id, e)
            out.send(topics.MATCHED.name, e.user_id, e.model_copy(update={"user_id": "z"}))

    out = Output()
    asyncio.run(_handle(None, out, spec, pass_on, [(Message("loopcast.events", 0, 0, b"a", original), value)],
                        {id(value): original}))  # fmt: skip
    assert out.items[0][2] is original
    assert codec(Event).decode(out.items[1][2]) == value.model_copy(update={"user_id": "z"})
