"""What the worker derives from events: sessions, pairs, ties, unpaired rows, refusals.

Pair columns follow TRL's names (``prompt``, ``chosen``, ``rejected``) so stored pairs flow into
any preference trainer without renaming. Every row carries its provenance and, once stored,
its storage ``partition`` (``YYYY-MM-DDTHH``): the writer stamps it from the row's own time (a
session's rows: the hour of its last event; dead letters and late events: their arrival), never
the pure core that builds the rows (see ``storage.partitions.stamp``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from prefstream.schemas.events import FeedbackEvent

CloseReason = Literal["gap", "session_end", "max_events", "max_duration", "evicted", "max_bytes"]
TieKind = Literal["both_accepted", "both_rejected"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: the ``partition`` of a row the core built and the writer has not stamped yet
UNSTAMPED = ""
Model = TypeVar("Model", bound=BaseModel)
_setattr = object.__setattr__


def construct_valid(cls: type[Model], values: dict[str, Any], fields_set: set[str]) -> Model:
    """The model ``cls(**given)`` would validate, built without validating: for rows whose
    builder made every value valid already (from validated events and rules), which every
    closed session yields several of. ``values`` holds every field, in declared order (as
    validation fills ``__dict__``), and ``fields_set`` the fields given rather than defaulted.
    Plain records only: no private attributes, no extra fields, no validators. The builders'
    property tests compare such rows with validated ones, field for field."""
    model = cls.__new__(cls)
    _setattr(model, "__dict__", values)
    _setattr(model, "__pydantic_fields_set__", fields_set)
    _setattr(model, "__pydantic_extra__", None)
    _setattr(model, "__pydantic_private__", None)
    return model


def given_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of a row the core builds: all but the ``partition`` the writer stamps."""
    return frozenset(cls.model_fields) - {"partition"}


class SessionEvent(_Record):
    """An accepted event with the Kafka offset it was read at (for redelivery detection)."""

    offset: int
    event: FeedbackEvent
    n_bytes: int = Field(default=0, description="state size counted for it (0: before counting)")


class Session(_Record):
    """Events of one user session, in arrival order, between its first and last event time."""

    session_id: str
    user_id: str
    kafka_partition: int = 0
    start: AwareDatetime
    last: AwareDatetime
    events: tuple[SessionEvent, ...] = ()
    n_duplicates: int = 0
    duplicates: tuple[tuple[int, str], ...] = Field(
        default=(), description="(offset, event_id) of each re-sent copy of an event")
    ended_at: AwareDatetime | None = Field(default=None, description="ts of a session_end event")
    cut: bool = Field(default=False, description="closed by a cap (events, bytes) or evicted "
                      "rather than by event time: other groups of its id may start with it")
    n_bytes: int = Field(default=0, description="state size of its events, as counted against "
                         "max_session_bytes")

    @property
    def key(self) -> str:
        """Identity of this session: an id may be reused after an inactivity gap. A group cut
        off early may share its id and first millisecond with the next group of its session:
        its key also names its first Kafka offset (each event is in one group only)."""
        key = f"{self.session_id}@{self.start.timestamp():.3f}"
        if self.cut:
            key += f"#{min(item.offset for item in self.events)}"
        return key


class ClosedSession(_Record):
    session: Session
    reason: CloseReason


class Pair(_Record):
    pair_id: str
    rule: str = Field(description="The highest-confidence rule that produced this pair.")
    rules: tuple[str, ...] = Field(description="Every rule that produced the same comparison.")
    confidence: float = Field(ge=0, le=1)
    propensity_weight: float = Field(ge=0, description="Inverse examination probability, clipped.")
    prompt: str
    chosen: str
    rejected: str
    session_id: str
    user_id: str
    request_id: str
    rejected_request_id: str
    chosen_response_id: str
    rejected_response_id: str
    chosen_model: str
    rejected_model: str
    chosen_position: int | None
    rejected_position: int | None
    event_time: datetime = Field(description="Time of the decisive signal.")
    session_start: datetime
    session_end: datetime
    partition: str = Field(UNSTAMPED, description="Storage partition: the writer stamps it.")


