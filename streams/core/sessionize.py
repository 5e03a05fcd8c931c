"""Session windows on event time, as pure functions (Faust has none).

State comes in two pieces, both persisted in the worker's Faust table:

* a :class:`Clock` per Kafka partition: the highest event time seen and the watermark
  (``max event time - grace``). Ticks advance it when the partition is idle, so quiet sessions
  close even when no new events arrive.
* a :class:`SessionSlot` per ``session_id``: the open session, plus sessions that already closed
  but whose rows are not yet durable (``pending``). Pending sessions are dropped only after the
  sink flushed them and the offsets were committed, so a crash in between replays into state that
  still knows every event (redeliveries are recognised by ``(event_id, offset)``).

A session closes when the watermark passes its last event plus the inactivity gap, or its
``session_end`` event (the grace period then lets stragglers in), or when it hits the event or
duration limit. Until then an open session may hold several groups of events a gap apart: a
straggler can still bridge them. An event older than the watermark is late: set aside, never
merged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict

from prefstream.schemas.events import FeedbackEvent
from prefstream.schemas.records import ClosedSession, CloseReason, Session, SessionEvent
from prefstream.schemas.rules import SessionRules

Outcome = Literal["accepted", "duplicate", "redelivered", "late", "oversized"]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
TICK = timedelta(microseconds=1)  # the smallest step of event time
#: state bytes counted per event beyond its message (offset, sizes, fields the model adds)
EVENT_OVERHEAD_BYTES = 128
#: state bytes counted per duplicate recorded: (offset, event id), as the changelog holds it
DUPLICATE_OVERHEAD_BYTES = 48
#: state bytes counted per group a session id holds (open, or closed and not written yet) beyond
#: its events and its two ids: the group's own fields in the changelog record, escaped as the
#: record escapes them (measured at most 337, with UTC offsets, microseconds and six-digit
#: counts), and the slot's own fields (43)
GROUP_OVERHEAD_BYTES = 400
#: what ``json.dumps`` writes as it is (every other byte escaped)
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))


def state_bytes(raw: bytes) -> int:
    """What one event adds to its session's changelog record, at most: the record is the slot's
    JSON encoded once more as a JSON string (ASCII, escaped), so the message counts as that of
    its own text, plus :data:`EVENT_OVERHEAD_BYTES`.

    The length of ``json.dumps`` of the text: for printable ASCII (the usual message) its own
    length, its quotes and one backslash before each quote and backslash, counted without
    building it (this runs for every event)."""
    if raw.isascii() and not raw.translate(None, _PRINTABLE_ASCII):
        escaped = len(raw) + raw.count(b'"') + raw.count(b"\\") + 2
    else:
        escaped = len(json.dumps(raw.decode("utf-8", errors="replace")))
    return escaped + EVENT_OVERHEAD_BYTES


def duplicate_bytes(event_id: str) -> int:
    return len(event_id) + DUPLICATE_OVERHEAD_BYTES


def group_bytes(session_id: str, user_id: str) -> int:
    """What one group of a session id adds to its changelog record beyond its events: each of a
    group's ids is written again, at most 6 bytes a character once escaped."""
    return GROUP_OVERHEAD_BYTES + len(json.dumps(session_id)) + len(json.dumps(user_id))


