"""Open sessions held compactly: what a worker keeps for each of (possibly) 100,000s of them.

The sessionizer (:mod:`~prefstream.streams.core.sessionize`) works on validated pydantic models;
held that way an open session costs about 4 KB per event (the event model, its ``SessionEvent``
and ``Session`` wrappers). An :class:`OpenSlot` holds the same state in a few hundred bytes:

* each event as one ``bytes`` object (:mod:`~prefstream.streams.core.compact_events`): a fixed
  header (event time in microseconds and its UTC offset, Kafka offset, counted size, event type)
  followed by the event id and the event's other fields as a JSON array of values (texts in
  UTF-8, not as Python strings; the session's user id left out when it is the session's);
* the session's bounds and counters as references to objects the events share.

Only open-only slots (no pending or held groups) are held this way; a slot with closed groups
stays a :class:`~prefstream.streams.core.sessionize.SessionSlot` model until they are written.
Every rule still runs on the models: :func:`to_model` materializes a slot exactly as the
sessionizer would have built it. The steps of the hot path are done compactly, as the
sessionizer decides them: :func:`append`, the plain accept of an event into an open session;
:func:`repeat`, a copy of one of its events or a late event; and :func:`expire`, the close of a
whole open session by the watermark (its events decoded once, into the closed groups). See
docs/operations.md ("State memory").
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from operator import itemgetter

from prefstream.schemas.events import FeedbackEvent
from prefstream.schemas.records import ClosedSession, Session
from prefstream.streams.core.compact_events import (
    HEAD,
    SEP,
    SIZE,
    TIME,
    ZONE,
    ZONED,
    construct,
    decode_events,
    encodable,
    encode_event,
    event_time,
    micros,
    values_of,
    written_user,
)
from prefstream.streams.core.compact_groups import bounds, group_deadline, groups, headers
from prefstream.streams.core.sessionize import (
    GROUP_OVERHEAD_BYTES,
    Clock,
    Outcome,
    SessionRules,
    SessionSlot,
    duplicate_bytes,
    group_bytes,
)

_first = itemgetter(0)


class OpenSlot:
    """A :class:`SessionSlot` with an open session only, held compactly (immutable but for
    ``due``, its deadline as the partition last scheduled it).

    ``events``: one encoded event (:func:`encode_event`), or a tuple of them in arrival order;
    the session's bounds (``start``, ``last``, ``ended_at``) are read from them (see
    :func:`compact_groups.bounds`).
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
        return event_time(self.blobs()[bounds(headers(self.blobs()))[0]])

    @property
    def last(self) -> datetime:
        return event_time(self.blobs()[bounds(headers(self.blobs()))[1]])

    @property
    def ended_at(self) -> datetime | None:
        end = bounds(headers(self.blobs()))[2]
        return None if end is None else event_time(self.blobs()[end])

    def last_micros(self) -> int:
        """The latest event time, in µs."""
        return max(map(TIME.unpack_from, self.blobs()))[0]  # type: ignore[no-any-return]

    def blobs(self) -> tuple[bytes, ...]:
        return (self.events,) if isinstance(self.events, bytes) else self.events

    @property
    def session_user(self) -> str:
        if self.user_id is not None:
            return self.user_id
        return values_of(self.blobs()[0])[0]  # type: ignore[no-any-return]

    @property
    def n_bytes(self) -> int:
        return _size(self.blobs()) + self.extra_bytes

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


def _size(blobs: tuple[bytes, ...]) -> int:
    """The counted size of the events (read in one pass in C: this runs for every event
    appended, over each event of its session)."""
    return sum(map(_first, map(SIZE.unpack_from, blobs)))


# --- slots ----------------------------------------------------------------------------------

def to_session(slot: OpenSlot) -> Session:
    events = decode_events(slot.blobs(), slot.session_id, slot.user_id)
    start, last, end = bounds(headers(slot.blobs()))
    return construct(Session, dict(
        session_id=slot.session_id, user_id=events[0].event.user_id if slot.user_id is None
        else slot.user_id, kafka_partition=slot.kafka_partition,
        start=events[start].event.ts, last=events[last].event.ts, events=events,
        n_duplicates=len(slot.duplicates), duplicates=slot.duplicates,
        ended_at=None if end is None else events[end].event.ts, cut=False,
        n_bytes=slot.n_bytes))


def expire(slot: OpenSlot, watermark: datetime, rules: SessionRules) -> SessionSlot | None:
    """:func:`sessionize.expire` of the slot's model, when the watermark closes every group of
    its open session (the usual close: one group); None when a group stays open (the models
    decide). Built from the encoded events, without the open session's models."""
    read = headers(slot.blobs())
    watermark_us = micros(watermark)
    closing = []
    for members in groups(read, rules):
        mine = [read[k] for k in members]
        start, last, end = bounds(mine)
        due, reason = group_deadline(mine[start][1], mine[last][1],
                                     None if end is None else mine[end][1], rules)
        if due > watermark_us:
            return None
        closing.append((members, (start, last, end), reason))
    events = decode_events(slot.blobs(), slot.session_id, slot.user_id, read)
    user_id = events[0].event.user_id if slot.user_id is None else slot.user_id
    pending = []
    for members, (start, last, end), reason in closing:
        mine = tuple(events[k] for k in members)
        ids = {i.event.event_id for i in mine}
        dups = tuple(d for d in slot.duplicates if d[1] in ids)
        size = sum(read[k][3] for k in members)
        if size:  # as sessionize._with_events: each duplicate recorded counts too
            size += sum(duplicate_bytes(d[1]) for d in dups)
        session = construct(Session, {
            "session_id": slot.session_id, "user_id": user_id,
            "kafka_partition": slot.kafka_partition, "start": mine[start].event.ts,
            "last": mine[last].event.ts, "events": mine, "n_duplicates": len(dups),
            "duplicates": dups, "ended_at": None if end is None else mine[end].event.ts,
            "cut": False, "n_bytes": size})
        pending.append(construct(ClosedSession, {"session": session, "reason": reason}))
    return construct(SessionSlot, {"open": None, "pending": tuple(pending), "held": ()})


