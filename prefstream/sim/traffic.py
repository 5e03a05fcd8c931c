"""Deterministic feedback traffic: the demo's built-in workload and ``prefstream simulate``.

``generate_traffic(TrafficConfig(end=...))`` simulates users who see candidate answers to a prompt
(``impression`` events) and then behave in one of several ways (careful rater, copier,
position-biased clicker, regenerator, editor, reformulator, abandoner, tie maker). Every answer
has a latent quality in [0, 1], returned as ground truth, so mined pairs can be scored with
:func:`prefers`. Malformed messages, exact re-sends, late events and local reordering are mixed
in at the configured shares. No clock reads: all randomness comes from one seeded
``random.Random`` and all times from ``config.end``.

Two content sources feed the same behaviours:

- synthetic (``config.source`` is None): one to four built-in answers per prompt, written for
  their quality; the user perceives that quality as it is.
- a preference file (``config.source``, see :mod:`prefstream.sim.content`): each request is one row,
  its two answers shown in random slots (chosen = better in truth). The user perceives the truly
  chosen answer as the better one with probability ``prefer_prob`` and acts on that perception.
  Regenerators, editors and reformulators are users unhappy with the first answer: they are shown
  the answer they perceive as worse, and the row's other answer is what the regeneration, the
  edit or the same-intent reformulation brings. A share of the rows (``holdout``, grouped by
  prompt) is never simulated and is returned as explicit labels. Reading that file is the only
  I/O.

The pieces: ``workload`` (``TrafficConfig``, ``Traffic``, ``prefers``), ``texts`` (the built-in
texts), ``users`` (the shared random state, sessions and content sources) and ``behaviours``
(what each kind of user does). This module mixes the sessions into one message stream.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import datetime, timedelta

from prefstream.errors import ConfigError
from prefstream.schemas.events import (
    MAX_TEXT_CHARS,
    Click,
    FeedbackEvent,
    Impression,
    SessionEnd,
    ThumbsDown,
    ThumbsUp,
)
from prefstream.sim.behaviours import build_session
from prefstream.sim.content import SourcePair, read_source, split_holdout
from prefstream.sim.texts import TOPICS
from prefstream.sim.users import External, Gen, Session
from prefstream.sim.workload import Traffic, TrafficConfig, prefers

__all__ = ["BAD_KINDS", "LATE_BY", "TOPICS", "Traffic", "TrafficConfig", "generate_traffic",
           "prefers"]

LATE_BY = timedelta(hours=6)
SHUFFLE_P = 0.1
BAD_KINDS = (
    "not_json", "json_array", "missing_event_id", "unknown_type", "wrong_field_type",
    "unknown_field", "text_too_long", "naive_ts", "future_ts", "invalid_utf8", "empty_value",
)
_Entry = tuple[datetime, bytes, bytes, str]  # (send time, key, value, label)


def _reorder(rng: random.Random, events: list[FeedbackEvent], window: int) -> int:
    """Locally shuffle (each event moves at most ``window`` places); a session_end stays last."""
    n = len(events) - (1 if events and isinstance(events[-1], SessionEnd) else 0)
    keys = [i + (rng.uniform(0, window) if rng.random() < SHUFFLE_P else 0) for i in range(n)]
    order = sorted(range(n), key=lambda i: keys[i])
    events[:n] = [events[i] for i in order]
    return sum(1 for i, j in enumerate(order) if i != j)


def _late(gen: Gen, s: Session, events: list[FeedbackEvent]) -> FeedbackEvent:
    """A fresh signal on an answer shown in the session, timed hours before the session started."""
    rng = gen.rng
    shown = rng.choice([e for e in events if isinstance(e, Impression)])
    ts = min(e.ts for e in events) - LATE_BY - timedelta(seconds=rng.randint(0, 1800))
    cls = rng.choice((ThumbsUp, ThumbsDown, Click))
    extra = {"dwell_ms": rng.randint(8_000, 60_000)} if cls is Click else {}
    return cls(event_id=gen.next_id("e"), session_id=s.session_id, user_id=s.user_id,
               request_id=shown.request_id, response_id=shown.response_id, ts=ts, **extra)


def _bad_value(gen: Gen, kind: str, template: Impression) -> bytes:
    """One malformed message of the given kind, derived from a valid impression."""
    d = json.loads(template.model_dump_json())
    d["event_id"] = gen.next_id("e")
    if kind == "not_json":
        return f"impression session={template.session_id} pos=0".encode()
    if kind == "empty_value":
        return b""
    if kind == "missing_event_id":
        del d["event_id"]
    elif kind == "unknown_type":
        d["type"] = "like"
    elif kind == "wrong_field_type":
        d["position"] = "first"
    elif kind == "unknown_field":
        d["sentiment"] = "positive"
    elif kind == "text_too_long":
        d["response_text"] = "x" * (MAX_TEXT_CHARS + 1)
    elif kind == "naive_ts":
        d["ts"] = template.ts.replace(tzinfo=None).isoformat()
    elif kind == "future_ts":
        d["ts"] = (gen.config.end + timedelta(days=30)).isoformat()
    raw = json.dumps([d] if kind == "json_array" else d, separators=(",", ":")).encode()
    if kind == "invalid_utf8":
        raw = raw.replace(b'"response_text":"', b'"response_text":"\xff\xfe', 1)
    return raw


def _send_list(gen: Gen, s: Session, events: list[FeedbackEvent], n_late: int,
               n_dup: int) -> list[_Entry]:
    """Reorder locally, add late events and exact re-sends (all before any session_end), then
    stamp send times: an event leaves once everything before it in send order has happened."""
    gen.counts["reordered"] += _reorder(gen.rng, events, gen.config.shuffle_window)
    labels = ["valid"] * len(events)
    tail = len(events) - (1 if isinstance(events[-1], SessionEnd) else 0)
    for _ in range(n_late):
        events.insert(tail, _late(gen, s, events))
        labels.insert(tail, "late")
        tail += 1
    valid = [i for i in range(tail) if labels[i] == "valid"]
    for i in sorted(gen.rng.sample(valid, min(n_dup, len(valid))), reverse=True):
        at = min(tail, i + 1 + gen.rng.randint(0, 2))  # descending i: earlier indices stay put
        events.insert(at, events[i])
        labels.insert(at, "duplicate")
        tail += 1
    out: list[_Entry] = []
    clock = events[0].ts
    for event, label in zip(events, labels, strict=True):
        clock = clock if label == "late" else max(clock, event.ts)
        out.append((clock, s.session_id.encode(), event.model_dump_json().encode(), label))
    return out


def _use_source(gen: Gen) -> tuple[dict[str, int], list[SourcePair]]:
    """Switch ``gen`` to the configured source file: (skipped rows by reason, held-out rows)."""
    config = gen.config
    if config.source is None:
        return {}, []
    try:
        rows = read_source(config.source)
    except OSError as exc:
        raise ConfigError(f"cannot read source {config.source}: {exc}") from exc
    simulated, held = split_holdout(rows.pairs, config.holdout, config.seed)
    if not simulated:
        raise ConfigError(f"{config.source}: no preference rows left to simulate "
                          f"({rows.n_rows} rows, skipped {dict(rows.skipped)}, "
                          f"{len(held)} held out)")
    gen.content = External(gen, simulated)
    gen.counts.update(source_rows=rows.n_rows, source_valid=len(rows.pairs),
                      source_skipped=rows.n_rows - len(rows.pairs), source_holdout=len(held),
                      source_simulated=len(simulated))
    return dict(rows.skipped), held


def generate_traffic(config: TrafficConfig) -> Traffic:
    """Generate the workload described by ``config`` (deterministic for a given config and
    source file). Raises ``ConfigError`` when the source cannot be read or has no usable row."""
    gen = Gen(config)
    rng = gen.rng
    skipped, holdout = _use_source(gen)
    n_bad, n_late, n_dup = (round(share * config.n_events) for share in
                            (config.bad_share, config.late_share, config.duplicate_share))
    sessions: list[tuple[Session, list[FeedbackEvent]]] = []
    n_valid = 0
    while n_valid + n_late + n_bad < config.n_events or not sessions:
        sessions.append(build_session(gen))
        n_valid += len(sessions[-1][1])
    lates = Counter(rng.randrange(len(sessions)) for _ in range(n_late))
    dups = Counter(rng.randrange(len(sessions)) for _ in range(n_dup))
    entries: list[_Entry] = []
    for i, (s, events) in enumerate(sessions):
        gen.counts.update(f"type:{e.type}" for e in events)
        entries += _send_list(gen, s, events, lates[i], dups[i])
    impressions = [e for _, events in sessions for e in events if isinstance(e, Impression)]
    kinds = [BAD_KINDS[i % len(BAD_KINDS)] for i in range(n_bad)]
    rng.shuffle(kinds)
    start = config.end - timedelta(hours=config.hours)
    for kind in kinds:
        template = rng.choice(impressions)
        at = start + timedelta(seconds=rng.uniform(0, config.hours * 3600))
        entries.append((at, template.session_id.encode(), _bad_value(gen, kind, template),
                        f"bad:{kind}"))
    entries = [entries[i] for i in sorted(range(len(entries)), key=lambda i: (entries[i][0], i))]
    tally = Counter(label for *_, label in entries)
    counts = dict(gen.counts)
    counts.update(
        valid=tally["valid"] + tally["late"], late=tally["late"], duplicates=tally["duplicate"],
        bad=n_bad, sessions=len(sessions), requests=gen.ids["q"], responses=gen.ids["r"],
        no_session_end=len(sessions) - gen.counts["session_end"],
    )
    return Traffic(
        messages=[(key, value) for _, key, value, _ in entries], quality=dict(gen.quality),
        counts=counts, bad_reasons=dict(Counter(kinds)), labels=[e[3] for e in entries],
        skipped=skipped, holdout=holdout,
    )
