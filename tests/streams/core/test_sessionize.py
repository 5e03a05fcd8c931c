"""The pure sessionizer (streams.core.sessionize): literal cases first, then properties of the clock
and of how an open session splits into groups (``clusters``) and closes (``expire``).

Properties over whole event streams run through ``PartitionSessions`` in test_state.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta, timezone
from itertools import pairwise

from factories import T0, at, event
from hypothesis import given, settings
from hypothesis import strategies as st

from prefstream.schemas.records import ClosedSession, Session, SessionEvent
from prefstream.streams.core.sessionize import (
    EPOCH,
    TICK,
    Clock,
    SessionRules,
    SessionSlot,
    _group_deadline,
    add_event,
    clusters,
    deadline,
    expire,
    flushed,
    next_deadline,
    state_bytes,
)

RULES = SessionRules()  # gap 30 min, grace 5 min, idle 30 s, 500 events, 6 h
MIN = timedelta(minutes=1)
T0_MS = int(T0.timestamp() * 1000)
FRESH = Clock(kafka_partition=3)  # watermark at the epoch: nothing is late


def clock_at(minute: float) -> Clock:
    """A clock whose watermark is ``at(minute)`` (max event time ``grace`` later)."""
    return FRESH.observe(at(minute) + RULES.grace, RULES.grace)


def feed(*items, slot=None, clock=FRESH, rules=RULES):
    """Feed ``(event, offset)`` pairs; returns the final slot and the list of outcomes."""
    outcomes = []
    for ev, offset in items:
        slot, outcome = add_event(slot, ev, offset=offset, clock=clock, rules=rules)
        outcomes.append(outcome)
    return slot, outcomes


def ids(session: Session) -> list[str]:
    return [item.event.event_id for item in session.events]


# --- Clock -----------------------------------------------------------------------------------

def test_observe_tracks_max_event_time_and_watermark():
    observed = FRESH.observe(at(10), RULES.grace)
    assert observed.last_arrival_ms == 0  # arrival is recorded by ``arrived``, not ``observe``
    clock = observed.arrived(1_000)
    assert clock.kafka_partition == 3
    assert clock.max_event_ts == at(10)
    assert clock.watermark == at(5)
    assert clock.last_arrival_ms == 1_000


def test_arrived_records_arrival_only():
    clock = FRESH.observe(at(10), RULES.grace)
    arrived = clock.arrived(1_000)
    assert arrived.last_arrival_ms == 1_000
    assert (arrived.max_event_ts, arrived.watermark) == (clock.max_event_ts, clock.watermark)


def test_observe_never_moves_backwards():
    clock = (FRESH.observe(at(10), RULES.grace).arrived(2_000)
             .observe(at(2), RULES.grace).arrived(1_000))
    assert clock.max_event_ts == at(10)
    assert clock.watermark == at(5)
    assert clock.last_arrival_ms == 2_000


def test_is_late_is_strictly_before_the_watermark():
    clock = clock_at(0)
    assert clock.is_late(at(0) - timedelta(microseconds=1))
    assert not clock.is_late(at(0))
    assert not clock.is_late(at(1))
    assert not FRESH.is_late(EPOCH)


def test_tick_waits_for_idle_then_follows_the_wall_clock():
    clock = FRESH.observe(at(0), RULES.grace).arrived(T0_MS)
    idle_ms = int(RULES.idle.total_seconds() * 1000)
    wall = T0_MS + idle_ms + 3_600_000  # an hour of wall time, but...
    # ...not idle yet: only the tick is noted (it bounds the times of the events after it)
    assert clock.tick(T0_MS + idle_ms - 1, RULES) == replace(clock,
                                                             last_tick_ms=T0_MS + idle_ms - 1)
    ticked = clock.tick(T0_MS + idle_ms, RULES)
    assert ticked.watermark == at(0) + RULES.idle - RULES.grace
    assert clock.tick(wall, RULES).watermark == at(60) + RULES.idle - RULES.grace
    # a tick only moves the watermark: event time and arrival stay as observed
    assert ticked.max_event_ts == at(0)
    assert ticked.last_arrival_ms == T0_MS


def test_tick_never_moves_the_watermark_backwards():
    clock = FRESH.observe(at(120), RULES.grace).arrived(T0_MS)  # event time ahead of the wall
    ticked = clock.tick(T0_MS + 10 * 60_000, RULES)
    assert ticked.watermark == clock.watermark == at(115)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("observe"), st.integers(-600, 600), st.integers(0, 10_000)),
        st.tuples(st.just("arrive"), st.integers(-600, 600), st.integers(0, 10_000)),
        st.tuples(st.just("tick"), st.integers(-600, 600), st.integers(0, 200_000)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_clock_watermark_is_monotonic_and_bounded(ops):
    """Event time never pulls the watermark back; it trails the max event time by at most grace
    until a tick after ``idle`` wall time lets it follow the wall clock. An accepted event is
    observed and arrives; a late or duplicate one only arrives (it moves no event time)."""
    clock = Clock(kafka_partition=0)
    ceiling = EPOCH
    for kind, minute, arrival_step in ops:
        before = clock
        if kind == "observe":
            clock = clock.observe(at(minute), RULES.grace).arrived(
                clock.last_arrival_ms + arrival_step)
            ceiling = max(ceiling, at(minute) - RULES.grace)
            assert clock.max_event_ts >= at(minute)
            assert clock.watermark >= clock.max_event_ts - RULES.grace
            assert clock.last_arrival_ms == before.last_arrival_ms + arrival_step
        elif kind == "arrive":
            clock = clock.arrived(before.last_arrival_ms + arrival_step)
            assert (clock.max_event_ts, clock.watermark) == (before.max_event_ts, before.watermark)
            assert clock.last_arrival_ms == before.last_arrival_ms + arrival_step
        else:
            wall_ms = T0_MS + minute * 60_000
            clock = clock.tick(wall_ms, RULES)
            idle = wall_ms - before.last_arrival_ms >= RULES.idle.total_seconds() * 1000
            if idle:
                wall = at(minute)
                ceiling = max(ceiling, wall - RULES.grace)
                assert clock.watermark >= wall - RULES.grace
            else:
                assert clock == replace(before, last_tick_ms=max(before.last_tick_ms, wall_ms))
        assert clock.watermark >= before.watermark
        assert clock.max_event_ts >= before.max_event_ts
        assert clock.last_arrival_ms >= before.last_arrival_ms
        assert clock.watermark <= ceiling or clock.watermark == EPOCH


# --- add_event -------------------------------------------------------------------------------

def test_first_event_starts_a_session():
    ev = event(minute=0, session_id="s1")
    slot, outcome = add_event(None, ev, offset=7, clock=FRESH, rules=RULES)
    assert outcome == "accepted"
    assert slot.pending == ()
    session = slot.open
    assert (session.session_id, session.user_id, session.kafka_partition) == ("s1", "u1", 3)
    assert session.start == session.last == at(0)
    assert session.events == (SessionEvent(offset=7, event=ev),)
    assert (session.n_duplicates, session.duplicates, session.ended_at) == (0, (), None)


def test_append_extends_start_and_last_in_arrival_order():
    a, b, c = event(minute=10), event(minute=25), event(minute=3)
    slot, outcomes = feed((a, 0), (b, 1), (c, 2))
    assert outcomes == ["accepted"] * 3
    assert (slot.open.start, slot.open.last) == (at(3), at(25))
    assert ids(slot.open) == [a.event_id, b.event_id, c.event_id]
    assert [item.offset for item in slot.open.events] == [0, 1, 2]
    assert slot.pending == ()


def test_duplicate_event_id_at_a_new_offset_is_counted_not_merged():
    a = event(minute=0)
    resent = event(minute=9, event_id=a.event_id)  # same id, even with another payload
    slot, outcomes = feed((a, 0), (resent, 5))
    assert outcomes == ["accepted", "duplicate"]
    assert ids(slot.open) == [a.event_id]
    assert slot.open.last == at(0)
    assert (slot.open.n_duplicates, slot.open.duplicates) == (1, ((5, a.event_id),))
    slot, outcomes = feed((a, 6), slot=slot)
    assert outcomes == ["duplicate"]
    assert (slot.open.n_duplicates, slot.open.duplicates) == (
        2, ((5, a.event_id), (6, a.event_id)))


def test_redelivery_of_the_same_offset_changes_nothing():
    a, b = event(minute=0), event(minute=1)
    slot, _ = feed((a, 0), (b, 1))
    again, outcome = add_event(slot, a, offset=0, clock=FRESH, rules=RULES)
    assert outcome == "redelivered"
    assert again is slot


def test_redelivered_duplicate_is_not_counted_twice():
    a = event(minute=0)
    slot, outcomes = feed((a, 0), (a, 4))
    assert outcomes == ["accepted", "duplicate"]
    again, outcome = add_event(slot, a, offset=4, clock=FRESH, rules=RULES)
    assert outcome == "redelivered"
    assert again is slot
    assert (again.open.n_duplicates, again.open.duplicates) == (1, ((4, a.event_id),))


def test_duplicate_of_an_event_in_a_pending_session_is_counted_there():
    a, b = event(minute=0), event(minute=40)
    slot, outcomes = feed((a, 0), (b, 1))
    assert outcomes == ["accepted", "accepted"]
    slot = expire(slot, at(30), RULES)  # a's group closes, b stays open
    assert [ids(c.session) for c in slot.pending] == [[a.event_id]]
    slot, outcomes = feed((a, 2), slot=slot)
    assert outcomes == ["duplicate"]
    assert slot.pending[0].session.duplicates == ((2, a.event_id),)
    assert slot.pending[0].session.n_duplicates == 1
    assert slot.open.duplicates == ()
    again, outcome = add_event(slot, a, offset=2, clock=FRESH, rules=RULES)
    assert (again, outcome) == (slot, "redelivered")


def test_duplicates_follow_their_event_when_the_watermark_splits_the_session():
    a, b = event(minute=0), event(minute=40)
    slot, outcomes = feed((a, 0), (b, 1), (b, 2), (a, 3), (b, 4))
    assert outcomes == ["accepted", "accepted", "duplicate", "duplicate", "duplicate"]
    assert slot.open.duplicates == ((2, b.event_id), (3, a.event_id), (4, b.event_id))
    slot = expire(slot, at(30), RULES)
    [closed] = slot.pending
    assert (closed.session.n_duplicates, closed.session.duplicates) == (1, ((3, a.event_id),))
    assert (slot.open.n_duplicates, slot.open.duplicates) == (
        2, ((2, b.event_id), (4, b.event_id)))
    # each copy is still recognised as a redelivery on the side it moved to
    for ev, offset in ((a, 3), (b, 2), (b, 4)):
        again, outcome = add_event(slot, ev, offset=offset, clock=FRESH, rules=RULES)
        assert (again, outcome) == (slot, "redelivered")


def test_event_older_than_the_watermark_is_late_and_set_aside():
    a = event(minute=20)
    slot, _ = feed((a, 0), clock=clock_at(10))
    late = event(minute=9)
    after, outcome = add_event(slot, late, offset=1, clock=clock_at(10), rules=RULES)
    assert outcome == "late"
    assert after is slot
    empty, outcome = add_event(None, late, offset=1, clock=clock_at(10), rules=RULES)
    assert outcome == "late"
    assert empty is None or (empty.open is None and empty.pending == ())
    _, outcome = add_event(slot, event(minute=10), offset=2, clock=clock_at(10), rules=RULES)
    assert outcome == "accepted"  # exactly at the watermark is in time


def test_redelivery_of_an_old_message_is_not_late():
    """After a restart the clock is ahead of replayed messages: they must not become late rows."""
    a = event(minute=0)
    slot, _ = feed((a, 0), (a, 4))
    for offset in (0, 4):  # the original and a recorded duplicate alike
        again, outcome = add_event(slot, a, offset=offset, clock=clock_at(60), rules=RULES)
        assert (again, outcome) == (slot, "redelivered")
    # A new copy older than the watermark is late, not a duplicate (the lateness check now comes
    # before the duplicate check): it is set aside and counted nowhere, as it would be once the
    # session holding ``a`` was flushed and forgotten.
    after, outcome = add_event(slot, a, offset=1, clock=clock_at(60), rules=RULES)
    assert (after, outcome) == (slot, "late")
    assert slot.open.duplicates == ((4, a.event_id),)
    forgotten, outcome = add_event(None, a, offset=1, clock=clock_at(60), rules=RULES)
    assert outcome == "late" and (forgotten is None or forgotten.open is None)
    # while it is not older than the watermark, the same copy is still a duplicate
    _, outcome = add_event(slot, a, offset=1, clock=clock_at(0), rules=RULES)
    assert outcome == "duplicate"


def test_duplicate_of_an_event_of_a_closed_group_is_late_whether_or_not_flushed():
    """A group closes only once the watermark is past its last event, so a later copy of any of
    its events is late: the outcome does not depend on when the pending session was flushed."""
    a, b = event(minute=0), event(minute=40)
    slot, _ = feed((a, 0), (b, 1))
    clock = clock_at(30)
    slot = expire(slot, clock.watermark, RULES)
    [closed] = slot.pending
    assert ids(closed.session) == [a.event_id]
    pending, outcome = add_event(slot, a, offset=2, clock=clock, rules=RULES)
    assert (pending, outcome) == (slot, "late")  # not counted on the pending session
    flushed_slot, outcome = add_event(flushed(slot), a, offset=2, clock=clock, rules=RULES)
    assert (flushed_slot, outcome) == (flushed(slot), "late")
    # a copy of an event of the open group is in time and still counted as a duplicate
    slot, outcome = add_event(slot, b, offset=3, clock=clock, rules=RULES)
    assert outcome == "duplicate"
    assert slot.open.duplicates == ((3, b.event_id),)


def test_gap_after_last_closes_the_open_session():
    """An event a gap after the last one joins the open session as a second group; the split
    happens when the watermark passes the first group's last event plus the gap."""
    a, b = event(minute=0), event(minute=30)  # exactly the gap
    slot, outcomes = feed((a, 0), (b, 1))
    assert outcomes == ["accepted", "accepted"]
    assert slot.pending == ()
    assert ids(slot.open) == [a.event_id, b.event_id]
    assert [ids(g) for g in clusters(slot.open, RULES.gap)] == [[a.event_id], [b.event_id]]
    assert deadline(slot.open, RULES) == (at(30), "gap")
    assert expire(slot, at(30) - timedelta(microseconds=1), RULES) is slot
    slot = expire(slot, at(30), RULES)
    [closed] = slot.pending
    assert closed.reason == "gap"
    assert ids(closed.session) == [a.event_id]
    assert (closed.session.start, closed.session.last) == (at(0), at(0))
    assert ids(slot.open) == [b.event_id]
    assert slot.open.start == at(30)


