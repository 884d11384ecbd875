"""Bulk profile files become profile_updated events: CSV, Parquet and JSON lines read alike."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from console.profiles_cli import as_event, rows
from schemas.models import PROFILE_UPDATED

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)


def test_csv_parquet_and_json_lines_give_the_same_rows(tmp_path) -> None:
    (tmp_path / "p.csv").write_text("user_id,city,age,phone\nu1,Hangzhou,31,+8613800000001\nu2,,40,\n")
    pq.write_table(
        pa.table({"user_id": ["u1", "u2"], "city": ["Hangzhou", None], "age": [31, 40]}), tmp_path / "p.parquet"
    )
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"user_id": "u1", "city": "Hangzhou"}) + "\n\n" + '{"user_id": "u2"}\n'
    )
    csv_rows = list(rows(tmp_path / "p.csv"))
    assert csv_rows == [
        {"user_id": "u1", "city": "Hangzhou", "age": "31", "phone": "+8613800000001"},
        {"user_id": "u2", "age": "40"},  # empty cells are left out, not set to ""
    ]
    assert [r["user_id"] for r in rows(tmp_path / "p.parquet")] == ["u1", "u2"]
    assert [r["user_id"] for r in rows(tmp_path / "p.jsonl")] == ["u1", "u2"]


def test_a_row_is_a_profile_update_and_loading_twice_is_the_same_event() -> None:
    event = as_event({"user_id": "u1", "city": "Hangzhou", "membership_expires_at": NOW}, NOW)
    assert event.event_type == PROFILE_UPDATED and event.user_id == "u1"
    assert event.properties == {"city": "Hangzhou", "membership_expires_at": NOW.isoformat()}
    again = as_event({"user_id": "u1", "city": "Hangzhou", "membership_expires_at": NOW}, NOW)
    assert again.event_id == event.event_id
    assert as_event({"user_id": "u1", "city": "Beijing"}, NOW).event_id != event.event_id
    with pytest.raises(ValueError, match="no user_id"):
        as_event({"city": "Hangzhou"}, NOW)
