"""Real-time segment evaluation: does one user, as the stream currently knows them, belong to a
segment? Pure and free of I/O, so it runs inside a stream processor; the semantics are those
documented in schemas.segments, which the SQL compilers in connectors.segment_sql follow too."""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable
from typing import Any, Protocol

from schemas.segments import (
    AndNode,
    AttributeCondition,
    AttributeWithin,
    HasTag,
    InPackage,
    Node,
    NotNode,
    NotPerformed,
    OrNode,
    Performed,
    PerformedWithout,
    UserFacts,
    children,
)


class PackageLookup(Protocol):
    """Whether a user belongs to a package; supplied by the caller, who knows where packages live."""

    def __call__(self, package_id: str, user_id: str) -> bool: ...


def evaluate(node: Node, profile: UserFacts, now: dt.datetime, packages: PackageLookup) -> bool:
    """Whether `node` holds for `profile` at the instant `now` (timezone-aware)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return _holds(node, profile, now.astimezone(dt.UTC), packages)


def _holds(node: Node, profile: UserFacts, now: dt.datetime, packages: PackageLookup) -> bool:
    match node:
        case HasTag(tag=tag):
            return tag in profile.tags
        case AttributeCondition():
            return _compare(node, profile.attributes.get(node.name))
        case AttributeWithin(name=name, direction=direction):
            value = profile.attributes.get(name)
            if value is None:
                return False
            if direction == "next":
                return now <= value <= now + node.delta
            return now - node.delta <= value <= now
        case Performed(event_type=kind, min_count=min_count, within=within):
            return _count_in(profile.events.get(kind, ()), now - within.delta, now) >= min_count
        case NotPerformed(event_type=kind, within=within):
            return _count_in(profile.events.get(kind, ()), now - within.delta, now) == 0
        case PerformedWithout():
            return _performed_without(node, profile, now)
        case InPackage(package_id=package_id):
            return bool(packages(package_id, profile.user_id))
        case AndNode(nodes=nodes):
            return all(_holds(child, profile, now, packages) for child in nodes)
        case OrNode(nodes=nodes):
            return any(_holds(child, profile, now, packages) for child in nodes)
        case NotNode(node=child):
            return not _holds(child, profile, now, packages)
    raise TypeError(f"not a segment node: {node!r}")


def _compare(node: AttributeCondition, actual: Any) -> bool:
    if actual is None:
        return False
    value = node.value
    match node.op:
        case "exists":
            return True
        case "=":
            return actual == value
        case "!=":
            return actual != value
        case "<":
            return actual < value
        case ">":
            return actual > value
        case "<=":
            return actual <= value
        case ">=":
            return actual >= value
        case "in":
            return actual in value
        case "between":
            low, high = value
            return low <= actual <= high
    raise ValueError(f"unknown operator {node.op!r}")


def _count_in(times: Iterable[dt.datetime], after: dt.datetime, until: dt.datetime) -> int:
    """Events with after < time <= until."""
    return sum(1 for t in times if after < t <= until)


def _performed_without(node: PerformedWithout, profile: UserFacts, now: dt.datetime) -> bool:
    within = node.within.delta
    oldest, newest = now - node.lookback.delta, now - within
    followups = sorted(profile.events.get(node.then, ()))
    for t in profile.events.get(node.first, ()):
        if not oldest < t <= newest:
            continue
        i = bisect.bisect_left(followups, t)
        if i == len(followups) or followups[i] > t + within:
            return True
    return False


def referenced_events(node: Node) -> set[str]:
    """Every event type the segment looks at: the history a caller must keep per user."""
    match node:
        case Performed(event_type=kind) | NotPerformed(event_type=kind):
            return {kind}
        case PerformedWithout(first=first, then=then):
            return {first, then}
    return set().union(*(referenced_events(child) for child in children(node)))


def max_window(node: Node) -> dt.timedelta:
    """How far back from `now` event history matters to the segment; older events may be dropped.

    performed_without looks back `lookback` for its first event; its follow-up window ends at the
    latest at now, so the lookback covers it."""
    match node:
        case Performed(within=within) | NotPerformed(within=within):
            return within.delta
        case PerformedWithout(lookback=lookback):
            return lookback.delta
    return max((max_window(child) for child in children(node)), default=dt.timedelta(0))


def referenced_packages(node: Node) -> set[str]:
    """Every uploaded package the segment looks in: what a caller must look up per user."""
    if isinstance(node, InPackage):
        return {node.package_id}
    return set().union(*(referenced_packages(child) for child in children(node)))