class Tie(_Record):
    tie_id: str
    kind: TieKind
    rule: str
    prompt: str
    response_a: str
    response_b: str
    response_a_id: str
    response_b_id: str
    session_id: str
    user_id: str
    request_id: str
    event_time: datetime
    partition: str = Field(UNSTAMPED, description="Storage partition: the writer stamps it.")


class UnpairedRow(_Record):
    """A lone signal on one answer (KTO-style: prompt, completion, label)."""

    row_id: str
    prompt: str
    completion: str
    label: bool
    signal: str
    confidence: float = Field(ge=0, le=1)
    session_id: str
    user_id: str
    request_id: str
    response_id: str
    model_version: str
    position: int | None
    event_time: datetime
    partition: str = Field(UNSTAMPED, description="Storage partition: the writer stamps it.")


class Refusal(_Record):
    """A candidate comparison (or a signal) that was not turned into a pair, and why."""

    refusal_id: str
    reason: str
    rule: str
    session_id: str
    user_id: str
    request_id: str
    response_ids: str
    detail: str
    event_time: datetime
    partition: str = Field(UNSTAMPED, description="Storage partition: the writer stamps it.")


class SessionSummary(_Record):
    session_key: str
    session_id: str
    user_id: str
    kafka_partition: int
    start: datetime
    end: datetime
    close_reason: str
    n_events: int
    n_duplicates: int
    n_requests: int
    n_impressions: int
    n_candidates: int
    n_pairs: int
    n_ties: int
    n_unpaired: int
    n_refusals: int
    partition: str = Field(UNSTAMPED, description="Storage partition: the writer stamps it.")


class DeadLetter(_Record):
    dead_letter_id: str = Field(description="topic[partition]@offset of the bad message")
    topic: str
    kafka_partition: int
    offset: int
    reason: str
    raw: str = Field(description="The message value, decoded leniently and truncated.")
    received_at: datetime
    partition: str


class LateEvent(_Record):
    late_id: str = Field(description="topic[partition]@offset: a re-sent late event is a new row")
    event_id: str
    session_id: str
    event_type: str
    ts: datetime
    watermark: datetime
    kafka_partition: int
    offset: int
    raw: str
    received_at: datetime
    partition: str = Field(description="Arrival hour: late rows never touch a sealed partition.")


class PairingResult(_Record):
    """Everything one closed session yields."""

    n_candidates: int = 0
    pairs: tuple[Pair, ...] = ()
    ties: tuple[Tie, ...] = ()
    unpaired: tuple[UnpairedRow, ...] = ()
    refusals: tuple[Refusal, ...] = ()


# --- event-time partitions: every row's ``partition`` ---------------------------------------

PARTITION_FORMAT = "%Y-%m-%dT%H"


def partition_for(ts: datetime, *, hours: int = 1) -> str:
    """Name of the event-time partition holding ``ts``: its UTC hour floored to ``hours``."""
    if ts.tzinfo is None:
        raise ValueError("partition_for needs a timezone-aware datetime")
    utc = ts.astimezone(timezone.utc)
    hour = utc.hour - utc.hour % hours
    if utc.year < 1000:  # strftime writes such a year as the platform does: keep its names
        return utc.replace(hour=hour).strftime(PARTITION_FORMAT)
    # PARTITION_FORMAT written out: a third of replace + strftime's cost, once per closed session
    return f"{utc.year}-{utc.month:02d}-{utc.day:02d}T{hour:02d}"


def partition_bounds(name: str, *, hours: int = 1) -> tuple[datetime, datetime]:
    """``[start, end)`` of a partition name made by :func:`partition_for`."""
    start = datetime.strptime(name, PARTITION_FORMAT).replace(tzinfo=timezone.utc)
    return start, start + timedelta(hours=hours)
