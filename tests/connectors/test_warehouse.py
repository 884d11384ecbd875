"""The warehouse: the read-only guard, parameters, chDB tables and view, the SQL endpoint, ownership.

In-process chDB tests share the session's one embedded warehouse (conftest.py); tests that need a
second opener or a second data directory run a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import connectors.warehouse as wh
from connectors.warehouse import (
    EmbeddedWarehouse,
    ReadOnlyWarehouse,
    RemoteWarehouse,
    ServerWarehouse,
    WarehouseError,
    WarehousePathConflict,
    WarehouseQueryError,
    connect,
    encode_parameters,
    ensure_read_only,
    funnel,
    insert_dead_letters,
    insert_outcomes,
    json_safe,
    migrate,
    split_statements,
    sql_routes,
)
from infra.clickhouse import migrations
from schemas.models import TERMINAL_CODES, DeadLetter, Outcome, OutcomeCode

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

unit = pytest.mark.unit
integration = pytest.mark.integration


def new_campaign(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def outcome(campaign: str, message: str, code: OutcomeCode, minutes: float = 0, **extra: object) -> Outcome:
    return Outcome(
        message_id=message,
        campaign_id=campaign,
        user_id=f"u-{message}",
        channel="email",
        code=code,
        stage="dispatch",
        triggered_at=T0,
        occurred_at=T0 + timedelta(minutes=minutes),
        **extra,
    )


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


# --------------------------------------------------------------------------------------------
# The read-only guard


@unit
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select 1",
        "  \n\tSELECT 1  ",
        "SELECT 1;",
        "SELECT 1 ;  ; -- trailing comment",
        "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
        "SHOW TABLES",
        "DESCRIBE TABLE outcomes",
        "DESC outcomes",
        "EXPLAIN SELECT 1",
        "EXISTS TABLE outcomes",
        "-- a comment\nSELECT 1",
        "/* a /* nested */ comment */ SELECT 1",
        "# hash comment\nSELECT 1",
        "// slash comment\nSELECT 1",
        "((SELECT 1)) UNION ALL (SELECT 2)",
        "SELECT ';' AS s",
        "SELECT 'it''s; fine' AS s",
        "SELECT 'it\\'s; fine' AS s",
        "SELECT 'x'';DROP TABLE outcomes; SELECT ''' AS s",
        'SELECT 1 AS "a;b"',
        "SELECT 1 AS `a;b`",
        "SELECT $$ ; DROP TABLE outcomes $$ AS s",
        "SELECT $tag$ ; $tag$ AS s",
        "SELECT 1 -- ; DROP TABLE outcomes",
        "SELECT 1 /* ; DROP TABLE outcomes */",
        "SELECT {campaign_id:String} AS c",
    ],
)
def test_read_only_statements_pass(sql: str) -> None:
    statement = ensure_read_only(sql)
    assert statement.strip() and sql.startswith(statement)


@unit
@pytest.mark.parametrize(
    "sql",
    [
        "",
        "   ",
        "-- only a comment",
        ";",
        "INSERT INTO outcomes VALUES ('x')",
        "insert into outcomes select * from outcomes",
        "ALTER TABLE outcomes DELETE WHERE 1",
        "DROP TABLE outcomes",
        "CREATE TABLE t (a Int8) ENGINE = Memory",
        "TRUNCATE TABLE outcomes",
        "OPTIMIZE TABLE outcomes FINAL",
        "RENAME TABLE outcomes TO o2",
        "DETACH TABLE outcomes",
        "SYSTEM SHUTDOWN",
        "SET readonly = 0",
        "KILL QUERY WHERE 1",
        "GRANT ALL ON *.* TO default",
        "-- SELECT\nDROP TABLE outcomes",
        "/* SELECT */ DROP TABLE outcomes",
        "(INSERT INTO outcomes VALUES ('x'))",
        "SELECT 1; DROP TABLE outcomes",
        "SELECT 1; SELECT 2",
        "SELECT 1;\n-- next\nDROP TABLE outcomes;",
        "SELECT 'unterminated",
        "SELECT 1 /* unterminated",
        "SELECT \u2018x\u2019",
        "SELECT a$b$; DROP TABLE outcomes; SELECT $b$",
        "SELECT 1 INTO OUTFILE 'out.csv'",
        "SELECT 1 INTO /* x */ outfile 'out.csv'",
    ],
)
def test_other_statements_are_refused(sql: str) -> None:
    with pytest.raises(ReadOnlyWarehouse, match="refused"):
        ensure_read_only(sql)


@unit
def test_guard_returns_the_statement_without_its_semicolon_and_explains_refusals() -> None:
    assert ensure_read_only("SELECT 1 ;  -- done\n") == "SELECT 1"
    assert ensure_read_only("SELECT ';'") == "SELECT ';'"
    with pytest.raises(ReadOnlyWarehouse, match="not 'DROP'"):
        ensure_read_only("DROP TABLE outcomes")
    with pytest.raises(ReadOnlyWarehouse, match="exactly one statement"):
        ensure_read_only("SELECT 1; SELECT 2")
    with pytest.raises(ReadOnlyWarehouse, match="OUTFILE"):
        ensure_read_only("SELECT 1 INTO OUTFILE 'x'")


@unit
def test_split_statements() -> None:
    script = """
    -- first
    CREATE TABLE a (s String DEFAULT ';') ENGINE = Memory;
    /* second; still a comment */
    CREATE VIEW v AS SELECT 'x;y' AS s
    ;
    ;  -- an empty statement
    SELECT 3
    """
    assert split_statements(script) == [
        "-- first\n    CREATE TABLE a (s String DEFAULT ';') ENGINE = Memory",
        "/* second; still a comment */\n    CREATE VIEW v AS SELECT 'x;y' AS s",
        "-- an empty statement\n    SELECT 3",
    ]
    assert split_statements("-- nothing") == []
    with pytest.raises(WarehouseError):
        split_statements("SELECT 'open")


# --------------------------------------------------------------------------------------------
# Parameters, types, JSON


@unit
def test_parameters_are_encoded_as_clickhouse_escaped_text() -> None:
    encoded = encode_parameters(
        {
            "s": "o'brien\\x\tz\n",
            "none": None,
            "n": 42,
            "f": 0.5,
            "b": True,
            "code": OutcomeCode.sent,
            "t": datetime(2025, 3, 1, 13, 0, 0, 123000, tzinfo=UTC),
            "local": datetime(2025, 3, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2))),
            "d": date(2025, 3, 1),
            "arr": ["a'b", None, 3],
            "tup": (1, "x"),
            "map": {"k": 1},
            "raw": b"\x00\xff",
        }
    )
    assert encoded["s"] == "o\\'brien\\\\x\\tz\\n"
    assert encoded["none"] == "\\N"
    assert encoded["n"] == "42" and encoded["f"] == "0.5" and encoded["b"] == "true"
    assert encoded["code"] == "sent"
    assert encoded["t"] == "2025-03-01 13:00:00.123000"
    assert encoded["local"] == "2025-03-01 12:00:00"
    assert encoded["d"] == "2025-03-01"
    assert encoded["arr"] == "['a\\'b', NULL, 3]"
    assert encoded["tup"] == "(1, 'x')"
    assert encoded["map"] == "{'k': 1}"
    assert encoded["raw"] == "\\x00\\xff"
    with pytest.raises(WarehouseQueryError, match="bad parameter name"):
        encode_parameters({"x; DROP": 1})
    with pytest.raises(WarehouseQueryError, match="cannot bind"):
        encode_parameters({"x": object()})


@unit
def test_server_warehouse_is_lazy_and_binds_like_chdb() -> None:
    from clickhouse_connect.driver.binding import bind_query

    server = ServerWarehouse("clickhouse://default:s3cret@127.0.0.1:9/loopcast")
    assert server._client is None  # nothing connects before the first call
    assert "s3cret" not in repr(server)
    # The guard runs before any connection is attempted.
    with pytest.raises(ReadOnlyWarehouse):
        server.query("DROP TABLE outcomes")
    assert server._client is None

    parameters = {"c": "x' OR '1'='1", "t": datetime(2025, 3, 1, 12, 0, 0, 5000, tzinfo=UTC), "n": None}
    statement = (
        "SELECT * FROM campaign_funnel WHERE campaign_id = {c:String}"
        " AND {t:DateTime64(3)} > 0 AND {n:Nullable(Int8)} IS NULL"
    )
    bound = ServerWarehouse.server_parameters(statement, parameters)
    final_sql, url_params = bind_query(statement, bound)
    assert final_sql == statement  # nothing pasted into the SQL
    assert url_params == {f"param_{k}": v for k, v in encode_parameters(parameters).items()}
    # Without placeholders, values are not sent at all (never formatted into the text).
    assert ServerWarehouse.server_parameters("SELECT 1", parameters) is None
    server.close()


@unit
def test_column_types_map_to_arrow() -> None:
    column_type = wh._column_arrow_type
    assert column_type("String") == (pa.binary(), False)
    assert column_type("LowCardinality(String)") == (pa.binary(), False)
    assert column_type("Nullable(String)") == (pa.binary(), True)
    assert column_type("LowCardinality(Nullable(String))") == (pa.binary(), True)
    assert column_type("DateTime64(3, 'UTC')") == (pa.timestamp("ms", tz="UTC"), False)
    assert column_type("DateTime64(6)") == (pa.timestamp("us", tz="UTC"), False)
    assert column_type("Int32") == (pa.int32(), False)
    assert column_type("UInt32") == (pa.uint32(), False)
    assert column_type("Array(String)") == (None, False)


@unit
def test_json_safe() -> None:
    value = {
        "t": datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC),
        "d": date(2025, 3, 1),
        "text": b"caf\xc3\xa9",
        "binary": b"\x00\xff",
        "nan": float("nan"),
        "nested": [(1, 2.5)],
        "id": uuid.UUID(int=1),
    }
    assert json_safe(value) == {
        "t": "2025-03-01T12:00:00.123000+00:00",
        "d": "2025-03-01",
        "text": "café",
        "binary": base64.b64encode(b"\x00\xff").decode(),
        "nan": None,
        "nested": [[1, 2.5]],
        "id": "00000000-0000-0000-0000-000000000001",
    }
    json.dumps(json_safe(value), allow_nan=False)


@unit
def test_remote_warehouse_refuses_writes_without_a_server() -> None:
    remote = RemoteWarehouse("http://127.0.0.1:9")
    try:
        with pytest.raises(ReadOnlyWarehouse):
            remote.insert("outcomes", [{"message_id": "m"}])
        with pytest.raises(ReadOnlyWarehouse):
            remote.command("DROP TABLE outcomes")
        with pytest.raises(ReadOnlyWarehouse):
            remote.query("DROP TABLE outcomes")
    finally:
        remote.close()


@unit
def test_bundled_migrations_are_numbered() -> None:
    found = migrations()
    assert [m.version for m in found][:3] == [1, 2, 3]
    assert [m.name for m in found][:3] == ["001_outcomes", "002_dead_letters", "003_funnel_view"]
    assert len({m.version for m in found}) == len(found)


# --------------------------------------------------------------------------------------------
# chDB: schema, inserts, the funnel


@integration
def test_migrations_apply_once(warehouse: EmbeddedWarehouse) -> None:
    # The session fixture applied them; a second run is a no-op.
    assert migrate(warehouse) == []
    applied = warehouse.query("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in applied] == [(m.version, m.name) for m in migrations()]
    tables = {r["name"] for r in warehouse.query("SHOW TABLES")}
    assert {"outcomes", "dead_letters", "campaign_funnel", "schema_migrations"} <= tables


@integration
def test_readme_documents_every_column(warehouse: EmbeddedWarehouse) -> None:
    readme = (REPO / "infra" / "clickhouse" / "README.md").read_text()
    documented: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in readme.splitlines():
        heading = re.match(r"## (?:Table|View) `(\w+)`", line)
        if heading:
            current = heading.group(1)
            documented[current] = []
        elif line.startswith("## "):
            current = None
        elif current and (row := re.match(r"\| `(\w+)` \| `([^`]+)` \|", line)):
            documented[current].append((row.group(1), row.group(2)))
    # Every table and view there is, documented: the README is the public interface.
    assert set(documented) == {r["name"] for r in warehouse.query("SHOW TABLES")}
    for table, columns in documented.items():
        actual = warehouse.query(
            "SELECT name, type FROM system.columns"
            " WHERE database = currentDatabase() AND table = {t:String} ORDER BY position",
            {"t": table},
        )
        assert [(r["name"], r["type"]) for r in actual] == columns, table


@integration
def test_duplicate_outcomes_collapse(warehouse: EmbeddedWarehouse) -> None:
    campaign = new_campaign("dup")
    batch = [outcome(campaign, f"m{i}", OutcomeCode.sent) for i in range(50)]
    assert insert_outcomes(warehouse, batch) == 50
    assert insert_outcomes(warehouse, batch) == 50  # Kafka redelivered the whole batch
    count = "SELECT count() AS n FROM outcomes FINAL WHERE campaign_id = {c:String}"
    assert warehouse.query(count, {"c": campaign}) == [{"n": 50}]
    assert funnel(warehouse, campaign)[0]["sent"] == 50
    warehouse.command("OPTIMIZE TABLE outcomes FINAL")
    plain = "SELECT count() AS n FROM outcomes WHERE campaign_id = {c:String}"
    assert warehouse.query(plain, {"c": campaign}) == [{"n": 50}]


@integration
def test_alerts_collapse_and_report_newest_first(warehouse: EmbeddedWarehouse) -> None:
    from connectors.warehouse import insert_alerts
    from console.reports import alerts_report
    from schemas.models import Alert, Severity

    subject = f"{uuid.uuid4().hex[:8]}/webhook"
    now = datetime.now(UTC)
    drop = Alert(
        alert_id=f"delivery_rate_drop:{subject}:1",
        kind="delivery_rate_drop",
        severity=Severity.critical,
        subject=subject,
        message="dropped",
        value=0.2,
        occurred_at=now - timedelta(minutes=5),
    )
    recovered = drop.model_copy(
        update={"alert_id": f"delivery_rate_recovered:{subject}:1", "kind": "delivery_rate_recovered",
                "severity": Severity.info, "value": 0.99, "occurred_at": now}
    )  # fmt: skip
    assert insert_alerts(warehouse, [drop, recovered]) == 2
    insert_alerts(warehouse, [drop])  # Kafka redelivered it
    rows = [r for r in alerts_report(warehouse, hours=1, limit=1000) if r["subject"] == subject]
    assert [(r["kind"], r["severity"], r["value"]) for r in rows] == [
        ("delivery_rate_recovered", "info", 0.99),
        ("delivery_rate_drop", "critical", 0.2),
    ]


@integration
def test_funnel_numbers(warehouse: EmbeddedWarehouse) -> None:
    a, b, c = new_campaign("a"), new_campaign("b"), new_campaign("c")
    rows = [outcome(a, f"m{i}", OutcomeCode.sent, minutes=i) for i in range(1, 7)]
    rows += [
        outcome(a, "m7", OutcomeCode.failed, minutes=-5, reason="provider said no"),
        outcome(a, "m8", OutcomeCode.capped),
        outcome(a, "m9", OutcomeCode.opted_out),
        outcome(a, "m10", OutcomeCode.render_failed, reason="missing variable"),
    ]
    rows += [outcome(a, f"m{i}", OutcomeCode.delivered, minutes=10, provider="sandbox") for i in (1, 2, 3, 4)]
    rows += [
        outcome(a, "m5", OutcomeCode.undelivered, minutes=10),
        outcome(a, "m1", OutcomeCode.clicked, minutes=20),
        outcome(a, "m2", OutcomeCode.clicked, minutes=21),
        outcome(a, "m1", OutcomeCode.converted, minutes=30),
    ]
    rows += [outcome(b, "m1", OutcomeCode.sent), outcome(b, "m2", OutcomeCode.sent)]
    rows += [outcome(c, "m1", OutcomeCode.capped)]
    insert_outcomes(warehouse, rows)
    insert_outcomes(warehouse, [outcome(a, "m1", OutcomeCode.delivered, minutes=10)])  # a duplicate receipt

    [row_a] = funnel(warehouse, a)
    assert row_a == {
        "campaign_id": a,
        "targeted": 10,
        "sent": 6,
        "delivered": 4,
        "undelivered": 1,
        "clicked": 2,
        "converted": 1,
        "failed": 1,
        "suppressed": 3,
        "delivery_rate": pytest.approx(4 / 6),
        "ctr": pytest.approx(0.5),
        "cvr": pytest.approx(0.25),
        "first_at": T0 - timedelta(minutes=5),
        "last_at": T0 + timedelta(minutes=30),
    }
    [row_b] = funnel(warehouse, b)
    assert (row_b["sent"], row_b["delivered"], row_b["delivery_rate"], row_b["ctr"], row_b["cvr"]) == (2, 0, 0, 0, 0)
    [row_c] = funnel(warehouse, c)
    assert (row_c["targeted"], row_c["sent"], row_c["suppressed"], row_c["delivery_rate"]) == (1, 0, 1, 0)
    everything = funnel(warehouse)
    ids = [r["campaign_id"] for r in everything]
    assert {a, b, c} <= set(ids) and ids == sorted(ids)


@integration
def test_funnel_agrees_with_terminal_codes(warehouse: EmbeddedWarehouse) -> None:
    campaign = new_campaign("codes")
    insert_outcomes(warehouse, [outcome(campaign, f"m-{code.value}", code) for code in OutcomeCode])
    [row] = funnel(warehouse, campaign)
    assert row["targeted"] == len(TERMINAL_CODES)
    assert row["suppressed"] == len(TERMINAL_CODES - {OutcomeCode.sent, OutcomeCode.failed})
    assert row["targeted"] == row["sent"] + row["failed"] + row["suppressed"]
    # And the SQL spells exactly the terminal codes.
    view_sql = next(m.sql for m in migrations() if m.name == "003_funnel_view")
    targeted = re.search(r"code IN \(([^)]*)\)\) AS targeted", view_sql)
    assert targeted is not None
    assert set(re.findall(r"'(\w+)'", targeted.group(1))) == {c.value for c in TERMINAL_CODES}


@integration
def test_parameters_are_bound_not_pasted(warehouse: EmbeddedWarehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    quoted = new_campaign('o\'brien \\ "q"')
    other = new_campaign("other")
    insert_outcomes(warehouse, [outcome(quoted, "m1", OutcomeCode.sent), outcome(other, "m1", OutcomeCode.sent)])
    assert [r["campaign_id"] for r in funnel(warehouse, quoted)] == [quoted]

    calls: list[tuple[str, dict[str, str]]] = []
    real = warehouse._conn

    class Spy:
        def query(self, sql: str, fmt: str, params: dict[str, str]) -> object:
            calls.append((sql, params))
            return real.query(sql, fmt, params=params)

    monkeypatch.setattr(warehouse, "_conn", Spy())
    injection = "x' OR '1'='1"
    assert funnel(warehouse, injection) == []
    echoed = warehouse.query("SELECT {s:String} AS s", {"s": "'); DROP TABLE outcomes; --"})
    monkeypatch.undo()

    assert echoed == [{"s": "'); DROP TABLE outcomes; --"}]
    assert all(injection not in sql and "DROP" not in sql for sql, _ in calls)
    assert calls[0][1] == {"campaign_id": "x\\' OR \\'1\\'=\\'1"}
    assert calls[0][0].endswith("SETTINGS readonly=1")
    assert warehouse.query("EXISTS TABLE outcomes") == [{"result": 1}]


@integration
def test_query_is_read_only_even_past_the_guard(warehouse: EmbeddedWarehouse) -> None:
    with pytest.raises(ReadOnlyWarehouse):
        warehouse.query("DROP TABLE outcomes")
    # Table functions pass the text guard but not the engine's readonly=1.
    with pytest.raises(WarehouseQueryError, match="readonly"):
        warehouse.query("SELECT * FROM file('anything.csv', 'CSV')")
    with pytest.raises(WarehouseQueryError, match="readonly"):
        warehouse.query("SELECT 1 SETTINGS max_threads = 1")
    assert warehouse.query("SELECT 1 AS one") == [{"one": 1}]


@integration
@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT 'x'';DROP TABLE outcomes; SELECT ''' AS s", "x';DROP TABLE outcomes; SELECT '"),
        ("SELECT 'it\\'s; fine' AS s", "it's; fine"),
        ("SELECT $$ ; DROP TABLE outcomes $$ AS s", " ; DROP TABLE outcomes "),
        ("SELECT /* ; /* ; */ DROP */ 'a' AS s -- ; DROP", "a"),
        ("# ; DROP\nSELECT 'b' AS s; ", "b"),
    ],
)
def test_the_guard_and_the_engine_see_the_same_single_statement(
    warehouse: EmbeddedWarehouse, sql: str, expected: str
) -> None:
    assert warehouse.query(sql) == [{"s": expected}]


@integration
def test_dead_letters_keep_bytes(warehouse: EmbeddedWarehouse) -> None:
    topic = new_campaign("topic")
    letters = [
        DeadLetter(stage="render", topic=topic, partition=1, offset=7, reason="bad avro", error_type="ValueError",
                   key=b"user-\xff", original=b"\x00\xff\xfe avro", occurred_at=T0),
        DeadLetter(stage="render", topic=topic, partition=1, offset=8, reason="bad json", error_type="JSONDecodeError",
                   original=b'{"not": json', occurred_at=T0),
    ]  # fmt: skip
    assert insert_dead_letters(warehouse, letters) == 2
    assert insert_dead_letters(warehouse, letters[:1]) == 1  # redelivered
    rows = warehouse.query(
        "SELECT stage, topic, partition, offset, reason, error_type, key, original, occurred_at "
        "FROM dead_letters FINAL WHERE topic = {t:String} ORDER BY offset",
        {"t": topic},
    )
    assert rows == [
        {"stage": "render", "topic": topic, "partition": 1, "offset": 7, "reason": "bad avro",
         "error_type": "ValueError", "key": b"user-\xff", "original": b"\x00\xff\xfe avro", "occurred_at": T0},
        {"stage": "render", "topic": topic, "partition": 1, "offset": 8, "reason": "bad json",
         "error_type": "JSONDecodeError", "key": None, "original": '{"not": json', "occurred_at": T0},
    ]  # fmt: skip


@integration
def test_insert_checks_rows(warehouse: EmbeddedWarehouse) -> None:
    good = wh.outcome_row(outcome(new_campaign(), "m1", OutcomeCode.sent))
    with pytest.raises(WarehouseQueryError, match="not Nullable"):
        warehouse.insert("outcomes", [good, {**good, "message_id": None}])
    with pytest.raises(WarehouseQueryError, match="no column"):
        warehouse.insert("outcomes", [{**good, "surprise": 1}])
    with pytest.raises(WarehouseQueryError, match="unknown table"):
        warehouse.insert("no_such_table", [good])
    with pytest.raises(WarehouseQueryError, match="bad table name"):
        warehouse.insert("outcomes; DROP TABLE outcomes", [good])
    assert warehouse.insert("outcomes", []) == 0


@integration
def test_concurrent_calls_are_serialised(warehouse: EmbeddedWarehouse) -> None:
    campaign = new_campaign("threads")

    def work(i: int) -> int:
        insert_outcomes(warehouse, [outcome(campaign, f"m{i}-{j}", OutcomeCode.sent) for j in range(20)])
        rows = warehouse.query("SELECT count() AS n FROM outcomes WHERE campaign_id = {c:String}", {"c": campaign})
        return rows[0]["n"]

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(work, range(12)))
    assert max(counts) >= 20
    assert funnel(warehouse, campaign)[0]["sent"] == 240


# --------------------------------------------------------------------------------------------
# The HTTP endpoint


def sql_app(warehouse: EmbeddedWarehouse) -> web.Application:
    app = web.Application()
    app.add_routes(sql_routes(warehouse))
    return app


@integration
def test_sql_endpoint(warehouse: EmbeddedWarehouse) -> None:
    topic = new_campaign("endpoint")
    insert_dead_letters(warehouse, [DeadLetter(stage="match", topic=topic, partition=0, offset=1, reason="r",
                                               error_type="E", original=b"\xff\x00", occurred_at=T0)])  # fmt: skip

    async def scenario() -> None:
        async with TestClient(TestServer(sql_app(warehouse), host="127.0.0.1")) as client:
            health = await client.get("/sql/health")
            assert health.status == 200 and (await health.json())["ok"] is True

            ok = await client.post("/sql", json={
                "sql": "SELECT {c:String} AS c, toDateTime64('2025-03-01 12:00:00.123', 3, 'UTC') AS t, 1.5 AS f",
                "parameters": {"c": "o'k"},
            })  # fmt: skip
            assert ok.status == 200
            assert await ok.json() == {"rows": [{"c": "o'k", "t": "2025-03-01T12:00:00.123000+00:00", "f": 1.5}]}

            letters = await client.post(
                "/sql",
                json={"sql": "SELECT original FROM dead_letters WHERE topic = {t:String}", "parameters": {"t": topic}},
            )
            assert (await letters.json())["rows"] == [{"original": base64.b64encode(b"\xff\x00").decode()}]

            for refused in [
                "INSERT INTO outcomes (message_id) VALUES ('x')",
                "DROP TABLE outcomes",
                "SELECT 1; DROP TABLE outcomes",
                "SELECT 1; SELECT 2",
            ]:
                response = await client.post("/sql", json={"sql": refused})
                body = await response.json()
                assert response.status == 400, refused
                assert body["type"] == "ReadOnlyWarehouse" and "refused" in body["error"]

            failing = await client.post("/sql", json={"sql": "SELECT * FROM no_such_table"})
            assert failing.status == 400 and (await failing.json())["type"] == "WarehouseQueryError"
            engine_refused = await client.post("/sql", json={"sql": "SELECT * FROM file('x.csv', 'CSV')"})
            assert engine_refused.status == 400 and "readonly" in (await engine_refused.json())["error"]
            not_json = await client.post("/sql", data=b"SELECT 1")
            assert not_json.status == 400 and (await not_json.json())["type"] == "BadRequest"
            no_sql = await client.post("/sql", json={"query": "SELECT 1"})
            assert no_sql.status == 400
            bad_params = await client.post("/sql", json={"sql": "SELECT 1", "parameters": [1]})
            assert bad_params.status == 400
            missing_param = await client.post("/sql", json={"sql": "SELECT {x:String} AS x"})
            assert missing_param.status == 400 and (await missing_param.json())["type"] == "WarehouseQueryError"

    asyncio.run(scenario())
    assert warehouse.query("EXISTS TABLE outcomes") == [{"result": 1}]


@integration
def test_sql_endpoint_does_not_block_the_event_loop(warehouse: EmbeddedWarehouse) -> None:
    async def scenario() -> None:
        async with TestClient(TestServer(sql_app(warehouse), host="127.0.0.1")) as client:
            wh._CHDB_LOCK.acquire()  # chDB is "busy": the query thread will wait for it
            try:
                pending = asyncio.ensure_future(client.post("/sql", json={"sql": "SELECT 42 AS answer"}))
                health = await client.get("/sql/health")  # the loop still serves meanwhile
                assert health.status == 200
                assert not pending.done()
            finally:
                wh._CHDB_LOCK.release()
            response = await pending
            assert await response.json() == {"rows": [{"answer": 42}]}

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# Ownership: connect(), the owner file, a second process, a second path


@contextmanager
def serve_in_thread(app: web.Application) -> Iterator[int]:
    """Run an aiohttp app on 127.0.0.1 (a free port) in its own thread and loop; yield the port."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    started = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        port.append(runner.addresses[0][1])
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@integration
def test_connect_owner_and_readers(warehouse: EmbeddedWarehouse, warehouse_settings) -> None:
    with serve_in_thread(sql_app(warehouse)) as port:
        settings = warehouse_settings.model_copy(update={"http_port": port})
        owner_file = settings.run_dir / "warehouse.json"
        owner = connect(settings, owner=True)
        try:
            assert isinstance(owner, EmbeddedWarehouse) and owner.path == warehouse.path
            assert json.loads(owner_file.read_text()) == {"pid": os.getpid(), "url": settings.http_base}
            reader = connect(settings)
            try:
                assert isinstance(reader, RemoteWarehouse)
                rows = reader.query(
                    "SELECT {c:String} AS c, {t:DateTime64(3, 'UTC')} AS t, {n:Nullable(String)} AS n",
                    {"c": "o'k", "t": T0 + timedelta(milliseconds=123), "n": None},
                )
                assert rows == [{"c": "o'k", "t": "2025-03-01T12:00:00.123000+00:00", "n": None}]
                with pytest.raises(ReadOnlyWarehouse):
                    reader.insert("outcomes", [{"message_id": "m"}])
                with pytest.raises(WarehouseQueryError, match="(?i)unknown table"):
                    reader.query("SELECT * FROM no_such_table")
            finally:
                reader.close()
        finally:
            owner.close()
        assert not owner_file.exists()
        assert warehouse.query("SELECT 1 AS one") == [{"one": 1}]  # the session's handle survived

    # Nobody advertises the warehouse: a reader opens chDB itself (the same directory here).
    direct = connect(settings)
    assert isinstance(direct, EmbeddedWarehouse)
    direct.close()

    # A stale owner file (dead pid, or a live pid whose endpoint does not answer) is ignored.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for info in ({"pid": gone.pid, "url": f"http://127.0.0.1:{free_port()}"},
                 {"pid": os.getpid(), "url": f"http://127.0.0.1:{free_port()}"}):  # fmt: skip
        owner_file.write_text(json.dumps(info))
        fallback = connect(settings)
        assert isinstance(fallback, EmbeddedWarehouse)
        fallback.close()
    owner_file.unlink()

    server = connect(settings.model_copy(update={"clickhouse_url": "clickhouse://127.0.0.1:9/default"}))
    assert isinstance(server, ServerWarehouse) and server._client is None
    server.close()


