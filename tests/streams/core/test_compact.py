"""Open sessions held compactly (streams.core.compact): the same state as the sessionizer's
models, read back exactly, through the changelog record too; the steps done compactly (a plain
accept, its deadline, the close of a whole session) decided as the sessionizer decides them; and
a partition's state (streams.core.state), message by message, what the rules give on the models
alone."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from factories import T0, at, event
from helpers.core import pending
from hypothesis import given, settings
from hypothesis import strategies as st

from prefstream.schemas.events import MAX_POSITION
from prefstream.streams.core import compact, compact_events, compact_groups, compact_record
from prefstream.streams.core.compact import OpenSlot, to_model
from prefstream.streams.core.sessionize import (
    EPOCH,
    TICK,
    Clock,
    SessionRules,
    SessionSlot,
    add_event,
    deadline,
    expire,
    group_bytes,
    next_deadline,
    state_bytes,
)
from prefstream.streams.core.state import DEADLINE_HEAP_SLACK, PartitionSessions

RULES = SessionRules()  # gap 30 min, grace 5 min, 500 events, 6 h
KINDS = ("impression", "click", "copy", "thumbs_up", "thumbs_down", "regenerate", "edit",
         "reformulate", "session_end")
_SHARED = ("How do I sort a dict by value?", 'Re: "How do I sort a dict by value?" again',
           "Grüße aus Köln: wie geht's dir heute? \\", "x" * 24)
_text = st.sampled_from(_SHARED) | st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40)


@st.composite
def events(draw: st.DrawFn, n: int, span: int = 600) -> list:
    """``n`` events of one session: any type, texts, users, minutes (``span`` of them) and UTC
    offsets."""
    out = []
    for i in range(n):
        kind = draw(st.sampled_from(KINDS))
        zone = timezone(timedelta(minutes=draw(st.sampled_from((0, 0, 60, -330, 765)))))
        fields = {}
        if kind == "impression":
            fields = dict(prompt=draw(_text), response_text=draw(_text),
                          position=draw(st.integers(0, MAX_POSITION)))
        elif kind == "edit":
            fields = dict(edited_text=draw(_text))
        ev = event(kind, event_id=f"e{i}", user_id=draw(st.sampled_from(("u1", "u1", "ü2"))),
                   **fields)
        ts = at(draw(st.integers(0, span)) + draw(st.integers(0, 999_999)) / 6e7)
        out.append(ev.model_copy(update={"ts": ts.astimezone(zone)}))
    return out


def slot_of(evs: list, rules: SessionRules = RULES) -> SessionSlot:
    slot = None
    for offset, ev in enumerate(evs):
        slot, outcome = add_event(slot, ev, offset=offset, clock=Clock(kafka_partition=3),
                                  rules=rules, size=offset * 7)
        assert outcome == "accepted"
    return slot


def assert_same(got: SessionSlot, want: SessionSlot) -> None:
    """Equal, and every time in the same UTC offset (equality alone compares instants)."""
    assert got == want
    for a, b in zip(got.open.events, want.open.events, strict=True):
        assert a.event.ts.isoformat() == b.event.ts.isoformat()
        assert type(a.event) is type(b.event)


@settings(max_examples=60, deadline=None)
@given(events(1) | st.integers(2, 6).flatmap(events))
def test_an_open_session_reads_back_as_the_model_it_was_built_as(evs):
    slot = slot_of(evs)
    held = compact.compact(slot, "s1")
    assert isinstance(held, OpenSlot)
    assert_same(to_model(held), slot)
    assert held == slot and held.open == slot.open
    assert compact_groups.deadline(held.blobs(), RULES) == deadline(slot.open, RULES)
    assert_same(to_model(compact_record.from_json(compact_record.to_json(held), "s1")), slot)


@settings(max_examples=60, deadline=None)
@given(events(1) | st.integers(2, 6).flatmap(events))
def test_the_deadline_in_micros_is_the_sessionizers(evs):
    """What the partition schedules (integers alone) is the sessionizer's deadline."""
    slot = slot_of(evs)
    held = compact.compact(slot, "s1")
    assert compact_groups.deadline_micros(held.blobs(), RULES) == (
        deadline(slot.open, RULES)[0] - EPOCH) // TICK


