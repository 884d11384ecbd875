"""Rebuild every user's behavioural tags and counters from the whole event history (Spark), for
when the tag rules changed or the live state drifted; then load the result back into ClickHouse and
Redis. `run` documents the input, output and replay rules."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# spark-submit runs this file as a script: put the repository root on sys.path so that `jobs`,
# `schemas` and `connectors` import without installing the package on the cluster.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from jobs.common import (  # noqa: E402
    JobError,
    insert_table,
    job_main,
    read_manifest,
    read_parquet,
    sql_string,
    sync_sets,
    write_manifest,
)
from schemas.config import TagRule  # noqa: E402

if TYPE_CHECKING:
    import redis
    from pyspark.sql import Column, DataFrame, SparkSession

    from connectors.warehouse import Warehouse

OUTPUTS = ("user_tags", "user_tag_changes", "user_counters")
JOB_SOURCE = "job:tags"
TAGS_KEY = "tags:"


@dataclass(frozen=True)
class CounterEvents:
    """The event types the counters read."""

    login: str = "login"
    cart_add: str = "cart_add"
    order_created: str = "order_created"
    order_paid: str = "order_paid"


@dataclass(frozen=True)
class TagsResult:
    now: dt.datetime
    rules: int
    users: int
    tags: int
    changes: int


def load_rules(path: Path) -> list[TagRule]:
    """A JSON list of TagRule documents, in the order they apply."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a JSON list of tag rules")
    return [TagRule.model_validate(item) for item in data]