@integration
def test_a_second_process_gets_warehouse_locked(warehouse: EmbeddedWarehouse) -> None:
    code = """
import sys
from connectors.warehouse import EmbeddedWarehouse, WarehouseLocked
try:
    EmbeddedWarehouse(sys.argv[1])
except WarehouseLocked as exc:
    print("LOCKED", exc.pid)
else:
    print("OPENED")
"""
    result = run_python(code, str(warehouse.path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LOCKED", str(os.getpid())]


@integration
def test_one_process_opens_one_path_at_a_time(warehouse: EmbeddedWarehouse, tmp_path: Path) -> None:
    # In this process the session's directory is open: another one is refused before chDB is touched.
    with pytest.raises(WarehousePathConflict):
        EmbeddedWarehouse(tmp_path / "other")
    assert not (tmp_path / "other").exists()

    code = """
import sys
import chdb
from connectors.warehouse import EmbeddedWarehouse, WarehousePathConflict
first, second = sys.argv[1], sys.argv[2]
a = EmbeddedWarehouse(first)
a.command("CREATE TABLE t (x Int32) ENGINE = MergeTree ORDER BY x")
try:
    EmbeddedWarehouse(second)
except WarehousePathConflict:
    print("CONFLICT")
try:  # what chDB itself does, under the wrapper
    chdb.connect(second)
except RuntimeError as exc:
    print("RAW", "already initialized with path" in str(exc))
a.close()
b = EmbeddedWarehouse(second)  # allowed once the first is closed
print("SECOND", [r["name"] for r in b.query("SHOW TABLES")])
b.close()
a = EmbeddedWarehouse(first)  # and back
print("FIRST", [r["name"] for r in a.query("SHOW TABLES")])
a.close()
"""
    result = run_python(code, str(tmp_path / "first"), str(tmp_path / "second"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["CONFLICT", "RAW True", "SECOND []", "FIRST ['t']"]
