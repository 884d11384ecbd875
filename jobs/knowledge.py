"""The copy knowledge base (Spark): what every template, keyword and phrase of the copy sent has earned in
clicks and conversions per send, with 95 % Wilson lower bounds, per campaign and channel and overall; then
load it back into ClickHouse (copy_library, copy_knowledge), where connectors.knowledge reads few-shot examples
and the priors new variants start from."""

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

from connectors.knowledge import KNOWLEDGE, LIBRARY  # noqa: E402
from jobs.common import (  # noqa: E402
    JobError,
    insert_table,
    job_main,
    read_manifest,
    read_parquet,
    require_writable,
    write_manifest,
)
from schemas.config import DOCUMENT_TYPES, Document  # noqa: E402
from schemas.models import ConfigKind  # noqa: E402
from streams.copy.knowledge import MIN_SENDS, Z, library_rows, terms  # noqa: E402

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from connectors.warehouse import Warehouse

MANIFEST = "knowledge"
# Every item is counted at these scopes; '' stands for "all" in copy_knowledge's campaign_id and channel.
SCOPES: tuple[tuple[str, ...], ...] = (("campaign_id", "channel"), ("campaign_id",), ("channel",), ())
LIBRARY_SCHEMA = (
    "template_id string, version int, campaign_id string, variant string, channel string, channel_format string,"
    " trigger_event string, title string, body string, long_text string, cta string, text string, source string,"
    " seen_at timestamp"
)


@dataclass(frozen=True)
class KnowledgeResult:
    now: dt.datetime
    copies: int  # copy_library rows: templates behind campaign variants, plus unused templates
    sends: int  # messages sent whose copy is known
    unattributed: int  # messages sent whose campaign variant has no template among the documents
    items: dict[str, int]  # kind → items with at least min_sends sends, over all campaigns and channels


def parse_documents(items: Sequence[dict[str, Any]]) -> list[Document]:
    """Templates, campaigns and channels (config documents, recognised by `kind`); other kinds are skipped."""
    wanted = (ConfigKind.template, ConfigKind.campaign, ConfigKind.channel)
    documents: list[Document] = []
    for item in items:
        kind = ConfigKind(item.get("kind"))
        if kind in wanted:
            documents.append(DOCUMENT_TYPES[kind].model_validate(item))
    return documents


def load_documents(path: Path) -> list[Document]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a JSON list of config documents (templates, campaigns, channels)")
    return parse_documents(data)


