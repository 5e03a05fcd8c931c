"""Tests for the traffic generator (prefstream.sim.traffic) and its external content
(prefstream.sim.content)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers.content import PLAIN_ROWS, hh_row, write_hh_source
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from prefstream.errors import ConfigError
from prefstream.schemas.events import EVENT_ADAPTER, MAX_TEXT_CHARS, Impression, SessionEnd
from prefstream.sim.content import (
    SourcePair,
    parse_lines,
    parse_row,
    read_source,
    rephrase,
    split_holdout,
    write_labels,
)
from prefstream.sim.traffic import (
    BAD_KINDS,
    LATE_BY,
    Traffic,
    TrafficConfig,
    generate_traffic,
    prefers,
)
from prefstream.streams.core.pairing import prompt_similarity

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


# --- external content: a preference file instead of the built-in texts -----------------------

#: rows that break the pair contract (PLAIN_ROWS: literal valid ones)
BROKEN_LINES = [
    "this is not json",
    json.dumps(["a", "list"]),
    json.dumps({"prompt": "p", "chosen": "same answer", "rejected": " same answer "}),
    json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}),
    json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}),
    json.dumps({"prompt": "p", "chosen": "x" * (MAX_TEXT_CHARS + 1), "rejected": "b"}),
    "",
]
PLAIN_SKIPPED = {"not_json": 1, "not_a_pair_object": 2, "identical_answers": 1, "empty_text": 1,
                 "text_too_long": 1}


@pytest.fixture(scope="module")
def plain_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "pairs.jsonl"
    lines = [json.dumps(r) for r in PLAIN_ROWS[:10]] + BROKEN_LINES + [
        json.dumps(r) for r in PLAIN_ROWS[10:]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def hh_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("hh") / "hh.jsonl.gz"
    return path, write_hh_source(path)


def source_config(source: Path, **kw: object) -> TrafficConfig:
    return TrafficConfig(**{"n_events": 3000, "end": END, "source": source, **kw})


@pytest.fixture(scope="module")
def plain_traffic(plain_source: Path) -> Traffic:
    return generate_traffic(source_config(plain_source))


def texts_in(traffic: Traffic) -> set[str]:
    """Every prompt and answer text the traffic's valid messages carry."""
    out: set[str] = set()
    for p in parse_good(traffic):
        for name in ("prompt", "response_text", "edited_text"):
            if getattr(p.event, name, None):
                out.add(getattr(p.event, name))
    return out


def test_parse_row_reasons() -> None:
    assert parse_row(json.dumps(PLAIN_ROWS[0])) == SourcePair(**PLAIN_ROWS[0])
    reasons = [parse_row(line) for line in BROKEN_LINES if line]
    assert reasons == ["not_json", "not_a_pair_object", "identical_answers", "empty_text",
                       "not_a_pair_object", "text_too_long"]
    hh = parse_row(json.dumps(hh_row(["Human: Why?"], "Because.", "No idea.")))
    assert hh == SourcePair("\n\nHuman: Why?\n\nAssistant:", "Because.", "No idea.")
    earlier = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    assert parse_row(json.dumps(earlier)) == "dialogue_mismatch"
    rows = parse_lines([json.dumps(PLAIN_ROWS[0]), *BROKEN_LINES])
    assert rows.pairs == [SourcePair(**PLAIN_ROWS[0])] and dict(rows.skipped) == PLAIN_SKIPPED
    assert rows.n_rows == 7


def test_split_holdout_groups_prompts_and_is_deterministic() -> None:
    pairs = [SourcePair(f"p{i % 10}", f"good {i}", f"bad {i}") for i in range(40)]
    simulated, held = split_holdout(pairs, 0.2, seed=1)
    assert len(held) == 8 and len(simulated) == 32
    assert {p.prompt for p in held}.isdisjoint({p.prompt for p in simulated})
    assert split_holdout(pairs, 0.2, seed=1) == (simulated, held)
    assert split_holdout(pairs, 0.0, seed=1) == (pairs, [])
    assert split_holdout(pairs, 0.2, seed=2) != (simulated, held)


def test_rephrase_keeps_the_intent() -> None:
    rng = random.Random(0)
    dialogue = "\n\nHuman: I need help.\n\nAssistant: Sure.\n\nHuman: How do I sort a list?" \
               "\n\nAssistant:"
    for _ in range(20):
        for prompt in (dialogue, "How do I sort a list of numbers in Python?"):
            new = rephrase(prompt, rng)
            assert new != prompt and prompt_similarity(new, prompt) >= 0.5
        assert new.endswith("\n\nAssistant:") or not prompt.endswith("\n\nAssistant:")
        assert rephrase(dialogue, rng).startswith("\n\nHuman: I need help.\n\nAssistant: Sure.")