def test_straggler_before_the_watermark_bridges_gap_separated_groups():
    a, b, c = event(minute=0), event(minute=31), event(minute=27)
    slot, _ = feed((a, 0), (b, 1))
    assert len(clusters(slot.open, RULES.gap)) == 2
    slot, outcomes = feed((c, 2), slot=slot, clock=clock_at(26))  # 31 - grace: c is in time
    assert outcomes == ["accepted"]
    [whole] = clusters(slot.open, RULES.gap)
    assert ids(whole) == [a.event_id, b.event_id, c.event_id]
    assert deadline(slot.open, RULES) == (at(61), "gap")
    assert expire(slot, at(60), RULES) is slot
    [closed] = expire(slot, at(61), RULES).pending
    assert (closed.reason, ids(closed.session)) == ("gap", [a.event_id, b.event_id, c.event_id])


def test_just_under_the_gap_stays_in_the_session():
    a, b = event(minute=0), event(minute=30 - 1 / 60)
    slot, _ = feed((a, 0), (b, 1))
    assert slot.pending == ()
    assert ids(slot.open) == [a.event_id, b.event_id]
    assert [ids(g) for g in clusters(slot.open, RULES.gap)] == [[a.event_id, b.event_id]]
    assert expire(slot, at(30), RULES) is slot  # no split when the first event's gap passes
    [closed] = expire(slot, at(60 - 1 / 60), RULES).pending
    assert ids(closed.session) == [a.event_id, b.event_id]


