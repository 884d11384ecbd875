from __future__ import annotations

import pytest

from schemas.config import Campaign, Template, Trigger
from schemas.contracts import encode
from streams.config_store import ConfigStore

pytestmark = pytest.mark.unit


def campaign(**kw) -> Campaign:
    base = dict(
        id="c1",
        name="C",
        trigger=Trigger(event_type="cart"),
        channel="webhook",
        template_id="t1",
        conversion_event="paid",
    )
    return Campaign(**{**base, **kw})


def test_apply_index_update_delete() -> None:
    store = ConfigStore()
    store.apply("campaign:c1", encode(campaign().to_record()))
    store.apply("template:t1", encode(Template(id="t1", body="x").to_record()))
    assert [c.id for c in store.by_trigger["cart"]] == ["c1"] and [c.id for c in store.by_conversion["paid"]] == ["c1"]
    store.apply("campaign:c1", encode(campaign(status="paused", version=2).to_record()))
    assert store.by_trigger == {} and store.campaign("c1").version == 2
    store.apply("campaign:c1", None)
    assert store.campaign("c1") is None and store.template("t1").body == "x"


def test_a_bad_document_keeps_the_previous_version() -> None:
    store = ConfigStore()
    store.apply("campaign:c1", encode(campaign().to_record()))
    store.apply("campaign:c1", b"garbage")
    assert store.campaign("c1") is not None and store.errors