def test_write_labels_round_trip(tmp_path: Path) -> None:
    pairs = [SourcePair("p", "a\nb", "c ü")]
    assert write_labels(tmp_path / "labels.jsonl", pairs) == 1
    assert read_source(tmp_path / "labels.jsonl").pairs == pairs


def test_source_traffic_invariants(plain_source: Path, plain_traffic: Traffic) -> None:
    check_invariants(plain_traffic, source_config(plain_source))
    counts = plain_traffic.counts
    assert plain_traffic.skipped == PLAIN_SKIPPED
    assert counts["source_rows"] == len(PLAIN_ROWS) + 6 and counts["source_valid"] == 20
    assert counts["source_holdout"] == len(plain_traffic.holdout) == 4
    assert counts["source_simulated"] == 16 and counts["source_passes"] > 1
    assert abs(counts["valid"] + counts["bad"] - 3000) < 60


def test_holdout_rows_never_appear(plain_traffic: Traffic) -> None:
    texts = texts_in(plain_traffic)
    for row in plain_traffic.holdout:
        assert row.prompt not in texts and row.chosen not in texts and row.rejected not in texts
    shown = {r["prompt"] for r in PLAIN_ROWS} & texts
    assert len(shown) == 16


def test_source_rows_are_shown_in_random_slots(plain_traffic: Traffic) -> None:
    chosen = {r["chosen"] for r in PLAIN_ROWS}
    slots = [p.event.position for p in parse_good(plain_traffic)
             if isinstance(p.event, Impression) and p.event.response_text in chosen]
    assert 0.3 < slots.count(0) / len(slots) < 0.8 and 1 in slots
    answers = {r["prompt"]: {r["chosen"], r["rejected"]} for r in PLAIN_ROWS}
    for p in parse_good(plain_traffic):
        if isinstance(p.event, Impression) and p.event.prompt in answers:
            assert p.event.response_text in answers[p.event.prompt]


def test_source_traffic_has_every_behaviour(plain_traffic: Traffic) -> None:
    types = {p.event.type for p in parse_good(plain_traffic)}
    assert types == {"impression", "click", "copy", "thumbs_up", "thumbs_down", "regenerate",
                     "edit", "reformulate", "session_end"}
    assert plain_traffic.counts["reformulate_same_intent"] > 0
    assert plain_traffic.counts["reformulate_new_intent"] > 0


@pytest.mark.parametrize("prefer_prob", [0.0, 1.0])
def test_user_follows_prefer_prob(plain_source: Path, prefer_prob: float) -> None:
    """A user who always (never) prefers the truly chosen answer: every explicit verdict and
    every edit agrees (disagrees) with the truth."""
    traffic = generate_traffic(source_config(plain_source, n_events=1500,
                                             prefer_prob=prefer_prob))
    good = [p for p in parse_good(traffic) if p.label == "valid"]
    ups: dict[str, list[str]] = defaultdict(list)
    downs: dict[str, list[str]] = defaultdict(list)
    for p in good:
        if p.event.type in ("thumbs_up", "thumbs_down"):
            (ups if p.event.type == "thumbs_up" else downs)[p.event.request_id].append(
                p.event.response_id)
        if p.event.type == "edit":
            rid = p.event.response_id
            assert prefers(traffic.quality, f"{rid}:edit", rid) is (prefer_prob == 1.0)
    verdicts = [prefers(traffic.quality, u, d) for r in ups for u in ups[r] for d in downs[r]]
    assert verdicts and all(v is (prefer_prob == 1.0) for v in verdicts)


def test_hh_gz_source(hh_source: tuple[Path, dict[str, int]]) -> None:
    path, skipped = hh_source
    config = TrafficConfig(n_events=1200, end=END, seed=5, source=path, holdout=0.25)
    traffic = generate_traffic(config)
    check_invariants(traffic, config)
    assert traffic.skipped == skipped and len(traffic.holdout) == 8
    assert all(r.prompt.endswith("\n\nAssistant:") for r in traffic.holdout)
    texts = texts_in(traffic)
    assert not any(r.prompt in texts or r.chosen in texts for r in traffic.holdout)
    reformulated = [p.event.prompt for p in parse_good(traffic) if p.event.type == "reformulate"]
    assert reformulated and all(t.endswith("\n\nAssistant:") for t in reformulated)


def test_source_traffic_is_deterministic(plain_source: Path, plain_traffic: Traffic) -> None:
    assert generate_traffic(source_config(plain_source)) == plain_traffic
    other = generate_traffic(source_config(plain_source, seed=1))
    assert other.messages != plain_traffic.messages


def test_unusable_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        generate_traffic(source_config(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text("\n".join(BROKEN_LINES))
    with pytest.raises(ConfigError, match="no preference rows"):
        generate_traffic(source_config(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError):
        TrafficConfig(end=END, prefer_prob=1.5)
