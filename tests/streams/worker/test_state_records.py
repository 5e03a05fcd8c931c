"""The session table's changelog records (streams.worker.app): open sessions in the compact
record, other slots as the model's JSON, and the records of workers before compact state (every
slot as the model's JSON) still read (docs/operations.md, "State memory")."""

from __future__ import annotations

import json

from factories import at, event

from prefstream.streams.core.compact import OpenSlot
from prefstream.streams.core.sessionize import Clock, SessionRules, add_event, expire
from prefstream.streams.worker.app import (
    _clock_from_json,
    _clock_to_json,
    slot_from_json,
    slot_to_json,
)

RULES = SessionRules()


def open_slot(session_id: str = "s1"):
    slot = None
    for offset, ev in enumerate([event("impression", minute=0, session_id=session_id,
                                       prompt="Grüße \"quoted\" \\ 日本"),
                                 event("copy", minute=1, session_id=session_id),
                                 event("session_end", minute=2, session_id=session_id)]):
        slot, _ = add_event(slot, ev, offset=offset, clock=Clock(kafka_partition=2),
                            rules=RULES, size=100 + offset)
    return slot


def test_an_open_session_is_written_compactly_and_read_back():
    slot = open_slot()
    record = slot_to_json(slot_from_json(slot.model_dump_json(), "s1"))
    assert record.startswith('["open1"')
    assert len(record) < len(slot.model_dump_json())
    back = slot_from_json(record, "s1")
    assert isinstance(back, OpenSlot) and back.session_id == "s1" and back == slot


def test_a_record_written_before_compact_state_is_read():
    """A deployed changelog holds every slot as the model's JSON: open ones load compactly,
    slots with closed groups as they were."""
    slot = open_slot()
    back = slot_from_json(slot.model_dump_json(), "s1")
    assert isinstance(back, OpenSlot) and back == slot
    closing = expire(open_slot(), at(40), RULES)
    assert closing.pending and closing.open is None
    again = slot_from_json(closing.model_dump_json(), "s1")
    assert again == closing and slot_to_json(again) == closing.model_dump_json()


def test_the_compact_record_is_json_with_every_value():
    slot = open_slot()
    record = json.loads(slot_to_json(slot_from_json(slot.model_dump_json())))
    tag, session_id, user_id, partition, *_, events = record
    assert (tag, session_id, user_id, partition) == ("open1", "s1", None, 2)
    assert [e[5] for e in events] == [ev.event.event_id for ev in slot.open.events]
    assert "Grüße \"quoted\" \\ 日本" in events[0][6]


def test_the_clock_record_keeps_the_offset_it_counted_to_and_old_records_read_as_none():
    """A restart replays into the checkpointed clock: it must know which events it counted
    (``Clock.next_offset``, docs/delivery.md); a record without it counts none."""
    clock = Clock(kafka_partition=2).observe(at(10), RULES.grace).arrived(5_000, 41)
    assert clock.next_offset == 42
    assert _clock_from_json(_clock_to_json(clock)) == clock
    old = json.loads(_clock_to_json(clock))
    del old["next"]
    assert _clock_from_json(json.dumps(old)) == Clock(
        kafka_partition=2, max_event_ts=at(10), watermark=at(5), last_arrival_ms=5_000)