@settings(max_examples=200, deadline=None)
@given(st.datetimes(timezones=st.builds(timezone, st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)))))
def test_an_event_time_in_micros_is_read_from_its_fields_exactly(ts):
    assert compact_events.micros_in_zone(ts) == ((ts - EPOCH) // TICK, ts.utcoffset() // TICK)


def test_texts_are_held_once_per_session():
    """A prompt shown with several answers, an answer shown again: each long text is held by
    the first event that has it, the others refer to it."""
    prompt, answer = "How do I sort a dict by value?", "Use sorted(d.items(), key=...)."
    evs = [event("impression", response_id=r, prompt=prompt, response_text=f"{answer} {r}",
                 minute=i) for i, r in enumerate("abc")]
    evs += [event("impression", response_id="a", prompt=prompt, response_text=f"{answer} a",
                  minute=4),
            event("reformulate", prompt=prompt, minute=5)]
    slot = slot_of(evs)
    held = compact.compact(slot)
    assert [b.count(prompt.encode()) for b in held.blobs()] == [1, 0, 0, 0, 0]
    assert [b.count(answer.encode()) for b in held.blobs()] == [1, 1, 1, 0, 0]
    assert_same(to_model(held), slot)
    assert_same(to_model(compact_record.from_json(compact_record.to_json(held))), slot)
    ps = PartitionSessions(Clock(kafka_partition=3), RULES)
    for offset, ev in enumerate(evs):  # appended one by one, the same
        ps.on_event(ev, offset=offset, arrival_ms=int(T0.timestamp() * 1000), size=offset * 7)
    assert ps._slots["s1"].blobs() == held.blobs()


def test_a_session_of_another_user_than_its_first_event_keeps_both():
    slot = slot_of([event(user_id="u1"), event(user_id="u2", minute=1)])
    other = SessionSlot(open=slot.open.model_copy(update={"user_id": "u9"}))
    held = compact.compact(other)
    assert held.user_id == "u9"
    assert_same(to_model(compact_record.from_json(compact_record.to_json(held))), other)


def test_slots_with_closed_groups_stay_models():
    slot = slot_of([event(minute=0), event(minute=40)])
    closed = expire(slot, at(31), RULES)
    assert closed.pending and closed.open is not None
    assert compact.compact(closed) is closed
    assert compact.compact(SessionSlot(pending=closed.pending)).pending == closed.pending


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(events), events(1), st.integers(0, 700),
       st.sampled_from((None, 64 * 1024)), st.integers(2, 4))
def test_the_compact_accept_is_the_sessionizers(evs, new, watermark_minute, max_bytes, cap):
    """Whenever ``compact.append`` accepts an event, the sessionizer accepts it into the same
    state; otherwise it leaves the event to the sessionizer."""
    rules = SessionRules(max_bytes=max_bytes, max_events=cap)
    clock = Clock(kafka_partition=3, watermark=at(watermark_minute))
    evs = evs[:cap - 1]
    slot = slot_of(evs, rules)
    [ev] = new
    for candidate in (ev, evs[0].model_copy(update={"ts": ev.ts})):  # new id, then a copy
        size = state_bytes(candidate.model_dump_json().encode()) * 40
        fast = compact.append(compact.compact(slot), candidate, offset=99, clock=clock,
                              rules=rules, size=size)
        want, outcome = add_event(slot, candidate, offset=99, clock=clock, rules=rules,
                                  size=size)
        if fast is not None:
            assert outcome == "accepted"
            assert_same(to_model(fast), want)
        first = compact.append(None, candidate, offset=99, clock=clock, rules=rules, size=size)
        want, outcome = add_event(None, candidate, offset=99, clock=clock, rules=rules,
                                  size=size)
        if first is not None:
            assert outcome == "accepted"
            assert_same(to_model(first), want)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4).flatmap(events), st.data())
