"""The knowledge job on generated sends: per-template and per-term counts agree with a plain-Python tally,
fields and tags never become keywords, minimum support, Wilson bounds as Python computes them, and an
idempotent load-back into chDB, where new variants' priors are read from."""

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

from connectors.knowledge import prior_for
from jobs import knowledge as knowledge_job
from jobs.common import JobError, read_parquet
from streams.copy.knowledge import MIN_SENDS, copy_text, terms, wilson_lower

pytestmark = pytest.mark.integration

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
PREFIX = "kjob-"  # campaign ids of this module, apart from other tests' rows in the shared warehouse

DOCUMENTS: list[dict[str, Any]] = [
    {"kind": "channel", "id": "sms", "provider": "webhook", "format": "sms-cn"},
    {"kind": "channel", "id": "push", "provider": "webhook", "format": "push-fcm"},
    {
        "kind": "template", "id": "cart-cn-a",
        "body": '${name!"亲"}，购物车里的商品只剩${stock}件<#if stock < 5>，快抢！</#if>',
    },
    {"kind": "template", "id": "cart-cn-b", "body": "{name}，购物车里的宝贝在等你，限时优惠"},
    {"kind": "template", "id": "cart-en", "title": "Only a few left", "body": "Hi ${name}, your cart misses you"},
    {"kind": "template", "id": "unused", "body": "Nobody sends this"},
    {
        "kind": "campaign", "id": f"{PREFIX}cart", "name": "cart", "trigger": {"event_type": "cart_add"},
        "channel": "sms",
        "variants": [{"id": "a", "template_id": "cart-cn-a"}, {"id": "b", "template_id": "cart-cn-b"}],
    },
    {
        "kind": "campaign", "id": f"{PREFIX}en", "name": "en", "trigger": {"event_type": "cart_add"},
        "channel": "push", "template_id": "cart-en",
    },
]  # fmt: skip
# (campaign, variant or None, channel, sends, click rate, conversion rate)
CELLS = [
    (f"{PREFIX}cart", "a", "sms", 400, 0.20, 0.05),
    (f"{PREFIX}cart", "b", "sms", 300, 0.08, 0.02),
    (f"{PREFIX}en", None, "push", 200, 0.10, 0.04),
    (f"{PREFIX}en", None, "sms", 20, 0.5, 0.0),  # a fallback channel: under min support alone
    (f"{PREFIX}cart", "zz", "sms", 50, 0.5, 0.5),  # a variant no document names: unattributed
]
SCHEMA = pa.schema(
    [
        ("message_id", pa.string()),
        ("campaign_id", pa.string()),
        ("channel", pa.string()),
        ("code", pa.string()),
        ("variant", pa.string()),
        ("occurred_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def _outcomes(seed: int = 5) -> tuple[list[dict], dict[tuple, list[int]]]:
    """Outcome rows (clicks and conversions without the variant, as receipts and tracking write them), a
    duplicate delivery of some, messages never sent, and the tally per (campaign, variant, channel)."""
    rng = random.Random(seed)
    rows, tally = [], defaultdict(lambda: [0, 0, 0])
    for campaign, variant, channel, sends, ctr, cvr in CELLS:
        for i in range(sends):
            message = f"{campaign}-{variant}-{channel}-{i}"
            row = {"message_id": message, "campaign_id": campaign, "channel": channel, "occurred_at": NOW}
            rows.append({**row, "code": "sent", "variant": variant})
            clicked, converted = rng.random() < ctr, rng.random() < cvr
            if clicked:
                rows += [{**row, "code": "clicked", "variant": None}] * rng.choice([1, 2])
            if converted:
                rows.append({**row, "code": "converted", "variant": None})
            counts = tally[campaign, variant or "", channel]
            counts[0] += 1
            counts[1] += clicked
            counts[2] += converted
        # Suppressed messages were never sent: not exposures.
        rows.append({"message_id": f"{campaign}-capped", "campaign_id": campaign, "channel": channel,
                     "occurred_at": NOW, "code": "capped", "variant": variant})  # fmt: skip
    return rows, tally


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list:
    path = tmp_path_factory.mktemp("copy") / "copy.json"
    path.write_text(json.dumps(DOCUMENTS))
    return knowledge_job.load_documents(path)


@pytest.fixture(scope="module")
def run(spark: Any, documents: list, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, dict]:
    base = tmp_path_factory.mktemp("knowledge")
    rows, tally = _outcomes()
    (base / "input" / "outcomes").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), base / "input" / "outcomes" / "part-0.parquet")
    result = knowledge_job.run(spark, base / "input", base / "output", documents, NOW)
    return base / "output", result, tally


def _knowledge(output: Path) -> dict[tuple[str, str, str, str], dict]:
    rows = read_parquet(output / "copy_knowledge").to_pylist()
    return {(r["kind"], r["item"], r["campaign_id"], r["channel"]): r for r in rows}


def _expected(tally: dict[tuple, list[int]]) -> dict[tuple[str, str, str, str], list[int]]:
    """The plain-Python tally of every item at every scope, before minimum support."""
    templates = {
        (f"{PREFIX}cart", "a"): "cart-cn-a",
        (f"{PREFIX}cart", "b"): "cart-cn-b",
        (f"{PREFIX}en", ""): "cart-en",
    }
    text = {d["id"]: copy_text(d) for d in DOCUMENTS if d["kind"] == "template"}
    expected: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for (campaign, variant, channel), counts in tally.items():
        template = templates.get((campaign, variant))
        if template is None:
            continue
        for kind, item in [("template", template), *terms(text[template])]:
            for scope in ((campaign, channel), (campaign, ""), ("", channel), ("", "")):
                key = (kind, item, *scope)
                expected[key] = [a + b for a, b in zip(expected[key], counts, strict=True)]
    return expected


def test_counts_agree_with_a_plain_tally(run: tuple) -> None:
    output, result, tally = run
    found = _knowledge(output)
    expected = {key: c for key, c in _expected(tally).items() if c[0] >= MIN_SENDS}
    assert set(found) == set(expected)
    for key, (sends, clicks, conversions) in expected.items():
        row = found[key]
        assert (row["sends"], row["clicks"], row["conversions"]) == (sends, clicks, conversions), key
        assert row["ctr"] == pytest.approx(clicks / sends)
        assert row["ctr_lower"] == pytest.approx(wilson_lower(clicks, sends), abs=1e-12)
        assert row["cvr_lower"] == pytest.approx(wilson_lower(conversions, sends), abs=1e-12)
        assert 0 <= row["ctr_lower"] <= row["ctr"]
    assert result.sends == 400 + 300 + 200 + 20
    assert result.unattributed == 50
    assert result.copies == 4  # three campaign variants and the unused template


def test_terms_shared_by_templates_add_up(run: tuple) -> None:
    found = _knowledge(run[0])
    a, b = found["template", "cart-cn-a", "", ""], found["template", "cart-cn-b", "", ""]
    shared = found["keyword", "购物", "", ""]  # in both Chinese templates
    assert shared["sends"] == a["sends"] + b["sends"] and shared["templates"] == 2
    assert found["phrase", "购物车", f"{PREFIX}cart", "sms"]["sends"] == 700
    assert ("keyword", "快抢", "", "") in found  # inside <#if>: still copy people read
    assert ("phrase", "only a few", "", "") in found and ("keyword", "misses", "", "") in found
    items = {item for _, item, _, _ in found}
    # Fields and tags are not copy; neither is the unsent template, nor stopwords on their own.
    assert not items & {"name", "stock", "if", "#if", "${name}", "nobody", "your", "hi name"}
    # The en campaign's sms fallback (20 sends) is under min support; its push sends are not.
    assert ("template", "cart-en", f"{PREFIX}en", "sms") not in found
    assert found["template", "cart-en", f"{PREFIX}en", "push"]["sends"] == 200


def test_min_support_is_an_argument(spark: Any, documents: list, run: tuple, tmp_path: Path) -> None:
    output = run[0]
    strict = knowledge_job.run(spark, output.parent / "input", tmp_path, documents, NOW, min_sends=350)
    assert strict.items["template"] == 1  # only cart-cn-a has 400 sends
    assert all(r["sends"] >= 350 for r in read_parquet(tmp_path / "copy_knowledge").to_pylist())


def test_missing_input_is_a_clear_error(spark: Any, documents: list, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="export outcomes"):
        knowledge_job.run(spark, tmp_path, tmp_path / "out", documents, NOW)


def test_load_back_twice_replaces(run: tuple, warehouse: Any) -> None:
    output = run[0]
    warehouse.command("TRUNCATE TABLE copy_knowledge")
    stale = {"kind": "keyword", "item": "stale", "campaign_id": "", "channel": "", "templates": 1, "sends": 1}
    rates = {"clicks": 0, "conversions": 0, "ctr": 0.0, "cvr": 0.0, "ctr_lower": 0.0, "cvr_lower": 0.0}
    warehouse.insert("copy_knowledge", [{**stale, **rates, "updated_at": NOW}])
    rows = len(read_parquet(output / "copy_knowledge"))
    for attempt in range(2):
        built_at = NOW + dt.timedelta(hours=attempt + 1)
        loaded = knowledge_job.load_back(output, warehouse=warehouse, built_at=built_at)
        assert loaded["copy_knowledge"] == rows
        (counted,) = warehouse.query("SELECT count() AS n, max(updated_at) AS at FROM copy_knowledge")
        assert counted == {"n": rows, "at": built_at}
        library = warehouse.query(
            "SELECT template_id, campaign_id, variant, source FROM copy_library FINAL"
            " WHERE campaign_id LIKE 'kjob-%' OR template_id = 'unused' ORDER BY template_id"
        )
        assert [(r["template_id"], r["campaign_id"], r["variant"]) for r in library] == [
            ("cart-cn-a", f"{PREFIX}cart", "a"),
            ("cart-cn-b", f"{PREFIX}cart", "b"),
            ("cart-en", f"{PREFIX}en", ""),
            ("unused", "", ""),
        ]
        assert {r["source"] for r in library} == {"human"}
        prior = prior_for(warehouse, template_id="cart-cn-a")
        template = warehouse.query(
            "SELECT sends, clicks FROM copy_knowledge WHERE kind = 'template' AND item = 'cart-cn-a'"
            " AND campaign_id = '' AND channel = ''"
        )[0]
        # Capped at 100 pseudo-sends, centred on the template's CTR.
        assert prior.alpha + prior.beta == pytest.approx(102)
        assert (prior.alpha - 1) / 100 == pytest.approx(template["clicks"] / template["sends"])