def test_gap_before_start_closes_the_open_session():
    """An event a gap before the open session's start is a separate group; the earlier group in
    event time closes first, once the watermark passes its last event plus the gap."""
    a, b = event(minute=100), event(minute=70)
    slot, _ = feed((a, 0), (b, 1))
    assert slot.pending == ()
    assert [ids(g) for g in clusters(slot.open, RULES.gap)] == [[b.event_id], [a.event_id]]
    assert deadline(slot.open, RULES) == (at(100), "gap")
    slot = expire(slot, at(100), RULES)
    [closed] = slot.pending
    assert (closed.reason, ids(closed.session)) == ("gap", [b.event_id])
    assert ids(slot.open) == [a.event_id]


def test_max_events_closes_the_session():
    rules = SessionRules(max_events=3)
    evs = [event(minute=i) for i in range(4)]
    slot, outcomes = feed(*((e, i) for i, e in enumerate(evs[:3])), rules=rules)
    assert outcomes == ["accepted"] * 3
    assert slot.open is None and slot.pending == ()
    [closed] = slot.held  # closed to new events, written once the watermark passes it
    assert (closed.reason, ids(closed.session)) == ("max_events", [e.event_id for e in evs[:3]])
    slot, _ = feed((evs[3], 3), slot=slot, rules=rules)
    assert ids(slot.open) == [evs[3].event_id]
    assert len(slot.held) == 1
    slot, outcome = add_event(slot, evs[1], offset=4, clock=FRESH, rules=rules)
    assert outcome == "duplicate" and slot.held[0].session.duplicates == ((4, evs[1].event_id),)
    assert next_deadline(slot, rules) == evs[2].ts + TICK
    assert expire(slot, evs[2].ts, rules) == slot
    released = expire(slot, evs[2].ts + TICK, rules)
    assert released.held == () and released.pending == slot.held
    assert ids(released.open) == [evs[3].event_id]
    assert flushed(released) == SessionSlot(open=released.open)


