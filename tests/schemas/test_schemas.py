"""The wire contract: strict validation, JSON round trips, the published JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from prefstream.schemas.events import EVENT_ADAPTER, EVENT_TYPES, MAX_TEXT_CHARS, Copy, Impression
from prefstream.schemas.records import PARTITION_FORMAT, partition_for

ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True)
texts = st.text(min_size=1, max_size=200)
IST = timezone(timedelta(hours=5, minutes=30))
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                     timezones=st.sampled_from([timezone.utc, IST]))


def base(**extra: object) -> dict:
    return {"event_id": "e1", "session_id": "s1", "user_id": "u1", "request_id": "r1",
            "ts": "2026-11-20T10:00:00+00:00", **extra}


@given(event_id=ids, session_id=ids, prompt=texts, text=texts, position=st.integers(0, 100),
       ts=times)
def test_impression_round_trips_through_json(event_id: str, session_id: str, prompt: str,
                                              text: str, position: int, ts: datetime) -> None:
    event = Impression(event_id=event_id, session_id=session_id, user_id="u", request_id="r",
                       response_id="a", prompt=prompt, response_text=text, position=position,
                       model_version="m", ts=ts)
    assert EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize("bad, where", [
    (base(type="copy"), "response_id"),
    (base(type="copy", response_id="a", color="red"), "color"),
    (base(type="copy", response_id="a", ts="2026-11-20T10:00:00"), "ts"),
    (base(type="impression", response_id="a", prompt="p", response_text="t", position="1",
          model_version="m"), "position"),
    (base(type="impression", response_id="a", prompt="p", response_text="x" * (MAX_TEXT_CHARS + 1),
          position=0, model_version="m"), "response_text"),
    (base(type="like", response_id="a"), "type"),
    (base(type="copy", response_id="a", event_id=""), "event_id"),
    (base(type="copy", response_id="a", schema_version=2), "schema_version"),
    (base(type="copy", response_id="a", schema_version=True), "schema_version"),  # == 1
    (base(type="copy", response_id="a", schema_version=1.0), "schema_version"),
])
def test_bad_events_are_rejected_with_the_field_named(bad: dict, where: str) -> None:
    with pytest.raises(ValidationError) as info:
        EVENT_ADAPTER.validate_json(json.dumps(bad))
    assert where in str(info.value) or "tag" in str(info.value)


def test_models_are_frozen() -> None:
    event = Copy(**{**base(response_id="a"), "ts": datetime(2026, 1, 1, tzinfo=timezone.utc)})
    with pytest.raises(ValidationError):
        event.response_id = "b"  # type: ignore[misc]


def test_cli_prints_the_json_schema_of_every_event_type() -> None:
    out = subprocess.run([sys.executable, "-m", "prefstream.cli", "schema"], capture_output=True,
                         text=True, check=True)
    schema = json.loads(out.stdout)
    names = set(schema["$defs"])
    assert {model.__name__ for model in EVENT_TYPES} <= names
    assert schema["discriminator"]["propertyName"] == "type"


@given(ts=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                       timezones=st.sampled_from([timezone.utc, IST])),
       hours=st.integers(1, 24))
def test_partition_names_are_the_strftime_of_the_floored_utc_hour(ts: datetime, hours: int):
    """partition_for writes PARTITION_FORMAT out itself: the names strftime gave, any year."""
    utc = ts.astimezone(timezone.utc)
    floored = utc.replace(hour=utc.hour - utc.hour % hours, minute=0, second=0, microsecond=0)
    assert partition_for(ts, hours=hours) == floored.strftime(PARTITION_FORMAT)
