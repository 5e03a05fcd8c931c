"""The fast pairing, session rows and stamping equal their reference (the implementation before
the speed work, tests/helpers/pairing_reference.py) row for row, field for field, in order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import count

from helpers import pairing_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from prefstream.schemas import events as sch
from prefstream.schemas.records import ClosedSession, PairingResult, Session, SessionEvent
from prefstream.schemas.rules import RuleConfig
from prefstream.storage.partitions import partition_for, stamp
from prefstream.streams.core.outputs import session_rows
from prefstream.streams.core.pair_rows import row_id
from prefstream.streams.core.pairing import session_to_pairs

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
ZONES = [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
# punctuation, case and spacing variants of one prompt, other prompts, texts JSON must escape
PROMPTS = ["sort a list", "Sort a list!", "  sort   a LIST ", "sort a python list", "bake",
           "¿qué?", '"quoted" \\ back', "..."]
TEXTS = ["alpha", "beta", " alpha", "gamma\n", 'say "hi"\\', "naïve ☃", "\x01ctl", " "]
SIGNALS = ["click", "copy", "thumbs_up", "thumbs_down", "regenerate", "edit"]
_ids = count()


def _event(kind: str, t: int, zone: timezone, req: str, **kw: object) -> sch.FeedbackEvent:
    return sch.EVENT_ADAPTER.validate_python(dict(
        type=kind, event_id=f"e{next(_ids)}", session_id="s1", user_id="u1", request_id=req,
        ts=(T0 + timedelta(seconds=t)).astimezone(zone), **kw))


@st.composite
def rule_configs(draw: st.DrawFn) -> RuleConfig:
    confidences = st.sampled_from([0.0, 0.3, 0.55, 0.6, 0.95, 1.0])
    return RuleConfig(
        min_confidence=draw(st.sampled_from([0.0, 0.5, 0.6, 0.9])),
        thumbs_confidence=draw(confidences), copy_confidence=draw(confidences),
        click_confidence=draw(confidences), regenerate_confidence=draw(confidences),
        edit_confidence=draw(confidences), reformulate_confidence=draw(confidences),
        min_dwell_ms=draw(st.sampled_from([0, 5000])),
        reformulate_min_similarity=draw(st.sampled_from([0.0, 0.5, 1.0])),
        reformulate_max_gap_s=draw(st.sampled_from([0.0, 30.0, 120.0])),
        examination_eta=draw(st.sampled_from([0.0, 1.0, 2.5])),
        max_propensity_weight=draw(st.sampled_from([1.0, 3.0, 10.0])),
    )


@st.composite
def closed_sessions(draw: st.DrawFn) -> ClosedSession:
    """Sessions of every event kind: answers re-shown in another request, signals on unknown
    answers or naming another request, equal times (the offset decides), mixed time zones."""
    # signals mostly after the impressions; whole seconds, so equal times are common
    times, later, zones = st.integers(0, 60), st.integers(30, 200), st.sampled_from(ZONES)
    events, shown = [], []
    n_requests = draw(st.integers(1, 4))
    for q in range(n_requests):
        prompt = draw(st.sampled_from(PROMPTS))
        if q and draw(st.booleans()):
            events.append(_event("reformulate", draw(times), draw(zones), f"q{q}", prompt=prompt,
                                 previous_request_id=f"q{draw(st.integers(0, q - 1))}"))
        for k in range(draw(st.integers(0, 4))):
            rid = draw(st.sampled_from([f"q{q}r{k}", *[r for r, _ in shown]])) if shown and \
                draw(st.integers(0, 4)) == 0 else f"q{q}r{k}"
            events.append(_event("impression", draw(times), draw(zones), f"q{q}",
                                 response_id=rid, prompt=prompt if draw(st.integers(0, 4))
                                 else draw(st.sampled_from(PROMPTS)),  # mostly the request's
                                 response_text=draw(st.sampled_from(TEXTS)),
                                 position=draw(st.integers(0, 4)),
                                 model_version=draw(st.sampled_from(["m1", "m2"]))))
            shown.append((rid, f"q{q}"))
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(SIGNALS))
        rid, req = draw(st.sampled_from(shown)) if shown and draw(st.integers(0, 9)) else (
            "ghost", "q0")
        if draw(st.integers(0, 6)) == 0:
            req = f"q{draw(st.integers(0, n_requests))}"  # maybe another request than showed it
        extra = {"click": {"dwell_ms": draw(st.sampled_from([0, 4999, 5000, 60000]))},
                 "edit": {"edited_text": draw(st.sampled_from(TEXTS))}}.get(kind, {})
        events.append(_event(kind, draw(later), draw(zones), req, response_id=rid, **extra))
    if draw(st.booleans()):
        events.append(_event("session_end", draw(later), draw(zones), "q0"))
    if not events:
        events.append(_event("session_end", 0, timezone.utc, "q0"))
    events = draw(st.permutations(events))
    offsets = draw(st.permutations(range(100, 100 + len(events))))
    ts = [e.ts for e in events]
    session = Session(
        session_id="s1", user_id="u1", kafka_partition=draw(st.integers(0, 3)), start=min(ts),
        last=max(ts), n_duplicates=draw(st.integers(0, 2)), cut=draw(st.booleans()),
        events=tuple(SessionEvent(offset=o, event=e) for o, e in zip(offsets, events, strict=True)))
    return ClosedSession(session=session, reason=draw(st.sampled_from(["gap", "max_events"])))


def assert_same_rows(got: list[BaseModel], want: list[BaseModel]) -> None:
    """Equal rows of one type, fields in the declared order, the same fields set."""
    assert got == want
    for a, b in zip(got, want, strict=True):
        assert type(a) is type(b)
        assert list(a.__dict__.items()) == list(b.__dict__.items())
        assert [type(v) for v in a.__dict__.values()] == [type(v) for v in b.__dict__.values()]
        assert a.model_fields_set == b.model_fields_set
        assert a.model_dump_json() == b.model_dump_json()


def assert_same_result(got: PairingResult, want: PairingResult) -> None:
    assert got == want
    assert got.n_candidates == want.n_candidates
    for name in ("pairs", "ties", "unpaired", "refusals"):
        assert_same_rows(list(getattr(got, name)), list(getattr(want, name)))


@settings(max_examples=300, deadline=None)
@given(closed_sessions(), rule_configs())
def test_pairing_equals_the_reference(cs: ClosedSession, rules: RuleConfig):
    assert_same_result(session_to_pairs(cs, rules), ref.session_to_pairs(cs, rules))


@settings(max_examples=100, deadline=None)
@given(closed_sessions(), st.sampled_from(["full", "redact", "drop"]))
def test_session_rows_and_stamp_equal_the_reference(cs: ClosedSession, text_storage: str):
    """The whole chain: the reference's rows are validated models at every step."""
    rules = RuleConfig()
    got = session_rows(cs, session_to_pairs(cs, rules), text_storage=text_storage)
    want = ref.session_rows(cs, ref.session_to_pairs(cs, rules), text_storage=text_storage)
    assert list(got) == list(want)
    part = partition_for(cs.session.last)
    for table in want:
        assert_same_rows(got[table], want[table])
        assert_same_rows(stamp(got[table], part), ref.stamp(want[table], part))
        assert_same_rows(stamp(want[table], part), ref.stamp(want[table], part))