def test_max_events_closes_only_the_group_that_reached_it():
    """The cap is per group: groups a gap apart are not closed before the watermark says so."""
    rules = SessionRules(max_events=3)
    a, b, c, d = event(minute=50), event(minute=0), event(minute=10), event(minute=52)
    slot, outcomes = feed((a, 0), (b, 1), (c, 2), rules=rules)
    assert outcomes == ["accepted"] * 3
    assert slot.pending == () and ids(slot.open) == [a.event_id, b.event_id, c.event_id]
    slot, outcomes = feed((d, 3), slot=slot, rules=rules)
    assert outcomes == ["accepted"]
    assert slot.pending == ()  # [b, c] and [a, d]: neither group holds 3 events
    e = event(minute=53)
    slot, _ = feed((e, 4), slot=slot, rules=rules)
    assert [(p.reason, ids(p.session)) for p in slot.held] == [
        ("max_events", [a.event_id, d.event_id, e.event_id])]
    assert ids(slot.open) == [b.event_id, c.event_id]


def test_session_end_sets_ended_at():
    a = event(minute=0)
    slot, _ = feed((a, 0))
    assert slot.open.ended_at is None
    slot, _ = feed((event("session_end", minute=5), 1), slot=slot)
    assert slot.open.ended_at == at(5)
    slot, _ = feed((event("session_end", minute=3), 2), (event(minute=8), 3), slot=slot)
    assert slot.open.ended_at == at(5)  # the latest session_end wins, other events leave it
    slot, _ = feed((event("session_end", minute=9), 4), slot=slot)
    assert slot.open.ended_at == at(9)
    first, _ = feed((event("session_end", minute=2), 0))
    assert first.open.ended_at == at(2)


