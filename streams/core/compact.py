"""Open sessions held compactly: what a worker keeps for each of (possibly) 100,000s of them.

The sessionizer (:mod:`~prefstream.streams.core.sessionize`) works on validated pydantic models;
held that way an open session costs about 4 KB per event (the event model, its ``SessionEvent``
and ``Session`` wrappers). An :class:`OpenSlot` holds the same state in a few hundred bytes:

* each event as one ``bytes`` object: a fixed header (event time in microseconds and its UTC
  offset, Kafka offset, counted size, event type) followed by the event id and the event's other
  fields as a JSON array of values (texts in UTF-8, not as Python strings; the session's user id
  left out when it is the session's);
* the session's bounds and counters as references to objects the events share.

Only open-only slots (no pending or held groups) are held this way; a slot with closed groups
stays a :class:`~prefstream.streams.core.sessionize.SessionSlot` model until they are written.
Every rule still runs on the models: :func:`to_model` materializes a slot exactly as the
sessionizer would have built it, and :func:`append` is the one step done compactly, the plain
accept of an event into an open session (the hot path), decided as :func:`sessionize.add_event`
decides it. See docs/operations.md ("State memory").
"""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta, timezone
from typing import Any

import pydantic_core

from prefstream.schemas.events import EVENT_TYPES, FeedbackEvent
from prefstream.schemas.records import Session, SessionEvent
from prefstream.streams.core.sessionize import (
    EPOCH,
    TICK,
    Clock,
    CloseReason,
    SessionRules,
    SessionSlot,
    _deadline_of,
)

#: type code (flag ``_ZONED``: a UTC offset follows), event time (µs since the epoch), Kafka
#: offset, counted size; then the UTC offset (µs) if flagged, the event id, NUL, the values
HEAD = struct.Struct("<BqqI")
ZONE = struct.Struct("<q")
_ZONED = 0x80
_MAX_SIZE = 0xFFFFFFFF
_SEP = b"\x00"  # ends the event id (ids never hold NUL: schemas.events.Id)
_SKIP = frozenset({"event_id", "schema_version", "session_id", "user_id", "ts", "type"})
_FIELDS = tuple(tuple(f for f in cls.model_fields if f not in _SKIP) for cls in EVENT_TYPES)
_CODE = {cls: code for code, cls in enumerate(EVENT_TYPES)}
_END = _CODE[next(c for c in EVENT_TYPES if c.__name__ == "SessionEnd")]
_ZONES: dict[int, timezone] = {0: timezone.utc}
_TEXTS = frozenset({"prompt", "response_text", "edited_text"})
#: positions of the text fields in each type's values (after the user id)
_TEXT_AT = tuple(tuple(1 + i for i, f in enumerate(fields) if f in _TEXTS) for fields in _FIELDS)
#: shorter texts are held as they are: a reference (``[k,i]``) would save little
MIN_SHARED_TEXT = 24
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_TYPE = tuple(cls.model_fields["type"].default for cls in EVENT_TYPES)
_setattr = object.__setattr__