def test_copies_and_late_events_are_decided_on_the_compact_slot_as_by_the_rules(evs, data):
    """``compact.repeat``: a redelivery, a duplicate (counted, up to the byte bound) or a late
    event gives the outcome and the slot ``add_event`` gives; another event is the rules'."""
    rules = SessionRules(max_bytes=data.draw(st.sampled_from((None, 450, 500, 100_000))))
    model = slot_of(evs)  # built without the byte bound: only the copies meet it
    held = compact.compact(model, "s1")
    clock = Clock(kafka_partition=3, watermark=data.draw(st.sampled_from((EPOCH, at(700)))))
    for _ in range(data.draw(st.integers(1, 6), label="copies")):
        k = data.draw(st.integers(0, len(evs) - 1), label="of event")
        offset = data.draw(st.sampled_from((k, 40, 41)), label="at offset")  # k: its own
        size = data.draw(st.sampled_from((0, 300)), label="size")
        got = compact.repeat(held, evs[k], offset=offset, clock=clock, rules=rules, size=size)
        want, outcome = add_event(model, evs[k], offset=offset, clock=clock, rules=rules,
                                  size=size)
        assert got is not None and got[1] == outcome
        assert_same(to_model(got[0]), want)
        held, model = got[0], want
    new = event(minute=1, event_id="new")
    late = compact.repeat(held, new, offset=50, clock=clock, rules=rules, size=0)
    assert late == ((held, "late") if clock.is_late(new.ts) else None)


def test_plain_accepts_are_done_compactly_and_the_rest_by_the_rules():
    ps = PartitionSessions(Clock(kafka_partition=0), RULES)
    ms = int(T0.timestamp() * 1000)
    a, b = event(minute=0), event(minute=1)
    assert ps.on_event(a, offset=0, arrival_ms=ms) == "accepted"
    assert ps.on_event(b, offset=1, arrival_ms=ms) == "accepted"
    assert isinstance(ps._slots["s1"], OpenSlot)
    assert ps.on_event(a, offset=2, arrival_ms=ms) == "duplicate"
    assert ps.slots["s1"].open.duplicates == ((2, a.event_id),)
    assert isinstance(ps._slots["s1"], OpenSlot)  # a counted duplicate is held compactly too
    assert ps.holds("s1", b.event_id) and not ps.holds("s1", "nope")


def test_an_event_its_group_would_take_over_the_byte_bound_is_oversized_as_by_the_rules():
    """The bound counts the group's own bytes too (``group_bytes``): an event that fits
    ``max_bytes`` alone but not with them is refused, as ``add_event`` refuses it (found by the
    message-by-message property below: the compact accept took it)."""
    ev = event(minute=0)
    size = 1000 - group_bytes("s1", "u1") + 1
    rules = SessionRules(max_bytes=1000)
    assert add_event(None, ev, offset=0, clock=Clock(kafka_partition=0), rules=rules,
                     size=size) == (None, "oversized")
    ps = PartitionSessions(Clock(kafka_partition=0), rules)
    assert ps.on_event(ev, offset=0, arrival_ms=int(T0.timestamp() * 1000),
                       size=size) == "oversized"
    assert ps.slots == {}
    assert ps.on_event(ev, offset=1, arrival_ms=int(T0.timestamp() * 1000),
                       size=size - 1) == "accepted"
    # a later event under half the bound, with a group of long ids over the other half
    sid, rules = "s" * 40, SessionRules(max_bytes=800)
    ps = PartitionSessions(Clock(kafka_partition=0), rules)
    first, second = event(minute=0, session_id=sid), event(minute=1, session_id=sid)
    assert ps.on_event(first, offset=0, arrival_ms=int(T0.timestamp() * 1000),
                       size=300) == "accepted"
    want = add_event(ps.slots[sid], second, offset=1, clock=ps.clock, rules=rules, size=60)
    assert want[1] == "oversized"
    assert ps.on_event(second, offset=1, arrival_ms=int(T0.timestamp() * 1000),
                       size=60) == "oversized"


def test_the_eviction_heap_is_kept_only_near_the_limit():
    """Kept while more than half of ``max_open`` sessions are open, rebuilt when they are again:
    the oldest session is evicted either way."""
    ps = PartitionSessions(Clock(kafka_partition=0), RULES, max_open=8)
    ms = int(T0.timestamp() * 1000)

    def open_session(sid: str, minute: float, offset: int) -> None:
        assert ps.on_event(event(minute=minute, session_id=sid), offset=offset,
                           arrival_ms=ms) == "accepted"

    for i in range(4):
        open_session(f"a{i}", 10 - i, i)
    assert not ps._tracking and ps._by_last == []
    for i in range(4, 9):  # s8 is one too many: the oldest (a3, minute 7) goes
        open_session(f"a{i}", 20 + i, i)
    assert ps._tracking and ps.open_sessions == 8 and ps.take_evicted() == 1
    assert [c.session.session_id for c in pending(ps)] == ["a3"]
    ps.on_tick(ms + 24 * 3_600_000)  # everything closes: the heap goes
    assert ps.open_sessions == 0 and not ps._tracking and ps._by_last == []
    ps.forget_flushed()
    ms += 24 * 3_600_000
    for i in range(9):
        open_session(f"b{i}", 24 * 60 + 50 - i, 100 + i)  # b8 is the oldest, and the new one
    assert ps.take_evicted() == 1
    assert [c.session.session_id for c in pending(ps)] == ["b7"]


