"""In-memory session state of one Kafka partition, built on the pure sessionizer.

The worker owns one :class:`PartitionSessions` per assigned partition. It keeps the slots in a
dict and a heap of close deadlines so a watermark step only touches sessions that are due, and it
remembers which slots changed since the last checkpoint so only those are written to the
changelog.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from datetime import datetime

from schemas.events import FeedbackEvent
from schemas.records import ClosedSession
from streams.sessionize import (
    Clock,
    Outcome,
    SessionRules,
    SessionSlot,
    add_event,
    deadline,
    expire,
    flushed,
)


class PartitionSessions:
    def __init__(
        self,
        clock: Clock,
        rules: SessionRules,
        slots: Iterable[tuple[str, SessionSlot]] = (),
    ) -> None:
        self.clock = clock
        self.rules = rules
        self.slots: dict[str, SessionSlot] = dict(slots)
        self._heap: list[tuple[datetime, str]] = []
        self._dirty: set[str] = set()
        # Sessions recovered as pending (closed before a crash) are emitted again: ids dedupe.
        self._pending = {sid for sid, slot in self.slots.items() if slot.pending}
        for session_id, slot in self.slots.items():
            self._schedule(session_id, slot)

    @property
    def open_sessions(self) -> int:
        return sum(1 for s in self.slots.values() if s.open is not None)

    def _schedule(self, session_id: str, slot: SessionSlot) -> None:
        if slot.open is not None:
            heapq.heappush(self._heap, (deadline(slot.open, self.rules)[0], session_id))

    def _put(self, session_id: str, slot: SessionSlot | None) -> None:
        if slot is None:
            self.slots.pop(session_id, None)
        else:
            self.slots[session_id] = slot
            self._schedule(session_id, slot)
        if slot is not None and slot.pending:
            self._pending.add(session_id)
        else:
            self._pending.discard(session_id)
        self._dirty.add(session_id)

    def on_event(self, event: FeedbackEvent, *, offset: int, arrival_ms: int) -> Outcome:
        slot, outcome = add_event(
            self.slots.get(event.session_id), event, offset=offset, clock=self.clock,
            rules=self.rules,
        )
        self.clock = self.clock.arrived(arrival_ms)
        if outcome in ("accepted", "duplicate"):
            self._put(event.session_id, slot)
        if outcome in ("accepted", "redelivered"):  # a replay moves event time as it did first
            self.clock = self.clock.observe(event.ts, self.rules.grace)
            self._expire()
        return outcome

    def on_tick(self, wall_ms: int) -> None:
        self.clock = self.clock.tick(wall_ms, self.rules)
        self._expire()

    def _expire(self) -> None:
        while self._heap and self._heap[0][0] <= self.clock.watermark:
            _, session_id = heapq.heappop(self._heap)
            slot = self.slots.get(session_id)
            if slot is None or slot.open is None:
                continue  # stale heap entry: the session closed or moved on
            after = expire(slot, self.clock.watermark, self.rules)
            if after is not slot:
                self._put(session_id, after)

    def take_closed(self) -> list[ClosedSession]:
        """Closed sessions whose rows are to be written, in their latest state; returned again
        until :meth:`forget_flushed` (a crash before then re-emits them: ids dedupe)."""
        return [c for sid in sorted(self._pending) for c in self.slots[sid].pending]

    def forget_flushed(self) -> None:
        """After the flush is durable and committed: drop pending sessions from state."""
        for session_id in list(self._pending):
            self._put(session_id, flushed(self.slots[session_id]))

    def take_dirty(self) -> dict[str, SessionSlot | None]:
        """Slots changed since the last checkpoint (``None`` = deleted)."""
        dirty = {sid: self.slots.get(sid) for sid in self._dirty}
        self._dirty = set()
        return dirty