# --- deadline / expire / flushed -------------------------------------------------------------

def _session(*minutes: float, ended: float | None = None) -> Session:
    """A session of copy events at ``minutes`` (plus a ``session_end`` event at ``ended``)."""
    kinds = [("copy", m) for m in minutes] + ([] if ended is None else [("session_end", ended)])
    evs = tuple(SessionEvent(offset=i, event=event(kind, minute=m))
                for i, (kind, m) in enumerate(kinds))
    times = [m for _, m in kinds]
    return Session(session_id="s1", user_id="u1", start=at(min(times)), last=at(max(times)),
                   events=evs, ended_at=None if ended is None else at(ended))


def test_deadline_is_the_earliest_of_gap_end_and_duration():
    assert TICK == timedelta(microseconds=1)
    assert deadline(_session(0, 10), RULES) == (at(40), "gap")
    # session_end and max_duration wait until the watermark is strictly past the last event
    # (here the session_end event itself): one tick after it, no longer at ended_at
    assert deadline(_session(0, 10, ended=12), RULES) == (at(12) + TICK, "session_end")
    assert deadline(_session(0, 10, ended=5), RULES) == (at(10) + TICK, "session_end")
    short = SessionRules(max_duration=timedelta(minutes=30))
    assert deadline(_session(0, 20), short) == (at(30), "max_duration")
    # an event at or past start + max_duration starts the next group: the first one, [0, 20],
    # closes when the duration runs out, however the later events keep coming within the gap
    assert deadline(_session(0, 20, 30), short) == (at(30), "max_duration")
    assert deadline(_session(0, 20, 40), short) == (at(30), "max_duration")


