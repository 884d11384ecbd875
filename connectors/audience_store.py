"""Redis: audiences as roaring bitmaps over dense user ints — segment members, uploaded packages and
the string-id ↔ int map they rest on, so segment sizes and set algebra take milliseconds, not scans."""

from __future__ import annotations

import array
import uuid
from collections.abc import Iterable, Sequence
from typing import Literal, overload

import numpy as np
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pyroaring import BitMap

from connectors.state import redis_client

UID_NEXT = "uid:next"
UID_FWD = "uid:fwd"
UID_REV = "uid:rev"
# A Redis bitmap (SETBIT) of every int ever handed out, kept by the same script that hands them out.
UNIVERSE = "universe"
# One hash of version counters, field = the bitmap's key; bumped with every write of that bitmap.
VERSIONS = "bitmap:versions"
# Ids per script call or pipeline: big enough to amortise round trips, small enough not to stall Redis.
BATCH = 10_000


def segment_bitmap_key(segment_id: str) -> str:
    return f"segment:{segment_id}:bitmap"


def package_key(package_id: str) -> str:
    return f"package:{package_id}"


def package_bitmap_key(package_id: str) -> str:
    return f"package:{package_id}:bitmap"


# Known ids get their int; unknown ones get the next int when ARGV[1] is "1", else -1. Racing callers
# are serialised by Redis, so one user never gets two ints, and an id repeated in a batch gets one.
IDS_FOR = """
local create = ARGV[1] == '1'
local out = {}
local created = 0
for i = 2, #ARGV do
  local known = redis.call('HGET', KEYS[2], ARGV[i])
  if known then
    out[i - 1] = tonumber(known)
  elseif create then
    local n = redis.call('INCR', KEYS[1]) - 1
    redis.call('HSET', KEYS[2], ARGV[i], n)
    redis.call('HSET', KEYS[3], n, ARGV[i])
    redis.call('SETBIT', KEYS[4], n, 1)
    out[i - 1] = n
    created = created + 1
  else
    out[i - 1] = -1
  end
end
if created > 0 then
  redis.call('HINCRBY', KEYS[5], KEYS[4], 1)
end
return out
"""


