"""The pairing of ``streams/core/pairing.py`` as it was before its speed work (frozen): the
reference its property tests compare the fast implementation with, row for row and in order.

Also the session rows and stamping as they were (``streams/core/outputs.session_rows``,
``storage/partitions.stamp``). Not maintained as the product changes: a deliberate change of a
rule changes the product and this copy together (see docs/pair-rules.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations
from typing import NamedTuple

from pydantic import BaseModel

from prefstream.schemas import events as sch
from prefstream.schemas.records import (
    ClosedSession,
    Pair,
    PairingResult,
    Refusal,
    Session,
    SessionSummary,
    Tie,
    UnpairedRow,
)
from prefstream.schemas.rules import RuleConfig
from prefstream.streams.core.outputs import TEXT_COLUMNS, scrub_text

RULES = (
    "thumbs", "copy_over_skipped", "click_over_skipped_above", "regenerate_accept", "edit",
    "reformulate_same_intent",
)
REFUSAL_REASONS = (
    "not_exposed", "request_mismatch", "context_mismatch", "identical_candidates",
    "conflicting_signals", "below_last_click", "click_without_dwell", "regenerate_without_accept",
    "reformulation_new_intent", "slow_reformulation", "reformulation_without_accept", "abandoned",
    "contradictory_pair", "low_confidence",
)
ABANDON_RULE = "abandonment"  # Refusal.rule of "abandoned": no pairing rule was involved
EDIT_MODEL = "user_edit"
SIGNAL_RULE = {
    "thumbs_up": "thumbs", "thumbs_down": "thumbs", "copy": "copy_over_skipped",
    "click": "click_over_skipped_above", "regenerate": "regenerate_accept", "edit": "edit",
}
# Unpaired (KTO) label per signal, in priority order: explicit thumbs beat an implicit copy.
UNPAIRED_SIGNALS = {"thumbs_up": True, "thumbs_down": False, "copy": True}
# Reformulation confidence loses up to this share as similarity falls from 1 to 0 (see below).
REFORMULATE_SIM_DISCOUNT = 0.1

Signal = sch.Click | sch.Copy | sch.ThumbsUp | sch.ThumbsDown | sch.Regenerate | sch.Edit


def normalize_prompt(text: str) -> str:
    """Lowercase, collapse whitespace, strip punctuation (any non-word char) at both ends."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", " ".join(text.lower().split()))


def prompt_similarity(a: str, b: str) -> float:
    """Jaccard of word-token sets of the normalized prompts; two empty prompts are identical."""
    ta, tb = (set(re.findall(r"\w+", normalize_prompt(x))) for x in (a, b))
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


