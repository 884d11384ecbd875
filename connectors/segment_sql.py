"""Segments as SQL over the audience tables (infra/clickhouse/006_audience.sql): one sqlglot tree,
rendered for ClickHouse or Spark, that selects exactly the users streams.segments.evaluate accepts.

Safety: identifiers come only from constants here and from schemas.segments.ATTRIBUTES; every
value a segment author wrote becomes a sqlglot literal, quoted by sqlglot for the dialect.
Reproducibility: `now` and every window bound are computed here and rendered as UTC timestamp
literals (ClickHouse: DateTime64(6, 'UTC'); Spark: an explicit +00:00), so neither engine's session
zone changes the answer. Run Spark with spark.sql.session.timeZone=UTC all the same, as the tables'
loaders and readers assume it.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from sqlglot import exp

from schemas.segments import (
    ATTRIBUTES,
    AndNode,
    AttributeCondition,
    AttributeType,
    AttributeWithin,
    HasTag,
    InPackage,
    Node,
    NotNode,
    NotPerformed,
    OrNode,
    Performed,
    PerformedWithout,
    Segment,
)

Dialect = Literal["clickhouse", "spark"]
DIALECTS: tuple[Dialect, ...] = ("clickhouse", "spark")

USERS = "user_attributes"
TAGS = "user_tags"
EVENTS = "user_events"
PACKAGES = "package_members"


def condition(node: Node, now: dt.datetime) -> exp.Expression:
    """A WHERE condition over user_attributes that is never NULL: true exactly when `node` holds."""
    match node:
        case HasTag(tag=tag):
            return _user_in(exp.select("user_id").from_(TAGS).where(exp.column("tag").eq(_text(tag))))
        case AttributeCondition():
            return _attribute(node)
        case AttributeWithin(name=name, direction=direction):
            column = _attribute_column(name)
            low, high = (now, now + node.delta) if direction == "next" else (now - node.delta, now)
            return _present(column, column.between(_timestamp(low), _timestamp(high)))
        case Performed(event_type=kind, min_count=min_count, within=within):
            events = _events_between(kind, now - within.delta, now)
            if min_count > 1:
                events = events.group_by("user_id").having(
                    exp.GTE(this=exp.Count(this=exp.Star()), expression=exp.Literal.number(min_count))
                )
            return _user_in(events)
        case NotPerformed(event_type=kind, within=within):
            return exp.not_(_user_in(_events_between(kind, now - within.delta, now)))
        case PerformedWithout():
            return _user_in(_performed_without(node, now))
        case InPackage(package_id=package_id):
            members = exp.select("user_id").from_(PACKAGES).where(exp.column("package_id").eq(_text(package_id)))
            return _user_in(members)
        case AndNode(nodes=nodes):
            return exp.and_(*(exp.paren(condition(child, now)) for child in nodes))
        case OrNode(nodes=nodes):
            return exp.or_(*(exp.paren(condition(child, now)) for child in nodes))
        case NotNode(node=child):
            return exp.not_(exp.paren(condition(child, now)))
    raise TypeError(f"not a segment node: {node!r}")


def select_users(segment: Segment | Node, now: dt.datetime) -> exp.Select:
    """SELECT user_id FROM user_attributes WHERE <segment>."""
    return exp.select("user_id").from_(USERS).where(condition(_root(segment), _utc(now)))


def count_users(segment: Segment | Node, now: dt.datetime) -> exp.Select:
    """SELECT COUNT(*) AS users FROM user_attributes WHERE <segment>."""
    counted = exp.alias_(exp.Count(this=exp.Star()), "users")
    return exp.select(counted).from_(USERS).where(condition(_root(segment), _utc(now)))


def to_sql(segment: Segment | Node, dialect: Dialect, now: dt.datetime, *, count: bool = False) -> str:
    """The segment's users (or their number, with count=True) as SQL text for `dialect`."""
    if dialect not in DIALECTS:
        raise ValueError(f"unsupported dialect {dialect!r}; use one of {', '.join(DIALECTS)}")
    tree = count_users(segment, now) if count else select_users(segment, now)
    return tree.sql(dialect=dialect)


def _root(segment: Segment | Node) -> Node:
    return segment.root if isinstance(segment, Segment) else segment


def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.UTC)


def _text(value: str) -> exp.Literal:
    return exp.Literal.string(value)


def _timestamp(moment: dt.datetime) -> exp.Expression:
    # Not exp.cast(..., TIMESTAMP): sqlglot renders that as Nullable(DateTime) for ClickHouse, which
    # drops the sub-second part. TimeStrToTime with a zone gives CAST(... AS DateTime64(6, 'UTC'))
    # there and CAST(... AS TIMESTAMP) in Spark; the +00:00 pins the instant in both.
    text = moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
    return exp.TimeStrToTime(this=_text(text), zone=_text("UTC"))


