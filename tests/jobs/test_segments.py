"""The segments job: exported from chDB, run with Spark, its membership equals the real-time
evaluator's on the same data; loading it back twice into chDB and Redis leaves no duplicates; the
script runs on its own, as spark-submit would run it; and `loopcast jobs run` chains it all."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from jobs import segments as segments_job
from jobs.common import AUDIENCE_TABLES, JobError, export_tables, require_writable
from schemas.segments import ATTRIBUTES, Segment, UserFacts
from streams.segments import evaluate

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2025, 3, 1, 12, 0, 0, 500_000, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
DAY = dt.timedelta(days=1)

SEGMENTS: list[dict[str, Any]] = [
    {
        "kind": "segment",
        "id": "vip:paris.v2",
        "name": "VIPs or Parisians",
        "root": {
            "type": "or",
            "nodes": [
                {"type": "has_tag", "tag": "vip"},
                {"type": "attribute", "name": "city", "op": "=", "value": "Paris"},
            ],
        },
    },
    {
        "kind": "segment",
        "id": "active-7d",
        "name": "logged in twice this week",
        "root": {"type": "performed", "event_type": "login", "min_count": 2, "within": {"amount": 7, "unit": "days"}},
    },
    {
        "kind": "segment",
        "id": "cart-unpaid",
        "name": "cart left unpaid for 2 hours",
        "root": {
            "type": "performed_without",
            "first": "cart_add",
            "then": "payment",
            "within": {"amount": 2, "unit": "hours"},
        },
    },
    {
        # a plain Segment (no kind/status); a numeric id stays a string through the partition path
        "id": "123",
        "name": "package, seniors or no recent browsing",
        "root": {
            "type": "or",
            "nodes": [
                {"type": "in_package", "package_id": "pkg-a"},
                {"type": "attribute", "name": "age", "op": ">=", "value": 60},
                {
                    "type": "and",
                    "nodes": [
                        {"type": "not_performed", "event_type": "page_view", "within": {"amount": 3, "unit": "days"}},
                        {"type": "not", "node": {"type": "has_tag", "tag": "newsletter"}},
                    ],
                },
            ],
        },
    },
    {
        "kind": "segment",
        "id": "nobody",
        "name": "empty",
        "root": {"type": "attribute", "name": "age", "op": ">", "value": 200},
    },
    {
        "kind": "segment",
        "id": "paused-one",
        "name": "paused",
        "status": "paused",
        "root": {"type": "has_tag", "tag": "vip"},
    },
]
BUILT = ["vip:paris.v2", "active-7d", "cart-unpaid", "123", "nobody"]


def _dataset(seed: int = 11) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)

    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.8 else None

    data: dict[str, list[dict[str, Any]]] = {table: [] for table in AUDIENCE_TABLES}
    for i in range(200):
        user_id = f"u{i:03d}"
        attributes = {name: None for name in ATTRIBUTES}
        attributes |= {
            "age": maybe(rng.randint(18, 80)),
            "city": maybe(rng.choice(["Paris", "Lyon", "Berlin"])),
            "vip_level": maybe(rng.randint(0, 3)),
            "last_login_at": maybe(NOW - rng.randint(0, 30 * 1440) * MINUTE),
        }
        data["user_attributes"].append({"user_id": user_id, **attributes})
        for tag in ("vip", "newsletter"):
            if rng.random() < 0.25:
                data["user_tags"].append({"user_id": user_id, "tag": tag})
        if rng.random() < 0.2:
            data["package_members"].append({"package_id": "pkg-a", "user_id": user_id})
    for _ in range(3000):
        data["user_events"].append(
            {
                "user_id": f"u{rng.randrange(200):03d}",
                "event_type": rng.choices(["login", "cart_add", "payment", "page_view"], [4, 2, 2, 3])[0],
                "occurred_at": NOW - rng.randint(-60, 20 * 1440) * MINUTE,
            }
        )
    return data


def _facts(data: dict[str, list[dict[str, Any]]]) -> list[UserFacts]:
    tags: dict[str, set[str]] = defaultdict(set)
    for row in data["user_tags"]:
        tags[row["user_id"]].add(row["tag"])
    events: dict[str, dict[str, list[dt.datetime]]] = defaultdict(lambda: defaultdict(list))
    for row in data["user_events"]:
        events[row["user_id"]][row["event_type"]].append(row["occurred_at"])
    return [
        UserFacts(
            user_id=user["user_id"],
            attributes={k: v for k, v in user.items() if k != "user_id" and v is not None},
            tags=tags[user["user_id"]],
            events=dict(events[user["user_id"]]),
        )
        for user in data["user_attributes"]
    ]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict[str, Any]]]:
    return _dataset()


@pytest.fixture(scope="module")
def expected(data: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    """The real-time evaluator's members of every active segment."""
    facts = _facts(data)
    packages = {(row["package_id"], row["user_id"]) for row in data["package_members"]}
    segments = segments_job.parse_segments(SEGMENTS)
    return {
        s.id: {f.user_id for f in facts if evaluate(s.root, f, NOW, lambda p, u: (p, u) in packages)} for s in segments
    }


@pytest.fixture(scope="module")
def audience(warehouse: Any, data: dict[str, list[dict[str, Any]]]) -> Any:
    """The shared session chDB with the audience tables refilled from the data set."""
    for table, rows in data.items():
        warehouse.command(f"TRUNCATE TABLE {table}")
        warehouse.insert(table, rows)
    warehouse.insert("user_attributes", data["user_attributes"][:5])  # unmerged duplicates: exported once
    return warehouse