def _digest(kind: str, *parts: object) -> str:
    """Row id: the row kind prefixes the hashed JSON list, so different kinds never collide."""
    raw = json.dumps([kind, *[str(p) for p in parts]], ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class _Shown(NamedTuple):
    """An answer at its first impression (or the user's edit standing in for one)."""

    response_id: str
    request_id: str
    prompt: str
    text: str
    model: str
    position: int | None
    idx: int  # place in (ts, offset) order
    ts: datetime


class _Cand(NamedTuple):
    rule: str
    confidence: float
    propensity: float
    prompt: str
    chosen: _Shown
    rejected: _Shown
    idx: int  # the decisive signal
    ts: datetime


@dataclass
class _Ctx:
    """What one session's rules share: indexed events, candidates and output rows so far."""

    rules: RuleConfig
    session: Session
    shown: dict[str, _Shown] = field(default_factory=dict)
    by_request: dict[str, list[_Shown]] = field(default_factory=dict)
    signals: dict[str, list[tuple[int, Signal]]] = field(default_factory=dict)
    reforms: list[tuple[int, sch.Reformulate]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # requests with any exposed signal
    banned: set[str] = field(default_factory=set)  # answers with conflicting thumbs
    cands: list[_Cand] = field(default_factory=list)
    ties: list[Tie] = field(default_factory=list)
    # refusal id -> (row, is it about a comparison?); equal ids are exact duplicates
    refusals: dict[str, tuple[Refusal, bool]] = field(default_factory=dict)

    @property
    def common(self) -> dict[str, str]:
        return {"session_id": self.session.session_id, "user_id": self.session.user_id}

    def refuse(self, reason: str, rule: str, req: str, ids: tuple[str, ...], detail: str,
               ts: datetime, comparison: bool = True) -> None:
        joined = ",".join(ids)
        rid = _digest("refusal", self.session.key, reason, rule, req, joined, detail, ts)
        row = Refusal(refusal_id=rid, reason=reason, rule=rule, request_id=req,
                      response_ids=joined, detail=detail, event_time=ts, **self.common)
        self.refusals.setdefault(rid, (row, comparison))

    def refuse_cand(self, reason: str, c: _Cand, detail: str = "") -> None:
        ids = (c.chosen.response_id, c.rejected.response_id)
        detail = detail or f"{ids[0]} > {ids[1]}"
        self.refuse(reason, c.rule, c.chosen.request_id, ids, detail, c.ts)

    def positive(self, rid: str) -> tuple[int, Signal] | None:
        """First positive signal (dwelled click, copy, thumbs up) on an answer."""
        hits = (s for s in self.signals.get(rid, ()) if s[1].type in sch.POSITIVE_TYPES)
        return next(hits, None)

    def first(self, kind: str) -> list[tuple[_Shown, int, Signal]]:
        """First signal of ``kind`` per (non-conflicting) answer, in time order."""
        out = []
        for rid, sigs in self.signals.items():
            hit = next(((i, e) for i, e in sigs if e.type == kind), None)
            if hit and rid not in self.banned:
                out.append((self.shown[rid], *hit))
        return sorted(out, key=lambda t: t[1])

    def last_slot(self, req: str) -> int:
        """Lowest slot of the request that got a positive signal (-1 if none)."""
        slots = [s.position for s in self.by_request[req] if self.positive(s.response_id)]
        return max((p for p in slots if p is not None), default=-1)


def _index(closed: ClosedSession, rules: RuleConfig) -> _Ctx:
    """Replay events in time order; answers are known only from their first impression on."""
    ctx = _Ctx(rules, closed.session)
    ordered = sorted(closed.session.events, key=lambda se: (se.event.ts, se.offset))
    for idx, se in enumerate(ordered):
        ev = se.event
        if isinstance(ev, sch.Impression):
            if ev.response_id not in ctx.shown:
                s = _Shown(ev.response_id, ev.request_id, ev.prompt, ev.response_text,
                           ev.model_version, ev.position, idx, ev.ts)
                ctx.shown[ev.response_id] = s
                ctx.by_request.setdefault(ev.request_id, []).append(s)
        elif isinstance(ev, sch.Reformulate):
            ctx.reforms.append((idx, ev))
        elif not isinstance(ev, sch.SessionEnd):
            _add_signal(ctx, idx, ev)
    return ctx


def _add_signal(ctx: _Ctx, idx: int, ev: Signal) -> None:
    shown, rule = ctx.shown.get(ev.response_id), SIGNAL_RULE[ev.type]
    detail = f"{ev.type} {ev.event_id}"
    if shown is None:  # replay order: only earlier impressions are in ``shown``
        ctx.refuse("not_exposed", rule, ev.request_id, (ev.response_id,), detail, ev.ts, False)
        return
    if ev.request_id != shown.request_id:  # exposure is per request: what this request showed
        ctx.refuse("request_mismatch", rule, ev.request_id, (ev.response_id,),
                   f"{detail} names request {ev.request_id}; the answer was shown in "
                   f"{shown.request_id}", ev.ts, False)
        return
    ctx.touched.add(shown.request_id)
    if isinstance(ev, sch.Click) and ev.dwell_ms < ctx.rules.min_dwell_ms:
        ctx.refuse("click_without_dwell", rule, shown.request_id, (ev.response_id,),
                   f"{detail} dwell_ms={ev.dwell_ms}", ev.ts, False)
    else:
        ctx.signals.setdefault(ev.response_id, []).append((idx, ev))


def _ban_conflicts(ctx: _Ctx) -> None:
    for rid, sigs in ctx.signals.items():
        kinds = {e.type: e.ts for _, e in sigs if e.type in ("thumbs_up", "thumbs_down")}
        if len(kinds) == 2:
            ctx.banned.add(rid)
            ctx.refuse("conflicting_signals", "thumbs", ctx.shown[rid].request_id, (rid,),
                       "thumbs_up and thumbs_down", max(kinds.values()), False)


def _propose(ctx: _Ctx, c: _Cand, same_prompt: bool = True) -> None:
    """Context checks shared by all rules; conflicting answers are silently left out."""
    if {c.chosen.response_id, c.rejected.response_id} & ctx.banned:
        return
    if same_prompt and normalize_prompt(c.chosen.prompt) != normalize_prompt(c.rejected.prompt):
        ctx.refuse_cand("context_mismatch", c)
    elif c.chosen.text.strip() == c.rejected.text.strip():
        ctx.refuse_cand("identical_candidates", c)
    else:
        ctx.cands.append(c)


def _thumbs(ctx: _Ctx) -> None:
    ups, downs = ctx.first("thumbs_up"), ctx.first("thumbs_down")
    for kind, group in (("both_accepted", ups), ("both_rejected", downs)):
        for (a, _, ea), (b, _, eb) in combinations(group, 2):
            same = normalize_prompt(a.prompt) == normalize_prompt(b.prompt)
            if same and a.text.strip() != b.text.strip():  # ties only on one prompt
                ctx.ties.append(_tie(ctx, kind, a, b, max(ea.ts, eb.ts)))
    for a, ia, ea in ups:
        for b, ib, eb in downs:
            decisive = (ia, ea) if ia > ib else (ib, eb)
            conf = ctx.rules.thumbs_confidence
            _propose(ctx, _Cand("thumbs", conf, 1.0, a.prompt, a, b, decisive[0], decisive[1].ts))


def _skipped(ctx: _Ctx, rule: str, kind: str, conf: float) -> None:
    """copy / click on A vs answers of the same request shown before it and never accepted."""
    eta, clip = ctx.rules.examination_eta, ctx.rules.max_propensity_weight
    for a, idx, ev in ctx.first(kind):
        k, last = a.position or 0, ctx.last_slot(a.request_id)
        weight = min(clip, (k + 1) ** eta) if kind == "click" else 1.0
        for b in ctx.by_request[a.request_id]:
            if b.idx > idx or b.response_id == a.response_id or ctx.positive(b.response_id):
                continue
            c = _Cand(rule, conf, weight, a.prompt, a, b, idx, ev.ts)
            pos = b.position or 0
            if pos > last:  # never below the last positive slot: maybe never examined
                ctx.refuse_cand("below_last_click", c, f"slot {pos} > last positive slot {last}")
            elif pos < k or kind == "copy":  # Joachims: a click beats only skipped-above
                _propose(ctx, c)


def _regenerate(ctx: _Ctx) -> None:
    for a, idx, ev in ctx.first("regenerate"):
        later = [b for b in ctx.by_request[a.request_id] if b.idx > idx]
        accepted = [(b, p) for b in later if (p := ctx.positive(b.response_id))]
        if not accepted:
            ctx.refuse("regenerate_without_accept", "regenerate_accept", a.request_id,
                       (a.response_id,), f"regenerate {ev.event_id}", ev.ts)
        for b, (pidx, pev) in accepted:
            conf = ctx.rules.regenerate_confidence
            _propose(ctx, _Cand("regenerate_accept", conf, 1.0, b.prompt, b, a, pidx, pev.ts))


def _edits(ctx: _Ctx) -> None:
    for rid, sigs in ctx.signals.items():
        for idx, ev in sigs:
            if isinstance(ev, sch.Edit):
                a = ctx.shown[rid]
                user = a._replace(response_id=f"{rid}:edit", text=ev.edited_text,
                                  model=EDIT_MODEL, position=None, idx=idx, ts=ev.ts)
                _propose(ctx, _Cand("edit", ctx.rules.edit_confidence, 1.0, a.prompt, user, a,
                                    idx, ev.ts))


def _reformulations(ctx: _Ctx) -> None:
    for fidx, f in ctx.reforms:
        olds = [a for a in ctx.by_request.get(f.previous_request_id, ()) if a.idx < fidx]
        news = ctx.by_request.get(f.request_id, ())
        # accepted after the reformulation, so the old answer was shown before the decisive signal
        accepted = [(b, p) for b in news if (p := ctx.positive(b.response_id)) and p[0] > fidx]
        for a in olds:
            _reformulate_one(ctx, f, a, prompt_similarity(a.prompt, f.prompt), accepted)


def _reformulate_one(ctx: _Ctx, f: sch.Reformulate, a: _Shown, sim: float,
                     accepted: list[tuple[_Shown, tuple[int, Signal]]]) -> None:
    r, rule = ctx.rules, "reformulate_same_intent"
    gap = (f.ts - a.ts).total_seconds()
    if ctx.positive(a.response_id) or a.response_id in ctx.banned:
        reason = "conflicting_signals"
    elif sim < r.reformulate_min_similarity:
        reason = "reformulation_new_intent"
    elif gap > r.reformulate_max_gap_s:
        reason = "slow_reformulation"
    elif not accepted:
        reason = "reformulation_without_accept"
    else:
        # Graded by intent: identical prompts keep the full confidence, sim -> 0 would lose 10%.
        conf = r.reformulate_confidence * (1 - REFORMULATE_SIM_DISCOUNT * (1 - sim))
        for b, (pidx, pev) in accepted:
            _propose(ctx, _Cand(rule, conf, 1.0, a.prompt, b, a, pidx, pev.ts), same_prompt=False)
        return
    detail = f"reformulate {f.event_id} sim={sim:.3f} gap_s={gap:.1f}"
    ctx.refuse(reason, rule, a.request_id, (a.response_id,), detail, f.ts)


def _abandoned(ctx: _Ctx) -> None:
    reformulated = {f.previous_request_id for _, f in ctx.reforms}
    for req, answers in ctx.by_request.items():
        if req not in ctx.touched and req not in reformulated:
            ids = tuple(s.response_id for s in answers)
            ctx.refuse("abandoned", ABANDON_RULE, req, ids, f"{len(ids)} answers, no signal",
                       answers[-1].ts, False)


def _merge(ctx: _Ctx) -> list[tuple[_Cand, tuple[str, ...]]]:
    """One row per (prompt, chosen, rejected); weak ones refused; contradictions refused both."""
    groups: dict[tuple[str, str, str], list[_Cand]] = {}
    for c in ctx.cands:
        key = (normalize_prompt(c.prompt), c.chosen.text, c.rejected.text)
        groups.setdefault(key, []).append(c)
    kept = {}
    for key, cs in groups.items():
        best = min(cs, key=lambda c: (-c.confidence, RULES.index(c.rule), c.idx))
        names = tuple(sorted({c.rule for c in cs}))
        if best.confidence < ctx.rules.min_confidence:
            ctx.refuse_cand("low_confidence", best, f"confidence {best.confidence:.3f}")
        else:
            kept[key] = (best, names)
    for (p, chosen, rejected), (best, _) in kept.items():
        if (p, rejected, chosen) in kept:
            ctx.refuse_cand("contradictory_pair", best, "the reverse comparison was also derived")
    return [v for (p, ch, rj), v in kept.items() if (p, rj, ch) not in kept]


def _pair(ctx: _Ctx, c: _Cand, names: tuple[str, ...]) -> Pair:
    s, ch, rj = ctx.session, c.chosen, c.rejected
    return Pair(
        pair_id=_digest("pair", s.key, normalize_prompt(c.prompt), ch.text, rj.text),
        rule=c.rule, rules=names, confidence=c.confidence, propensity_weight=c.propensity,
        prompt=c.prompt, chosen=ch.text, rejected=rj.text, request_id=ch.request_id,
        rejected_request_id=rj.request_id, chosen_response_id=ch.response_id,
        rejected_response_id=rj.response_id, chosen_model=ch.model, rejected_model=rj.model,
        chosen_position=ch.position, rejected_position=rj.position, event_time=c.ts,
        session_start=s.start, session_end=s.last, **ctx.common,
    )


def _tie(ctx: _Ctx, kind: str, a: _Shown, b: _Shown, ts: datetime) -> Tie:
    tie_id = _digest("tie", ctx.session.key, kind, *sorted((a.response_id, b.response_id)))
    return Tie(tie_id=tie_id, kind=kind, rule="thumbs", prompt=a.prompt, response_a=a.text,
               response_b=b.text, response_a_id=a.response_id, response_b_id=b.response_id,
               request_id=a.request_id, event_time=ts, **ctx.common)


def _unpaired(ctx: _Ctx, used: set[str]) -> list[UnpairedRow]:
    """One row per answer in no pair or tie: its strongest lone thumbs/copy signal."""
    r, rows = ctx.rules, []
    confs = {"thumbs_up": r.thumbs_confidence, "thumbs_down": r.thumbs_confidence,
             "copy": r.copy_confidence}
    for rid, sigs in ctx.signals.items():
        lone = [e for _, e in sigs if e.type in UNPAIRED_SIGNALS]
        if rid in used or rid in ctx.banned or not lone:
            continue
        ev, a = min(lone, key=lambda e: list(UNPAIRED_SIGNALS).index(e.type)), ctx.shown[rid]
        rows.append(UnpairedRow(
            row_id=_digest("unpaired", ctx.session.key, rid), prompt=a.prompt, completion=a.text,
            label=UNPAIRED_SIGNALS[ev.type], signal=ev.type, confidence=confs[ev.type],
            request_id=a.request_id, response_id=rid, model_version=a.model,
            position=a.position, event_time=ev.ts, **ctx.common,
        ))
    return rows


def session_to_pairs(closed: ClosedSession, rules: RuleConfig) -> PairingResult:
    """All pairs, ties, unpaired rows and refusals of one closed session.

    ``n_candidates`` = stored pairs (a merged comparison counts once) + ties + refusals of a
    proposed comparison (every reason except not_exposed, click_without_dwell, abandoned and the
    per-answer conflicting_signals of the thumbs rule).
    """
    ctx = _index(closed, rules)
    _ban_conflicts(ctx)
    for rule in (_thumbs, _edits, _regenerate, _reformulations, _abandoned):
        rule(ctx)
    _skipped(ctx, "copy_over_skipped", "copy", rules.copy_confidence)
    _skipped(ctx, "click_over_skipped_above", "click", rules.click_confidence)
    pairs = tuple(_pair(ctx, c, names) for c, names in _merge(ctx))
    used = {p.chosen_response_id for p in pairs} | {p.rejected_response_id for p in pairs}
    used |= {t.response_a_id for t in ctx.ties} | {t.response_b_id for t in ctx.ties}
    n_refused = sum(about_comparison for _, about_comparison in ctx.refusals.values())
    return PairingResult(
        n_candidates=len(pairs) + len(ctx.ties) + n_refused, pairs=pairs, ties=tuple(ctx.ties),
        unpaired=tuple(_unpaired(ctx, used)), refusals=tuple(r for r, _ in ctx.refusals.values()),
    )


# --- rows and stamping as they were (streams/core/outputs.py, storage/partitions.py) ---------


def session_summary(closed: ClosedSession, result: PairingResult) -> SessionSummary:
    session = closed.session
    events = [item.event for item in session.events]
    return SessionSummary(
        session_key=session.key,
        session_id=session.session_id,
        user_id=session.user_id,
        kafka_partition=session.kafka_partition,
        start=session.start,
        end=session.last,
        close_reason=closed.reason,
        n_events=len(events),
        n_duplicates=session.n_duplicates,
        n_requests=len({e.request_id for e in events}),
        n_impressions=sum(1 for e in events if e.type == "impression"),
        n_candidates=result.n_candidates,
        n_pairs=len(result.pairs),
        n_ties=len(result.ties),
        n_unpaired=len(result.unpaired),
        n_refusals=len(result.refusals),
    )


def scrub_row(row: BaseModel, table: str, text_storage: str) -> BaseModel:
    columns = TEXT_COLUMNS.get(table, ())
    if text_storage == "full" or not columns:
        return row
    return row.model_copy(update={c: scrub_text(getattr(row, c), text_storage) for c in columns})


def session_rows(closed: ClosedSession, result: PairingResult, *,
                 text_storage: str = "full") -> dict[str, list[BaseModel]]:
    rows: dict[str, list[BaseModel]] = {
        "pairs": list(result.pairs),
        "ties": list(result.ties),
        "unpaired": list(result.unpaired),
        "refusals": list(result.refusals),
        "sessions": [session_summary(closed, result)],
    }
    return {table: [scrub_row(r, table, text_storage) for r in table_rows]
            for table, table_rows in rows.items()}


def stamp(rows: Iterable[BaseModel], partition: str) -> list[BaseModel]:
    return [row.model_copy(update={"partition": partition}) for row in rows]