@dataclass(frozen=True)
class Clock:
    """Event-time progress of one Kafka partition."""

    kafka_partition: int
    max_event_ts: datetime = EPOCH
    watermark: datetime = EPOCH
    last_arrival_ms: int = 0
    #: wall time of the last worker tick read from the partition (0: none yet)
    last_tick_ms: int = 0
    #: the offset after the last event counted (0: none yet). An event below it was counted
    #: before (a replay from an earlier offset into this clock): it moved event time then,
    #: against the tick before it, and must not move it again against a later tick
    #: (docs/delivery.md).
    next_offset: int = 0

    def observe(self, ts: datetime, grace: timedelta) -> Clock:
        """An accepted event at ``ts`` moves event time forward (the same clock when it does
        not: this runs for every event, and most arrive behind the newest)."""
        # max() of each, one comparison apiece (an event time is compared in its own UTC offset)
        top = ts if ts > self.max_event_ts else self.max_event_ts
        watermark = top - grace
        if not watermark > self.watermark:
            watermark = self.watermark
        if top is self.max_event_ts and watermark is self.watermark:  # neither moved
            return self
        # the constructor, not dataclasses.replace (a third of its cost): once per event
        return Clock(self.kafka_partition, top, watermark, self.last_arrival_ms,
                     self.last_tick_ms, self.next_offset)

    def arrived(self, arrival_ms: int, offset: int = -1) -> Clock:
        """Any valid message (late and duplicate ones too) shows the partition is not idle;
        ``offset``: the event's, now counted (see ``next_offset``)."""
        arrival_ms = max(arrival_ms, self.last_arrival_ms)
        next_offset = max(offset + 1, self.next_offset)
        if arrival_ms == self.last_arrival_ms and next_offset == self.next_offset:
            return self
        return Clock(self.kafka_partition, self.max_event_ts, self.watermark, arrival_ms,
                     self.last_tick_ms, next_offset)  # as in observe

    def counted(self, offset: int) -> bool:
        """Whether the event at ``offset`` was counted already (see ``next_offset``)."""
        return offset < self.next_offset

    def tick(self, wall_ms: int, rules: SessionRules) -> Clock:
        """With no event for ``idle`` wall time, event time is assumed to follow the wall clock."""
        clock = self if wall_ms <= self.last_tick_ms else replace(self, last_tick_ms=wall_ms)
        if wall_ms - self.last_arrival_ms < rules.idle.total_seconds() * 1000:
            return clock
        wall = datetime.fromtimestamp(wall_ms / 1000, tz=timezone.utc)
        return replace(clock, watermark=max(self.watermark, wall - rules.grace))

    def bound_ms(self, arrival_ms: int, rules: SessionRules) -> int:
        """The latest time an event that arrived at ``arrival_ms`` may move the clock to: its
        arrival, and no later than the last worker tick before it in the partition plus
        ``rules.tick_slack`` (it was appended after that tick, and before the next one).

        Ticks are in the log, so the bound is the same on every replay from a clock that has not
        counted the event yet (a clock that has may hold a later tick: such an event moves it no
        more, see ``next_offset``); it holds whatever a producer sets as its record timestamps,
        and however far behind the worker reads."""
        if not self.last_tick_ms:
            return arrival_ms
        return min(arrival_ms, self.last_tick_ms + int(rules.tick_slack.total_seconds() * 1000))

    def is_late(self, ts: datetime) -> bool:
        return ts < self.watermark