class Expr(BaseModel):
    """A set expression over stored bitmaps: {"op": "and", "args": [...]}, {"op": "segment", "id": "vip"}.

    NOT is relative to the universe (every user int ever handed out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    op: Literal["and", "or", "not", "segment", "package"]
    id: str | None = None
    args: list[Expr] = Field(default_factory=list)

    @field_validator("args", mode="before")
    @classmethod
    def _short_forms(cls, value: object) -> object:
        """A bare string in args is a segment id; a list or tuple is the nested-tuple form."""
        if isinstance(value, list | tuple):
            return [cls.parse(item) if isinstance(item, str | list | tuple) else item for item in value]
        return value

    @model_validator(mode="after")
    def _shape(self) -> Expr:
        if self.op in ("segment", "package"):
            if not self.id or self.args:
                raise ValueError(f"{self.op}: names an id and has no args")
        elif self.id is not None:
            raise ValueError(f"{self.op}: takes args, not an id")
        elif self.op == "not" and len(self.args) != 1:
            raise ValueError("not: exactly one arg")
        elif not self.args:
            raise ValueError(f"{self.op}: at least one arg")
        return self

    @classmethod
    def parse(cls, value: ExprLike) -> Expr:
        """Accepts an Expr, a dict, a bare segment id, or nested tuples (or JSON lists):
        ("and", "a", ("not", "b")), ("package", "p")."""
        if isinstance(value, Expr):
            return value
        if isinstance(value, str):
            return cls(op="segment", id=value)
        if isinstance(value, dict):
            return cls.model_validate(value)
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"not an expression: {value!r}")
        op, *rest = value
        if op in ("segment", "package"):
            if len(rest) != 1 or not isinstance(rest[0], str):
                raise ValueError(f"({op!r}, id) expected, got {value!r}")
            return cls(op=op, id=rest[0])
        return cls(op=op, args=[cls.parse(item) for item in rest])

    def leaves(self) -> set[str]:
        """The keys of every bitmap this expression reads."""
        if self.op == "segment":
            return {segment_bitmap_key(self.id or "")}
        if self.op == "package":
            return {package_bitmap_key(self.id or "")}
        found = {UNIVERSE} if self.op == "not" else set()
        for arg in self.args:
            found |= arg.leaves()
        return found


ExprLike = Expr | str | dict | tuple | list


def universe_bitmap(raw: bytes | None) -> BitMap:
    """A Redis bitmap (bit n is the n-th bit from the most significant of each byte) as a roaring one."""
    if not raw:
        return BitMap()
    ints = np.flatnonzero(np.unpackbits(np.frombuffer(raw, dtype=np.uint8))).astype(np.uint32)
    return BitMap(array.array("I", ints.tobytes()))


def _batches(items: Sequence[str], size: int = BATCH) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AudienceStore:
    def __init__(self, url: str) -> None:
        self.redis: aioredis.Redis = redis_client(url)
        self._ids_for = self.redis.register_script(IDS_FOR)
        # key → (version, bitmap): a bitmap is fetched again only when its version moved.
        self._cache: dict[str, tuple[int, BitMap]] = {}

    async def close(self) -> None:
        await self.redis.aclose()

    # The id map ------------------------------------------------------------------------------
    @overload
    async def ids_for(self, user_ids: Sequence[str], create: Literal[True] = True) -> list[int]: ...

    @overload
    async def ids_for(self, user_ids: Sequence[str], create: Literal[False]) -> list[int | None]: ...

    async def ids_for(self, user_ids: Sequence[str], create: bool = True) -> list[int] | list[int | None]:
        """The dense int of each user id, handing out new ones (create) or None for unknown ids."""
        keys = [UID_NEXT, UID_FWD, UID_REV, UNIVERSE, VERSIONS]
        out: list[int | None] = []
        for batch in _batches(user_ids):
            found = await self._ids_for(keys=keys, args=["1" if create else "0", *batch])
            out += [int(n) if int(n) >= 0 else None for n in found]
        return out

    async def user_ids_for(self, ints: Sequence[int]) -> list[str | None]:
        """The string id of each int (None for an int never handed out)."""
        if not ints:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(ints), BATCH):
            pipe.hmget(UID_REV, list(ints[start : start + BATCH]))
        out: list[str | None] = []
        for chunk in await pipe.execute():
            out += [raw.decode() if raw is not None else None for raw in chunk]
        return out

    async def known_users(self) -> int:
        return int(await self.redis.get(UID_NEXT) or 0)

    # Bitmaps -----------------------------------------------------------------------------------
    async def _put(self, key: str, bitmap: BitMap) -> None:
        bitmap.run_optimize()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(key, bitmap.serialize())
        pipe.hincrby(VERSIONS, key, 1)
        await pipe.execute()

    async def _fetch(self, keys: Iterable[str]) -> dict[str, BitMap]:
        """The bitmaps at these keys, from the cache where their versions still match (two round
        trips at most: the versions, then the stale bitmaps with their versions, read together)."""
        keys = sorted(set(keys))
        versions = [int(v or 0) for v in await self.redis.hmget(VERSIONS, keys)]
        stale = [k for k, v in zip(keys, versions, strict=True) if k not in self._cache or self._cache[k][0] != v]
        if stale:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hmget(VERSIONS, stale)
            for key in stale:
                pipe.get(key)
            fresh_versions, *raws = await pipe.execute()
            for key, version, raw in zip(stale, fresh_versions, raws, strict=True):
                bitmap = universe_bitmap(raw) if key == UNIVERSE else BitMap.deserialize(raw) if raw else BitMap()
                self._cache[key] = (int(version or 0), bitmap)
        return {k: self._cache[k][1] for k in keys}

    async def put_bitmap(self, segment_id: str, bitmap: BitMap) -> None:
        await self._put(segment_bitmap_key(segment_id), bitmap)

    async def bitmap(self, segment_id: str) -> BitMap:
        """The segment's members (a shared cached object: copy it before changing it)."""
        return (await self._fetch([segment_bitmap_key(segment_id)]))[segment_bitmap_key(segment_id)]

    async def set_members(self, segment_id: str, user_ids: Sequence[str]) -> int:
        """Replace the segment's members by these users (new users get ints); returns the member count."""
        bitmap = BitMap(await self.ids_for(user_ids))
        await self.put_bitmap(segment_id, bitmap)
        return len(bitmap)

    async def universe(self) -> BitMap:
        return (await self._fetch([UNIVERSE]))[UNIVERSE]

    async def combine(self, expr: ExprLike) -> BitMap:
        """The users the expression selects, as a new bitmap."""
        parsed = Expr.parse(expr)
        bitmaps = await self._fetch(parsed.leaves())
        return BitMap(_evaluate(parsed, bitmaps))

    async def size(self, expr: ExprLike) -> int:
        """How many users the expression selects; a two-way AND or OR is counted without building it."""
        parsed = Expr.parse(expr)
        bitmaps = await self._fetch(parsed.leaves())
        if parsed.op in ("and", "or") and len(parsed.args) == 2:
            a, b = (_evaluate(arg, bitmaps) for arg in parsed.args)
            return a.intersection_cardinality(b) if parsed.op == "and" else a.union_cardinality(b)
        return len(_evaluate(parsed, bitmaps))

    # Packages --------------------------------------------------------------------------------
    async def put_package(self, package_id: str, user_ids: Sequence[str]) -> int:
        """Replace the package by these users: a SET for real-time membership checks and a bitmap for
        set algebra. Built under a temporary key, then swapped in at once, so no reader sees half of it.
        Ids without an int get one (a package may name users the stream has not seen yet)."""
        members = list(dict.fromkeys(user_ids))
        bitmap = BitMap(await self.ids_for(members))
        bitmap.run_optimize()
        staging = f"{package_key(package_id)}:staging:{uuid.uuid4().hex}"
        try:
            if members:
                fill = self.redis.pipeline(transaction=False)
                for batch in _batches(members):
                    fill.sadd(staging, *batch)
                await fill.execute()
            pipe = self.redis.pipeline(transaction=True)
            if members:
                pipe.rename(staging, package_key(package_id))
            else:
                pipe.delete(package_key(package_id))
            pipe.set(package_bitmap_key(package_id), bitmap.serialize())
            pipe.hincrby(VERSIONS, package_bitmap_key(package_id), 1)
            await pipe.execute()
        finally:
            await self.redis.delete(staging)
        return len(members)

    async def in_package(self, package_id: str, user_ids: Sequence[str]) -> list[bool]:
        """Whether each user is in the package: one round trip (SMISMEMBER per batch, pipelined)."""
        if not user_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for batch in _batches(user_ids):
            pipe.smismember(package_key(package_id), list(batch))
        return [bool(flag) for chunk in await pipe.execute() for flag in chunk]

    async def package_size(self, package_id: str) -> int:
        return int(await self.redis.scard(package_key(package_id)))

    async def package_bitmap(self, package_id: str) -> BitMap:
        return (await self._fetch([package_bitmap_key(package_id)]))[package_bitmap_key(package_id)]


def _evaluate(expr: Expr, bitmaps: dict[str, BitMap]) -> BitMap:
    """Never mutates the cached bitmaps: every operator returns a new one."""
    match expr.op:
        case "segment":
            return bitmaps[segment_bitmap_key(expr.id or "")]
        case "package":
            return bitmaps[package_bitmap_key(expr.id or "")]
        case "not":
            return bitmaps[UNIVERSE] - _evaluate(expr.args[0], bitmaps)
        case "and":
            parts = sorted((_evaluate(a, bitmaps) for a in expr.args), key=len)
            return BitMap.intersection(*parts) if len(parts) > 1 else parts[0]
        case _:
            parts = [_evaluate(a, bitmaps) for a in expr.args]
            return BitMap.union(*parts) if len(parts) > 1 else parts[0]