def _literal(*specs: tuple) -> ClosedSession:
    """A session from ``(kind, t, request, fields)`` tuples, in UTC, offsets in listed order."""
    events = [_event(kind, t, timezone.utc, req, **kw) for kind, t, req, kw in specs]
    ts = [e.ts for e in events]
    return ClosedSession(reason="gap", session=Session(
        session_id="s1", user_id="u1", start=min(ts), last=max(ts),
        events=tuple(SessionEvent(offset=i, event=e) for i, e in enumerate(events))))


def _shown(rid: str, t: int, req: str = "q0", text: str = "", pos: int = 0,
           prompt: str = "sort a list") -> tuple:
    return ("impression", t, req, dict(response_id=rid, prompt=prompt, position=pos,
                                       response_text=text or f"answer {rid}", model_version="m1"))


def test_rare_outcomes_equal_the_reference():
    """What random sessions seldom reach: a contradiction (an edit vs thumbs), a regenerated
    answer accepted, a same-intent reformulation accepted, a tie of two thumbs up."""
    sessions = [
        _literal(_shown("a", 0, text="alpha"), _shown("b", 1, text="beta", pos=1),
                 ("edit", 5, "q0", dict(response_id="a", edited_text="beta")),
                 ("thumbs_up", 6, "q0", dict(response_id="a")),
                 ("thumbs_down", 7, "q0", dict(response_id="b"))),
        _literal(_shown("a", 0), ("regenerate", 5, "q0", dict(response_id="a")),
                 _shown("b", 6), ("click", 9, "q0", dict(response_id="b", dwell_ms=9000))),
        _literal(_shown("a", 0),
                 ("reformulate", 20, "q1", dict(prompt="Sort a list!", previous_request_id="q0")),
                 _shown("b", 21, "q1", prompt="Sort a list!"),
                 ("click", 30, "q1", dict(response_id="b", dwell_ms=9000))),
        _literal(_shown("a", 0), _shown("b", 0, pos=1),
                 ("thumbs_up", 5, "q0", dict(response_id="a")),
                 ("thumbs_up", 5, "q0", dict(response_id="b"))),
    ]
    rules = RuleConfig()
    results = [ref.session_to_pairs(cs, rules) for cs in sessions]
    assert "contradictory_pair" in {r.reason for r in results[0].refusals}
    assert [p.rule for p in results[1].pairs] == ["regenerate_accept"]
    assert [p.rule for p in results[2].pairs] == ["reformulate_same_intent"]
    assert [t.kind for t in results[3].ties] == ["both_accepted"]
    for cs, want in zip(sessions, results, strict=True):
        assert_same_result(session_to_pairs(cs, rules), want)


@given(st.text(), st.lists(st.one_of(st.text(), st.integers(), st.datetimes(
    timezones=st.sampled_from(ZONES))), max_size=8))
def test_row_ids_hash_the_json_list_of_their_parts(kind: str, parts: list[object]):
    assert row_id(kind, *parts) == ref._digest(kind, *parts)