def _property_values(events: DataFrame) -> Column | None:
    """The events' properties as map<string, variant> (types kept), or None without the column."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import MapType, StringType

    if "properties" not in events.columns:
        return None
    kind = events.schema["properties"].dataType
    if isinstance(kind, StringType):
        text = F.col("properties")
    elif isinstance(kind, MapType):
        text = F.to_json(F.col("properties"))
    else:
        raise JobError(f"user_events.properties must be a map or JSON text, not {kind.simpleString()}")
    return F.from_json(text, "map<string,variant>")


_NUMBER_TYPES = ("TINYINT", "SMALLINT", "INT", "BIGINT", "FLOAT", "DOUBLE", "BOOLEAN")


def _value_matches(value: Column, expected: str | int | float | bool) -> Column:
    """Python's `==` on JSON values, as streams.tags.applies compares: a string equals the same
    string only; numbers and booleans compare as numbers (true is 1, 100 is 100.0)."""
    from pyspark.sql import functions as F

    kind = F.schema_of_variant(value)
    if isinstance(expected, str):
        return (kind == F.lit("STRING")) & (F.try_variant_get(value, "$", "string") == F.lit(expected))
    numeric = kind.isin(*_NUMBER_TYPES) | kind.startswith("DECIMAL")
    return numeric & (F.try_variant_get(value, "$", "double") == F.lit(float(expected)))


def _rule_matches(rule: TagRule, properties: Column | None) -> Column:
    from pyspark.sql import functions as F

    test = F.col("event_type") == F.lit(rule.event_type)
    for name, expected in rule.when.items():
        if properties is None:
            return F.lit(False)
        test = test & _value_matches(F.try_element_at(properties, F.lit(name)), expected)
    return F.coalesce(test, F.lit(False))


def tag_actions(events: DataFrame, rules: Sequence[TagRule], now: dt.datetime) -> DataFrame:
    """One row per (event, rule, tag) a rule applies: user_id, occurred_at, rule_index, source, tag, action."""
    from pyspark.sql import functions as F

    action_type = "array<struct<rule_index:int,source:string,tag:string,action:string>>"
    properties = _property_values(events)
    per_rule = []
    for index, rule in enumerate(rules):
        actions = [(tag, "add") for tag in rule.add] + [(tag, "remove") for tag in rule.remove]
        structs = [
            F.struct(
                F.lit(index).alias("rule_index"),
                F.lit(rule.id).alias("source"),
                F.lit(tag).alias("tag"),
                F.lit(action).alias("action"),
            )
            for tag, action in actions
        ]
        per_rule.append(F.when(_rule_matches(rule, properties), F.array(*structs)).otherwise(F.array()))
    applied = F.flatten(F.array(*per_rule)).cast(action_type) if per_rule else F.array().cast(action_type)
    return (
        events.where(F.col("occurred_at") <= F.lit(now))
        .select("user_id", "occurred_at", F.explode(applied).alias("a"))
        .select("user_id", "occurred_at", "a.rule_index", "a.source", "a.tag", "a.action")
    )


def replay(actions: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(user_tags, user_tag_changes): the final tags, and each action that flipped a tag's state."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy("user_id", "tag").orderBy("occurred_at", "rule_index")
    before = F.coalesce(F.lag("action").over(order), F.lit("remove"))  # no tag before the first action
    changes = (
        actions.withColumn("before", before)
        .where(F.col("action") != F.col("before"))
        .select(
            "user_id",
            "tag",
            F.when(F.col("action") == "add", "added").otherwise("removed").alias("change"),
            "source",
            "occurred_at",
        )
    )
    last = F.max_by("action", F.struct("occurred_at", "rule_index"))
    tags = (
        actions.groupBy("user_id", "tag")
        .agg(last.alias("action"))
        .where(F.col("action") == "add")
        .select("user_id", "tag")
    )
    return tags, changes


def counters(events: DataFrame, now: dt.datetime, names: CounterEvents = CounterEvents()) -> DataFrame:
    """One row per user with an event at or before `now` (later events are ignored):

    - last_login_at / last_cart_add_at: the latest `names.login` / `names.cart_add` event, or null.
    - unpaid_order_since: the earliest `names.order_created` event not followed by a `names.order_paid`
      of the same user (a payment at the same instant or later settles it; orders are not matched by
      id, so a payment settles every order created before it), or null when none is unpaid.
    - events_7d / events_30d: events of any type with now - 7 (30) days < occurred_at <= now.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t, kind = F.col("occurred_at"), F.col("event_type")
    user = Window.partitionBy("user_id")
    last_paid = F.max(F.when(kind == names.order_paid, t)).over(user)
    unpaid = (kind == names.order_created) & (last_paid.isNull() | (t > last_paid))
    return (
        events.where(t <= F.lit(now))
        .withColumn("unpaid", unpaid)
        .groupBy("user_id")
        .agg(
            F.max(F.when(kind == names.login, t)).alias("last_login_at"),
            F.max(F.when(kind == names.cart_add, t)).alias("last_cart_add_at"),
            F.min(F.when(F.col("unpaid"), t)).alias("unpaid_order_since"),
            F.count(F.when(t > F.lit(now - dt.timedelta(days=7)), 1)).alias("events_7d"),
            F.count(F.when(t > F.lit(now - dt.timedelta(days=30)), 1)).alias("events_30d"),
        )
    )