def test_the_deadline_heap_stays_proportional_to_the_slots():
    """Each event moving a session's deadline leaves a stale entry, popped only when the
    watermark reaches it; rebuilding drops them, and every session still closes on time."""
    ps = PartitionSessions(Clock(kafka_partition=0), RULES)
    ms = int(T0.timestamp() * 1000)
    n = 3 * DEADLINE_HEAP_SLACK // 2
    for offset in range(n):
        assert ps.on_event(event(minute=offset / 100, session_id=f"s{offset % 30}"),
                           offset=offset, arrival_ms=ms) == "accepted"
    assert len(ps._heap) <= 2 * 30 + DEADLINE_HEAP_SLACK + 1
    ps.on_tick(ms + 24 * 3_600_000)
    closed = pending(ps)
    assert sorted(c.session.session_id for c in closed) == sorted(f"s{i}" for i in range(30))
    assert sum(len(c.session.events) for c in closed) == n


def test_bounds_are_read_from_the_events_and_others_keep_the_model():
    """The first event in arrival order among equal times gives each bound (as ``min`` and
    ``max`` keep the first); a session whose bounds are not its events' stays a model."""
    plus_one = timezone(timedelta(hours=1))
    evs = [event(minute=5), event(minute=0), event("session_end", minute=5),
           event(minute=0).model_copy(update={"ts": at(0).astimezone(plus_one)})]
    slot = slot_of(evs)
    held = compact.compact(slot)
    assert (held.start.isoformat(), held.last, held.ended_at) == (
        at(0).isoformat(), slot.open.last, slot.open.ended_at)
    assert_same(to_model(held), slot)
    odd = SessionSlot(open=slot.open.model_copy(update={"start": at(-1)}))
    assert compact.compact(odd) is odd


def test_the_models_have_nothing_model_construct_would_add():
    """``compact_events.construct`` sets what ``model_construct`` sets for frozen models without
    private attributes, post-init or defaults left out: the same model, fields in order; the
    fields set its models of a class share stays as it is when one is copied with changes."""
    from prefstream.schemas.events import EVENT_TYPES
    from prefstream.schemas.records import ClosedSession, Session, SessionEvent

    for cls in (*EVENT_TYPES, SessionEvent, Session, ClosedSession, SessionSlot):
        assert cls.__pydantic_post_init__ is None and not cls.__private_attributes__
        assert cls.model_config.get("frozen")
    slot = slot_of([event(kind, minute=i) for i, kind in enumerate(KINDS)])
    built = to_model(compact.compact(slot))
    for a, b in zip(built.open.events, slot.open.events, strict=True):
        again = type(a.event).model_construct(**dict(a.event))
        assert vars(a.event) == vars(again) and list(vars(a.event)) == list(vars(b.event))
        assert a.event.model_fields_set == again.model_fields_set
    closed = compact.expire(compact.compact(slot), at(10_000), RULES)
    for model, cls in ((built, SessionSlot), (built.open, Session),
                       (built.open.events[0], SessionEvent), (closed, SessionSlot),
                       (closed.pending[0], ClosedSession), (closed.pending[0].session, Session)):
        assert list(vars(model)) == list(cls.model_fields) == sorted(
            model.model_fields_set, key=list(cls.model_fields).index)
    first = built.open.events[0]
    changed = first.model_copy(update={"offset": 7})
    assert changed.offset == 7 and first.model_fields_set == {"offset", "event", "n_bytes"}
    assert changed.model_fields_set is not first.model_fields_set


