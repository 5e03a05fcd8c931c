"""The rows of a closed session's pairing, built: their ids and their models.

The rules (``streams/core/pairing.py``, docs/pair-rules.md) decide which rows a session yields
and what each id hashes; this module builds them, for every closed session the worker writes.
Every value comes from validated events and rules, so the rows are built without validating
them again (``schemas.records.construct_valid``: every field, in declared order), which cost
more than the rules themselves; tests/streams/core/test_pairing_reference.py compares them with
validated rows, field for field.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from json.encoder import encode_basestring as _json_str
from typing import NamedTuple

from prefstream.schemas.records import (
    UNSTAMPED,
    Pair,
    PairingResult,
    Refusal,
    Session,
    Tie,
    UnpairedRow,
    construct_valid,
    given_fields,
)

_PAIR_FIELDS, _TIE_FIELDS, _UNPAIRED_FIELDS, _REFUSAL_FIELDS = (
    given_fields(Pair), given_fields(Tie), given_fields(UnpairedRow), given_fields(Refusal))
_RESULT_FIELDS = frozenset(PairingResult.model_fields)


class Shown(NamedTuple):
    """An answer at its first impression (or the user's edit standing in for one)."""

    response_id: str
    request_id: str
    prompt: str
    text: str
    model: str
    position: int | None
    idx: int  # place in (ts, offset) order
    ts: datetime


def row_id(kind: str, *parts: object) -> str:
    """Row id: the row kind prefixes the hashed JSON list, so different kinds never collide.

    The list is ``json.dumps([kind, *map(str, parts)], ensure_ascii=False)``, written out: a
    list of strings is its items, each encoded as json encodes a string, joined by ", " in
    brackets (the reference test checks the two agree), without the encoder's set-up, which
    cost more than the hash for these short lists.
    """
    raw = "[" + ", ".join([_json_str(str(p)) for p in (kind, *parts)]) + "]"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def refusal_row(s: Session, refusal_id: str, reason: str, rule: str, request_id: str,
                response_ids: str, detail: str, ts: datetime) -> Refusal:
    return construct_valid(Refusal, {
        "refusal_id": refusal_id, "reason": reason, "rule": rule, "session_id": s.session_id,
        "user_id": s.user_id, "request_id": request_id, "response_ids": response_ids,
        "detail": detail, "event_time": ts, "partition": UNSTAMPED,
    }, set(_REFUSAL_FIELDS))


def pair_row(s: Session, pair_id: str, rule: str, rules: tuple[str, ...], confidence: float,
             propensity: float, prompt: str, chosen: Shown, rejected: Shown,
             ts: datetime) -> Pair:
    ch, rj = chosen, rejected
    return construct_valid(Pair, {
        "pair_id": pair_id, "rule": rule, "rules": rules, "confidence": confidence,
        "propensity_weight": propensity, "prompt": prompt, "chosen": ch.text,
        "rejected": rj.text, "session_id": s.session_id, "user_id": s.user_id,
        "request_id": ch.request_id, "rejected_request_id": rj.request_id,
        "chosen_response_id": ch.response_id, "rejected_response_id": rj.response_id,
        "chosen_model": ch.model, "rejected_model": rj.model, "chosen_position": ch.position,
        "rejected_position": rj.position, "event_time": ts, "session_start": s.start,
        "session_end": s.last, "partition": UNSTAMPED,
    }, set(_PAIR_FIELDS))


def tie_row(s: Session, tie_id: str, kind: str, a: Shown, b: Shown, ts: datetime) -> Tie:
    return construct_valid(Tie, {
        "tie_id": tie_id, "kind": kind, "rule": "thumbs", "prompt": a.prompt,
        "response_a": a.text, "response_b": b.text, "response_a_id": a.response_id,
        "response_b_id": b.response_id, "session_id": s.session_id, "user_id": s.user_id,
        "request_id": a.request_id, "event_time": ts, "partition": UNSTAMPED,
    }, set(_TIE_FIELDS))


def unpaired_row(s: Session, unpaired_id: str, a: Shown, signal: str, label: bool,
                 confidence: float, ts: datetime) -> UnpairedRow:
    return construct_valid(UnpairedRow, {
        "row_id": unpaired_id, "prompt": a.prompt, "completion": a.text, "label": label,
        "signal": signal, "confidence": confidence, "session_id": s.session_id,
        "user_id": s.user_id, "request_id": a.request_id, "response_id": a.response_id,
        "model_version": a.model, "position": a.position, "event_time": ts,
        "partition": UNSTAMPED,
    }, set(_UNPAIRED_FIELDS))


def pairing_result(n_candidates: int, pairs: tuple[Pair, ...], ties: tuple[Tie, ...],
                   unpaired: tuple[UnpairedRow, ...],
                   refusals: tuple[Refusal, ...]) -> PairingResult:
    return construct_valid(PairingResult, {
        "n_candidates": n_candidates, "pairs": pairs, "ties": ties, "unpaired": unpaired,
        "refusals": refusals,
    }, set(_RESULT_FIELDS))
