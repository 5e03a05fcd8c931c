"""Pairing rules: one literal session per rule and per refusal reason, then properties."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from prefstream.schemas import events as sch
from prefstream.schemas.records import (
    UNSTAMPED,
    ClosedSession,
    PairingResult,
    Session,
    SessionEvent,
)
from prefstream.streams.core.pairing import (
    REFUSAL_REASONS,
    RULES,
    RuleConfig,
    normalize_prompt,
    prompt_similarity,
    session_to_pairs,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
PROMPT = "How do I sort a list in Python?"
_ids = count()


def ev(kind: str, rid: str = "a", t: float = 0.0, req: str = "q1", sid: str = "s1", **kw):
    """Any event; ``t`` is seconds after T0. Impressions default to PROMPT, slot 0, model m1."""
    common = dict(event_id=f"e{next(_ids)}", session_id=sid, user_id="u1", request_id=req,
                  ts=T0 + timedelta(seconds=t))
    if kind == "impression":
        kw = dict(prompt=PROMPT, response_text=f"answer {rid}", position=0, model_version="m1") | kw
    if kind not in ("reformulate", "session_end"):
        common["response_id"] = rid
    return sch.EVENT_ADAPTER.validate_python(dict(type=kind, **common, **kw))


def imp(rid: str, pos: int = 0, t: float = 0.0, **kw):
    return ev("impression", rid, t, position=pos, **kw)


def closed(*events) -> ClosedSession:
    """A closed session; events keep their listed (arrival) order, offsets 0..n-1."""
    ts = [e.ts for e in events]
    session = Session(session_id=events[0].session_id, user_id="u1", start=min(ts), last=max(ts),
                      events=tuple(SessionEvent(offset=i, event=e) for i, e in enumerate(events)))
    return ClosedSession(session=session, reason="gap")


def run(*events, **config) -> PairingResult:
    return session_to_pairs(closed(*events), RuleConfig(**config))


def pairs(res: PairingResult) -> list[tuple]:
    return [(p.rule, p.chosen, p.rejected, round(p.confidence, 5), p.propensity_weight)
            for p in res.pairs]


def reasons(res: PairingResult) -> list[str]:
    return sorted(r.reason for r in res.refusals)


# --- prompts ---------------------------------------------------------------------------------

def test_normalize_prompt():
    assert normalize_prompt("  How do   I\tsort?! ") == "how do i sort"
    assert normalize_prompt("¿Qué tal?") == "qué tal"
    assert normalize_prompt("...") == ""


def test_prompt_similarity():
    assert prompt_similarity("Sort a list!", "sort   a LIST") == 1.0
    assert prompt_similarity("sort a list", "bake bread") == 0.0
    assert prompt_similarity("how to sort a list", "how to sort a dict") == pytest.approx(4 / 6)
    assert prompt_similarity("?", "!") == 1.0


def test_rule_config_is_strict():
    with pytest.raises(ValidationError):
        RuleConfig(min_dwell=3)
    with pytest.raises(ValidationError):
        RuleConfig(thumbs_confidence=1.5)
    with pytest.raises(ValidationError):
        RuleConfig().min_confidence = 0.1  # frozen


# --- thumbs ----------------------------------------------------------------------------------

def test_thumbs_pair():
    res = run(imp("a", 0, 0), imp("b", 1, 1), ev("thumbs_up", "a", 10), ev("thumbs_down", "b", 20))
    assert pairs(res) == [("thumbs", "answer a", "answer b", 0.95, 1.0)]
    p = res.pairs[0]
    assert (p.rules, p.event_time, p.prompt) == (("thumbs",), T0 + timedelta(seconds=20), PROMPT)
    assert (p.chosen_position, p.rejected_position, p.chosen_model) == (0, 1, "m1")
    assert (p.request_id, p.rejected_request_id) == ("q1", "q1")
    assert res.refusals == () and res.unpaired == () and res.n_candidates == 1


def test_thumbs_across_requests_with_same_normalized_prompt():
    res = run(imp("a", t=0), imp("b", t=1, req="q2", prompt="how do i sort a list in python"),
              ev("thumbs_down", "a", 5), ev("thumbs_up", "b", 6, req="q2"))
    assert pairs(res) == [("thumbs", "answer b", "answer a", 0.95, 1.0)]
    assert (res.pairs[0].request_id, res.pairs[0].rejected_request_id) == ("q2", "q1")


def test_thumbs_context_mismatch_keeps_unpaired_rows():
    res = run(imp("a", t=0), imp("b", t=1, req="q2", prompt="Bake bread"),
              ev("thumbs_up", "a", 5), ev("thumbs_down", "b", 6, req="q2"))
    assert res.pairs == () and reasons(res) == ["context_mismatch"]
    assert res.refusals[0].response_ids == "a,b"
    rows = {(u.response_id, u.label, u.signal, u.confidence) for u in res.unpaired}
    assert rows == {("a", True, "thumbs_up", 0.95), ("b", False, "thumbs_down", 0.95)}
    assert res.n_candidates == 1


def test_identical_candidates():
    res = run(imp("a", 0, 0, response_text="Same."), imp("b", 1, 1, response_text=" Same.\n"),
              ev("thumbs_up", "a", 5), ev("thumbs_down", "b", 6))
    assert res.pairs == () and reasons(res) == ["identical_candidates"]


@pytest.mark.parametrize("kind,signal", [("both_accepted", "thumbs_up"),
                                         ("both_rejected", "thumbs_down")])
def test_ties(kind, signal):
    res = run(imp("a", 0, 0), imp("b", 1, 1), imp("c", 0, 2, req="q2", prompt="bake bread"),
              ev(signal, "a", 5), ev(signal, "b", 6), ev(signal, "c", 7, req="q2"))
    assert res.pairs == () and len(res.ties) == 1  # a-c / b-c: different prompts, no tie
    tie = res.ties[0]
    assert (tie.kind, tie.rule, tie.response_a_id, tie.response_b_id) == (kind, "thumbs", "a", "b")
    assert tie.event_time == T0 + timedelta(seconds=6)
    assert [u.response_id for u in res.unpaired] == ["c"]


def test_conflicting_signals_exclude_the_answer():
    res = run(imp("a", 0, 0), imp("b", 1, 1), imp("c", 2, 2),
              ev("thumbs_up", "a", 5), ev("thumbs_down", "a", 6), ev("thumbs_up", "b", 7),
              ev("thumbs_down", "c", 8))
    assert pairs(res) == [("thumbs", "answer b", "answer c", 0.95, 1.0)]
    assert reasons(res) == ["conflicting_signals"] and res.refusals[0].response_ids == "a"
    assert res.ties == () and res.unpaired == ()


def test_not_exposed():
    res = run(ev("thumbs_up", "a", 0), imp("a", 0, 1), imp("b", 1, 2), ev("copy", "ghost", 3),
              ev("thumbs_down", "b", 4))
    assert res.pairs == () and reasons(res) == ["not_exposed", "not_exposed"]
    assert {r.response_ids for r in res.refusals} == {"a", "ghost"}
    assert [(u.response_id, u.label) for u in res.unpaired] == [("b", False)]


def test_arrival_order_does_not_matter_event_time_does():
    # the thumbs up arrives first but happened after the impression
    res = run(ev("thumbs_up", "a", 5), ev("thumbs_down", "b", 6), imp("a", 0, 0), imp("b", 1, 1))
    assert pairs(res) == [("thumbs", "answer a", "answer b", 0.95, 1.0)]


# --- copy and clicks -------------------------------------------------------------------------

def test_copy_over_skipped_and_below_last_click():
    res = run(imp("a", 0, 0), imp("b", 1, 0), imp("c", 2, 0), ev("copy", "b", 10))
    assert pairs(res) == [("copy_over_skipped", "answer b", "answer a", 0.8, 1.0)]
    assert reasons(res) == ["below_last_click"] and res.refusals[0].response_ids == "b,c"
    assert res.n_candidates == 2 and res.unpaired == ()


def test_copy_pairs_with_skipped_below_it_but_above_the_last_click():
    res = run(imp("a", 0, 0), imp("b", 1, 0), imp("c", 2, 0), ev("copy", "a", 10),
              ev("click", "c", 20, dwell_ms=9000))
    assert sorted(pairs(res)) == [
        ("click_over_skipped_above", "answer c", "answer b", 0.6, 3.0),
        ("copy_over_skipped", "answer a", "answer b", 0.8, 1.0),
    ]
    assert res.refusals == ()


def test_copy_skips_answers_shown_after_it():
    res = run(imp("a", 1, 0), ev("copy", "a", 5), imp("b", 0, 6))
    assert res.pairs == () and res.refusals == ()
    assert [(u.response_id, u.signal, u.label, u.confidence) for u in res.unpaired] == [
        ("a", "copy", True, 0.8)]


def test_click_over_skipped_above_with_propensity():
    res = run(imp("a", 0, 0), imp("b", 1, 0), imp("c", 2, 0), imp("d", 3, 0),
              ev("click", "c", 10, dwell_ms=6000))
    assert pairs(res) == [("click_over_skipped_above", "answer c", "answer a", 0.6, 3.0),
                          ("click_over_skipped_above", "answer c", "answer b", 0.6, 3.0)]
    assert reasons(res) == ["below_last_click"] and res.refusals[0].response_ids == "c,d"
    assert res.pairs[0].event_time == T0 + timedelta(seconds=10)


def test_click_propensity_is_clipped():
    events = [imp(f"r{k}", k, 0) for k in range(5)] + [ev("click", "r4", 9, dwell_ms=5000)]
    res = run(*events, examination_eta=2.0)
    assert {p.propensity_weight for p in res.pairs} == {10.0} and len(res.pairs) == 4
    res = run(*events, examination_eta=2.0, max_propensity_weight=30.0)
    assert {p.propensity_weight for p in res.pairs} == {25.0}


def test_click_without_dwell_is_refused_and_not_abandoned():
    res = run(imp("a", 0, 0), imp("b", 1, 0), ev("click", "b", 3, dwell_ms=4999))
    assert res.pairs == () and reasons(res) == ["click_without_dwell"]
    assert res.n_candidates == 0


def test_short_clicked_answer_is_still_skipped():
    res = run(imp("a", 0, 0), imp("b", 1, 0), ev("click", "a", 2, dwell_ms=100),
              ev("click", "b", 3, dwell_ms=7000))
    assert pairs(res) == [("click_over_skipped_above", "answer b", "answer a", 0.6, 2.0)]
    assert reasons(res) == ["click_without_dwell"]


# --- regenerate and edit ---------------------------------------------------------------------

def test_regenerate_accept():
    res = run(imp("a", 0, 0), ev("regenerate", "a", 5), imp("b", 0, 6), ev("thumbs_up", "b", 9))
    assert pairs(res) == [("regenerate_accept", "answer b", "answer a", 0.7, 1.0)]
    assert res.pairs[0].event_time == T0 + timedelta(seconds=9) and res.unpaired == ()


def test_regenerate_and_copy_merge_into_one_pair():
    res = run(imp("a", 0, 0), ev("regenerate", "a", 5), imp("b", 0, 6), ev("copy", "b", 9))
    assert pairs(res) == [("copy_over_skipped", "answer b", "answer a", 0.8, 1.0)]
    assert res.pairs[0].rules == ("copy_over_skipped", "regenerate_accept")
    assert res.n_candidates == 1


def test_regenerate_without_accept():
    res = run(imp("a", 0, 0), ev("regenerate", "a", 5), imp("b", 0, 6), ev("session_end", t=7))
    assert res.pairs == () and reasons(res) == ["regenerate_without_accept"]
    assert res.refusals[0].response_ids == "a" and res.n_candidates == 1


def test_edit():
    res = run(imp("a", 2, 0), ev("edit", "a", 5, edited_text="a better answer"))
    assert pairs(res) == [("edit", "a better answer", "answer a", 0.75, 1.0)]
    p = res.pairs[0]
    assert (p.chosen_model, p.chosen_response_id) == ("user_edit", "a:edit")
    assert p.chosen_position is None
    assert (p.rejected_model, p.rejected_position, p.rejected_response_id) == ("m1", 2, "a")


def test_edit_identical():
    res = run(imp("a", 0, 0), ev("edit", "a", 5, edited_text="  answer a "))
    assert res.pairs == () and reasons(res) == ["identical_candidates"]


# --- reformulation ---------------------------------------------------------------------------

P1, P2 = "how to sort a list in python", "How to sort a Python list quickly?"


def reform(p2: str = P2, t: float = 30, accept: bool = True, **kw):
    events = [imp("a", 0, 0, prompt=P1, **kw), ev("reformulate", t=t, req="q2", prompt=p2,
                                                  previous_request_id="q1"),
              imp("b", 0, t + 1, req="q2", prompt=p2)]
    return events + ([ev("copy", "b", t + 5, req="q2")] if accept else [])


def test_reformulate_same_intent():
    res = run(*reform())
    sim = 6 / 8
    assert pairs(res) == [("reformulate_same_intent", "answer b", "answer a",
                           round(0.55 * (1 - 0.1 * (1 - sim)), 5), 1.0)]
    p = res.pairs[0]
    assert (p.prompt, p.request_id, p.rejected_request_id) == (P1, "q2", "q1")
    assert res.refusals == () and res.unpaired == ()


def test_reformulation_new_intent():
    res = run(*reform("bake some bread"))
    assert res.pairs == () and reasons(res) == ["reformulation_new_intent"]
    assert [u.response_id for u in res.unpaired] == ["b"]


def test_slow_reformulation():
    res = run(*reform(t=121))
    assert res.pairs == () and reasons(res) == ["slow_reformulation"]


def test_reformulation_without_accept():
    res = run(*reform(accept=False))
    assert res.pairs == () and reasons(res) == ["abandoned", "reformulation_without_accept"]
    assert {r.request_id for r in res.refusals if r.reason == "abandoned"} == {"q2"}
    assert res.n_candidates == 1  # abandonment is not a comparison


def test_reformulation_after_accepting_is_conflicting():
    res = run(*reform(), ev("click", "a", 10, dwell_ms=8000))
    assert res.pairs == () and reasons(res) == ["conflicting_signals"]
    assert res.refusals[0].rule == "reformulate_same_intent"


# --- abandonment, merging, confidence --------------------------------------------------------

def test_abandoned():
    res = run(imp("a", 0, 0), imp("b", 1, 1), imp("c", 0, 2, req="q2"),
              ev("copy", "c", 3, req="q2"))
    assert res.pairs == () and reasons(res) == ["abandoned"]
    assert (res.refusals[0].request_id, res.refusals[0].response_ids) == ("q1", "a,b")
    assert res.refusals[0].event_time == T0 + timedelta(seconds=1)


def test_contradictory_pair():
    res = run(imp("a", 0, 0), ev("thumbs_up", "a", 1), ev("regenerate", "a", 2), imp("b", 0, 3),
              ev("copy", "b", 4), ev("thumbs_down", "b", 5))
    assert res.pairs == () and reasons(res) == ["contradictory_pair", "contradictory_pair"]
    assert {r.rule for r in res.refusals} == {"thumbs", "regenerate_accept"}
    assert {(u.response_id, u.label, u.signal) for u in res.unpaired} == {
        ("a", True, "thumbs_up"), ("b", False, "thumbs_down")}
    assert res.n_candidates == 2


def test_low_confidence():
    res = run(imp("a", 0, 0), imp("b", 1, 0), ev("click", "b", 3, dwell_ms=9000),
              min_confidence=0.61)
    assert res.pairs == () and reasons(res) == ["low_confidence"]
    assert res.refusals[0].rule == "click_over_skipped_above"


def test_ids_are_deterministic_and_per_session():
    events = [imp("a", 0, 0), imp("b", 1, 1), ev("thumbs_up", "a", 5), ev("thumbs_down", "b", 6)]
    assert run(*events) == run(*events)
    other = [e.model_copy(update={"session_id": "s2"}) for e in events]
    assert run(*events).pairs[0].pair_id != run(*other).pairs[0].pair_id
    assert len(run(*events).pairs[0].pair_id) == 32


def test_the_core_leaves_the_storage_partition_to_the_writer():
    """Which partition a row is stored in (the hour of the session's last event) is the
    writer's stamp: tests/streams/worker/test_stamping.py."""
    res = run(imp("a", 0, 0), ev("edit", "a", 3600 * 2 + 5, edited_text="x"), partition_hours=2)
    assert res.pairs and {r.partition for r in (*res.pairs, *res.refusals)} == {UNSTAMPED}


def test_constants():
    assert len(set(RULES)) == len(RULES) == 6
    assert len(set(REFUSAL_REASONS)) == len(REFUSAL_REASONS) == 14


def test_a_signal_naming_another_request_pairs_with_nothing_that_request_did_not_show():
    """q1 showed a and b; thumbs that name q2 for them are no evidence about q1's answers."""
    res = run(imp("a", 0, 0), imp("b", 1, 1), ev("thumbs_up", "b", 2, req="q2"),
              ev("thumbs_down", "a", 3, req="q2"), ev("copy", "b", 4, req="q2"))
    assert res.pairs == () and res.unpaired == ()
    assert reasons(res) == ["abandoned"] + ["request_mismatch"] * 3
    mismatch = [r for r in res.refusals if r.reason == "request_mismatch"]
    assert {r.request_id for r in mismatch} == {"q2"}


# --- properties ------------------------------------------------------------------------------

PROMPTS = ["sort a list", "Sort a list!", "sort a python list", "bake"]
SIGNALS = ["click", "copy", "thumbs_up", "thumbs_down", "regenerate", "edit"]


@st.composite
def random_sessions(draw) -> ClosedSession:
    times, later = st.integers(0, 80), st.integers(40, 240)  # signals mostly after impressions
    events, rids = [], []
    for q in range(draw(st.integers(1, 3))):
        prompt = draw(st.sampled_from(PROMPTS))
        if q and draw(st.booleans()):
            events.append(ev("reformulate", t=draw(times), req=f"q{q}", prompt=prompt,
                             previous_request_id=f"q{q - 1}"))
        for k in range(draw(st.integers(1, 3))):
            text = draw(st.sampled_from(["alpha", "beta", "gamma", " alpha"]))
            events.append(imp(f"q{q}r{k}", draw(st.integers(0, 3)), draw(times), req=f"q{q}",
                              prompt=prompt, response_text=text))
            rids.append(f"q{q}r{k}")
    for _ in range(draw(st.integers(0, 10))):
        kind, rid = draw(st.sampled_from(SIGNALS)), draw(st.sampled_from([*rids, "ghost"]))
        extra = {"click": {"dwell_ms": draw(st.sampled_from([0, 6000]))},
                 "edit": {"edited_text": draw(st.sampled_from(["beta", "delta"]))}}.get(kind, {})
        events.append(ev(kind, rid, draw(later), req=rid[:2] if rid != "ghost" else "q0", **extra))
    return closed(*draw(st.permutations(events)))


@settings(max_examples=200, deadline=None)
@given(random_sessions())
def test_properties(cs: ClosedSession):
    rules = RuleConfig()
    res = session_to_pairs(cs, rules)
    s = cs.session
    assert session_to_pairs(cs, rules) == res
    rev = cs.model_copy(update={"session": s.model_copy(update={"events": s.events[::-1]})})
    assert session_to_pairs(rev, rules) == res  # arrival order does not matter, (ts, offset) does
    shown: dict[str, datetime] = {}
    for e in (se.event for se in s.events if se.event.type == "impression"):
        shown[e.response_id] = min(e.ts, shown.get(e.response_id, e.ts))
    for p in res.pairs:
        assert p.chosen.strip() != p.rejected.strip()
        assert shown[p.rejected_response_id] <= p.event_time
        assert p.chosen_model == "user_edit" or shown[p.chosen_response_id] <= p.event_time
        assert p.rule in p.rules and list(p.rules) == sorted(p.rules) and p.rule in RULES
        assert rules.min_confidence <= p.confidence <= 1
        assert 1.0 <= p.propensity_weight <= rules.max_propensity_weight
    ids = [p.pair_id for p in res.pairs] + [t.tie_id for t in res.ties]
    ids += [u.row_id for u in res.unpaired] + [r.refusal_id for r in res.refusals]
    assert len(ids) == len(set(ids))
    assert {r.reason for r in res.refusals} <= set(REFUSAL_REASONS)
    assert res.n_candidates >= len(res.pairs) + len(res.ties)
    rows = [*res.pairs, *res.ties, *res.unpaired, *res.refusals]
    assert {r.partition for r in rows} <= {UNSTAMPED}  # the writer stamps it
    assert {r.session_id for r in rows} <= {s.session_id}
    in_pairs = {rid for p in res.pairs for rid in (p.chosen_response_id, p.rejected_response_id)}
    assert not in_pairs & {u.response_id for u in res.unpaired}


@settings(max_examples=100, deadline=None)
@given(random_sessions(), st.data())
def test_signals_naming_another_request_change_no_pair_tie_or_unpaired_row(
        cs: ClosedSession, data: st.DataObject):
    """The exposure constraint per request: the same session with some signals re-labelled to a
    request that showed nothing yields the rows of the session without those signals."""
    items = cs.session.events
    wrong = [se.event.type in SIGNALS and data.draw(st.booleans()) for se in items]
    moved = tuple(se.model_copy(update={"event": se.event.model_copy(
        update={"request_id": "q9"})}) if w else se for se, w in zip(items, wrong, strict=True))
    kept = tuple(se for se, w in zip(items, wrong, strict=True) if not w)
    rules = RuleConfig()

    def result(events: tuple[SessionEvent, ...]) -> PairingResult:
        return session_to_pairs(cs.model_copy(update={"session": cs.session.model_copy(
            update={"events": events})}), rules)

    got, want = result(moved), result(kept)
    assert (got.pairs, got.ties, got.unpaired) == (want.pairs, want.ties, want.unpaired)
    assert sum(r.reason == "request_mismatch" for r in got.refusals) <= sum(wrong)