class SessionSlot(BaseModel):
    """Everything the worker keeps for one session id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    open: Session | None = None
    pending: tuple[ClosedSession, ...] = ()
    #: groups the event cap closed to new events, held until the watermark passes their last
    #: event: until then a copy of one of their events is in time and counts as a duplicate,
    #: the same whether or not a flush came in between
    held: tuple[ClosedSession, ...] = ()


def _seen(session: Session, event_id: str, offset: int) -> Outcome | None:
    for item in session.events:
        if item.event.event_id == event_id:
            again = item.offset == offset or any(o == offset for o, _ in session.duplicates)
            return "redelivered" if again else "duplicate"
    return None


def _start(event: FeedbackEvent, offset: int, kafka_partition: int, size: int) -> Session:
    return Session(
        session_id=event.session_id,
        user_id=event.user_id,
        kafka_partition=kafka_partition,
        start=event.ts,
        last=event.ts,
        events=(SessionEvent(offset=offset, event=event, n_bytes=size),),
        ended_at=event.ts if event.type == "session_end" else None,
        n_bytes=size,
    )


def _append(session: Session, event: FeedbackEvent, offset: int, size: int) -> Session:
    """``_with_events`` with one more event, updated in place of recomputed (the hot path)."""
    ts, ended = event.ts, session.ended_at
    if event.type == "session_end":
        ended = ts if ended is None else max(ended, ts)
    return session.model_copy(update={
        "start": min(session.start, ts), "last": max(session.last, ts), "ended_at": ended,
        "events": (*session.events, SessionEvent(offset=offset, event=event, n_bytes=size)),
        "n_bytes": session.n_bytes + size,
    })


def _with_events(template: Session, items: tuple[SessionEvent, ...]) -> Session:
    """``template`` restricted to ``items``: bounds, end marker and duplicates recomputed."""
    ids = {i.event.event_id for i in items}
    times = [i.event.ts for i in items]
    ends = [i.event.ts for i in items if i.event.type == "session_end"]
    dups = tuple(d for d in template.duplicates if d[1] in ids)
    size = sum(i.n_bytes for i in items)
    if size:  # sizes are counted (the worker's pipeline): each duplicate recorded counts too
        size += sum(duplicate_bytes(d[1]) for d in dups)
    return template.model_copy(update={
        "start": min(times), "last": max(times), "events": items,
        "ended_at": max(ends) if ends else None, "duplicates": dups, "n_duplicates": len(dups),
        "n_bytes": size,
    })


def splits(ts: datetime, start: datetime, last: datetime, gap: timedelta,
           max_duration: timedelta | None) -> bool:
    """Whether an event at ``ts`` (in event-time order) starts a new group after the group
    ``start``..``last``: a gap of at least ``gap`` before it, or the group already spanning
    ``max_duration`` at it. So no group is longer than the longest duration, however its events
    keep arriving within the gap (each one would otherwise move the group's deadline on)."""
    return ts - last >= gap or (max_duration is not None and ts - start >= max_duration)


def clusters(session: Session, gap: timedelta,
             max_duration: timedelta | None = None) -> list[Session]:
    """Split a session's events wherever event time has a gap of at least ``gap``, or where a
    group would reach ``max_duration`` (see :func:`splits`).

    Events arrive out of order, so two groups that looked a gap apart may still be bridged by a
    straggler: the split is decided only when the watermark closes a group (see :func:`expire`).
    """
    ordered = sorted(session.events, key=lambda i: (i.event.ts, i.offset))
    groups: list[list[SessionEvent]] = [[ordered[0]]]
    for item in ordered[1:]:
        if splits(item.event.ts, groups[-1][0].event.ts, groups[-1][-1].event.ts, gap,
                  max_duration):
            groups.append([])
        groups[-1].append(item)
    members = [{id(i) for i in g} for g in groups]
    return [_with_events(session, tuple(i for i in session.events if id(i) in m))
            for m in members]


def find(slot: SessionSlot, event_id: str, offset: int) -> Outcome | None:
    sessions = [c.session for c in (*slot.pending, *slot.held)] + (
        [slot.open] if slot.open else [])
    for session in sessions:
        seen = _seen(session, event_id, offset)
        if seen is not None:
            return seen
    return None


def slot_bytes(slot: SessionSlot) -> int:
    """The state a session id holds, as counted against ``SessionRules.max_bytes``: its events'
    bytes and each group's own (:func:`group_bytes`)."""
    groups = [c.session for c in (*slot.pending, *slot.held)]
    if slot.open is not None:
        groups.append(slot.open)
    return sum(g.n_bytes + group_bytes(g.session_id, g.user_id) for g in groups)


def _over(slot: SessionSlot, size: int, rules: SessionRules, new_group: int = 0) -> bool:
    """Whether ``size`` more bytes (and ``new_group``: the bytes of a group it starts) take the
    session id's state over ``rules.max_bytes``."""
    return (rules.max_bytes is not None
            and slot_bytes(slot) + size + new_group > rules.max_bytes)


def close_early(slot: SessionSlot, rules: SessionRules, reason: CloseReason) -> SessionSlot:
    """Close the open session of ``slot`` now, each gap-separated group on its own (as the
    watermark would have split it), to be written at the next flush."""
    if slot.open is None:
        return slot
    closed = tuple(ClosedSession(session=group.model_copy(update={"cut": True}), reason=reason)
                   for group in clusters(slot.open, rules.gap, rules.max_duration))
    return SessionSlot(pending=(*slot.pending, *closed), held=slot.held)


def add_event(
    slot: SessionSlot | None,
    event: FeedbackEvent,
    *,
    offset: int,
    clock: Clock,
    rules: SessionRules,
    size: int = 0,
) -> tuple[SessionSlot | None, Outcome]:
    """Merge one validated event into its session slot.

    Returns the new slot and what happened to the event. Events not older than the watermark
    join the open session (which may span several gap-separated groups until the watermark
    closes them); a group reaching ``rules.max_events`` closes at once.

    ``size`` (:func:`state_bytes`) is what the event adds to the state of its session id. With
    ``rules.max_bytes`` set, an open session whose events would pass half of it closes first
    (close reason ``max_bytes``, written at the next flush) and the event starts the next one;
    an event or duplicate that would still take the state over ``max_bytes`` (closed groups not
    written yet, or one huge event) is ``oversized``: refused, to be dead-lettered.
    """
    slot = slot or SessionSlot()
    seen = find(slot, event.event_id, offset)
    if seen == "redelivered":  # replay after a restart: already applied
        return slot, seen
    if clock.is_late(event.ts):  # before the duplicate check: a copy of an event of a closed
        return slot, "late"      # session is late whether or not that session was flushed yet
    if seen == "duplicate":
        if size and _over(slot, duplicate_bytes(event.event_id), rules):
            return slot, "oversized"
        return _count_duplicate(slot, event.event_id, offset, counted=bool(size)), seen
    if (rules.max_bytes is not None and slot.open is not None
            and slot.open.n_bytes + size > rules.max_bytes // 2):
        slot = close_early(slot, rules, "max_bytes")
    starts = group_bytes(event.session_id, event.user_id) if slot.open is None else 0
    if _over(slot, size, rules, starts):
        return (None if slot == SessionSlot() else slot), "oversized"
    if slot.open is None:
        session = _start(event, offset, clock.kafka_partition, size)
    else:
        session = _append(slot.open, event, offset, size)
    slot = slot.model_copy(update={"open": session})
    if len(session.events) >= rules.max_events:  # only then can one group reach the cap
        slot = _cap(slot, session, event.event_id, rules)
    return slot, "accepted"


def _cap(slot: SessionSlot, session: Session, event_id: str, rules: SessionRules) -> SessionSlot:
    """Close the group the new event joined if it reached ``max_events``; others stay open."""
    groups = clusters(session, rules.gap, rules.max_duration)
    full = next(g for g in groups if any(i.event.event_id == event_id for i in g.events))
    if len(full.events) < rules.max_events:
        return slot
    # A straggler that bridges two groups can take the joined one past the cap: it closes in
    # groups of exactly the cap, in event-time order; the rest stays open.
    ordered = sorted(full.events, key=lambda i: (i.event.ts, i.offset))
    n = rules.max_events
    chunks = [tuple(ordered[k:k + n]) for k in range(0, len(ordered) // n * n, n)]
    closing = {id(i) for chunk in chunks for i in chunk}
    kept = tuple(i for i in session.events if id(i) not in closing)
    still_open = _with_events(session, kept) if kept else None
    closed = tuple(ClosedSession(session=_with_events(full, chunk).model_copy(update={"cut": True}),
                                 reason="max_events") for chunk in chunks)
    return SessionSlot(open=still_open, pending=slot.pending, held=(*slot.held, *closed))


def _count_duplicate(slot: SessionSlot, event_id: str, offset: int,
                     counted: bool = False) -> SessionSlot:
    """Record the duplicate on the session that holds the original event (``counted``: its
    bytes too)."""
    extra = duplicate_bytes(event_id) if counted else 0
    def mark(session: Session) -> Session:
        if _seen(session, event_id, offset) is None:
            return session
        dups = (*session.duplicates, (offset, event_id))
        return session.model_copy(update={"duplicates": dups, "n_duplicates": len(dups),
                                          "n_bytes": session.n_bytes + extra})

    def mark_all(closed: tuple[ClosedSession, ...]) -> tuple[ClosedSession, ...]:
        marked = [(c, mark(c.session)) for c in closed]  # a group left alone stays the same object
        return tuple(c if s is c.session else c.model_copy(update={"session": s})
                     for c, s in marked)

    return SessionSlot(open=mark(slot.open) if slot.open else None,
                       pending=mark_all(slot.pending), held=mark_all(slot.held))


def _group_deadline(group: Session, rules: SessionRules) -> tuple[datetime, CloseReason]:
    return _deadline_of(group.start, group.last, group.ended_at, rules)


def _deadline_of(start: datetime, last: datetime, ended_at: datetime | None,
                 rules: SessionRules) -> tuple[datetime, CloseReason]:
    """A group closes only once the watermark is past its last event, so any later copy of one
    of its events is late: what happens to it never depends on when the group was flushed."""
    after_last = last + TICK
    candidates: list[tuple[datetime, CloseReason]] = [
        (last + rules.gap, "gap"),
        (max(start + rules.max_duration, after_last), "max_duration"),
    ]
    if ended_at is not None:
        candidates.append((max(ended_at, after_last), "session_end"))
    return min(candidates)


def deadline(session: Session, rules: SessionRules) -> tuple[datetime, CloseReason]:
    """Watermark at which the first group of an open session closes, and why.

    The earliest group always closes first: later groups start at least a gap after it ends.
    Computed from the event times alone (the first group of :func:`clusters`, without building
    it): this runs for every accepted event.
    """
    times = sorted((i.event.ts, i.event.type == "session_end") for i in session.events)
    start = last = times[0][0]
    ended_at = None
    for ts, is_end in times:
        if splits(ts, start, last, rules.gap, rules.max_duration):
            break
        last = ts
        if is_end:
            ended_at = ts  # ascending: the group's latest end so far
    return _deadline_of(start, last, ended_at, rules)


def held_deadline(closed: ClosedSession) -> datetime:
    """Watermark at which a group the cap closed is released to be written."""
    return closed.session.last + TICK


def next_deadline(slot: SessionSlot, rules: SessionRules) -> datetime | None:
    """The earliest watermark at which :func:`expire` changes ``slot`` (None: never)."""
    due = [held_deadline(c) for c in slot.held]
    if slot.open is not None:
        due.append(deadline(slot.open, rules)[0])
    return min(due, default=None)


def expire(slot: SessionSlot, watermark: datetime, rules: SessionRules) -> SessionSlot:
    """Close every group of the open session whose deadline the watermark has passed, and
    release the held groups the watermark has passed."""
    released = tuple(c for c in slot.held if held_deadline(c) <= watermark)
    held = tuple(c for c in slot.held if held_deadline(c) > watermark)
    groups = clusters(slot.open, rules.gap, rules.max_duration) if slot.open is not None else []
    closed: list[ClosedSession] = []
    while groups and (due := _group_deadline(groups[0], rules))[0] <= watermark:
        closed.append(ClosedSession(session=groups.pop(0), reason=due[1]))
    if not closed and not released:
        return slot
    still_open = slot.open
    if closed:
        assert slot.open is not None
        rest = {id(i) for g in groups for i in g.events}
        kept = tuple(i for i in slot.open.events if id(i) in rest)
        still_open = _with_events(slot.open, kept) if kept else None
    return SessionSlot(open=still_open, pending=(*slot.pending, *released, *closed), held=held)


def flushed(slot: SessionSlot) -> SessionSlot | None:
    """Forget pending sessions once their rows are durable; ``None`` when nothing is left."""
    if slot.open is None and not slot.held:
        return None
    return SessionSlot(open=slot.open, held=slot.held)
