"""Rows a closed session contributes to storage (pure)."""

from __future__ import annotations

from pydantic import BaseModel

from schemas.records import ClosedSession, PairingResult, SessionSummary
from storage.partitions import partition_for
from streams.pairing import RuleConfig


def session_summary(closed: ClosedSession, result: PairingResult,
                    rules: RuleConfig) -> SessionSummary:
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
        partition=partition_for(session.last, hours=rules.partition_hours),
    )


def session_rows(closed: ClosedSession, result: PairingResult,
                 rules: RuleConfig) -> dict[str, list[BaseModel]]:
    """Table name -> rows for one closed session."""
    return {
        "pairs": list(result.pairs),
        "ties": list(result.ties),
        "unpaired": list(result.unpaired),
        "refusals": list(result.refusals),
        "sessions": [session_summary(closed, result, rules)],
    }
