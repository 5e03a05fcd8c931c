"""Preference pairs from one closed session: the pairing rules of docs/pair-rules.md.

"Before" means earlier in (ts, offset) order. Rules (``RULES``) and refusal reasons
(``REFUSAL_REASONS``), each candidate or ambiguous signal refused with exactly one reason:

- exposure: a signal on an answer with no earlier impression -> ``not_exposed``; a signal naming
  another request than the one that showed the answer -> ``request_mismatch`` (a signal pairs only
  with what its own request showed); a rejected answer is always one shown before the decisive
  signal (negatives are never invented).
- ``thumbs``: up on A vs down on B with the same normalized prompt (else ``context_mismatch``); two
  ups / two downs on one prompt are ties; up and down on one answer -> ``conflicting_signals``, and
  that answer takes part in no pair, tie or unpaired row.
- ``copy_over_skipped``: copied A vs each B of the same request shown earlier and never accepted,
  unless B is below the lowest accepted slot (``below_last_click``).
- ``click_over_skipped_above`` (Joachims): dwelled click on A at slot k vs each never-accepted B at
  a slot < k (B below the lowest accepted slot: ``below_last_click``); a click shorter than
  ``min_dwell_ms`` -> ``click_without_dwell`` and it counts as no signal.
- ``regenerate_accept``: B shown after A was regenerated and then accepted > A (else
  ``regenerate_without_accept``). ``edit``: the user's edited text > the original answer.
- ``reformulate_same_intent``: accepted answer B of R2 > answer A of R1, prompt = R1's, when R2
  reformulates R1; refused when A was accepted (``conflicting_signals``), the intent changed
  (``reformulation_new_intent``), the user was slow (``slow_reformulation``) or nothing in R2 was
  accepted (``reformulation_without_accept``).
- a request with no signal on any answer that was not reformulated -> ``abandoned``.

Equal texts -> ``identical_candidates``; equal comparisons merge (highest confidence wins, all rules
kept); below ``min_confidence`` -> ``low_confidence``; A>B and B>A -> both ``contradictory_pair``.
Lone thumbs/copy signals become unpaired (KTO) rows. Pure: no I/O, clock or randomness; ids are
sha256 over stable strings, so a redelivered session yields the same rows.

Its size (~415 lines) is the rules and their refusal reasons side by side, each rule a short
function over one shared index of the session; the rows they yield are built by
``streams/core/pair_rows.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations
from typing import NamedTuple

from prefstream.schemas import events as sch
from prefstream.schemas.records import (
    ClosedSession,
    Pair,
    PairingResult,
    Refusal,
    Session,
    Tie,
    UnpairedRow,
)
from prefstream.schemas.rules import RuleConfig
from prefstream.streams.core.pair_rows import (
    Shown,
    pair_row,
    pairing_result,
    refusal_row,
    row_id,
    tie_row,
    unpaired_row,
)

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


_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")
_WORD = re.compile(r"\w+")


def normalize_prompt(text: str) -> str:
    """Lowercase, collapse whitespace, strip punctuation (any non-word char) at both ends."""
    return _EDGE_PUNCTUATION.sub("", " ".join(text.lower().split()))


def prompt_similarity(a: str, b: str) -> float:
    """Jaccard of word-token sets of the normalized prompts; two empty prompts are identical."""
    return _jaccard(normalize_prompt(a), normalize_prompt(b))


def _jaccard(normalized_a: str, normalized_b: str) -> float:
    ta, tb = set(_WORD.findall(normalized_a)), set(_WORD.findall(normalized_b))
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


class _Cand(NamedTuple):
    rule: str
    confidence: float
    propensity: float
    prompt: str
    chosen: Shown
    rejected: Shown
    idx: int  # the decisive signal
    ts: datetime


@dataclass
class _Ctx:
    """What one session's rules share: indexed events, candidates and output rows so far."""

    rules: RuleConfig
    session: Session
    key: str  # session.key, computed once: every row id names it
    shown: dict[str, Shown] = field(default_factory=dict)
    by_request: dict[str, list[Shown]] = field(default_factory=dict)
    signals: dict[str, list[tuple[int, Signal]]] = field(default_factory=dict)
    # kind -> answer -> its first signal of the kind; answers in time order of that signal
    firsts: dict[str, dict[str, tuple[int, Signal]]] = field(default_factory=dict)
    accepted: dict[str, tuple[int, Signal]] = field(default_factory=dict)  # see ``positive``
    last_slots: dict[str, int] = field(default_factory=dict)  # see ``last_slot``
    reforms: list[tuple[int, sch.Reformulate]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # requests with any exposed signal
    banned: set[str] = field(default_factory=set)  # answers with conflicting thumbs
    cands: list[_Cand] = field(default_factory=list)
    ties: list[Tie] = field(default_factory=list)
    # refusal id -> (row, is it about a comparison?); equal ids are exact duplicates
    refusals: dict[str, tuple[Refusal, bool]] = field(default_factory=dict)
    norms: dict[str, str] = field(default_factory=dict)  # prompt -> normalize_prompt(prompt)

    def norm(self, prompt: str) -> str:
        """``normalize_prompt``, once per distinct prompt of the session (rules compare the
        prompts of every candidate, and a session has a few)."""
        normalized = self.norms.get(prompt)
        if normalized is None:
            normalized = self.norms[prompt] = normalize_prompt(prompt)
        return normalized

    def refuse(self, reason: str, rule: str, req: str, ids: tuple[str, ...], detail: str,
               ts: datetime, comparison: bool = True) -> None:
        joined = ",".join(ids)
        rid = row_id("refusal", self.key, reason, rule, req, joined, detail, ts)
        if rid not in self.refusals:  # the same refusal again: the first row stays
            row = refusal_row(self.session, rid, reason, rule, req, joined, detail, ts)
            self.refusals[rid] = (row, comparison)

    def refuse_cand(self, reason: str, c: _Cand, detail: str = "") -> None:
        ids = (c.chosen.response_id, c.rejected.response_id)
        detail = detail or f"{ids[0]} > {ids[1]}"
        self.refuse(reason, c.rule, c.chosen.request_id, ids, detail, c.ts)

    def positive(self, rid: str) -> tuple[int, Signal] | None:
        """First positive signal (dwelled click, copy, thumbs up) on an answer."""
        return self.accepted.get(rid)

    def first(self, kind: str) -> list[tuple[Shown, int, Signal]]:
        """First signal of ``kind`` per (non-conflicting) answer, in time order."""
        hits = self.firsts.get(kind, {})
        return [(self.shown[rid], *hit) for rid, hit in hits.items() if rid not in self.banned]

    def last_slot(self, req: str) -> int:
        """Lowest slot of the request that got a positive signal (-1 if none)."""
        slot = self.last_slots.get(req)
        if slot is None:  # once per request: every answer a rule pairs asks for it
            slots = [s.position for s in self.by_request[req] if s.response_id in self.accepted]
            slot = max((p for p in slots if p is not None), default=-1)
            self.last_slots[req] = slot
        return slot


def _index(closed: ClosedSession, rules: RuleConfig) -> _Ctx:
    """Replay events in time order; answers are known only from their first impression on."""
    session = closed.session
    ctx = _Ctx(rules, session, session.key)
    ordered = sorted(session.events, key=lambda se: (se.event.ts, se.offset))
    shown, by_request = ctx.shown, ctx.by_request
    for idx, se in enumerate(ordered):
        ev = se.event
        kind = ev.type
        if kind == "impression":
            if ev.response_id not in shown:
                s = Shown(ev.response_id, ev.request_id, ev.prompt, ev.response_text,
                          ev.model_version, ev.position, idx, ev.ts)
                shown[ev.response_id] = s
                by_request.setdefault(ev.request_id, []).append(s)
        elif kind == "reformulate":
            ctx.reforms.append((idx, ev))
        elif kind != "session_end":
            _add_signal(ctx, idx, ev)
    return ctx


def _add_signal(ctx: _Ctx, idx: int, ev: Signal) -> None:
    shown, kind = ctx.shown.get(ev.response_id), ev.type
    if shown is None:  # replay order: only earlier impressions are in ``shown``
        ctx.refuse("not_exposed", SIGNAL_RULE[kind], ev.request_id, (ev.response_id,),
                   f"{kind} {ev.event_id}", ev.ts, False)
        return
    if ev.request_id != shown.request_id:  # exposure is per request: what this request showed
        ctx.refuse("request_mismatch", SIGNAL_RULE[kind], ev.request_id, (ev.response_id,),
                   f"{kind} {ev.event_id} names request {ev.request_id}; the answer was shown "
                   f"in {shown.request_id}", ev.ts, False)
        return
    ctx.touched.add(shown.request_id)
    if kind == "click" and ev.dwell_ms < ctx.rules.min_dwell_ms:
        ctx.refuse("click_without_dwell", SIGNAL_RULE[kind], shown.request_id,
                   (ev.response_id,), f"{kind} {ev.event_id} dwell_ms={ev.dwell_ms}", ev.ts,
                   False)
    else:
        ctx.signals.setdefault(ev.response_id, []).append((idx, ev))
        # replay order: the first signal the index meets is the first in time
        ctx.firsts.setdefault(kind, {}).setdefault(ev.response_id, (idx, ev))
        if kind in sch.POSITIVE_TYPES:
            ctx.accepted.setdefault(ev.response_id, (idx, ev))


def _ban_conflicts(ctx: _Ctx) -> None:
    ups, downs = ctx.firsts.get("thumbs_up", {}), ctx.firsts.get("thumbs_down", {})
    for rid, sigs in ctx.signals.items():
        if rid not in ups or rid not in downs:
            continue
        kinds = {e.type: e.ts for _, e in sigs if e.type in ("thumbs_up", "thumbs_down")}
        if len(kinds) == 2:
            ctx.banned.add(rid)
            ctx.refuse("conflicting_signals", "thumbs", ctx.shown[rid].request_id, (rid,),
                       "thumbs_up and thumbs_down", max(kinds.values()), False)


def _propose(ctx: _Ctx, c: _Cand, same_prompt: bool = True) -> None:
    """Context checks shared by all rules; conflicting answers are silently left out."""
    if c.chosen.response_id in ctx.banned or c.rejected.response_id in ctx.banned:
        return
    if same_prompt and ctx.norm(c.chosen.prompt) != ctx.norm(c.rejected.prompt):
        ctx.refuse_cand("context_mismatch", c)
    elif c.chosen.text.strip() == c.rejected.text.strip():
        ctx.refuse_cand("identical_candidates", c)
    else:
        ctx.cands.append(c)


def _thumbs(ctx: _Ctx) -> None:
    ups, downs = ctx.first("thumbs_up"), ctx.first("thumbs_down")
    for kind, group in (("both_accepted", ups), ("both_rejected", downs)):
        for (a, _, ea), (b, _, eb) in combinations(group, 2):
            same = ctx.norm(a.prompt) == ctx.norm(b.prompt)
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
        sims: dict[str, float] = {}  # prompt_similarity per old prompt: answers share one
        for a in olds:
            sim = sims.get(a.prompt)
            if sim is None:
                sim = sims[a.prompt] = _jaccard(ctx.norm(a.prompt), ctx.norm(f.prompt))
            _reformulate_one(ctx, f, a, sim, accepted)


def _reformulate_one(ctx: _Ctx, f: sch.Reformulate, a: Shown, sim: float,
                     accepted: list[tuple[Shown, tuple[int, Signal]]]) -> None:
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
        key = (ctx.norm(c.prompt), c.chosen.text, c.rejected.text)
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
    ch, rj = c.chosen, c.rejected
    pair_id = row_id("pair", ctx.key, ctx.norm(c.prompt), ch.text, rj.text)
    return pair_row(ctx.session, pair_id, c.rule, names, c.confidence, c.propensity, c.prompt,
                    ch, rj, c.ts)


def _tie(ctx: _Ctx, kind: str, a: Shown, b: Shown, ts: datetime) -> Tie:
    tie_id = row_id("tie", ctx.key, kind, *sorted((a.response_id, b.response_id)))
    return tie_row(ctx.session, tie_id, kind, a, b, ts)


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
        rows.append(unpaired_row(ctx.session, row_id("unpaired", ctx.key, rid), a, ev.type,
                                 UNPAIRED_SIGNALS[ev.type], confs[ev.type], ev.ts))
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
    return pairing_result(len(pairs) + len(ctx.ties) + n_refused, pairs, tuple(ctx.ties),
                          tuple(_unpaired(ctx, used)), tuple(r for r, _ in ctx.refusals.values()))