def assert_same_groups(got: SessionSlot, want: SessionSlot) -> None:
    """Equal, every group's times and its events' in the same UTC offsets, fields in order."""
    assert got == want
    groups = [(g, w) for name in ("pending", "held")
              for g, w in zip(getattr(got, name), getattr(want, name), strict=True)]
    for closed, wanted in groups:
        assert closed.reason == wanted.reason
        a, b = closed.session, wanted.session
        assert list(vars(a)) == list(vars(b))
        assert [str(t) for t in (a.start, a.last, a.ended_at)] == [
            str(t) for t in (b.start, b.last, b.ended_at)]
        for x, y in zip(a.events, b.events, strict=True):
            assert x.event.ts.isoformat() == y.event.ts.isoformat()
            assert type(x.event) is type(y.event)


durations = st.sampled_from((timedelta(hours=6), timedelta(minutes=45)))


@settings(max_examples=100, deadline=None)
@given(st.tuples(st.integers(1, 8), st.sampled_from((40, 600))).flatmap(lambda a: events(*a)),
       st.integers(0, 1300), durations,
       st.lists(st.integers(0, 7), max_size=2))
def test_the_compact_close_is_the_sessionizers(evs, watermark_minute, longest, copies):
    """Whenever ``compact.expire`` closes a slot it gives what ``sessionize.expire`` gives on
    its model (groups split by gap or duration, duplicates and bytes on their group), and it
    closes every slot whose groups are all due."""
    rules = SessionRules(max_duration=longest)
    slot = slot_of(evs, rules)
    for n, k in enumerate(copies):  # duplicates, counted on the group of their original
        copy = evs[k % len(evs)]
        slot, outcome = add_event(slot, copy, offset=50 + n, clock=Clock(kafka_partition=3),
                                  rules=rules, size=9)
        assert outcome == "duplicate"
    held = compact.compact(slot, "s1")
    assert isinstance(held, OpenSlot)
    watermark = at(watermark_minute)
    got = compact.expire(held, watermark, rules)
    want = expire(slot, watermark, rules)
    if got is None:
        assert want.open is not None
    else:
        assert want.open is None and want.pending
        assert_same_groups(got, want)


@settings(max_examples=150, deadline=None)
@given(st.tuples(st.integers(1, 6), st.sampled_from((40, 600))).flatmap(lambda a: events(*a)),
       st.data())
def test_the_deadline_after_an_append_is_the_sessionizers(evs, data):
    """``compact_groups.appended_deadline`` (from the deadline before the event, when the event
    is the latest) is the sessionizer's deadline of the slot after it, whether the event joins
    the first group, starts the next one (a gap or the longest duration on), or ends it."""
    rules = SessionRules(max_duration=data.draw(durations, label="longest"))
    before = compact.compact(slot_of(evs, rules), "s1")
    due = compact_groups.deadline_micros(before.blobs(), rules)
    latest = max(ev.ts for ev in evs)
    step = data.draw(st.sampled_from((0, 1, 10, 29, 30, 31, 50, 400)) | st.integers(-60, 60),
                     label="minutes after the latest")
    [new] = data.draw(events(1), label="event")
    new = new.model_copy(update={"event_id": "new", "ts": (latest + timedelta(minutes=step))
                                 .astimezone(new.ts.tzinfo)})
    after = compact.append(before, new, offset=99, clock=Clock(kafka_partition=3), rules=rules,
                           size=0)
    assert after is not None
    want, _ = add_event(slot_of(evs, rules), new, offset=99, clock=Clock(kafka_partition=3),
                        rules=rules)
    expected = (deadline(want.open, rules)[0] - EPOCH) // TICK
    for known in (due, None):  # None: not scheduled, read from every event
        assert compact_groups.appended_deadline(after.blobs(), rules, before.blobs(),
                                                known) == expected
    alone = compact.compact(slot_of([new], rules)).blobs()
    assert compact_groups.appended_deadline(alone, rules, (), None) == (
        compact_groups.deadline_micros(alone, rules))


# --- a partition, message by message ----------------------------------------------------

T0_MS = int(T0.timestamp() * 1000)