class OpenSlot:
    """A :class:`SessionSlot` with an open session only, held compactly (immutable but for
    ``due``, its deadline as the partition last scheduled it).

    ``events``: one encoded event (:func:`encode_event`), or a tuple of them in arrival order;
    the session's bounds (``start``, ``last``, ``ended_at``) are read from them (see
    :func:`_bounds`).
    The first holds the user id; ``user_id`` is None when it is the session's (the usual case).
    ``extra_bytes``: the session's counted size beyond its events' (duplicates counted).
    Reads like a ``SessionSlot`` (``open``, ``pending``, ``held``, equality) by materializing it.
    """

    __slots__ = ("session_id", "user_id", "kafka_partition", "extra_bytes", "duplicates",
                 "events", "due")

    def __init__(self, session_id: str, user_id: str | None, kafka_partition: int,
                 extra_bytes: int, duplicates: tuple[tuple[int, str], ...],
                 events: bytes | tuple[bytes, ...]) -> None:
        self.session_id, self.user_id, self.kafka_partition = session_id, user_id, kafka_partition
        self.extra_bytes, self.duplicates, self.events = extra_bytes, duplicates, events
        self.due: int | None = None  # µs since the epoch

    @property
    def start(self) -> datetime:
        return _ts(self.blobs()[_bounds(self.blobs())[0]])

    @property
    def last(self) -> datetime:
        return _ts(self.blobs()[_bounds(self.blobs())[1]])

    @property
    def ended_at(self) -> datetime | None:
        end = _bounds(self.blobs())[2]
        return None if end is None else _ts(self.blobs()[end])

    def last_micros(self) -> int:
        blobs = self.blobs()
        return HEAD.unpack_from(blobs[_bounds(blobs)[1]])[1]  # type: ignore[no-any-return]

    def blobs(self) -> tuple[bytes, ...]:
        return (self.events,) if isinstance(self.events, bytes) else self.events

    @property
    def session_user(self) -> str:
        if self.user_id is not None:
            return self.user_id
        return _values(self.blobs()[0])[0]  # type: ignore[no-any-return]

    @property
    def n_bytes(self) -> int:
        return sum(HEAD.unpack_from(b)[3] for b in self.blobs()) + self.extra_bytes

    @property
    def open(self) -> Session:
        return to_session(self)

    pending: tuple[()] = ()
    held: tuple[()] = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OpenSlot | SessionSlot):
            return to_model(self) == to_model(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OpenSlot({self.session_id!r}, {len(self.blobs())} events)"


#: how a partition holds a session id's state
StoredSlot = OpenSlot | SessionSlot


# --- events ---------------------------------------------------------------------------------

def _micros(ts: datetime) -> int:
    return (ts - EPOCH) // TICK


def _zone(offset_us: int) -> timezone:
    zone = _ZONES.get(offset_us)
    if zone is None:
        zone = timezone(timedelta(microseconds=offset_us))
        if len(_ZONES) < 64:  # the few offsets producers use; more are built each time
            _ZONES[offset_us] = zone
    return zone


def _id_at(blob: bytes) -> int:
    return HEAD.size + (ZONE.size if blob[0] & _ZONED else 0)


def dump_values(value: Any) -> bytes:
    """Compact JSON in UTF-8 (pydantic-core's serializer: several times the json module's
    speed); a text with a lone surrogate, which UTF-8 cannot hold, through the json module."""
    try:
        return pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        return _JSON.encode(value).encode("utf-8", "surrogatepass")


def _load(data: bytes) -> Any:
    try:
        return pydantic_core.from_json(data)
    except ValueError:  # written by _dump's fallback
        return json.loads(data.decode("utf-8", "surrogatepass"))


def pack_event(code: int, micros: int, offset_us: int, offset: int, size: int, event_id: str,
          values: bytes) -> bytes:
    head = HEAD.pack(code | (_ZONED if offset_us else 0), micros, offset, size)
    if offset_us:
        head += ZONE.pack(offset_us)
    return head + event_id.encode() + _SEP + values


def unpack_event(blob: bytes) -> tuple[int, int, int, int, int, str, bytes]:
    """code, µs, UTC offset (µs), Kafka offset, size, event id, values (JSON) of a blob."""
    flags, micros, offset, size = HEAD.unpack_from(blob)
    offset_us = ZONE.unpack_from(blob, HEAD.size)[0] if flags & _ZONED else 0
    at = _id_at(blob)
    end = blob.index(_SEP, at)
    return (flags & ~_ZONED, micros, offset_us, offset, size, blob[at:end].decode(),
            blob[end + 1:])


def encodable(size: int, offset: int) -> bool:
    return 0 <= size <= _MAX_SIZE and -(1 << 63) <= offset < (1 << 63)


def encode_event(event: FeedbackEvent, offset: int, size: int, user_id: str | None,
                 earlier: tuple[bytes, ...] = ()) -> bytes:
    """One event as :class:`OpenSlot` holds it; its user id left out when it is ``user_id``
    (its session's; None: always written), and each text an ``earlier`` event of the session
    holds already written as a reference to it (``[k, i]``: value ``i`` of event ``k``)."""
    code = _CODE[type(event)]
    ts = event.ts
    values: list[Any] = [None if event.user_id == user_id else event.user_id]
    values += [getattr(event, f) for f in _FIELDS[code]]
    if earlier:
        for i in _TEXT_AT[code]:
            values[i] = _shared(values[i], earlier)
    body = dump_values(values)
    return pack_event(code, _micros(ts), ts.utcoffset() // TICK,  # type: ignore[operator]
                 offset, size, event.event_id, body)


def _shared(text: str, earlier: tuple[bytes, ...]) -> str | list[int]:
    """A reference to ``text`` in an earlier event of the session, or ``text`` itself.

    Found by its JSON form in the encoded events (a fast byte search), then confirmed on the
    decoded values: a match inside a longer text is no reference."""
    if len(text) < MIN_SHARED_TEXT:
        return text
    needle = dump_values(text)
    for k, blob in enumerate(earlier):
        if needle in blob:
            values = _values(blob)
            for i in _TEXT_AT[blob[0] & ~_ZONED]:
                if values[i] == text:
                    return [k, i]
    return text


def _values(blob: bytes) -> list[Any]:
    at = blob.index(_SEP, _id_at(blob)) + 1
    return _load(blob[at:])  # type: ignore[no-any-return]


def _ts(blob: bytes) -> datetime:
    """The event time of ``blob``, in its own UTC offset."""
    flags, micros = HEAD.unpack_from(blob)[:2]
    offset_us = ZONE.unpack_from(blob, HEAD.size)[0] if flags & _ZONED else 0
    return (EPOCH + timedelta(microseconds=micros)).astimezone(_zone(offset_us))


def _bounds(blobs: tuple[bytes, ...]) -> tuple[int, int, int | None]:
    """Which events give the session's start, last and end (``session_end``) times: the first
    in arrival order at the earliest, latest and latest end time (``min``/``max`` keep the
    first of equals, and the sessionizer takes them in arrival order)."""
    start = last = 0
    end = None
    lo = hi = HEAD.unpack_from(blobs[0])[1]
    top = None
    for k, blob in enumerate(blobs):
        flags, micros = HEAD.unpack_from(blob)[:2]
        if micros < lo:
            start, lo = k, micros
        if micros > hi:
            last, hi = k, micros
        if flags & ~_ZONED == _END and (top is None or micros > top):
            end, top = k, micros
    return start, last, end


def _written_user(blob: bytes, user_id: str) -> bool:
    """Whether ``blob`` (a slot's first) names ``user_id`` as its user."""
    at = blob.index(_SEP, _id_at(blob)) + 1
    name = dump_values(user_id)
    return blob.startswith(b"[" + name + b",", at)


def decode_event(blob: bytes, session_id: str, user_id: str,
                 earlier: list[list[Any]] | None = None) -> SessionEvent:
    """The :class:`SessionEvent` :func:`encode_event` encoded (the very values it had);
    ``earlier``: the decoded values of the events before it in its session, for its texts held
    there (appended to with its own)."""
    code, micros, offset_us, offset, size, event_id, body = unpack_event(blob)
    values = _load(body)
    for i in _TEXT_AT[code]:
        if isinstance(values[i], list):
            k, j = values[i]
            values[i] = earlier[k][j]  # type: ignore[index]
    if earlier is not None:
        earlier.append(values)
    fields = {"event_id": event_id, "schema_version": 1, "session_id": session_id,
              "user_id": user_id if values[0] is None else values[0], "ts": _ts(blob),
              "type": _TYPE[code]}
    fields.update(zip(_FIELDS[code], values[1:], strict=True))
    cls = EVENT_TYPES[code]
    event = _construct(cls, {name: fields[name] for name in cls.__pydantic_fields__})
    return _construct(SessionEvent, {"offset": offset, "event": event, "n_bytes": size})


def _construct(cls: Any, values: dict[str, Any]) -> Any:
    """``cls.model_construct(**values)`` for these plain models (every field given in the
    declared order, as validation sets ``__dict__``; no private attributes, no post-init),
    without its per-field loop: this runs for every event of a session that closes."""
    model = cls.__new__(cls)
    _setattr(model, "__dict__", values)
    _setattr(model, "__pydantic_fields_set__", set(values))
    _setattr(model, "__pydantic_extra__", None)
    _setattr(model, "__pydantic_private__", None)
    return model


# --- slots ----------------------------------------------------------------------------------

def to_session(slot: OpenSlot) -> Session:
    user_id = slot.session_user
    earlier: list[list[Any]] = []
    events = tuple(decode_event(b, slot.session_id, user_id, earlier) for b in slot.blobs())
    start, last, end = _bounds(slot.blobs())
    return _construct(Session, dict(
        session_id=slot.session_id, user_id=user_id, kafka_partition=slot.kafka_partition,
        start=events[start].event.ts, last=events[last].event.ts, events=events,
        n_duplicates=len(slot.duplicates), duplicates=slot.duplicates,
        ended_at=None if end is None else events[end].event.ts, cut=False,
        n_bytes=slot.n_bytes))


def to_model(slot: StoredSlot) -> SessionSlot:
    """The slot as the sessionizer's model."""
    if isinstance(slot, SessionSlot):
        return slot
    return _construct(SessionSlot, {"open": to_session(slot), "pending": (), "held": ()})


def compact(slot: SessionSlot, session_id: str | None = None) -> StoredSlot:
    """``slot`` held compactly when it is an open session only (else the model itself)."""
    session = slot.open
    if (session is None or slot.pending or slot.held or session.cut
            or session.n_duplicates != len(session.duplicates)
            or (session_id is not None and session.session_id != session_id)
            or any(i.event.session_id != session.session_id
                   or not encodable(i.n_bytes, i.offset) for i in session.events)):
        return slot
    user_id = session.user_id
    first, *rest = session.events
    blobs = (encode_event(first.event, first.offset, first.n_bytes, None),)
    for i in rest:
        blobs += (encode_event(i.event, i.offset, i.n_bytes, user_id, blobs),)
    held = OpenSlot(session_id if session_id is not None else session.session_id,
                    None if first.event.user_id == user_id else user_id,
                    session.kafka_partition,
                    session.n_bytes - sum(i.n_bytes for i in session.events),
                    session.duplicates, blobs[0] if len(blobs) == 1 else blobs)
    start, last, end = _bounds(blobs)
    if not (_same_time(session.events[start].event.ts, session.start)
            and _same_time(session.events[last].event.ts, session.last)
            and (session.ended_at is None if end is None
                 else _same_time(session.events[end].event.ts, session.ended_at))):
        return slot  # bounds the sessionizer would not have set: kept as they are
    return held


def _same_time(a: datetime, b: datetime | None) -> bool:
    return b is not None and a == b and a.utcoffset() == b.utcoffset()


def copy(slot: OpenSlot) -> OpenSlot:
    return OpenSlot(slot.session_id, slot.user_id, slot.kafka_partition, slot.extra_bytes,
                    slot.duplicates, slot.events)


def holds(slot: OpenSlot, event_id: str) -> bool:
    """Whether the open session holds an event with this id."""
    # the id and the NUL after it, at the id's place: one startswith per event (this runs for
    # every event appended, over each event of its session)
    wanted = event_id.encode() + _SEP
    plain, zoned = HEAD.size, HEAD.size + ZONE.size
    return any(b.startswith(wanted, zoned if b[0] & _ZONED else plain) for b in slot.blobs())


def append(slot: OpenSlot | None, event: FeedbackEvent, *, offset: int, clock: Clock,
           rules: SessionRules, size: int) -> OpenSlot | None:
    """The slot after :func:`sessionize.add_event` accepts ``event`` into the open session,
    when that is all it does; None when the general rules must decide (the event's id is in the
    session already, it is late, or it takes the session to a cap)."""
    ts = event.ts
    if (clock.is_late(ts) or not encodable(size, offset)
            or rules.max_events <= 1 + (0 if slot is None else len(slot.blobs()))):
        return None
    if slot is None:
        if rules.max_bytes is not None and size > rules.max_bytes:
            return None
        return OpenSlot(event.session_id, None, clock.kafka_partition, 0, (),
                        encode_event(event, offset, size, None))
    if (rules.max_bytes is not None and slot.n_bytes + size > rules.max_bytes // 2) or holds(
            slot, event.event_id):
        return None
    blobs = slot.blobs()
    same = (event.user_id == slot.user_id if slot.user_id is not None
            else _written_user(blobs[0], event.user_id))
    blob = encode_event(event, offset, size, event.user_id if same else None, blobs)
    return OpenSlot(slot.session_id, slot.user_id, slot.kafka_partition, slot.extra_bytes,
                    slot.duplicates, (*blobs, blob))


def deadline(slot: OpenSlot, rules: SessionRules) -> tuple[datetime, CloseReason]:
    """:func:`sessionize.deadline` of the open session, from the encoded event times."""
    start, last, ended = _first_group(slot, rules)
    return _deadline_of(_at(start), _at(last), None if ended is None else _at(ended), rules)


def deadline_micros(slot: OpenSlot, rules: SessionRules) -> int:
    """The time of :func:`deadline` in µs since the epoch, in integers alone: the partition
    schedules one for every accepted event, and needs no datetime for it."""
    start, last, ended = _first_group(slot, rules)
    after_last = last + 1  # _deadline_of's candidates, in µs (TICK is one)
    due = min(last + rules.gap // TICK, max(start + rules.max_duration // TICK, after_last))
    return due if ended is None else min(due, max(ended, after_last))


def _first_group(slot: OpenSlot, rules: SessionRules) -> tuple[int, int, int | None]:
    """Start, last and end (``session_end``, None: none) time in µs of the first group of the
    session (:func:`sessionize.clusters`), from the encoded event times."""
    times = sorted(HEAD.unpack_from(b)[1::-1] for b in slot.blobs())
    gap, longest = rules.gap // TICK, rules.max_duration // TICK
    start = last = times[0][0]
    ended = None
    for micros, flags in times:
        if micros - last >= gap or micros - start >= longest:  # sessionize.splits
            break
        last = micros
        if flags & ~_ZONED == _END:
            ended = micros
    return start, last, ended


def _at(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)
