"""Materialise the members of every active segment in one Spark batch, with the very SQL the
warehouse runs (connectors.segment_sql, Spark dialect), so campaigns can target a segment without
evaluating it user by user; then load the membership back into ClickHouse and Redis."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# spark-submit runs this file as a script: put the repository root on sys.path so that `jobs`,
# `schemas` and `connectors` import without installing the package on the cluster.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from connectors.segment_sql import to_sql  # noqa: E402
from jobs.common import (  # noqa: E402
    AUDIENCE_TABLES,
    JobError,
    insert_table,
    job_main,
    read_manifest,
    read_parquet,
    replace_set,
    require_writable,
    sql_string,
    write_manifest,
)
from schemas.config import SegmentDocument  # noqa: E402
from schemas.segments import Segment  # noqa: E402

if TYPE_CHECKING:
    import redis
    from pyspark.sql import SparkSession

    from connectors.warehouse import Warehouse

MEMBERSHIP = "segment_membership"
MANIFEST = "segments"


def members_key(segment_id: str) -> str:
    return f"segment:{segment_id}:members"


@dataclass(frozen=True)
class SegmentsResult:
    now: dt.datetime
    members: dict[str, int]  # segment id → number of members, for every segment built


def parse_segments(items: Sequence[dict[str, Any]]) -> list[Segment]:
    """The active segments of a list of segment documents (schemas.config.SegmentDocument, recognised
    by `kind` or `status`; paused ones are skipped) or plain schemas.segments.Segment objects."""
    segments: list[Segment] = []
    for item in items:
        if "kind" in item or "status" in item:
            document = SegmentDocument.model_validate(item)
            if document.status == "active":
                segments.append(document.segment)
        else:
            segments.append(Segment.model_validate(item))
    ids = [s.id for s in segments]
    if len(set(ids)) != len(ids):
        raise JobError(f"segment ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return segments


def load_segments(path: Path) -> list[Segment]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a JSON list of segments")
    return parse_segments(data)


def register_tables(spark: SparkSession, input_dir: Path) -> None:
    """The four audience tables as temp views with the names the segment SQL uses."""
    for table in AUDIENCE_TABLES:
        source = Path(input_dir) / table
        if not source.exists():
            raise JobError(f"{source} not found: export the audience tables ({', '.join(AUDIENCE_TABLES)}) first")
        spark.read.parquet(str(source)).createOrReplaceTempView(table)


def run(
    spark: SparkSession, input_dir: Path, output_dir: Path, segments: Sequence[Segment], now: dt.datetime
) -> SegmentsResult:
    """Select every segment's users as of `now` and write them under `output_dir` (replacing).

    Input: Parquet `user_attributes`, `user_tags`, `user_events`, `package_members` under `input_dir`
    (the audience tables of infra/clickhouse/006_audience.sql). Output: the Parquet dataset
    `segment_membership(user_id)` partitioned by segment_id, and `_segments.json` naming every segment
    built with its size (an empty segment has no partition, yet its old members must go).
    """
    from pyspark.sql import functions as F

    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    register_tables(spark, input_dir)
    output = Path(output_dir)
    target = output / MEMBERSHIP
    selections = [
        spark.sql(to_sql(segment, "spark", now)).select(F.lit(segment.id).alias("segment_id"), "user_id")
        for segment in segments
    ]
    if selections:
        membership = selections[0]
        for selection in selections[1:]:
            membership = membership.unionByName(selection)
        # user_attributes is a ReplacingMergeTree: an unmerged duplicate user must not count twice.
        membership = membership.dropDuplicates(["segment_id", "user_id"])
        membership.write.mode("overwrite").partitionBy("segment_id").parquet(str(target))
        counted = (
            read_parquet(target, ["segment_id"], partition="segment_id")
            .group_by("segment_id")
            .aggregate([([], "count_all")])
        )
        found = dict(zip(counted.column(0).to_pylist(), counted.column(1).to_pylist(), strict=True))
    else:
        found = {}
        output.mkdir(parents=True, exist_ok=True)
    members = {segment.id: found.get(segment.id, 0) for segment in segments}
    write_manifest(output, MANIFEST, {"now": now.isoformat(), "members": members})
    return SegmentsResult(now=now, members=members)


def membership(output_dir: Path) -> dict[str, set[str]]:
    """segment id → its members, for every segment the run in `output_dir` built."""
    built = read_manifest(output_dir, MANIFEST)["members"]
    result: dict[str, set[str]] = {segment_id: set() for segment_id in built}
    target = Path(output_dir) / MEMBERSHIP
    if target.exists() and built:
        table = read_parquet(target, ["segment_id", "user_id"], partition="segment_id")
        for segment_id, user_id in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True):
            result[segment_id].add(user_id)
    return result


def load_back(
    output_dir: Path,
    *,
    warehouse: Warehouse | None = None,
    redis_client: redis.Redis | None = None,
    built_at: dt.datetime | None = None,
    prune: bool = True,
) -> dict[str, int]:
    """Replace each built segment's members in ClickHouse (DELETE its rows, then insert) and in Redis
    (`segment:{id}:members`, rebuilt in a temporary key and RENAMEd over). With `prune`, segments not
    built this time (paused or deleted since) lose their rows and sets too. A rerun replaces, so
    loading the same output twice leaves the same rows."""
    output = Path(output_dir)
    members = membership(output)
    built_at = built_at or dt.datetime.now(dt.UTC)
    loaded: dict[str, int] = {}
    if warehouse is not None:
        require_writable(warehouse)
        if prune:
            warehouse.command(f"TRUNCATE TABLE {MEMBERSHIP}")
        elif members:
            ids = ", ".join(sql_string(segment_id) for segment_id in sorted(members))
            warehouse.command(f"DELETE FROM {MEMBERSHIP} WHERE segment_id IN ({ids})")
        written = 0
        target = output / MEMBERSHIP
        if target.exists() and members:
            table = read_parquet(target, ["segment_id", "user_id"], partition="segment_id")
            written = insert_table(warehouse, MEMBERSHIP, table, {"built_at": built_at})
        loaded[MEMBERSHIP] = written
    if redis_client is not None:
        for segment_id, users in members.items():
            replace_set(redis_client, members_key(segment_id), sorted(users))
        if prune:
            stale = [
                key
                for key in redis_client.scan_iter(match="segment:*:members", count=5_000)
                if (key.decode() if isinstance(key, bytes) else key)[len("segment:") : -len(":members")] not in members
            ]
            if stale:
                redis_client.delete(*stale)
        loaded["redis sets"] = len(members)
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        description=__doc__.splitlines()[0],
        name="segments",
        input_help="directory holding the four audience tables",
        output_help="directory for segment_membership (Parquet)",
        definitions="segments",
        definitions_help="JSON list of segments",
        run=run,
        load=load_segments,
        summary=lambda result: {"members": result.members},
    )


if __name__ == "__main__":
    sys.exit(main())