def _literal(kind: AttributeType, value: int | float | str | dt.datetime) -> exp.Expression:
    if kind is AttributeType.DATETIME:
        assert isinstance(value, dt.datetime)
        return _timestamp(value)
    if kind is AttributeType.STR:
        return _text(str(value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return exp.Literal.number(repr(value))


def _attribute_column(name: str) -> exp.Column:
    if name not in ATTRIBUTES:  # the models refuse these; this guards trees built around validation
        raise ValueError(f"unknown attribute {name!r}")
    return exp.column(name)


def _present(column: exp.Column, test: exp.Expression) -> exp.Expression:
    """`column IS NOT NULL AND test`: false, never NULL, when the attribute is missing (FALSE AND
    NULL is FALSE in both engines), so an enclosing NOT negates a plain boolean."""
    return exp.and_(exp.not_(column.is_(exp.null())), test)


def _attribute(node: AttributeCondition) -> exp.Expression:
    column = _attribute_column(node.name)
    kind = ATTRIBUTES[node.name]
    value = node.value
    match node.op:
        case "exists":
            return exp.not_(column.is_(exp.null()))
        case "in":
            return _present(column, column.isin(*(_literal(kind, v) for v in value)))
        case "between":
            low, high = value
            return _present(column, column.between(_literal(kind, low), _literal(kind, high)))
    comparisons: dict[str, type[exp.Binary]] = {
        "=": exp.EQ,
        "!=": exp.NEQ,
        "<": exp.LT,
        ">": exp.GT,
        "<=": exp.LTE,
        ">=": exp.GTE,
    }
    try:
        comparison = comparisons[node.op]
    except KeyError:
        raise ValueError(f"unknown operator {node.op!r}") from None
    return _present(column, comparison(this=column, expression=_literal(kind, value)))


def _user_in(query: exp.Select) -> exp.Expression:
    return exp.column("user_id").isin(query=query)


def _events_between(kind: str, after: dt.datetime, until: dt.datetime) -> exp.Select:
    """user_id of events of `kind` with after < occurred_at <= until."""
    return (
        exp.select("user_id")
        .from_(EVENTS)
        .where(exp.column("event_type").eq(_text(kind)))
        .where(exp.GT(this=exp.column("occurred_at"), expression=_timestamp(after)))
        .where(exp.LTE(this=exp.column("occurred_at"), expression=_timestamp(until)))
    )


def _performed_without(node: PerformedWithout, now: dt.datetime) -> exp.Select:
    """Users with a `first` event in (now - lookback, now - within] and no `then` event in [t, t + within].

    One row per (user, first-event time) with the number of follow-ups in its window; a LEFT JOIN on
    user_id alone plus a conditional sum, because correlated NOT EXISTS and non-equi join conditions
    are not portable between the two engines. An unmatched row has a NULL b.occurred_at in Spark and
    the column default (1970-01-01) in ClickHouse (join_use_nulls=0); neither falls in [t, t + within].
    """
    oldest = now - node.lookback.delta
    first = (
        exp.select("user_id", "occurred_at")
        .from_(EVENTS)
        .where(exp.column("event_type").eq(_text(node.first)))
        .where(exp.GT(this=exp.column("occurred_at"), expression=_timestamp(oldest)))
        .where(exp.LTE(this=exp.column("occurred_at"), expression=_timestamp(now - node.within.delta)))
    )
    then = (
        exp.select("user_id", "occurred_at")
        .from_(EVENTS)
        .where(exp.column("event_type").eq(_text(node.then)))
        .where(exp.GT(this=exp.column("occurred_at"), expression=_timestamp(oldest)))
        .where(exp.LTE(this=exp.column("occurred_at"), expression=_timestamp(now)))
    )
    started, followed = exp.column("occurred_at", table="a"), exp.column("occurred_at", table="b")
    # A whole number of minutes, not DAY/HOUR: elapsed time, like the evaluator's timedelta. Not
    # exp.DateAdd: sqlglot renders it for Spark as DATE_ADD(ts, n), which adds days whatever the unit.
    deadline = exp.Add(
        this=started,
        expression=exp.Interval(this=exp.Literal.number(node.within.minutes), unit=exp.Var(this="MINUTE")),
    )
    in_window = exp.and_(
        exp.GTE(this=followed, expression=started),
        exp.LTE(this=followed, expression=deadline),
    )
    followups = exp.Sum(this=exp.Case().when(in_window, exp.Literal.number(1)).else_(exp.Literal.number(0)))
    return (
        exp.select(exp.column("user_id", table="a"))
        .from_(first.subquery("a"))
        .join(
            then.subquery("b"),
            on=exp.column("user_id", table="a").eq(exp.column("user_id", table="b")),
            join_type="left",
        )
        .group_by(exp.column("user_id", table="a"), started)
        .having(exp.EQ(this=followups, expression=exp.Literal.number(0)))
    )