def test_deadline_is_the_first_groups():
    assert deadline(_session(50, 0, 10, 55), RULES) == (at(40), "gap")
    assert deadline(_session(0, 10, 50, ended=52), RULES) == (at(40), "gap")
    # was at(5): the first group [0, 5, 10] now waits until the watermark is past 10
    assert deadline(_session(0, 10, 50, ended=5), RULES) == (at(10) + TICK, "session_end")
    short = SessionRules(max_duration=timedelta(minutes=20))
    # 25 is past start + max_duration: the first group is [0] alone, closed when it runs out
    assert deadline(_session(0, 25, 60), short) == (at(20), "max_duration")
    assert deadline(_session(0, 15, 60), short) == (at(20), "max_duration")


_minutes = st.lists(st.integers(0, 400), min_size=1, max_size=12)


@given(_minutes, st.one_of(st.none(), st.integers(0, 400)), st.integers(10, 400))
def test_deadline_equals_the_deadline_of_the_first_cluster(minutes, ended, duration):
    """``deadline`` skips building the groups; it must agree with the groups it skips."""
    rules = SessionRules(max_duration=timedelta(minutes=duration))
    session = _session(*minutes, ended=ended)
    first = clusters(session, rules.gap, rules.max_duration)[0]
    assert deadline(session, rules) == _group_deadline(first, rules)  # as ``expire`` sees it


@given(st.lists(st.tuples(st.sampled_from(["copy", "session_end", "click"]),
                          st.integers(0, 400)), min_size=1, max_size=10))
def test_appending_keeps_the_bounds_that_recomputing_gives(kinds):
    """``add_event`` updates start, last and ended_at per event; recomputing from all events
    (as ``clusters`` does) must give the same session."""
    slot, _ = feed(*((event(kind, minute=m, event_id=f"e{i}"), i)
                     for i, (kind, m) in enumerate(kinds)))
    session = slot.open
    assert clusters(session, timedelta(days=365))[0] == session


def test_clusters_split_at_event_time_gaps_and_keep_arrival_order():
    session = _session(60, 0, 89, 10, ended=25)  # offsets 0..4 in this order
    e1, e2 = session.events[1].event.event_id, session.events[2].event.event_id
    session = session.model_copy(update={"duplicates": ((7, e1), (8, e2)), "n_duplicates": 2})
    first, second = clusters(session, RULES.gap)
    assert [i.offset for i in first.events] == [1, 3, 4]  # arrival order, not event time
    assert [i.offset for i in second.events] == [0, 2]
    assert (first.start, first.last, first.ended_at) == (at(0), at(25), at(25))
    assert (second.start, second.last, second.ended_at) == (at(60), at(89), None)
    assert (first.duplicates, first.n_duplicates) == (((7, e1),), 1)
    assert (second.duplicates, second.n_duplicates) == (((8, e2),), 1)
    assert {(g.session_id, g.user_id, g.kafka_partition) for g in (first, second)} == {
        (session.session_id, session.user_id, session.kafka_partition)}
    whole = _session(0, 10, 20)
    assert clusters(whole, RULES.gap) == [whole]


def test_expire_closes_only_when_the_watermark_reaches_the_deadline():
    slot = SessionSlot(open=_session(0, 10))
    assert expire(slot, at(40) - timedelta(microseconds=1), RULES) is slot
    closed = expire(slot, at(40), RULES)
    assert closed.open is None
    assert closed.pending == (ClosedSession(session=slot.open, reason="gap"),)
    assert expire(closed, at(500), RULES) is closed  # nothing open: nothing to do


