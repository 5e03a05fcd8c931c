"""In-memory session state of one Kafka partition, built on the pure sessionizer.

The worker owns one :class:`PartitionSessions` per assigned partition. It keeps the slots in a
dict and a heap of close deadlines so a watermark step only touches sessions that are due, and it
remembers which slots changed since the last checkpoint so only those are written to the
changelog.

With ``max_open`` set, a partition holds at most that many open sessions: a new session beyond it
closes the open session whose last event is the oldest early (reason ``evicted``), so a flood of
one-event sessions (hostile or buggy producers) cannot grow the state without bound. A second heap,
keyed by last event time and kept while more than half the limit is open, finds that session in
O(log n); the limit is per Kafka partition, not per worker, so which sessions are evicted never
depends on how partitions are assigned.

Open sessions are held compactly (:mod:`~prefstream.streams.core.compact`); every rule runs on
the sessionizer's models, materialized for the few events the compact steps leave to them (the
caps, a close of part of a session).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from prefstream.schemas.events import FeedbackEvent
from prefstream.schemas.records import ClosedSession
from prefstream.streams.core import compact, compact_groups
from prefstream.streams.core.compact import OpenSlot, StoredSlot, to_model
from prefstream.streams.core.sessionize import (
    EPOCH,
    Clock,
    Outcome,
    SessionRules,
    SessionSlot,
    add_event,
    close_early,
    expire,
    find,
    flushed,
)
from prefstream.streams.core.stored_slots import (
    SlotView,
    adopted,
    has_open,
    last_offset,
    n_held,
    next_deadline_micros,
    open_last,
    to_stored,
)

#: stale entries the eviction heap may hold beyond two per open session before it is rebuilt
EVICTION_HEAP_SLACK = 1024
#: stale entries the deadline heap may hold beyond two per slot before it is rebuilt
DEADLINE_HEAP_SLACK = 1024


def evict(slot: SessionSlot, rules: SessionRules) -> SessionSlot:
    """Close the open session of ``slot`` now, before its deadline (reason ``evicted``).

    Each gap-separated group closes on its own, as the watermark would have closed it: pairs
    never join events a gap apart, whichever way a session closed.
    """
    return close_early(slot, rules, "evicted")


class PartitionSessions:
    def __init__(
        self,
        clock: Clock,
        rules: SessionRules,
        slots: Iterable[tuple[str, StoredSlot]] = (),
        *,
        max_open: int | None = None,
    ) -> None:
        if max_open is not None and max_open < 1:
            raise ValueError("max_open must be at least 1 (None: no limit)")
        self.clock = clock
        self.rules = rules
        self.max_open = max_open
        self._slots: dict[str, StoredSlot] = {sid: adopted(sid, s) for sid, s in slots}
        self._heap: list[tuple[int, str]] = []  # (deadline in µs, session id)
        # each session's deadline as last scheduled: a heap entry that differs is stale and is
        # skipped when popped, without looking at the session again
        self._due: dict[str, int] = {}  # an OpenSlot holds its own (``due``)
        # (last event time in µs, session id) of open sessions, oldest first; an entry is stale once
        # its session closed or moved on, and is skipped when popped (lazy invalidation)
        self._by_last: list[tuple[int, str]] = []
        self._tracking = False  # whether _by_last is kept (see _track_last)
        self._n_open = 0
        self._evicted = 0
        self._over_bytes = 0  # sessions closed early by max_bytes since the last take
        self._dirty: set[str] = set()
        self._first_due = (0, EPOCH)  # the earliest deadline in µs, and as a time
        self._bound = (0, EPOCH)  # the last arrival bound (ms), and as a time
        # Sessions recovered as pending (closed before a crash) are emitted again: ids dedupe.
        self._pending = {sid for sid, slot in self._slots.items() if slot.pending}
        self._n_held = 0  # groups the event cap closed, held until the watermark passes them
        for session_id, slot in self._slots.items():
            self._schedule(session_id, slot, None)
            self._n_open += open_last(slot) is not None
            self._n_held += n_held(slot)
        if self.max_open is not None and self._n_open > self.max_open // 2:
            self._rebuild_by_last()

    @property
    def slots(self) -> SlotView:
        """Each session id's state, as the sessionizer's models (read only)."""
        return SlotView(self._slots)

    @property
    def open_sessions(self) -> int:
        return self._n_open

    @property
    def unfinished(self) -> int:
        """Open sessions plus held groups: the sessions whose rows are still to come."""
        return self._n_open + self._n_held

    def _scheduled(self, session_id: str) -> int | None:
        slot = self._slots.get(session_id)
        return slot.due if isinstance(slot, OpenSlot) else self._due.get(session_id)

    def _unschedule(self, session_id: str) -> None:
        slot = self._slots.get(session_id)
        if isinstance(slot, OpenSlot):
            slot.due = None
        self._due.pop(session_id, None)

    def _schedule(self, session_id: str, slot: StoredSlot, before: int | None,
                  due: int | None = None) -> None:
        """Note the deadline of ``slot`` (``before``: the one scheduled for its session id until
        now; ``due``: the slot's, if known), and push it to the heap if it moved."""
        if due is None:
            due = next_deadline_micros(slot, self.rules)
        if isinstance(slot, OpenSlot):
            slot.due = due
            self._due.pop(session_id, None)
        elif due is None:
            self._due.pop(session_id, None)
        else:
            self._due[session_id] = due
        if due is not None and due != before:
            heapq.heappush(self._heap, (due, session_id))
            if len(self._heap) > 2 * len(self._slots) + DEADLINE_HEAP_SLACK:
                self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        """The deadline heap from the deadlines scheduled now: each event that moves a
        session's deadline leaves a stale entry, and an entry is popped only once the watermark
        reaches it (a day later, with a day's gap)."""
        dues = ((self._scheduled(sid), sid) for sid in self._slots)
        self._heap = [(due, sid) for due, sid in dues if due is not None]
        heapq.heapify(self._heap)

    def _rebuild_by_last(self) -> None:
        """The eviction heap from the open sessions alone (drops every stale entry)."""
        self._tracking = True
        lasts = ((open_last(slot), sid) for sid, slot in self._slots.items())
        self._by_last = [(last, sid) for last, sid in lasts if last is not None]
        heapq.heapify(self._by_last)

    def _track_last(self, session_id: str, before: StoredSlot | None,
                    after: StoredSlot | None) -> None:
        """Keep the open and held counts, and an eviction heap entry for every open session's
        last event.

        An entry is added only when a session opens or its last event moves; the heap is
        rebuilt once stale entries outnumber live ones, so it stays O(open sessions) in size
        at an amortized O(log n) per event.

        The heap is kept only while more than half of ``max_open`` sessions are open (built
        from the open sessions when their number passes that, dropped when it falls under a
        quarter): a partition far from its limit never evicts, and spares its memory.
        """
        self._n_open += has_open(after) - has_open(before)
        self._n_held += n_held(after) - n_held(before)
        if self.max_open is not None:
            self._track_eviction(session_id, before, after)

    def _track_eviction(self, session_id: str, before: StoredSlot | None,
                        after: StoredSlot | None) -> None:
        """The eviction heap's part of :meth:`_track_last` (the counts kept)."""
        assert self.max_open is not None
        if not self._tracking:
            if self._n_open <= self.max_open // 2:
                return
            self._rebuild_by_last()  # from the slots before this change: the rest follows
        elif self._n_open < self.max_open // 4:
            self._by_last, self._tracking = [], False
            return
        was, now = open_last(before), open_last(after)
        if now is None or (was is not None and was == now):
            return  # nothing open, or the session's entry is still live
        heapq.heappush(self._by_last, (now, session_id))
        if len(self._by_last) > 2 * self._n_open + EVICTION_HEAP_SLACK:
            self._rebuild_by_last()

    def _put(self, session_id: str, slot: SessionSlot | StoredSlot | None) -> None:
        if slot is not None:
            slot = to_stored(session_id, slot)
        self._track_last(session_id, self._slots.get(session_id), slot)
        if slot is None:
            self._unschedule(session_id)
            self._slots.pop(session_id, None)
        else:
            before = self._scheduled(session_id)
            self._slots[session_id] = slot
            self._schedule(session_id, slot, before)
        if slot is not None and slot.pending:
            self._pending.add(session_id)
        else:
            self._pending.discard(session_id)
        self._dirty.add(session_id)

    def _put_open(self, session_id: str, before: OpenSlot | None, slot: OpenSlot,
                  due: int | None) -> None:
        """:meth:`_put` of an open slot held compactly in place of ``before`` (the hot path:
        nothing pending before or after); ``due``: its deadline, if known."""
        self._n_open += before is None  # the counts of _track_last: nothing held before or after
        if self.max_open is not None:
            self._track_eviction(session_id, before, slot)
        self._slots[session_id] = slot
        self._schedule(session_id, slot, None if before is None else before.due, due)
        self._dirty.add(session_id)

    def on_event(self, event: FeedbackEvent, *, offset: int, arrival_ms: int,
                 size: int = 0) -> Outcome:
        """Apply one event; ``size``: its state bytes (:func:`~streams.core.sessionize.state_bytes`,
        0 = not counted)."""
        stored = self._slots.get(event.session_id)
        if stored is None or isinstance(stored, OpenSlot):  # the hot path, held compactly
            outcome = self._add_compact(event, stored, offset, size)
        else:
            outcome = self._add(event, stored, offset, size)
        # A replay moves event time as it did first. A redelivered event this clock counted
        # already (a restart replays from the committed offset into a checkpoint taken later)
        # moves it no more: its bound would come from a tick after it, so it could move the
        # watermark past events that were in time the first time (docs/delivery.md). Accepted
        # events always count: a re-created topic numbers its new events from 0 again.
        moves = outcome == "accepted" or (
            outcome == "redelivered" and not self.clock.counted(offset))
        self.clock = self.clock.arrived(arrival_ms, offset)
        if moves:
            # An event counts for the clock only up to its arrival: a producer's clock ahead
            # of the others' must not make their events late (docs/hostile-input.md).
            bound = self._bound_at(self.clock.bound_ms(arrival_ms, self.rules))
            self.clock = self.clock.observe(min(event.ts, bound), self.rules.grace)
            self._expire()
        if outcome == "accepted":  # after expiring: sessions the watermark closed make room
            self._evict_over_limit(keep=event.session_id)
        return outcome

    def _bound_at(self, bound_ms: int) -> datetime:
        """The time of ``bound_ms`` (the last one's again: the events of a batch mostly share
        it)."""
        if bound_ms != self._bound[0]:
            self._bound = (bound_ms, datetime.fromtimestamp(bound_ms / 1000, tz=timezone.utc))
        return self._bound[1]

    def _add_compact(self, event: FeedbackEvent, stored: OpenSlot | None, offset: int,
                     size: int) -> Outcome:
        """``event`` into a slot held compactly: a plain accept, a copy of one of its events or
        a late event decided on it as the rules decide them; anything else by :meth:`_add`."""
        slot = compact.append(stored, event, offset=offset, clock=self.clock, rules=self.rules,
                              size=size)
        if slot is not None:
            due = compact_groups.appended_deadline(
                slot.blobs(), self.rules, () if stored is None else stored.blobs(),
                None if stored is None else stored.due)
            self._put_open(event.session_id, stored, slot, due)
            return "accepted"
        if stored is not None:
            seen = compact.repeat(stored, event, offset=offset, clock=self.clock,
                                  rules=self.rules, size=size)
            if seen is not None:
                slot, outcome = seen
                if slot is not stored:  # a duplicate counted: same events, same deadline
                    self._put_open(event.session_id, stored, slot, stored.due)
                return outcome
        return self._add(event, stored, offset, size)

    def _add(self, event: FeedbackEvent, stored: StoredSlot | None, offset: int,
             size: int) -> Outcome:
        """``event`` through the sessionizer's rules, on the slot as its model."""
        before = None if stored is None else to_model(stored)
        slot, outcome = add_event(before, event, offset=offset, clock=self.clock,
                                  rules=self.rules, size=size)
        if outcome in ("accepted", "duplicate", "oversized") and slot is not before and (
                slot is not None or before is not None):
            if slot is not None:  # a closure appends to pending: count the byte bound's
                added = slot.pending[len(before.pending) if before else 0:]
                self._over_bytes += sum(c.reason == "max_bytes" for c in added)
            self._put(event.session_id, slot)
        return outcome

    def holds(self, session_id: str, event_id: str) -> bool:
        """Whether the state of ``session_id`` holds an event with this id (open, held or
        pending): a copy of it is the session rules' to count."""
        slot = self._slots.get(session_id)
        if isinstance(slot, OpenSlot):
            return compact.holds(slot, event_id)
        return slot is not None and find(slot, event_id, -1) is not None

    def on_tick(self, wall_ms: int) -> None:
        self.clock = self.clock.tick(wall_ms, self.rules)
        self._expire()

    def _due_at(self, due: int) -> datetime:
        """A deadline (µs) as a time; the earliest one's again: the watermark moves with most
        events, the earliest deadline only when a session closes."""
        if due != self._first_due[0]:
            self._first_due = (due, EPOCH + timedelta(microseconds=due))
        return self._first_due[1]

    def _expire(self) -> None:
        while self._heap and self._due_at(self._heap[0][0]) <= self.clock.watermark:
            due, session_id = heapq.heappop(self._heap)
            if self._scheduled(session_id) != due:
                continue  # stale heap entry: the session closed or moved on
            self._unschedule(session_id)
            stored = self._slots[session_id]
            if isinstance(stored, OpenSlot):  # usually closes whole: no open session's models
                after = compact.expire(stored, self.clock.watermark, self.rules)
                if after is not None:
                    self._put(session_id, after)
                    continue
            slot = to_model(stored)
            after = expire(slot, self.clock.watermark, self.rules)
            if after is not slot:
                self._put(session_id, after)

    def _evict_over_limit(self, keep: str) -> None:
        """Close the open sessions with the oldest last event (ties: the smaller session id)
        until at most ``max_open`` are open; never ``keep``, the session just added to.

        Only a new session can exceed the limit, so this evicts one session per new session
        (more only after a restart with a lower limit).
        """
        if self.max_open is None:
            return
        held = []
        while self._n_open > self.max_open:
            last, session_id = heapq.heappop(self._by_last)
            slot = self._slots.get(session_id)
            if slot is None or open_last(slot) != last:
                continue  # stale entry: the session closed or moved on
            if session_id == keep:
                held.append((last, session_id))
                continue
            self._put(session_id, evict(to_model(slot), self.rules))
            self._evicted += 1
        for entry in held:
            heapq.heappush(self._by_last, entry)

    def take_over_bytes(self) -> int:
        """Sessions closed early by the byte bound since the last call (for the metric)."""
        n, self._over_bytes = self._over_bytes, 0
        return n

    def take_evicted(self) -> int:
        """Sessions evicted since the last call (for the metric and the warning of a flush)."""
        n, self._evicted = self._evicted, 0
        return n

    def pending_groups(self) -> dict[str, tuple[ClosedSession, ...]]:
        """The pending groups of each session with rows to write, in their latest state; given
        again until :meth:`forget_flushed` (a crash before then re-emits them: ids dedupe), to
        which a flush passes them once written."""
        return {sid: self._slots[sid].pending for sid in self._pending}

    def forget_flushed(self, resume_offset: int | None = None, *,
                       written: dict[str, tuple[ClosedSession, ...]] | None = None) -> None:
        """After the flush is durable and committed: drop pending sessions from state.

        ``resume_offset`` is where a restart would read this partition from (the committed
        offset). A pending session with an event at or past it stays, to be emitted again (ids
        dedupe) until a commit passes it: a worker that resumed from a checkpoint taken ahead
        of the committed offset (killed between the two) replays those events, and they must
        find their session, or they would count as late or start it again from the middle.
        ``None``: everything was applied, forget them all.

        ``written``: the groups the flush wrote (:meth:`pending_groups` when it started), for a
        flush written while events went on; only those are dropped, and groups closed since
        stay pending for the next flush. ``None``: every pending group was written.
        """
        for session_id in list(self._pending):
            slot = to_model(self._slots[session_id])  # a model: it has pending groups
            if resume_offset is not None and any(last_offset(c.session) >= resume_offset
                                                 for c in slot.pending):
                continue
            if written is not None:
                done = written.get(session_id, ())
                rest = tuple(c for c in slot.pending if not any(c is w or c == w for w in done))
                if rest:
                    if len(rest) < len(slot.pending):
                        self._put(session_id, slot.model_copy(update={"pending": rest}))
                    continue
            self._put(session_id, flushed(slot))

    def take_dirty(self) -> dict[str, StoredSlot | None]:
        """Slots changed since the last checkpoint (``None`` = deleted), as held: immutable,
        open sessions compact (see :mod:`~prefstream.streams.core.compact`)."""
        dirty = {sid: self._slots.get(sid) for sid in self._dirty}
        self._dirty = set()
        return dirty
