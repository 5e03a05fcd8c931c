"""Feedback events: the wire contract between producers and the worker.

One JSON object per Kafka message, keyed by ``session_id``. Every event carries an ``event_id``
(for dedupe), the ``schema_version``, the session, the pseudonymous user, the request it belongs
to and a timezone-aware event time ``ts``. The ``type`` field selects the model.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

SCHEMA_VERSION = 1
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 32_768
MAX_POSITION = 100
#: wall-clock and Kafka record times (ms since the epoch) from here on are bogus: anyone can set
#: them, and times near datetime's limit (year 9999) overflow gap and partition arithmetic
MAX_WALL_MS = int(datetime(9000, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[\w.:@/+=-]+$")]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    event_id: Id
    schema_version: Literal[1] = SCHEMA_VERSION
    session_id: Id
    user_id: Id
    request_id: Id
    ts: AwareDatetime = Field(description="Event time, timezone-aware (ISO 8601 with offset).")

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: object) -> object:
        """``Literal[1]`` matches by equality, so on its own it takes ``true`` and ``1.0``."""
        if type(value) is not int:
            raise ValueError(f"schema_version must be the integer {SCHEMA_VERSION}")
        return value


class _OnResponse(_Event):
    response_id: Id = Field(description="The shown answer this signal refers to.")


class Impression(_OnResponse):
    """An answer was shown to the user for a prompt, in a slot."""

    type: Literal["impression"] = "impression"
    prompt: Text
    response_text: Text
    position: int = Field(ge=0, le=MAX_POSITION, description="Slot, 0 = top / first shown.")
    model_version: Id


class Click(_OnResponse):
    """The user opened or expanded an answer; ``dwell_ms`` tells how long they stayed."""

    type: Literal["click"] = "click"
    dwell_ms: int = Field(ge=0, le=86_400_000)


class Copy(_OnResponse):
    """The user copied (part of) an answer: a strong acceptance signal."""

    type: Literal["copy"] = "copy"


class ThumbsUp(_OnResponse):
    type: Literal["thumbs_up"] = "thumbs_up"


class ThumbsDown(_OnResponse):
    type: Literal["thumbs_down"] = "thumbs_down"


class Regenerate(_OnResponse):
    """The user asked for a new answer in place of ``response_id``."""

    type: Literal["regenerate"] = "regenerate"


class Edit(_OnResponse):
    """The user rewrote ``response_id``; the edited text is preferred to the original."""

    type: Literal["edit"] = "edit"
    edited_text: Text


class Reformulate(_Event):
    """The user asked again with a new prompt; ``request_id`` is the new request."""

    type: Literal["reformulate"] = "reformulate"
    prompt: Text
    previous_request_id: Id


class SessionEnd(_Event):
    """The client closed the session (tab closed, conversation ended)."""

    type: Literal["session_end"] = "session_end"


FeedbackEvent = Annotated[
    Impression | Click | Copy | ThumbsUp | ThumbsDown | Regenerate | Edit | Reformulate
    | SessionEnd,
    Field(discriminator="type"),
]
EVENT_TYPES = (
    Impression, Click, Copy, ThumbsUp, ThumbsDown, Regenerate, Edit, Reformulate, SessionEnd,
)
EVENT_ADAPTER: TypeAdapter[FeedbackEvent] = TypeAdapter(FeedbackEvent)
POSITIVE_TYPES = frozenset({"click", "copy", "thumbs_up"})


class Tick(BaseModel):
    """Control message the worker sends to every partition so watermarks advance when idle.

    ``mac`` signs the topic, ``partition`` and ``wall_ms`` with the workers' key (see
    ``streams/worker/ticks.py``): a tick without a valid one is dead-lettered, not obeyed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    type: Literal["_tick"] = "_tick"
    wall_ms: int = Field(ge=0, lt=MAX_WALL_MS)
    partition: int = Field(ge=0)
    mac: str = Field(pattern=r"^[0-9a-f]{64}$")


def event_json_schema() -> dict[str, object]:
    """The JSON Schema producers in other languages validate against."""
    schema = EVENT_ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"prefstream feedback event v{SCHEMA_VERSION}"
    return schema
