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
duration limit. An event older than the watermark is late: it is set aside, never merged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict

from schemas.events import FeedbackEvent
from schemas.records import ClosedSession, CloseReason, Session, SessionEvent

Outcome = Literal["accepted", "duplicate", "redelivered", "late"]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class SessionRules:
    gap: timedelta = timedelta(minutes=30)
    grace: timedelta = timedelta(minutes=5)
    idle: timedelta = timedelta(seconds=30)
    max_events: int = 500
    max_duration: timedelta = timedelta(hours=6)


@dataclass(frozen=True)
class Clock:
    """Event-time progress of one Kafka partition."""

    kafka_partition: int
    max_event_ts: datetime = EPOCH
    watermark: datetime = EPOCH
    last_arrival_ms: int = 0

    def observe(self, ts: datetime, arrival_ms: int, grace: timedelta) -> Clock:
        top = max(self.max_event_ts, ts)
        return replace(
            self,
            max_event_ts=top,
            watermark=max(self.watermark, top - grace),
            last_arrival_ms=max(self.last_arrival_ms, arrival_ms),
        )

    def tick(self, wall_ms: int, rules: SessionRules) -> Clock:
        """With no event for ``idle`` wall time, event time is assumed to follow the wall clock."""
        if wall_ms - self.last_arrival_ms < rules.idle.total_seconds() * 1000:
            return self
        wall = datetime.fromtimestamp(wall_ms / 1000, tz=timezone.utc)
        return replace(self, watermark=max(self.watermark, wall - rules.grace))

    def is_late(self, ts: datetime) -> bool:
        return ts < self.watermark


class SessionSlot(BaseModel):
    """Everything the worker keeps for one session id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    open: Session | None = None
    pending: tuple[ClosedSession, ...] = ()


def _seen(session: Session, event_id: str, offset: int) -> Outcome | None:
    for item in session.events:
        if item.event.event_id == event_id:
            redelivered = item.offset == offset or offset in session.duplicate_offsets
            return "redelivered" if redelivered else "duplicate"
    return None


def _start(event: FeedbackEvent, offset: int, kafka_partition: int) -> Session:
    return Session(
        session_id=event.session_id,
        user_id=event.user_id,
        kafka_partition=kafka_partition,
        start=event.ts,
        last=event.ts,
        events=(SessionEvent(offset=offset, event=event),),
        ended_at=event.ts if event.type == "session_end" else None,
    )


def _append(session: Session, event: FeedbackEvent, offset: int) -> Session:
    ended = session.ended_at
    if event.type == "session_end":
        ended = event.ts if ended is None else max(ended, event.ts)
    return session.model_copy(
        update={
            "start": min(session.start, event.ts),
            "last": max(session.last, event.ts),
            "events": (*session.events, SessionEvent(offset=offset, event=event)),
            "ended_at": ended,
        }
    )


def _close(slot: SessionSlot, reason: CloseReason) -> SessionSlot:
    assert slot.open is not None
    closed = ClosedSession(session=slot.open, reason=reason)
    return SessionSlot(open=None, pending=(*slot.pending, closed))


def _find(slot: SessionSlot, event_id: str, offset: int) -> Outcome | None:
    sessions = [c.session for c in slot.pending] + ([slot.open] if slot.open else [])
    for session in sessions:
        seen = _seen(session, event_id, offset)
        if seen is not None:
            return seen
    return None


def add_event(
    slot: SessionSlot | None,
    event: FeedbackEvent,
    *,
    offset: int,
    clock: Clock,
    rules: SessionRules,
) -> tuple[SessionSlot | None, Outcome]:
    """Merge one validated event into its session slot.

    Returns the new slot and what happened to the event. A gap larger than ``rules.gap`` to the
    open session closes it and starts a new one; so does reaching ``rules.max_events``.
    """
    slot = slot or SessionSlot()
    seen = _find(slot, event.event_id, offset)
    if seen == "duplicate":
        return _count_duplicate(slot, event.event_id, offset), seen
    if seen == "redelivered":
        return slot, seen
    if clock.is_late(event.ts):
        return slot, "late"
    current = slot.open
    if current is not None and (
        event.ts - current.last >= rules.gap or current.start - event.ts >= rules.gap
    ):
        slot, current = _close(slot, "gap"), None
    if current is None:
        session = _start(event, offset, clock.kafka_partition)
    else:
        session = _append(current, event, offset)
    slot = slot.model_copy(update={"open": session})
    if len(session.events) >= rules.max_events:
        slot = _close(slot, "max_events")
    return slot, "accepted"


def _count_duplicate(slot: SessionSlot, event_id: str, offset: int) -> SessionSlot:
    """Record the duplicate's offset on the session that holds the original event."""
    if slot.open is not None and _seen(slot.open, event_id, offset) is not None:
        return slot.model_copy(update={"open": _with_dup(slot.open, offset)})
    pending = tuple(
        c.model_copy(update={"session": _with_dup(c.session, offset)})
        if _seen(c.session, event_id, offset) is not None else c
        for c in slot.pending
    )
    return slot.model_copy(update={"pending": pending})


def _with_dup(session: Session, offset: int) -> Session:
    offsets = (*session.duplicate_offsets, offset)
    return session.model_copy(update={"duplicate_offsets": offsets, "n_duplicates": len(offsets)})


def deadline(session: Session, rules: SessionRules) -> tuple[datetime, CloseReason]:
    """Watermark at which an open session closes, and why."""
    candidates: list[tuple[datetime, CloseReason]] = [
        (session.last + rules.gap, "gap"),
        (session.start + rules.max_duration, "max_duration"),
    ]
    if session.ended_at is not None:
        candidates.append((session.ended_at, "session_end"))
    return min(candidates)


def expire(slot: SessionSlot, watermark: datetime, rules: SessionRules) -> SessionSlot:
    """Close the open session if the watermark has passed its deadline."""
    if slot.open is None:
        return slot
    when, reason = deadline(slot.open, rules)
    return _close(slot, reason) if when <= watermark else slot


def flushed(slot: SessionSlot) -> SessionSlot | None:
    """Forget pending sessions once their rows are durable; ``None`` when nothing is left."""
    return SessionSlot(open=slot.open) if slot.open is not None else None
