"""The tags job: rule replay (order, remove after add, `when` properties), the counters, agreement
with a plain-Python replay on generated users, and an idempotent load-back into chDB and Redis."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import tags as tags_job
from jobs.common import JobError, read_parquet
from schemas.config import TagRule

pytestmark = pytest.mark.integration

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
MS = dt.timedelta(milliseconds=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

RULES = [
    {"id": "coupon", "event_type": "coupon_claimed", "add": ["price_sensitive"]},
    {
        "id": "full-price",
        "event_type": "order_paid",
        "when": {"price_type": "full"},
        "add": ["full_price"],
        "remove": ["price_sensitive"],
    },
    {"id": "login", "event_type": "login", "add": ["active"]},
    {"id": "uninstall", "event_type": "app_uninstalled", "remove": ["active"]},
    {"id": "vip-on", "event_type": "vip_change", "add": ["vip"]},
    {"id": "vip-off", "event_type": "vip_change", "when": {"level": 0}, "remove": ["vip"]},
    {"id": "big-gift", "event_type": "purchase", "when": {"amount": 100, "gift": True}, "add": ["big_gift"]},
]
EVENT_TYPES = (
    "login", "coupon_claimed", "order_paid", "order_created", "app_uninstalled", "vip_change", "purchase",
    "cart_add", "page_view",
)  # fmt: skip


def _event(user_id: str, event_type: str, at: dt.datetime, properties: dict[str, Any] | None = None) -> dict:
    return {
        "user_id": user_id,
        "event_type": event_type,
        "occurred_at": at,
        "properties": None if properties is None else json.dumps(properties),
    }


def _hand_made() -> list[dict]:
    e = _event
    return [
        e("h_add_remove", "coupon_claimed", NOW - 10 * DAY),
        e("h_add_remove", "order_paid", NOW - 5 * DAY, {"price_type": "full"}),
        e("h_remove_then_add", "order_paid", NOW - 5 * DAY, {"price_type": "full", "amount": 3}),
        e("h_remove_then_add", "coupon_claimed", NOW - DAY),
        e("h_when_mismatch", "order_paid", NOW - 2 * DAY, {"price_type": "discount"}),
        e("h_when_mismatch", "order_paid", NOW - DAY),
        e("h_vip_same_instant", "vip_change", NOW - 3 * DAY, {"level": 0}),
        e("h_vip_on", "vip_change", NOW - 3 * DAY, {"level": "0"}),
        e("h_numbers", "purchase", NOW - HOUR, {"amount": 100.0, "gift": True}),
        e("h_numbers_text", "purchase", NOW - HOUR, {"amount": "100", "gift": "TRUE"}),
        e("h_numbers_wrong", "purchase", NOW - HOUR, {"amount": 99, "gift": True}),
        e("h_numbers_wrong", "purchase", NOW - HOUR, {"amount": 100}),
        e("h_future", "coupon_claimed", NOW + MS),
        e("h_future", "page_view", NOW),
        e("h_toggle", "login", NOW - 3 * DAY),
        e("h_toggle", "app_uninstalled", NOW - 2 * DAY),
        e("h_toggle", "login", NOW - DAY),
        e("h_toggle", "login", NOW - DAY),  # a duplicate delivery: no second change
        e("h_counters", "login", NOW - 8 * DAY),
        e("h_counters", "login", NOW - 7 * DAY),  # on the 7-day edge: excluded from events_7d
        e("h_counters", "cart_add", NOW - 40 * DAY),
        e("h_counters", "cart_add", NOW - 7 * DAY + MS),
        e("h_counters", "order_created", NOW - 20 * DAY),
        e("h_counters", "order_paid", NOW - 15 * DAY),
        e("h_counters", "order_created", NOW - 10 * DAY),
        e("h_counters", "order_created", NOW - 9 * DAY),
        e("h_counters", "login", NOW + HOUR),  # after now: ignored
        e("h_paid_same_instant", "order_created", NOW - DAY),
        e("h_paid_same_instant", "order_paid", NOW - DAY),
        e("h_paid_before", "order_paid", NOW - 3 * DAY),
        e("h_paid_before", "order_created", NOW - 2 * DAY),
    ]


def _generated(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    events = []
    for _ in range(3000):
        user_id = f"b{rng.randrange(200):03d}"
        kind = rng.choice(EVENT_TYPES)
        # whole hours, so same-instant actions of different rules happen
        at = NOW - rng.randint(-24, 60 * 24) * HOUR
        properties = rng.choice(
            [
                None,
                {"price_type": rng.choice(["full", "discount"])},
                {"level": rng.choice([0, 1, "0"])},
                {"amount": rng.choice([100, 100.0, "100", 50, 1e2]), "gift": rng.choice([True, False, "true", 1])},
            ]
        )
        events.append(_event(user_id, kind, at, properties))
    return events


SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), False),
        pa.field("event_type", pa.string(), False),
        pa.field("occurred_at", pa.timestamp("ms", tz="UTC"), False),
        pa.field("properties", pa.string()),
    ]
)


# ------------------------------------------------------------------------------------------
# A plain-Python replay of the documented semantics, to check the Spark job on generated users


def _matches(rule: TagRule, event: dict) -> bool:
    """streams.tags.applies on the decoded event: Python `==` on each `when` property."""
    properties = json.loads(event["properties"]) if event["properties"] else {}
    return event["event_type"] == rule.event_type and all(
        properties.get(name) == expected for name, expected in rule.when.items()
    )


def _reference(events: list[dict], rules: list[TagRule]) -> tuple[set, list]:
    actions = []
    for event in events:
        if event["occurred_at"] > NOW:
            continue
        for index, rule in enumerate(rules):
            if _matches(rule, event):
                for tag in rule.add:
                    actions.append((event["user_id"], tag, event["occurred_at"], index, rule.id, "add"))
                for tag in rule.remove:
                    actions.append((event["user_id"], tag, event["occurred_at"], index, rule.id, "remove"))
    state: dict[tuple[str, str], str] = defaultdict(lambda: "remove")
    changes = []
    for user_id, tag, at, _, source, action in sorted(actions, key=lambda a: (a[2], a[3])):
        if state[user_id, tag] != action:
            changes.append((user_id, tag, "added" if action == "add" else "removed", source, at))
        state[user_id, tag] = action
    return {key for key, action in state.items() if action == "add"}, changes


# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return _hand_made() + _generated()


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> list[TagRule]:
    path = tmp_path_factory.mktemp("rules") / "rules.json"
    path.write_text(json.dumps(RULES))
    return tags_job.load_rules(path)


@pytest.fixture(scope="module")
def output(spark: Any, events: list[dict], rules: list[TagRule], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tags")
    (base / "input" / "user_events").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(events, schema=SCHEMA), base / "input" / "user_events" / "part-0.parquet")
    result = tags_job.run(spark, base / "input", base / "output", rules, NOW)
    assert result.rules == len(RULES)
    return base / "output"


def _tags(output: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for row in read_parquet(output / "user_tags").to_pylist():
        found[row["user_id"]].add(row["tag"])
    return found


def _changes(output: Path) -> list[tuple]:
    rows = read_parquet(output / "user_tag_changes").to_pylist()
    return [(r["user_id"], r["tag"], r["change"], r["source"], r["occurred_at"]) for r in rows]


def test_hand_made_tags(output: Path) -> None:
    tags = _tags(output)
    assert tags["h_add_remove"] == {"full_price"}  # the later rule removed what the earlier one added
    assert tags["h_remove_then_add"] == {"full_price", "price_sensitive"}  # removing a missing tag, then adding it
    assert "h_when_mismatch" not in tags  # `when` not met, or no properties at all
    assert "h_vip_same_instant" not in tags  # same instant: rule order, vip-off comes after vip-on
    assert tags["h_vip_on"] == {"vip"}  # level "0" (text) is not the number 0
    assert tags["h_numbers"] == {"big_gift"}  # 100.0 == 100 and true == True, as in Python
    assert "h_numbers_text" not in tags  # "100" and "TRUE" are text, not a number and a boolean
    assert "h_numbers_wrong" not in tags
    assert "h_future" not in tags  # after now
    assert tags["h_toggle"] == {"active"}
    assert tags["h_counters"] == {"active"}


def test_hand_made_changes(output: Path) -> None:
    changes = sorted(c for c in _changes(output) if c[0].startswith("h_"))
    by_user: dict[str, list[tuple]] = defaultdict(list)
    for user_id, tag, change, source, at in changes:
        by_user[user_id].append((tag, change, source, at))
    assert sorted(by_user["h_add_remove"], key=lambda c: (c[3], c[0])) == [
        ("price_sensitive", "added", "coupon", NOW - 10 * DAY),
        ("full_price", "added", "full-price", NOW - 5 * DAY),
        ("price_sensitive", "removed", "full-price", NOW - 5 * DAY),
    ]
    assert sorted(by_user["h_remove_then_add"], key=lambda c: c[3]) == [
        ("full_price", "added", "full-price", NOW - 5 * DAY),
        ("price_sensitive", "added", "coupon", NOW - DAY),
    ]
    assert sorted(by_user["h_vip_same_instant"], key=lambda c: c[1]) == [
        ("vip", "added", "vip-on", NOW - 3 * DAY),
        ("vip", "removed", "vip-off", NOW - 3 * DAY),
    ]
    assert sorted(by_user["h_toggle"], key=lambda c: c[3]) == [
        ("active", "added", "login", NOW - 3 * DAY),
        ("active", "removed", "uninstall", NOW - 2 * DAY),
        ("active", "added", "login", NOW - DAY),
    ]


def test_counters(output: Path) -> None:
    counters = {row.pop("user_id"): row for row in read_parquet(output / "user_counters").to_pylist()}
    assert counters["h_counters"] == {
        "last_login_at": NOW - 7 * DAY,
        "last_cart_add_at": NOW - 7 * DAY + MS,
        "unpaid_order_since": NOW - 10 * DAY,
        "events_7d": 1,
        "events_30d": 7,
    }
    assert counters["h_paid_same_instant"]["unpaid_order_since"] is None
    assert counters["h_paid_before"]["unpaid_order_since"] == NOW - 2 * DAY
    assert counters["h_future"]["events_7d"] == 1  # the event exactly at now counts, the later one does not
    assert counters["h_when_mismatch"]["last_login_at"] is None


def test_generated_users_match_a_plain_replay(output: Path, events: list[dict], rules: list[TagRule]) -> None:
    expected_tags, expected_changes = _reference(events, rules)
    found = {(user_id, tag) for user_id, tags in _tags(output).items() for tag in tags}
    assert found == expected_tags
    assert sorted(_changes(output)) == sorted(expected_changes)
    assert len(expected_tags) > 200 and len(expected_changes) > len(expected_tags)
    users = {e["user_id"] for e in events if e["occurred_at"] <= NOW}
    assert {row["user_id"] for row in read_parquet(output / "user_counters").to_pylist()} == users


def test_rules_with_conditions_need_properties(spark: Any, rules: list[TagRule], tmp_path: Path) -> None:
    (tmp_path / "user_events").mkdir()
    bare = pa.Table.from_pylist(_hand_made()).drop_columns(["properties"])
    pq.write_table(bare, tmp_path / "user_events" / "part-0.parquet")
    with pytest.raises(JobError, match="full-price, vip-off, big-gift"):
        tags_job.run(spark, tmp_path, tmp_path / "out", rules, NOW)
    # Without conditional rules the same events replay fine.
    plain = [rule for rule in rules if not rule.when]
    assert tags_job.run(spark, tmp_path, tmp_path / "out", plain, NOW).tags > 0


def test_load_back_twice_replaces(output: Path, warehouse: Any, redis_client: Any) -> None:
    warehouse.command("TRUNCATE TABLE user_tags")
    warehouse.command("TRUNCATE TABLE user_tag_changes")
    warehouse.insert(
        "user_tags", [{"user_id": "h_add_remove", "tag": "legacy"}, {"user_id": "h_add_remove", "tag": "full_price"}]
    )
    redis_client.sadd("tags:ghost", "stale")
    redis_client.sadd("tags:h_add_remove", "legacy", "full_price")
    expected = {(user_id, tag) for user_id, tags in _tags(output).items() for tag in tags}
    history = len(_changes(output))
    built = [NOW + HOUR, NOW + 2 * HOUR]

    for attempt, built_at in enumerate(built):
        loaded = tags_job.load_back(output, warehouse=warehouse, redis_client=redis_client, built_at=built_at)
        assert loaded["user_tags"] == len(expected)
        (counted,) = warehouse.query("SELECT count() AS n, uniqExact(user_id, tag) AS u FROM user_tags")
        assert counted == {"n": len(expected), "u": len(expected)}
        rows = warehouse.query("SELECT user_id, tag FROM user_tags")
        assert {(r["user_id"], r["tag"]) for r in rows} == expected
        (rule_rows,) = warehouse.query("SELECT count() AS n FROM user_tag_changes WHERE source != 'job:tags'")
        assert rule_rows["n"] == history
        audit = warehouse.query(
            "SELECT change, count() AS n FROM user_tag_changes"
            " WHERE source = 'job:tags' GROUP BY change ORDER BY change"
        )
        # The first load removed `legacy` and added every tag but the one already there; the second, nothing.
        assert audit == [{"change": "added", "n": len(expected) - 1}, {"change": "removed", "n": 1}]
        assert loaded["redis changes"] == (len(expected) - 1 + 1 if attempt == 0 else 0)
        assert redis_client.smembers("tags:h_add_remove") == {"full_price"}
        assert redis_client.smembers("tags:h_remove_then_add") == {"full_price", "price_sensitive"}
        assert not redis_client.exists("tags:ghost")
        keys = redis_client.scan_iter("tags:*")
        in_redis = {(key.removeprefix("tags:"), tag) for key in keys for tag in redis_client.smembers(key)}
        assert in_redis == expected
