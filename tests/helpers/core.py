"""Helpers shared by the core's tests."""

from __future__ import annotations

from prefstream.schemas.records import ClosedSession
from prefstream.streams.core.state import PartitionSessions


def pending(ps: PartitionSessions) -> list[ClosedSession]:
    """The closed groups still to be written, in the order a flush writes them (by session id,
    then group): they stay pending until ``forget_flushed``."""
    groups = ps.pending_groups()
    return [c for sid in sorted(groups) for c in groups[sid]]
