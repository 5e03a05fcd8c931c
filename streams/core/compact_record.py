"""The changelog record of an open session held compactly (:class:`OpenSlot`).

A JSON array: ``["open1", session id, user id (None: the first event's), Kafka partition, bytes
counted beyond the events, duplicates, events]``, each event ``[type code, µs, UTC offset (µs),
Kafka offset, size, event id, values]`` with its values as :class:`OpenSlot` holds them (a text
an earlier event holds as ``[event, value]``). Other slots are written as the model's JSON; see
docs/operations.md ("State memory").
"""

from __future__ import annotations

import json

from prefstream.streams.core import compact
from prefstream.streams.core.compact import OpenSlot, StoredSlot
from prefstream.streams.core.compact_events import dump_values, pack_event, unpack_event
from prefstream.streams.core.sessionize import SessionSlot

#: first element of an :class:`OpenSlot`'s changelog record (other records: a SessionSlot's JSON)
RECORD_TAG = "open1"


def to_json(slot: OpenSlot) -> str:
    """The changelog record of ``slot``: a JSON array, each event's values as it holds them (its
    texts are not decoded and encoded again)."""
    head = json.dumps([RECORD_TAG, slot.session_id, slot.user_id, slot.kafka_partition,
                       slot.extra_bytes, slot.duplicates], separators=(",", ":"))
    events = []
    for blob in slot.blobs():
        code, micros, offset_us, offset, size, event_id, values = unpack_event(blob)
        events.append(f"[{code},{micros},{offset_us},{offset},{size},{json.dumps(event_id)},"
                      f"{values.decode('utf-8', 'surrogatepass')}]")
    return f"{head[:-1]},[{','.join(events)}]]"


def is_record(raw: str) -> bool:
    return raw.startswith(f'["{RECORD_TAG}"')


def from_json(raw: str, key: str | None = None) -> OpenSlot:
    """The slot :func:`to_json` wrote (``key``: its table key, the session id, to share)."""
    _, session_id, user_id, partition, extra, dups, events = json.loads(raw)
    blobs = [pack_event(code, micros, offset_us, offset, size, event_id, dump_values(values))
             for code, micros, offset_us, offset, size, event_id, values in events]
    return OpenSlot(key if key == session_id else session_id, user_id, partition, extra,
                    tuple((o, e) for o, e in dups), blobs[0] if len(blobs) == 1 else tuple(blobs))


def slot_to_json(slot: StoredSlot) -> str:
    """A slot's changelog record: an open session in the compact record, else the model's JSON
    (the only record before compact state: still read, see :func:`slot_from_json`)."""
    if isinstance(slot, OpenSlot):
        return to_json(slot)
    return slot.model_dump_json()


def slot_from_json(raw: str, key: str | None = None) -> StoredSlot:
    """The slot of a changelog record, of either kind."""
    if is_record(raw):
        return from_json(raw, key)
    return compact.compact(SessionSlot.model_validate_json(raw), key)
