"""Tests for the synthetic traffic generator (streams.traffic)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import EVENT_ADAPTER, Impression, SessionEnd
from streams.traffic import BAD_KINDS, LATE_BY, Traffic, TrafficConfig, generate_traffic, prefers

END = datetime(2025, 1, 15, 12, 0, tzinfo=timezone.utc)
CONFIG = TrafficConfig(n_events=5000, end=END)


@dataclass
class Parsed:
    """A message that validated, with its label and position in send order."""

    index: int
    key: bytes
    raw: bytes
    label: str
    event: object


def parse_good(traffic: Traffic) -> list[Parsed]:
    out = []
    for i, ((key, raw), label) in enumerate(zip(traffic.messages, traffic.labels, strict=True)):
        if not label.startswith("bad:"):
            out.append(Parsed(i, key, raw, label, EVENT_ADAPTER.validate_json(raw)))
    return out


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return generate_traffic(CONFIG)


@pytest.fixture(scope="module")
def good(traffic: Traffic) -> list[Parsed]:
    return parse_good(traffic)


def check_invariants(traffic: Traffic, config: TrafficConfig) -> None:
    """Funnel arithmetic, schema validity, keys, event times, exposure and ground-truth coverage."""
    counts = traffic.counts
    assert len(traffic.messages) == len(traffic.labels)
    assert len(traffic.messages) == counts["valid"] + counts["duplicates"] + counts["bad"]
    assert sum(traffic.bad_reasons.values()) == counts["bad"]
    assert sum(1 for lab in traffic.labels if lab.startswith("bad:")) == counts["bad"]
    for (_, raw), label in zip(traffic.messages, traffic.labels, strict=True):
        if label.startswith("bad:") and label != "bad:future_ts":
            with pytest.raises(ValidationError):
                EVENT_ADAPTER.validate_json(raw)
        elif label == "bad:future_ts":
            assert EVENT_ADAPTER.validate_json(raw).ts > config.end + timedelta(days=1)
    good = parse_good(traffic)
    ids = [p.event.event_id for p in good if p.label != "duplicate"]
    assert len(ids) == len(set(ids)) == counts["valid"]
    assert sum(p.label == "late" for p in good) == counts["late"]
    start = config.end - timedelta(hours=config.hours)
    first_ts: dict[str, datetime] = {}
    shown: dict[str, set[str]] = defaultdict(set)
    for p in good:
        assert p.key == p.event.session_id.encode()
        if p.label != "late":
            assert start <= p.event.ts <= config.end
            sid = p.event.session_id
            first_ts[sid] = min(p.event.ts, first_ts.get(sid, config.end))
        if isinstance(p.event, Impression):
            shown[p.event.session_id].add(p.event.response_id)
            assert p.event.response_id in traffic.quality
    for p in good:
        if p.label == "late":
            assert p.event.ts <= first_ts[p.event.session_id] - LATE_BY
        response_id = getattr(p.event, "response_id", None)
        if response_id is not None:
            assert response_id in shown[p.event.session_id]
    assert all(0.0 <= q <= 1.0 for q in traffic.quality.values())


def test_deterministic() -> None:
    a, b = generate_traffic(CONFIG), generate_traffic(CONFIG)
    assert a == b
    other = generate_traffic(TrafficConfig(n_events=5000, end=END, seed=1))
    assert other.messages != a.messages


def test_invariants(traffic: Traffic) -> None:
    check_invariants(traffic, CONFIG)


def test_sizes_and_shares(traffic: Traffic) -> None:
    counts, n = traffic.counts, len(traffic.messages)
    assert abs(counts["valid"] + counts["bad"] - CONFIG.n_events) < 60
    assert set(traffic.bad_reasons) == set(BAD_KINDS)
    assert counts["bad"] / n == pytest.approx(CONFIG.bad_share, abs=0.005)
    assert counts["duplicates"] / n == pytest.approx(CONFIG.duplicate_share, abs=0.004)
    assert counts["late"] / n == pytest.approx(CONFIG.late_share, abs=0.003)
    assert counts["sessions"] > 100
    assert 0 < counts["no_session_end"] < counts["session_end"]


def test_all_types_and_behaviours(traffic: Traffic, good: list[Parsed]) -> None:
    types = {p.event.type for p in good}
    assert types == {
        "impression", "click", "copy", "thumbs_up", "thumbs_down", "regenerate", "edit",
        "reformulate", "session_end",
    }
    behaviours = {k.split(":", 1)[1] for k in traffic.counts if k.startswith("behaviour:")}
    assert behaviours == {
        "careful", "copier", "clicker", "regenerator", "editor", "reformulator", "abandoner", "tie",
    }


def test_duplicates_are_exact_resends(good: list[Parsed]) -> None:
    seen: dict[str, Parsed] = {}
    n_dup = 0
    for p in good:
        if p.label == "duplicate":
            original = seen[p.event.event_id]
            assert (original.key, original.raw) == (p.key, p.raw)
            n_dup += 1
        else:
            seen[p.event.event_id] = p
    assert n_dup > 0


def test_session_end_is_last_and_reorder_is_local(good: list[Parsed]) -> None:
    by_session: dict[str, list[Parsed]] = defaultdict(list)
    for p in good:
        by_session[p.event.session_id].append(p)
    reordered = 0
    for events in by_session.values():
        ends = [i for i, p in enumerate(events) if isinstance(p.event, SessionEnd)]
        assert ends in ([], [len(events) - 1])
        valid = [p.event.ts for p in events if p.label == "valid"]
        rank = {ts: i for i, ts in enumerate(sorted(valid))}
        assert len(rank) == len(valid)
        displacement = [abs(rank[ts] - i) for i, ts in enumerate(valid)]
        assert max(displacement) <= CONFIG.shuffle_window
        reordered += any(displacement)
    assert reordered > 0


def test_signals_follow_latent_quality(traffic: Traffic, good: list[Parsed]) -> None:
    ups: dict[str, list[str]] = defaultdict(list)
    downs: dict[str, list[str]] = defaultdict(list)
    for p in good:
        if p.event.type == "thumbs_up" and p.label == "valid":
            ups[p.event.request_id].append(p.event.response_id)
        if p.event.type == "thumbs_down" and p.label == "valid":
            downs[p.event.request_id].append(p.event.response_id)
    verdicts = [prefers(traffic.quality, u, d) for r in ups for u in ups[r] for d in downs[r]]
    assert len(verdicts) > 30
    assert sum(v is True for v in verdicts) / len(verdicts) > 0.75
    for p in good:
        if p.event.type == "edit":
            rid = p.event.response_id
            assert prefers(traffic.quality, f"{rid}:edit", rid) is True
            assert p.event.edited_text


def test_regenerate_and_reformulate(traffic: Traffic, good: list[Parsed]) -> None:
    impressions = {p.event.response_id: p.event for p in good if isinstance(p.event, Impression)}
    requests = {imp.request_id for imp in impressions.values()}
    for p in good:
        if p.event.type == "regenerate":
            old = impressions[p.event.response_id]
            newer = [i for i in impressions.values()
                     if i.request_id == old.request_id and i.ts > p.event.ts]
            assert any(traffic.quality[i.response_id] > traffic.quality[old.response_id]
                       for i in newer)
        if p.event.type == "reformulate":
            assert p.event.previous_request_id in requests
            assert p.event.request_id in requests
            assert p.event.request_id != p.event.previous_request_id
    assert traffic.counts["reformulate_same_intent"] > 0
    assert traffic.counts["reformulate_new_intent"] > 0


def test_texts_distinct_and_length_not_quality(traffic: Traffic, good: list[Parsed]) -> None:
    texts = [p.event.response_text for p in good
             if isinstance(p.event, Impression) and p.label == "valid"]
    assert len(texts) == len(set(texts))
    by_request: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for p in good:
        if isinstance(p.event, Impression) and p.label == "valid":
            quality = traffic.quality[p.event.response_id]
            by_request[p.event.request_id].append((quality, len(p.event.response_text)))
    shorter = [a[1] < b[1] for r in by_request.values() for a in r for b in r if a[0] > b[0]]
    assert 0.3 < sum(shorter) / len(shorter) < 0.7


def test_prefers() -> None:
    quality = {"a": 0.9, "b": 0.2, "c": 0.2}
    assert prefers(quality, "a", "b") is True
    assert prefers(quality, "b", "a") is False
    assert prefers(quality, "b", "c") is None
    assert prefers(quality, "a", "missing") is None


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TrafficConfig(end=datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        TrafficConfig(end=END, bad_share=0.9)
    with pytest.raises(ValueError):
        TrafficConfig(end=END, hours=1)


def test_other_timezone_offsets_are_kept() -> None:
    end = datetime(2025, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    config = TrafficConfig(n_events=300, end=end, seed=7)
    traffic = generate_traffic(config)
    check_invariants(traffic, config)
    assert any(b"+05:30" in raw for _, raw in traffic.messages)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    n_events=st.integers(min_value=1, max_value=800),
    hours=st.integers(min_value=2, max_value=48),
    bad_share=st.floats(min_value=0.0, max_value=0.2),
    duplicate_share=st.floats(min_value=0.0, max_value=0.2),
    late_share=st.floats(min_value=0.0, max_value=0.1),
    shuffle_window=st.integers(min_value=0, max_value=8),
)
def test_invariants_hold_for_any_config(
    seed: int, n_events: int, hours: int, bad_share: float, duplicate_share: float,
    late_share: float, shuffle_window: int,
) -> None:
    config = TrafficConfig(
        n_events=n_events, seed=seed, end=END, hours=hours, bad_share=bad_share,
        duplicate_share=duplicate_share, late_share=late_share, shuffle_window=shuffle_window,
    )
    check_invariants(generate_traffic(config), config)


def test_messages_are_compact_json_objects(good: list[Parsed]) -> None:
    for p in good[:200]:
        assert isinstance(json.loads(p.raw), dict)