@st.composite
def streams(draw: st.DrawFn) -> list[tuple]:
    """Messages of two sessions, ``("msg", event, offset, arrival ms, size)`` or ``("tick",
    wall ms)``: rich events (every type, texts, users, UTC offsets) within ``span`` minutes,
    arriving in order with some jitter, with re-sent copies, redeliveries and ticks; sizes
    counted (as the worker counts them) or not (0)."""
    span = draw(st.sampled_from((60, 600)))
    counted = draw(st.booleans())
    evs = draw(st.integers(1, 14).flatmap(lambda n: events(n, span)))
    out: list[tuple] = []
    for offset, ev in enumerate(sorted(evs, key=lambda e: e.ts)):
        ev = ev.model_copy(update={"session_id": draw(st.sampled_from(("s1", "s2")))})
        arrival = int(ev.ts.timestamp() * 1000) + draw(st.integers(0, 12)) * 60_000
        size = state_bytes(ev.model_dump_json().encode()) if counted else 0
        out.append(("msg", ev, offset, arrival, size))
        extra = draw(st.sampled_from(("none", "none", "dup", "dup", "redeliver", "tick")))
        if extra == "dup":  # an earlier event again, at a new offset
            old = out[draw(st.integers(0, len(out) - 1))]
            if old[0] == "msg":
                out.append(("msg", old[1], 100 + offset, arrival, old[4]))
        elif extra == "redeliver":
            out.append(draw(st.sampled_from([m for m in out if m[0] == "msg"])))
        elif extra == "tick":
            out.append(("tick", arrival + draw(st.integers(0, 60)) * 60_000))
    return out


rules_st = st.builds(
    SessionRules,
    max_events=st.sampled_from((3, 500)),
    max_duration=st.sampled_from((timedelta(minutes=45), timedelta(hours=6))),
    max_bytes=st.sampled_from((None, None, 900, 4000, 900_000)),
)


class ModelsOnly:
    """The partition as the sessionizer's models alone: each message applied by the rules
    (``add_event``, the clock), then every slot whose next deadline the watermark passed
    expired (``expire``), as :class:`PartitionSessions` does without compact state."""

    def __init__(self, rules: SessionRules) -> None:
        self.rules, self.clock = rules, Clock(kafka_partition=0)
        self.slots: dict[str, SessionSlot] = {}

    def on_event(self, ev, offset: int, arrival_ms: int, size: int) -> str:
        slot, outcome = add_event(self.slots.get(ev.session_id), ev, offset=offset,
                                  clock=self.clock, rules=self.rules, size=size)
        if outcome in ("late", "redelivered"):
            pass  # the slot as it was (an empty one for a late first event: none kept)
        elif slot is None:
            self.slots.pop(ev.session_id, None)
        else:
            self.slots[ev.session_id] = slot
        # a redelivered event the clock counted already moves it no more (docs/delivery.md)
        moves = outcome == "accepted" or (
            outcome == "redelivered" and not self.clock.counted(offset))
        self.clock = self.clock.arrived(arrival_ms, offset)
        if moves:
            bound_ms = self.clock.bound_ms(arrival_ms, self.rules)
            bound = datetime.fromtimestamp(bound_ms / 1000, tz=timezone.utc)
            self.clock = self.clock.observe(min(ev.ts, bound), self.rules.grace)
            self._expire()
        return outcome

    def on_tick(self, wall_ms: int) -> None:
        self.clock = self.clock.tick(wall_ms, self.rules)
        self._expire()

    def _expire(self) -> None:
        for sid, slot in self.slots.items():
            due = next_deadline(slot, self.rules)
            if due is not None and due <= self.clock.watermark:
                self.slots[sid] = expire(slot, self.clock.watermark, self.rules)


def assert_same_state(ps: PartitionSessions, ref: ModelsOnly) -> None:
    assert ps.clock == ref.clock
    assert dict(ps.slots) == ref.slots
    for sid, slot in ref.slots.items():
        assert_same_groups(ps.slots[sid], slot)


@settings(max_examples=150, deadline=None)
@given(streams(), rules_st)
def test_the_compact_partition_is_the_sessionizers_models(messages, rules):
    ps, ref = PartitionSessions(Clock(kafka_partition=0), rules), ModelsOnly(rules)
    for msg in messages:
        if msg[0] == "tick":
            ps.on_tick(msg[1])
            ref.on_tick(msg[1])
        else:
            _, ev, offset, arrival, size = msg
            assert ps.on_event(ev, offset=offset, arrival_ms=arrival, size=size) == (
                ref.on_event(ev, offset, arrival, size))
        assert_same_state(ps, ref)
    far = T0_MS + 30 * 24 * 3_600_000  # closes everything
    ps.on_tick(far)
    ref.on_tick(far)
    assert_same_state(ps, ref)
    assert ps.open_sessions == 0
