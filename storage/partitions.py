"""Partition naming: a pure function of event time."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

PARTITION_FORMAT = "%Y-%m-%dT%H"


def partition_for(ts: datetime, *, hours: int = 1) -> str:
    """Name of the event-time partition holding ``ts``: its UTC hour floored to ``hours``."""
    if ts.tzinfo is None:
        raise ValueError("partition_for needs a timezone-aware datetime")
    utc = ts.astimezone(timezone.utc)
    floored = utc.replace(hour=utc.hour - utc.hour % hours, minute=0, second=0, microsecond=0)
    return floored.strftime(PARTITION_FORMAT)


def partition_bounds(name: str, *, hours: int = 1) -> tuple[datetime, datetime]:
    """``[start, end)`` of a partition name made by :func:`partition_for`."""
    start = datetime.strptime(name, PARTITION_FORMAT).replace(tzinfo=timezone.utc)
    return start, start + timedelta(hours=hours)