@pytest.fixture(scope="module")
def segments_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("segments") / "segments.json"
    path.write_text(json.dumps(SEGMENTS))
    return path


@pytest.fixture(scope="module")
def run_dirs(audience: Any, spark: Any, segments_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("segments-job")
    counts = export_tables(audience, base / "input")
    assert counts["user_attributes"] == 200 and counts["user_events"] == 3000
    result = segments_job.run(spark, base / "input", base / "output", segments_job.load_segments(segments_file), NOW)
    assert list(result.members) == BUILT
    return base


def test_membership_equals_the_realtime_evaluator(run_dirs: Path, expected: dict[str, set[str]]) -> None:
    found = segments_job.membership(run_dirs / "output")
    assert set(found) == set(BUILT)  # paused-one skipped
    for segment_id in BUILT:
        assert found[segment_id] == expected[segment_id], segment_id
    assert found["nobody"] == set()
    assert all(0 < len(found[s]) < 200 for s in BUILT if s != "nobody")
    manifest = json.loads((run_dirs / "output" / "_segments.json").read_text())
    assert manifest["members"] == {s: len(expected[s]) for s in BUILT}


def test_load_back_twice_replaces(run_dirs: Path, expected: dict[str, set[str]], warehouse: Any, redis_client: Any):
    warehouse.command("TRUNCATE TABLE segment_membership")
    stale = {"segment_id": "old-segment", "user_id": "u001", "built_at": NOW - DAY}
    warehouse.insert("segment_membership", [stale, stale | {"segment_id": "nobody"}])
    redis_client.sadd("segment:old-segment:members", "u001")
    redis_client.sadd("segment:nobody:members", "u001")
    total = sum(len(members) for members in expected.values())
    for built_at in (NOW + MINUTE, NOW + 2 * MINUTE):
        loaded = segments_job.load_back(
            run_dirs / "output", warehouse=warehouse, redis_client=redis_client, built_at=built_at
        )
        assert loaded["segment_membership"] == total
        (counted,) = warehouse.query(
            "SELECT count() AS n, uniqExact(segment_id, user_id) AS u, max(built_at) AS at FROM segment_membership"
        )
        assert counted == {"n": total, "u": total, "at": built_at}
        (final,) = warehouse.query("SELECT count() AS n FROM segment_membership FINAL")
        assert final["n"] == total
        rows = warehouse.query("SELECT segment_id, user_id FROM segment_membership")
        in_clickhouse: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            in_clickhouse[row["segment_id"]].add(row["user_id"])
        assert dict(in_clickhouse) == {s: users for s, users in expected.items() if users}
        for segment_id, users in expected.items():
            assert redis_client.smembers(segments_job.members_key(segment_id)) == users
        assert sorted(redis_client.scan_iter("segment:*")) == sorted(
            segments_job.members_key(s) for s, users in expected.items() if users
        )

    # Without pruning, only the built segments are replaced.
    warehouse.insert("segment_membership", [stale])
    segments_job.load_back(run_dirs / "output", warehouse=warehouse, prune=False)
    (counted,) = warehouse.query("SELECT count() AS n FROM segment_membership")
    assert counted["n"] == total + 1


def test_script_runs_as_spark_submit_would(run_dirs: Path, segments_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    command = [sys.executable, str(REPO / "jobs" / "segments.py"), "--input", str(run_dirs / "input")]
    command += ["--output", str(output), "--segments", str(segments_file), "--now", NOW.isoformat()]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["now"] == NOW.isoformat()
    assert segments_job.membership(output) == segments_job.membership(run_dirs / "output")


def test_cli_run_job(audience: Any, spark: Any, redis_client: Any, segments_file: Path, tmp_path: Path) -> None:
    from console.jobs_cli import JobName, run_job
    from infra.settings import Settings

    report = run_job(
        JobName.segments,
        Settings(home=tmp_path, clickhouse_url=None),
        segments_file=segments_file,
        now=NOW,
        work_dir=tmp_path / "work",
        warehouse=audience,
        redis_client=redis_client,
        spark=spark,
    )
    assert [name for name, _, _ in report.steps.timings] == [
        "configuration",
        "export from ClickHouse",
        "start Spark",
        "segments job",
        "load into ClickHouse",
        "load into Redis",
        "segment bitmaps",
    ]
    assert set(report.result) == set(BUILT)
    assert redis_client.scard(segments_job.members_key("active-7d")) == report.result["active-7d"]
    # The same members as a bitmap, for sizes and set algebra in milliseconds.
    from connectors.audience_store import AudienceStore

    where = redis_client.connection_pool.connection_kwargs
    store = AudienceStore(f"redis://{where['host']}:{where['port']}/{where.get('db', 0)}")
    assert asyncio.run(store.size("active-7d")) == report.result["active-7d"]
    asyncio.run(store.close())


def test_the_worker_endpoint_is_refused() -> None:
    from connectors.warehouse import RemoteWarehouse

    remote = RemoteWarehouse("http://127.0.0.1:9")
    try:
        with pytest.raises(JobError, match="Stop the worker"):
            require_writable(remote)
    finally:
        remote.close()


def test_segment_documents_only_active_and_distinct() -> None:
    assert [s.id for s in segments_job.parse_segments(SEGMENTS)] == BUILT
    with pytest.raises(JobError, match="repeat"):
        segments_job.parse_segments([SEGMENTS[0], SEGMENTS[0]])
    assert isinstance(segments_job.parse_segments(SEGMENTS[3:4])[0], Segment)