def wilson_lower(successes: Column, trials: Column) -> Column:
    """streams.copy.knowledge.wilson_lower as a Spark column (the views compute it in SQL)."""
    from pyspark.sql import functions as F

    n = trials.cast("double")
    p = successes / n
    z2 = Z * Z
    bound = (p + z2 / (2 * n) - Z * F.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
    return F.when(trials > 0, F.greatest(F.lit(0.0), bound)).otherwise(F.lit(0.0))


def sent_messages(outcomes: DataFrame) -> DataFrame:
    """One row per message sent: campaign_id, variant ('' without one), channel, clicked, converted. A
    message's variant is on its send rows only, so it is taken from whichever row carries one."""
    from pyspark.sql import functions as F

    def has(code: str) -> Column:
        return F.max(F.when(F.col("code") == code, 1).otherwise(0)) == 1

    return (
        outcomes.groupBy("campaign_id", "message_id")
        .agg(
            F.coalesce(F.first("variant", ignorenulls=True), F.lit("")).alias("variant"),
            F.first("channel").alias("channel"),
            has("sent").alias("sent"),
            has("clicked").alias("clicked"),
            has("converted").alias("converted"),
        )
        .where(F.col("sent"))
        .drop("sent", "message_id")
    )


def copy_items(spark: SparkSession, library: list[dict[str, Any]]) -> DataFrame:
    """(campaign_id, variant, template_id, kind, item) for every template behind a campaign variant: the
    template itself and each keyword and phrase of its literal copy. The copy is small (one row per
    variant), so it is tokenised here in the driver, and the big side (outcomes) stays in Spark."""
    rows = [
        (r["campaign_id"], r["variant"], r["template_id"], kind, item)
        for r in library
        if r["campaign_id"]
        for kind, item in [("template", r["template_id"]), *sorted(terms(r["text"]))]
    ]
    return spark.createDataFrame(
        rows, "campaign_id string, variant string, template_id string, kind string, item string"
    )


def knowledge(cells: DataFrame, items: DataFrame, min_sends: int) -> DataFrame:
    """Items with their sends, clicks, conversions, rates and lower bounds at every scope of SCOPES."""
    from pyspark.sql import functions as F

    counted = cells.join(F.broadcast(items), ["campaign_id", "variant"])
    scoped = []
    for scope in SCOPES:
        keys = [F.col(c) if c in scope else F.lit("").alias(c) for c in ("campaign_id", "channel")]
        scoped.append(
            counted.groupBy("kind", "item", *keys).agg(
                F.countDistinct("template_id").alias("templates"),
                F.sum("sends").alias("sends"),
                F.sum("clicks").alias("clicks"),
                F.sum("conversions").alias("conversions"),
            )
        )
    table = scoped[0]
    for other in scoped[1:]:
        table = table.unionByName(other)
    sends, clicks, conversions = F.col("sends"), F.col("clicks"), F.col("conversions")
    return (
        table.where(sends >= min_sends)
        .withColumn("ctr", clicks / sends)
        .withColumn("cvr", conversions / sends)
        .withColumn("ctr_lower", wilson_lower(clicks, sends))
        .withColumn("cvr_lower", wilson_lower(conversions, sends))
    )


def run(
    spark: SparkSession,
    input_dir: Path,
    output_dir: Path,
    documents: Sequence[Document],
    now: dt.datetime,
    *,
    min_sends: int = MIN_SENDS,
) -> KnowledgeResult:
    """Rank the copy in `documents` by what its sends in `input_dir/outcomes` earned; write under `output_dir`.

    Input: Parquet `outcomes` (infra/clickhouse/001, 004: campaign_id, message_id, channel, code, variant)
    and the campaigns, templates and channels of the config topic. A message is attributed to the template
    its campaign names for its variant (Campaign.template_for); clicks and conversions count per message
    sent. Output: Parquet `copy_library` (streams.copy.knowledge.library_rows, seen_at = now) and
    `copy_knowledge` (kind template|keyword|phrase, item, campaign_id, channel, templates, sends, clicks,
    conversions, ctr, cvr, ctr_lower, cvr_lower; '' = all campaigns / channels; items under `min_sends`
    sends left out), and `_knowledge.json`.
    """
    from pyspark.sql import functions as F

    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    source = Path(input_dir) / "outcomes"
    if not source.exists():
        raise JobError(f"{source} not found: export outcomes there first")
    outcomes = spark.read.parquet(str(source))
    missing = {"campaign_id", "message_id", "channel", "code", "variant"} - set(outcomes.columns)
    if missing:
        raise JobError(f"{source} lacks column(s) {', '.join(sorted(missing))}")
    library = library_rows(documents, now)
    output = Path(output_dir)
    spark.createDataFrame(library, LIBRARY_SCHEMA).write.mode("overwrite").parquet(str(output / LIBRARY))

    cells = (
        sent_messages(outcomes)
        .groupBy("campaign_id", "variant", "channel")
        .agg(
            F.count("*").alias("sends"),
            F.sum(F.col("clicked").cast("long")).alias("clicks"),
            F.sum(F.col("converted").cast("long")).alias("conversions"),
        )
        .persist()
    )
    try:
        items = copy_items(spark, library)
        knowledge(cells, items, min_sends).write.mode("overwrite").parquet(str(output / KNOWLEDGE))
        known = items.select("campaign_id", "variant").distinct()
        attributed = cells.join(F.broadcast(known), ["campaign_id", "variant"], "left_semi")
        sends = attributed.agg(F.sum("sends")).first()[0] or 0
        total = cells.agg(F.sum("sends")).first()[0] or 0
    finally:
        cells.unpersist()
    overall = read_parquet(output / KNOWLEDGE, ["kind", "campaign_id", "channel"]).to_pylist()
    counts = {kind: 0 for kind in ("template", "keyword", "phrase")}
    for row in overall:
        if row["campaign_id"] == "" and row["channel"] == "":
            counts[row["kind"]] += 1
    result = KnowledgeResult(
        now=now, copies=len(library), sends=int(sends), unattributed=int(total - sends), items=counts
    )
    write_manifest(
        output,
        MANIFEST,
        {"now": now.isoformat(), "min_sends": min_sends, "copies": result.copies, "sends": result.sends,
         "unattributed": result.unattributed, "items": counts},
    )  # fmt: skip
    return result


def load_back(output_dir: Path, *, warehouse: Warehouse, built_at: dt.datetime | None = None) -> dict[str, int]:
    """ClickHouse: copy_knowledge is truncated and refilled (updated_at = built_at); copy_library rows are
    appended, and a row seen again collapses on its key (ReplacingMergeTree by seen_at), so a rerun adds
    nothing a reader sees and copy no longer on the config topic keeps its history. Priors for new variants
    are read from here when copy is published (connectors.knowledge.prior_for), so nothing goes to Redis."""
    output = Path(output_dir)
    read_manifest(output, MANIFEST)
    built_at = built_at or dt.datetime.now(dt.UTC)
    require_writable(warehouse)
    loaded = {LIBRARY: insert_table(warehouse, LIBRARY, read_parquet(output / LIBRARY))}
    warehouse.command(f"TRUNCATE TABLE {KNOWLEDGE}")
    loaded[KNOWLEDGE] = insert_table(warehouse, KNOWLEDGE, read_parquet(output / KNOWLEDGE), {"updated_at": built_at})
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        description=__doc__.splitlines()[0],
        name="knowledge",
        input_help="directory holding outcomes/ (Parquet)",
        output_help="directory for copy_library and copy_knowledge (Parquet)",
        definitions="copy",
        definitions_help="JSON list of config documents: templates, campaigns, channels",
        run=run,
        load=load_documents,
        summary=lambda result: {k: v for k, v in vars(result).items() if k != "now"},
    )


if __name__ == "__main__":
    sys.exit(main())