def test_expire_closes_every_due_leading_group_and_keeps_the_rest_open():
    session = _session(0, 10, 50, 55, 100)
    slot = SessionSlot(open=session)
    one = expire(slot, at(40), RULES)
    assert [(c.reason, [i.offset for i in c.session.events]) for c in one.pending] == [
        ("gap", [0, 1])]
    assert [i.offset for i in one.open.events] == [2, 3, 4]
    assert (one.open.start, one.open.last) == (at(50), at(100))
    assert deadline(one.open, RULES) == (at(85), "gap")
    assert expire(one, at(85) - timedelta(microseconds=1), RULES) is one
    all_at_once = expire(slot, at(130), RULES)
    assert all_at_once.open is None
    assert [[i.offset for i in c.session.events] for c in all_at_once.pending] == [
        [0, 1], [2, 3], [4]]
    assert {c.reason for c in all_at_once.pending} == {"gap"}
    assert expire(expire(one, at(85), RULES), at(130), RULES) == all_at_once


def test_expire_max_duration():
    rules = SessionRules(max_duration=timedelta(hours=1))
    slot = SessionSlot(open=_session(*range(0, 59, 10)))
    assert expire(slot, at(59), rules) is slot
    assert expire(slot, at(60), rules).pending[0].reason == "max_duration"


def test_session_end_waits_for_grace_so_stragglers_join():
    end, straggler = event("session_end", minute=10), event(minute=7)
    slot, _ = feed((event(minute=0), 0), (end, 1))
    clock = FRESH.observe(end.ts, RULES.grace)
    assert expire(slot, clock.watermark, RULES) is slot  # watermark 10 - 5 = 5 min
    slot, outcome = add_event(slot, straggler, offset=2, clock=clock, rules=RULES)
    assert outcome == "accepted"
    clock = clock.observe(at(15), RULES.grace)  # another session moves the watermark to 10
    # The close now waits until the watermark is strictly past the last event (the session_end
    # at 10, not yet late at watermark 10): a last straggler exactly at 10 still joins.
    assert expire(slot, clock.watermark, RULES) is slot
    last = event(minute=10)
    slot, outcome = add_event(slot, last, offset=3, clock=clock, rules=RULES)
    assert outcome == "accepted"
    assert expire(slot, clock.watermark, RULES) is slot
    clock = clock.observe(at(15) + TICK, RULES.grace)  # watermark one tick past 10
    slot = expire(slot, clock.watermark, RULES)
    [closed] = slot.pending
    assert closed.reason == "session_end"
    assert straggler.event_id in ids(closed.session) and last.event_id in ids(closed.session)


def test_flushed_drops_pending_and_keeps_open():
    a, b = event(minute=0), event(minute=40)
    slot, _ = feed((a, 0), (b, 1))
    slot = expire(slot, at(30), RULES)
    assert len(slot.pending) == 1
    assert slot.open is not None
    kept = flushed(slot)
    assert kept == SessionSlot(open=slot.open)
    only_pending = SessionSlot(pending=slot.pending)
    assert flushed(only_pending) is None


# --- properties of clusters / deadline / expire ----------------------------------------------

@st.composite
def open_sessions(draw):
    """An open session as ``add_event`` builds it: events in arrival order (any event time, some
    ``session_end``), and re-sent copies of some of them."""
    kinds = draw(st.lists(st.tuples(st.sampled_from(["copy"] * 4 + ["session_end"]),
                                    st.integers(0, 300)), min_size=1, max_size=15))
    slot = None
    for offset, (kind, minute) in enumerate(kinds):
        slot, outcome = add_event(slot, event(kind, minute=minute), offset=offset, clock=FRESH,
                                  rules=RULES)
        assert outcome == "accepted"
    originals = [item.event for item in slot.open.events]
    copies = draw(st.lists(st.sampled_from(originals), max_size=5))
    for offset, ev in enumerate(copies, start=len(kinds)):
        slot, outcome = add_event(slot, ev, offset=offset, clock=FRESH, rules=RULES)
        assert outcome == "duplicate"
    return slot.open


rules_st = st.builds(
    SessionRules,
    gap=st.sampled_from([timedelta(minutes=10), timedelta(minutes=30)]),
    max_duration=st.sampled_from([timedelta(minutes=45), timedelta(hours=6)]),
)