def run(
    spark: SparkSession,
    input_dir: Path,
    output_dir: Path,
    rules: Sequence[TagRule],
    now: dt.datetime,
    names: CounterEvents = CounterEvents(),
) -> TagsResult:
    """Replay `rules` over `input_dir/user_events` and write the outputs under `output_dir` (replacing them).

    Input: Parquet user_events with user_id, event_type, occurred_at and an optional `properties`
    column (a map, or a JSON object as text). Output: Parquet datasets `user_tags(user_id, tag)`,
    `user_tag_changes(user_id, tag, change, source, occurred_at)`, `user_counters` (see `counters`)
    and `_tags.json`.

    Replay: only events at or before `now` count. Per user and tag, rule actions apply in time order;
    actions at the same instant apply in rule order (the `rules` list), so the last add or remove
    wins, and a change is recorded each time an action flips the tag. A rule matches an event of its
    event_type whose properties hold every `when` entry, compared as the real-time tagger
    (streams.tags) compares them: Python `==` on the JSON values.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    source = Path(input_dir) / "user_events"
    if not source.exists():
        raise JobError(f"{source} not found: export user_events there first")
    events = spark.read.parquet(str(source))
    missing = {"user_id", "event_type", "occurred_at"} - set(events.columns)
    if missing:
        raise JobError(f"{source} lacks column(s) {', '.join(sorted(missing))}")
    conditional = [rule.id for rule in rules if rule.when]
    if conditional and "properties" not in events.columns:
        raise JobError(
            f"{source} has no properties column, so the rules with `when` conditions ({', '.join(conditional)}) "
            "cannot be replayed and the tags they gave would be lost: export the events with their properties, "
            "or leave those rules out"
        )
    actions = tag_actions(events, rules, now).persist()
    try:
        tags, changes = replay(actions)
        output = Path(output_dir)
        tags.write.mode("overwrite").parquet(str(output / "user_tags"))
        changes.write.mode("overwrite").parquet(str(output / "user_tag_changes"))
        counters(events, now, names).write.mode("overwrite").parquet(str(output / "user_counters"))
    finally:
        actions.unpersist()
    sizes = {name: read_parquet(output / name, ["user_id"]).num_rows for name in OUTPUTS}
    result = TagsResult(
        now=now,
        rules=len(rules),
        users=sizes["user_counters"],
        tags=sizes["user_tags"],
        changes=sizes["user_tag_changes"],
    )
    write_manifest(output, "tags", {"now": now.isoformat(), "rules": [r.id for r in rules], **sizes})
    return result


def load_back(
    output_dir: Path,
    *,
    warehouse: Warehouse | None = None,
    redis_client: redis.Redis | None = None,
    built_at: dt.datetime | None = None,
) -> dict[str, int]:
    """Replace the tags in ClickHouse and Redis with the job's output (a rerun changes nothing).

    ClickHouse: user_tags is truncated and refilled; user_tag_changes keeps its `job:tags` rows and
    gets one more per tag this load adds or removes (occurred_at = built_at), while the rule rows
    (the replayed history) are deleted and rewritten. Redis: `tags:{user_id}` sets get SADD/SREM of
    the differences; sets of users without tags are deleted.
    """
    output = Path(output_dir)
    read_manifest(output, "tags")
    built_at = built_at or dt.datetime.now(dt.UTC)
    tags = read_parquet(output / "user_tags", ["user_id", "tag"])
    loaded: dict[str, int] = {}
    if warehouse is not None:
        from jobs.common import require_writable

        require_writable(warehouse)
        previous = {(r["user_id"], r["tag"]) for r in warehouse.query("SELECT user_id, tag FROM user_tags FINAL")}
        current = set(zip(tags.column("user_id").to_pylist(), tags.column("tag").to_pylist(), strict=True))
        audit = [
            {"user_id": u, "tag": t, "change": change, "source": JOB_SOURCE, "occurred_at": built_at}
            for change, pairs in (("added", current - previous), ("removed", previous - current))
            for u, t in sorted(pairs)
        ]
        warehouse.command("TRUNCATE TABLE user_tags")
        loaded["user_tags"] = insert_table(warehouse, "user_tags", tags)
        warehouse.command(f"DELETE FROM user_tag_changes WHERE source != {sql_string(JOB_SOURCE)}")
        history = read_parquet(output / "user_tag_changes")
        loaded["user_tag_changes"] = insert_table(warehouse, "user_tag_changes", history)
        loaded["user_tag_changes (job)"] = warehouse.insert("user_tag_changes", audit)
    if redis_client is not None:
        wanted: dict[str, set[str]] = {}
        for user_id, tag in zip(tags.column("user_id").to_pylist(), tags.column("tag").to_pylist(), strict=True):
            wanted.setdefault(user_id, set()).add(tag)
        loaded["redis changes"] = sync_sets(redis_client, wanted, TAGS_KEY)
        loaded["redis users"] = len(wanted)
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        description=__doc__.splitlines()[0],
        name="tags",
        input_help="directory holding user_events/ (Parquet)",
        output_help="directory for the Parquet outputs",
        definitions="rules",
        definitions_help="JSON list of tag rules",
        run=run,
        load=load_rules,
        summary=lambda result: {k: v for k, v in vars(result).items() if k != "now"},
    )


if __name__ == "__main__":
    sys.exit(main())
