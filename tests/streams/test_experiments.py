"""The A/B loop's pure parts: the copy it records into copy_library only when it is new."""

from __future__ import annotations

import datetime as dt

import pytest

from schemas.config import Campaign, Channel, Template
from streams.experiments import library_key, new_library_rows

pytestmark = pytest.mark.unit

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def test_copy_is_recorded_once_per_change() -> None:
    channel = Channel(id="sms", provider="webhook", format="sms-cn")
    hand = Template(id="t-hand", body="${name}，购物车等你")
    generated = Template(id="c1.gen-2-1", body="${name}，只剩最后几件", source="llm:m", version=2)
    single = Campaign(id="c1", name="C", trigger={"event_type": "cart"}, channel="sms", template_id="t-hand")
    rows = new_library_rows([channel, hand, single], set(), NOW)
    assert [(r["template_id"], r["campaign_id"], r["variant"], r["channel_format"]) for r in rows] == [
        ("t-hand", "c1", "", "sms-cn")
    ]
    recorded = {library_key(r) for r in rows}
    assert new_library_rows([channel, hand, single], recorded, NOW + dt.timedelta(seconds=1)) == []
    variants = [{"id": "a", "template_id": "t-hand"}, {"id": "gen-2-1", "template_id": "c1.gen-2-1"}]
    ab = Campaign.model_validate({**single.model_dump(), "version": 2, "template_id": None, "variants": variants})
    later = new_library_rows([channel, hand, generated, ab], recorded, NOW)
    assert [(r["template_id"], r["variant"], r["source"]) for r in later] == [
        ("t-hand", "a", "human"),
        ("c1.gen-2-1", "gen-2-1", "llm:m"),
    ]