@settings(max_examples=200, deadline=None)
@given(open_sessions(), rules_st)
def test_clusters_partition_a_session_at_gaps_and_the_longest_duration(session, rules):
    groups = clusters(session, rules.gap, rules.max_duration)
    assert sorted(i.offset for g in groups for i in g.events) == sorted(
        i.offset for i in session.events)
    for g in groups:
        assert [i for i in session.events if i in g.events] == list(g.events)  # arrival order
        times = sorted(i.event.ts for i in g.events)
        assert (g.start, g.last) == (times[0], times[-1])
        assert all(b - a < rules.gap for a, b in pairwise(times))
        assert g.last - g.start < rules.max_duration
        ends = [i.event.ts for i in g.events if i.event.type == "session_end"]
        assert g.ended_at == (max(ends) if ends else None)
        mine = {i.event.event_id for i in g.events}
        assert g.duplicates == tuple(d for d in session.duplicates if d[1] in mine)
        assert g.n_duplicates == len(g.duplicates)
        assert (g.session_id, g.user_id, g.kafka_partition) == (
            session.session_id, session.user_id, session.kafka_partition)
    for before, after in pairwise(groups):  # split at a gap, or where the duration ran out
        assert (after.start - before.last >= rules.gap
                or after.start - before.start >= rules.max_duration)
    assert sum(g.n_duplicates for g in groups) == session.n_duplicates == len(session.duplicates)


@settings(max_examples=200, deadline=None)
@given(open_sessions(), rules_st, st.integers(-10, 400), st.integers(0, 400))
def test_expire_closes_exactly_the_due_leading_groups(session, rules, minute, later):
    """``deadline`` is the earliest group deadline; ``expire`` closes the leading groups whose own
    deadline the watermark reached, keeps the others open, and two steps equal one."""
    groups = clusters(session, rules.gap, rules.max_duration)
    slot = SessionSlot(open=session)
    watermark = at(minute)
    closed_slot = expire(slot, watermark, rules)
    n_due = 0
    while n_due < len(groups) and deadline(groups[n_due], rules)[0] <= watermark:
        n_due += 1
    assert deadline(session, rules) == deadline(groups[0], rules)
    assert deadline(session, rules)[0] == min(deadline(g, rules)[0] for g in groups)
    if n_due == 0:
        assert closed_slot is slot
    # a group closes only once the watermark is strictly past its last event: any later copy
    # of one of its events is late
    assert all(deadline(g, rules)[0] > g.last for g in groups)
    assert all(c.session.last < watermark for c in closed_slot.pending)
    assert [c.session for c in closed_slot.pending] == groups[:n_due]
    reasons = [deadline(g, rules)[1] for g in groups[:n_due]]
    assert [c.reason for c in closed_slot.pending] == reasons
    if n_due == len(groups):
        assert closed_slot.open is None
    else:
        assert clusters(closed_slot.open, rules.gap, rules.max_duration) == groups[n_due:]
        assert deadline(closed_slot.open, rules)[0] > watermark
    end = watermark + timedelta(minutes=later)
    assert expire(closed_slot, end, rules) == expire(slot, end, rules)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80) | st.text(max_size=60).map(
    lambda t: t.encode("utf-8", "surrogatepass")) | st.lists(st.sampled_from(
        (b'{"a":', b'"x\\"', b"\\", b'"', b" ", b"~", b"\x7f", b"\x1f", b"\n", b"\xc3\xa9",
         b"z" * 30))).map(b"".join))
def test_state_bytes_count_the_escaped_message_without_building_it(raw):
    """As ``json.dumps`` escapes the message's text, whatever its bytes (the printable ASCII
    shortcut included)."""
    assert state_bytes(raw) == len(json.dumps(raw.decode("utf-8", errors="replace"))) + 128


_zoned = st.builds(lambda minute, hours: at(minute).astimezone(timezone(timedelta(hours=hours))),
                   st.integers(-30, 30), st.sampled_from((0, 0, 1, -5)))


@settings(max_examples=200, deadline=None)
@given(st.lists(_zoned, min_size=1, max_size=8), st.sampled_from((timedelta(0), RULES.grace)))
def test_observe_keeps_the_max_of_event_time_and_of_the_watermark(times, grace):
    """Each time the larger of the two (the first of equal instants, in its own UTC offset),
    and the very same clock when neither moves."""
    clock = Clock(kafka_partition=0, max_event_ts=at(0), watermark=at(-3))
    for ts in times:
        top = max(clock.max_event_ts, ts)
        watermark = max(clock.watermark, top - grace)
        after = clock.observe(ts, grace)
        assert (str(after.max_event_ts), str(after.watermark)) == (str(top), str(watermark))
        assert (after is clock) == (top == clock.max_event_ts and watermark == clock.watermark)
        clock = after