def to_model(slot: StoredSlot) -> SessionSlot:
    """The slot as the sessionizer's model."""
    if isinstance(slot, SessionSlot):
        return slot
    return construct(SessionSlot, {"open": to_session(slot), "pending": (), "held": ()})


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
    start, last, end = bounds(headers(blobs))
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
    return _holds(slot.blobs(), event_id, _joined(slot))


def _joined(slot: OpenSlot) -> bytes:
    """The slot's events as one ``bytes``: searched once for a text or an id in any of them."""
    return slot.events if isinstance(slot.events, bytes) else b"".join(slot.events)


def _holds(blobs: tuple[bytes, ...], event_id: str, joined: bytes) -> bool:
    # the id and the NUL after it, at the id's place; first searched in all events at once
    # (this runs for every event appended, over each event of its session)
    wanted = event_id.encode() + SEP
    if wanted not in joined:
        return False
    plain, zoned = HEAD.size, HEAD.size + ZONE.size
    return any(b.startswith(wanted, zoned if b[0] & ZONED else plain) for b in blobs)


def append(slot: OpenSlot | None, event: FeedbackEvent, *, offset: int, clock: Clock,
           rules: SessionRules, size: int) -> OpenSlot | None:
    """The slot after :func:`sessionize.add_event` accepts ``event`` into the open session,
    when that is all it does; None when the general rules must decide (the event's id is in the
    session already, it is late, or it takes the session to a cap)."""
    if clock.is_late(event.ts) or not encodable(size, offset):
        return None
    if slot is None:
        if rules.max_events <= 1 or _over(rules, size, event.session_id, len(event.user_id),
                                          lambda: event.user_id):
            return None
        return OpenSlot(event.session_id, None, clock.kafka_partition, 0, (),
                        encode_event(event, offset, size, None))
    blobs = slot.blobs()
    if rules.max_events <= 1 + len(blobs):
        return None
    if rules.max_bytes is not None:
        n_bytes = _size(blobs) + slot.extra_bytes + size
        user_chars = len(slot.user_id if slot.user_id is not None else blobs[0])
        if n_bytes > rules.max_bytes // 2 or _over(rules, n_bytes, slot.session_id, user_chars,
                                                   lambda: slot.session_user):
            return None
    joined = _joined(slot)
    if _holds(blobs, event.event_id, joined):
        return None
    same = (event.user_id == slot.user_id if slot.user_id is not None
            else written_user(blobs[0], event.user_id))
    blob = encode_event(event, offset, size, event.user_id if same else None, blobs, joined)
    return OpenSlot(slot.session_id, slot.user_id, slot.kafka_partition, slot.extra_bytes,
                    slot.duplicates, (*blobs, blob))


def _over(rules: SessionRules, n_bytes: int, session_id: str, user_chars: int,
          user_id: Callable[[], str]) -> bool:
    """:func:`sessionize._over`: whether events of ``n_bytes`` and their group's own bytes
    (:func:`group_bytes`) take the state over ``rules.max_bytes``. The group's bytes are
    worked out only near the bound: JSON escapes its ids to at most 12 bytes a character
    (``user_chars``: at least as many as the user id has)."""
    if rules.max_bytes is None:
        return False
    most = GROUP_OVERHEAD_BYTES + 12 * (len(session_id) + user_chars) + 4
    return n_bytes + most > rules.max_bytes and (
        n_bytes + group_bytes(session_id, user_id()) > rules.max_bytes)


def repeat(slot: OpenSlot, event: FeedbackEvent, *, offset: int, clock: Clock,
           rules: SessionRules, size: int) -> tuple[OpenSlot, Outcome] | None:
    """:func:`sessionize.add_event` of an event the open session holds already (a redelivery
    or a duplicate, counted on the slot) or that is late: the slot after it and the outcome;
    None for any other event (the rules decide)."""
    seen = _seen(slot, event.event_id, offset)
    if seen == "redelivered":
        return slot, seen
    if clock.is_late(event.ts):
        return slot, "late"
    if seen is None:
        return None
    extra = duplicate_bytes(event.event_id) if size else 0
    if size and rules.max_bytes is not None and (
            slot.n_bytes + group_bytes(slot.session_id, slot.session_user) + extra
            > rules.max_bytes):  # sessionize._over of the slot (its open group alone)
        return slot, "oversized"
    return OpenSlot(slot.session_id, slot.user_id, slot.kafka_partition,
                    slot.extra_bytes + extra, (*slot.duplicates, (offset, event.event_id)),
                    slot.events), "duplicate"


def _seen(slot: OpenSlot, event_id: str, offset: int) -> Outcome | None:
    """:func:`sessionize._seen` of the open session."""
    wanted = event_id.encode() + SEP
    for blob in slot.blobs():
        if blob.startswith(wanted, HEAD.size + (ZONE.size if blob[0] & ZONED else 0)):
            again = HEAD.unpack_from(blob)[2] == offset or any(
                o == offset for o, _ in slot.duplicates)
            return "redelivered" if again else "duplicate"
    return None
