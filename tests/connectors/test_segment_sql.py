"""The segment SQL compiler: literals are always quoted by sqlglot, and the real-time evaluator,
ClickHouse (chDB) and Spark select the very same users over one generated data set."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pytest
import sqlglot
from sqlglot import exp

from connectors.segment_sql import DIALECTS, to_sql
from schemas.segments import ATTRIBUTES, NODE_ADAPTER, Node, Segment, UserFacts, children
from streams.segments import evaluate

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, 250_000, tzinfo=dt.UTC)
MS = dt.timedelta(milliseconds=1)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
EVENT_TYPES = ("login", "cart_add", "payment", "purchase", "page_view")
TRICKY = ("o'brien", "back\\slash", "x') OR 1=1 --", 'quote"d', "naïve ☃")


# ------------------------------------------------------------------------------------------
# (a) literals


def _tricky_segment() -> Segment:
    return Segment.model_validate(
        {
            "id": "tricky",
            "name": "tricky",
            "root": {
                "type": "or",
                "nodes": [
                    *({"type": "has_tag", "tag": value} for value in TRICKY),
                    {"type": "attribute", "name": "city", "op": "in", "value": list(TRICKY)},
                    {"type": "performed", "event_type": TRICKY[2], "within": {"amount": 1, "unit": "days"}},
                    {"type": "in_package", "package_id": TRICKY[0]},
                ],
            },
        }
    )


@pytest.mark.unit
@pytest.mark.parametrize("dialect", DIALECTS)
def test_user_values_appear_only_as_sqlglot_literals(dialect: str) -> None:
    sql = to_sql(_tricky_segment(), dialect, NOW)
    tree = sqlglot.parse_one(sql, dialect=dialect)
    strings = {lit.this for lit in tree.find_all(exp.Literal) if lit.is_string}
    assert set(TRICKY) <= strings
    allowed = {"user_id", "tag", "event_type", "occurred_at", "package_id", *ATTRIBUTES}
    assert {column.name for column in tree.find_all(exp.Column)} <= allowed
    assert {table.name for table in tree.find_all(exp.Table)} <= {
        "user_attributes",
        "user_tags",
        "user_events",
        "package_members",
    }
    # the injection attempt stayed a value: the only ORs are the segment's own
    assert len(list(tree.find_all(exp.Or))) == len(_tricky_segment().root.nodes) - 1


@pytest.mark.unit
def test_quotes_are_escaped_per_dialect() -> None:
    segment = Segment(id="s", name="s", root={"type": "has_tag", "tag": "o'brien"})
    assert "'o''brien'" in to_sql(segment, "clickhouse", NOW)
    assert "'o\\'brien'" in to_sql(segment, "spark", NOW)


@pytest.mark.unit
def test_count_variant_and_bad_inputs() -> None:
    segment = Segment(id="s", name="s", root={"type": "has_tag", "tag": "vip"})
    assert to_sql(segment, "spark", NOW, count=True).startswith("SELECT COUNT(*) AS users FROM user_attributes WHERE")
    with pytest.raises(ValueError, match="timezone-aware"):
        to_sql(segment, "spark", NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="unsupported dialect"):
        to_sql(segment, "postgres", NOW)  # type: ignore[arg-type]


@pytest.mark.unit
def test_timestamps_keep_microseconds_and_the_instant() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    now = dt.datetime(2025, 3, 1, 13, 0, 0, 123_456, tzinfo=paris)
    node = {"type": "performed", "event_type": "login", "within": {"amount": 1, "unit": "minutes"}}
    assert "'2025-03-01 12:00:00.123456' AS DateTime64(6, 'UTC')" in to_sql(
        NODE_ADAPTER.validate_python(node), "clickhouse", now
    )
    assert "'2025-03-01 11:59:00.123456+00:00' AS TIMESTAMP" in to_sql(NODE_ADAPTER.validate_python(node), "spark", now)


# ------------------------------------------------------------------------------------------
# (b) three-way agreement: the data set


@dataclass
class Dataset:
    users: list[dict[str, Any]] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    packages: list[dict[str, Any]] = field(default_factory=list)

    def add_user(self, user_id: str, **attributes: Any) -> None:
        self.users.append({"user_id": user_id, **{name: attributes.get(name) for name in ATTRIBUTES}})

    def add_event(self, user_id: str, event_type: str, occurred_at: dt.datetime) -> None:
        self.events.append({"user_id": user_id, "event_type": event_type, "occurred_at": occurred_at})

    def facts(self) -> list[UserFacts]:
        tags: dict[str, set[str]] = defaultdict(set)
        for row in self.tags:
            tags[row["user_id"]].add(row["tag"])
        events: dict[str, dict[str, list[dt.datetime]]] = defaultdict(lambda: defaultdict(list))
        for row in self.events:
            events[row["user_id"]][row["event_type"]].append(row["occurred_at"])
        return [
            UserFacts(
                user_id=user["user_id"],
                attributes={name: user[name] for name in ATTRIBUTES if user[name] is not None},
                tags=tags[user["user_id"]],
                events=dict(events[user["user_id"]]),
            )
            for user in self.users
        ]


def _maybe(rng: random.Random, value: Any) -> Any:
    return value if rng.random() < 0.85 else None


def _build_dataset(seed: int = 20250301) -> Dataset:
    rng = random.Random(seed)
    data = Dataset()
    cities = ("Paris", "Berlin", "São Paulo", "o'brien town", "back\\slash")
    for i in range(280):
        user_id = f"u{i:03d}"
        data.add_user(
            user_id,
            age=_maybe(rng, rng.randint(16, 80)),
            city=_maybe(rng, rng.choice(cities)),
            country=_maybe(rng, rng.choice(("FR", "DE", "BR", "US"))),
            vip_level=_maybe(rng, rng.randint(0, 5)),
            gender=_maybe(rng, rng.choice(("f", "m", "x"))),
            membership_expires_at=_maybe(rng, NOW + rng.randint(-10 * 1440, 10 * 1440) * MINUTE),
            last_login_at=_maybe(rng, NOW - rng.randint(0, 60 * 1440) * MINUTE),
            signup_at=_maybe(rng, NOW - rng.randint(30, 1000) * DAY - rng.randint(0, 86_399_999) * MS),
            timezone=_maybe(rng, rng.choice(("Europe/Paris", "UTC", "America/Sao_Paulo"))),
            lifetime_value=_maybe(rng, round(rng.uniform(0, 500), 2)),
        )
        for tag in ("vip", "newsletter", "o'brien", "churn-risk"):
            if rng.random() < 0.3:
                data.tags.append({"user_id": user_id, "tag": tag})
        if rng.random() < 0.3:
            data.packages.append({"package_id": "pkg-a", "user_id": user_id})
        if rng.random() < 0.1:
            data.packages.append({"package_id": "pkg'b", "user_id": user_id})
    weights = (5, 3, 2, 1, 4)
    for _ in range(4800):
        user_id = f"u{rng.randrange(280):03d}"
        # whole minutes before NOW (some after it): window edges fall on whole minutes, so they get hit
        occurred_at = NOW - rng.randint(-120, 40 * 1440) * MINUTE
        if rng.random() < 0.2:
            occurred_at += rng.randint(-999, 999) * MS
        data.add_event(user_id, rng.choices(EVENT_TYPES, weights)[0], occurred_at)
    # A cart whose payment comes a random few minutes later, around the 2-hour deadline.
    for _ in range(120):
        user_id = f"u{rng.randrange(280):03d}"
        cart = NOW - rng.randint(120, 10 * 1440) * MINUTE
        data.add_event(user_id, "cart_add", cart)
        if rng.random() < 0.7:
            data.add_event(user_id, "payment", cart + rng.choice((0, 60, 119, 120, 121, 180)) * MINUTE)
    _add_edge_users(data)
    return data


def _add_edge_users(data: Dataset) -> None:
    """Users sitting exactly on the boundaries of the cases below."""
    data.add_user("e_missing")  # no attribute, tag, event or package
    data.add_user("e_age_30", age=30, city="Paris", lifetime_value=100.0)
    data.add_user("e_expires_now", membership_expires_at=NOW, last_login_at=NOW - 7 * DAY)
    data.add_user("e_expires_3d", membership_expires_at=NOW + 3 * DAY, last_login_at=NOW - 7 * DAY - MS)
    data.add_user("e_expires_late", membership_expires_at=NOW + 3 * DAY + MS, lifetime_value=250.5)
    data.add_user("e_login_window_start")
    data.add_event("e_login_window_start", "login", NOW - DAY)  # excluded: (now - 1 day, now]
    data.add_user("e_login_now")
    data.add_event("e_login_now", "login", NOW)  # included
    data.add_user("e_login_future")
    data.add_event("e_login_future", "login", NOW + MS)  # not yet
    data.add_user("e_cart_deadline_now")
    data.add_event("e_cart_deadline_now", "cart_add", NOW - 2 * HOUR)  # window just elapsed, unpaid
    data.add_user("e_cart_too_recent")
    data.add_event("e_cart_too_recent", "cart_add", NOW - 2 * HOUR + MS)
    data.add_user("e_cart_paid_at_deadline")
    data.add_event("e_cart_paid_at_deadline", "cart_add", NOW - 3 * HOUR)
    data.add_event("e_cart_paid_at_deadline", "payment", NOW - HOUR)
    data.add_user("e_cart_paid_same_instant")
    data.add_event("e_cart_paid_same_instant", "cart_add", NOW - 5 * HOUR)
    data.add_event("e_cart_paid_same_instant", "payment", NOW - 5 * HOUR)
    data.add_user("e_cart_paid_late")
    data.add_event("e_cart_paid_late", "cart_add", NOW - 5 * HOUR)
    data.add_event("e_cart_paid_late", "payment", NOW - 3 * HOUR + MS)
    data.add_user("e_cart_paid_before")
    data.add_event("e_cart_paid_before", "payment", NOW - 5 * HOUR - MS)
    data.add_event("e_cart_paid_before", "cart_add", NOW - 5 * HOUR)
    data.add_user("e_cart_at_lookback")
    data.add_event("e_cart_at_lookback", "cart_add", NOW - 30 * DAY)  # excluded: (now - lookback, ...]
    data.add_user("e_cart_inside_lookback")
    data.add_event("e_cart_inside_lookback", "cart_add", NOW - 30 * DAY + MS)
    data.add_user("e_two_carts_one_paid")
    data.add_event("e_two_carts_one_paid", "cart_add", NOW - 10 * HOUR)
    data.add_event("e_two_carts_one_paid", "payment", NOW - 9 * HOUR)
    data.add_event("e_two_carts_one_paid", "cart_add", NOW - 4 * HOUR)
    data.add_user("e_tricky", city="back\\slash")
    data.tags.append({"user_id": "e_tricky", "tag": "o'brien"})
    data.packages.append({"package_id": "pkg'b", "user_id": "e_tricky"})


@dataclass(frozen=True)
class Case:
    id: str
    root: dict[str, Any]
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()


def _attr(name: str, op: str, value: Any = None) -> dict[str, Any]:
    node = {"type": "attribute", "name": name, "op": op}
    return node if op == "exists" else node | {"value": value}


def _within(amount: int, unit: str) -> dict[str, Any]:
    return {"amount": amount, "unit": unit}


LOGIN_1D = {"type": "performed", "event_type": "login", "within": _within(1, "days")}
CART_UNPAID = {"type": "performed_without", "first": "cart_add", "then": "payment", "within": _within(2, "hours")}

CASES = [
    Case("tag", {"type": "has_tag", "tag": "vip"}),
    Case("tag_quote", {"type": "has_tag", "tag": "o'brien"}, includes=("e_tricky",)),
    Case("age_gt", _attr("age", ">", 30), excludes=("e_age_30", "e_missing")),
    Case("age_ge", _attr("age", ">=", 30), includes=("e_age_30",)),
    Case("age_lt", _attr("age", "<", 30), excludes=("e_age_30",)),
    Case("age_le", _attr("age", "<=", 30), includes=("e_age_30",)),
    Case("age_eq", _attr("age", "=", 30), includes=("e_age_30",)),
    Case("city_ne", _attr("city", "!=", "Paris"), excludes=("e_age_30", "e_missing")),
    Case("city_in", _attr("city", "in", ["Berlin", "o'brien town", "back\\slash"]), includes=("e_tricky",)),
    Case("value_between", _attr("lifetime_value", "between", [100, 250.5]), includes=("e_age_30", "e_expires_late")),
    Case("vip_exists", _attr("vip_level", "exists"), excludes=("e_missing",)),
    Case("signup_before", _attr("signup_at", "<", (NOW - 200 * DAY).isoformat())),
    Case("country_eq", _attr("country", "=", "FR")),
    Case(
        "expires_next_3d",
        {"type": "attribute_within", "name": "membership_expires_at", "direction": "next", "amount": 3, "unit": "days"},
        includes=("e_expires_now", "e_expires_3d"),
        excludes=("e_expires_late",),
    ),
    Case(
        "login_past_7d",
        {"type": "attribute_within", "name": "last_login_at", "direction": "past", "amount": 7, "unit": "days"},
        includes=("e_expires_now",),
        excludes=("e_expires_3d",),
    ),
    Case("performed_1d", LOGIN_1D, includes=("e_login_now",), excludes=("e_login_window_start", "e_login_future")),
    Case(
        "performed_3x_7d",
        {"type": "performed", "event_type": "login", "min_count": 3, "within": _within(7, "days")},
    ),
    Case(
        "not_performed_purchase",
        {"type": "not_performed", "event_type": "purchase", "within": _within(14, "days")},
        includes=("e_missing",),
    ),
    Case(
        "not_performed_login_1d",
        {"type": "not_performed", "event_type": "login", "within": _within(1, "days")},
        includes=("e_login_window_start", "e_login_future"),
        excludes=("e_login_now",),
    ),
    Case(
        "cart_unpaid_2h",
        CART_UNPAID,
        includes=(
            "e_cart_deadline_now",
            "e_cart_paid_late",
            "e_cart_paid_before",
            "e_two_carts_one_paid",
            "e_cart_inside_lookback",
        ),
        excludes=("e_cart_too_recent", "e_cart_paid_at_deadline", "e_cart_paid_same_instant", "e_cart_at_lookback"),
    ),
    Case(
        "cart_unpaid_90min_lookback_7d",
        CART_UNPAID | {"within": _within(90, "minutes"), "lookback": _within(7, "days")},
    ),
    Case("package", {"type": "in_package", "package_id": "pkg-a"}),
    Case("package_quote", {"type": "in_package", "package_id": "pkg'b"}, includes=("e_tricky",)),
    Case("not_age_gt", {"type": "not", "node": _attr("age", ">", 30)}, includes=("e_missing", "e_age_30")),
    Case("not_city_ne", {"type": "not", "node": _attr("city", "!=", "Paris")}, includes=("e_missing", "e_age_30")),
    Case("not_not_performed", {"type": "not", "node": {"type": "not", "node": LOGIN_1D}}, includes=("e_login_now",)),
    Case("single_and", {"type": "and", "nodes": [_attr("gender", "in", ["f", "x"])]}),
    Case(
        "nested",
        {
            "type": "or",
            "nodes": [
                {"type": "and", "nodes": [{"type": "has_tag", "tag": "vip"}, {"type": "not", "node": LOGIN_1D}]},
                {
                    "type": "and",
                    "nodes": [{"type": "in_package", "package_id": "pkg-a"}, _attr("gender", "in", ["f", "x"])],
                },
                {
                    "type": "not",
                    "node": {
                        "type": "or",
                        "nodes": [
                            _attr("age", "<", 60),
                            {"type": "not_performed", "event_type": "page_view", "within": _within(3, "days")},
                            CART_UNPAID,
                        ],
                    },
                },
            ],
        },
    ),
]


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return _build_dataset()


@pytest.fixture(scope="module")
def facts(dataset: Dataset) -> list[UserFacts]:
    return dataset.facts()


@pytest.fixture(scope="module")
def membership(dataset: Dataset) -> set[tuple[str, str]]:
    return {(row["package_id"], row["user_id"]) for row in dataset.packages}


@pytest.fixture(scope="module")
def chdb_audience(warehouse: Any, dataset: Dataset) -> Any:
    """The shared session warehouse (tests/connectors/conftest.py): chDB opens one data directory per
    process, and its migrate() has already run 006_audience.sql; the four tables are refilled here."""
    for table, rows in (
        ("user_attributes", dataset.users),
        ("user_tags", dataset.tags),
        ("user_events", dataset.events),
        ("package_members", dataset.packages),
    ):
        warehouse.command(f"TRUNCATE TABLE {table}")
        assert warehouse.insert(table, rows) == len(rows)
    return warehouse


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("loopcast-segment-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.catalogImplementation", "in-memory")
        .config("spark.driver.memory", "512m")
        .config("spark.driver.extraJavaOptions", "-XX:+UseSerialGC -XX:TieredStopAtLevel=1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


_TS = pa.timestamp("ms", tz="UTC")
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "datetime": _TS}
_ARROW_SCHEMAS = {
    "user_attributes": pa.schema(
        [pa.field("user_id", pa.string(), nullable=False)]
        + [pa.field(name, _ARROW_TYPES[kind.value]) for name, kind in ATTRIBUTES.items()]
    ),
    "user_tags": pa.schema([pa.field("user_id", pa.string(), False), pa.field("tag", pa.string(), False)]),
    "user_events": pa.schema(
        [
            pa.field("user_id", pa.string(), False),
            pa.field("event_type", pa.string(), False),
            pa.field("occurred_at", _TS, False),
        ]
    ),
    "package_members": pa.schema([pa.field("package_id", pa.string(), False), pa.field("user_id", pa.string(), False)]),
}


@pytest.fixture(scope="module")
def spark_audience(spark: Any, dataset: Dataset) -> Any:
    for table, rows in (
        ("user_attributes", dataset.users),
        ("user_tags", dataset.tags),
        ("user_events", dataset.events),
        ("package_members", dataset.packages),
    ):
        arrow = pa.Table.from_pylist(rows, schema=_ARROW_SCHEMAS[table])
        spark.createDataFrame(arrow).createOrReplaceTempView(table)
    return spark


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_three_way_agreement(
    case: Case, facts: list[UserFacts], membership: set[tuple[str, str]], chdb_audience: Any, spark_audience: Any
) -> None:
    segment = Segment(id=case.id, name=case.id, root=case.root)

    def packages(package_id: str, user_id: str) -> bool:
        return (package_id, user_id) in membership

    realtime = {f.user_id for f in facts if evaluate(segment.root, f, NOW, packages)}
    clickhouse = [row["user_id"] for row in chdb_audience.query(to_sql(segment, "clickhouse", NOW))]
    spark = [row.user_id for row in spark_audience.sql(to_sql(segment, "spark", NOW)).collect()]

    assert len(clickhouse) == len(set(clickhouse)) and len(spark) == len(set(spark))
    assert set(clickhouse) == realtime, f"chDB differs: {sorted(set(clickhouse) ^ realtime)}"
    assert set(spark) == realtime, f"Spark differs: {sorted(set(spark) ^ realtime)}"
    assert 0 < len(realtime) < len(facts), "a case that selects nobody or everybody proves little"
    assert set(case.includes) <= realtime
    assert not set(case.excludes) & realtime

    (counted,) = chdb_audience.query(to_sql(segment, "clickhouse", NOW, count=True))
    assert counted["users"] == len(realtime)
    assert spark_audience.sql(to_sql(segment, "spark", NOW, count=True)).collect()[0].users == len(realtime)


@pytest.mark.unit
def test_agreement_covers_every_node_type() -> None:
    seen: set[str] = set()

    def walk(node: Node) -> None:
        seen.add(node.type)
        for child in children(node):
            walk(child)

    for case in CASES:
        walk(NODE_ADAPTER.validate_python(case.root))
    assert seen == set(NODE_ADAPTER.json_schema()["discriminator"]["mapping"])


@pytest.mark.unit
def test_dataset_is_deterministic() -> None:
    first, second = _build_dataset(), _build_dataset()
    assert first == second
    assert len(first.users) >= 290 and len(first.events) >= 5000
