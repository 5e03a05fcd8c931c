"""One event of an open session held compactly (:class:`~prefstream.streams.core.compact.OpenSlot`):
a ``bytes`` object, encoded from the validated model and decoded back to the very same model.

Layout: a fixed header (:data:`HEAD`: type code, with flag :data:`ZONED` when a UTC offset
follows; event time in µs since the epoch; Kafka offset; counted size), the UTC offset in µs if
flagged (:data:`ZONE`), the event id, NUL, then the event's other fields as a JSON array of
values in UTF-8 (the user id first, None when it is its session's; a text an earlier event of
the session holds already as ``[event, value]``). See docs/operations.md ("State memory").
"""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta, timezone
from typing import Any

import pydantic_core

from prefstream.schemas.events import EVENT_TYPES, FeedbackEvent
from prefstream.schemas.records import SessionEvent
from prefstream.streams.core.sessionize import EPOCH, TICK

#: type code (flag ``ZONED``: a UTC offset follows), event time (µs since the epoch), Kafka
#: offset, counted size; then the UTC offset (µs) if flagged, the event id, NUL, the values
HEAD = struct.Struct("<BqqI")
ZONE = struct.Struct("<q")
#: an event's time alone, then its counted size alone (both read from :data:`HEAD`'s place)
TIME = struct.Struct("<xq")
SIZE = struct.Struct("<17xI")
ZONED = 0x80
_MAX_SIZE = 0xFFFFFFFF
SEP = b"\x00"  # ends the event id (ids never hold NUL: schemas.events.Id)
_SKIP = frozenset({"event_id", "schema_version", "session_id", "user_id", "ts", "type"})
_FIELDS = tuple(tuple(f for f in cls.model_fields if f not in _SKIP) for cls in EVENT_TYPES)
_CODE = {cls: code for code, cls in enumerate(EVENT_TYPES)}
#: the type code of ``session_end``
END = _CODE[next(c for c in EVENT_TYPES if c.__name__ == "SessionEnd")]
_ZONES: dict[int, timezone] = {0: timezone.utc}
_EPOCHS: dict[int, datetime] = {0: EPOCH}
_TEXTS = frozenset({"prompt", "response_text", "edited_text"})
#: positions of the text fields in each type's values (after the user id)
_TEXT_AT = tuple(tuple(1 + i for i, f in enumerate(fields) if f in _TEXTS) for fields in _FIELDS)
#: shorter texts are held as they are: a reference (``[k,i]``) would save little
MIN_SHARED_TEXT = 24
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
#: each type's fields in the model's order, the constant ones set (see :func:`decode_events`)
_TEMPLATE = tuple({name: cls.model_fields[name].default if name in ("schema_version", "type")
                   else None for name in cls.model_fields} for cls in EVENT_TYPES)
#: the names of each type's values
_NAMES = tuple(("user_id", *fields) for fields in _FIELDS)
_setattr = object.__setattr__
_ALL_FIELDS: dict[type, set[str]] = {}  # see construct
_EPOCH_DAY = EPOCH.toordinal()
_new = object.__new__


def micros(ts: datetime) -> int:
    """A time as µs since the epoch."""
    return (ts - EPOCH) // TICK


def micros_in_zone(ts: datetime) -> tuple[int, int]:
    """:func:`micros` of an aware time, and its UTC offset in µs: from its fields and one call
    of its offset (subtracting the epoch calls both times' offsets, a third of an event's
    encoding)."""
    offset_us = ts.utcoffset() // TICK  # type: ignore[operator]
    days = ts.toordinal() - _EPOCH_DAY
    local = ((days * 24 + ts.hour) * 60 + ts.minute) * 60 + ts.second
    return local * 1_000_000 + ts.microsecond - offset_us, offset_us


def _zone(offset_us: int) -> timezone:
    zone = _ZONES.get(offset_us)
    if zone is None:
        zone = timezone(timedelta(microseconds=offset_us))
        if len(_ZONES) < 64:  # the few offsets producers use; more are built each time
            _ZONES[offset_us] = zone
    return zone


def _epoch_in(offset_us: int) -> datetime:
    """The epoch in a UTC offset: an event time is read as it plus its µs, in that offset (as
    ``(EPOCH + µs).astimezone(zone)``: a fixed offset has no daylight saving time)."""
    epoch = _EPOCHS.get(offset_us)
    if epoch is None:
        epoch = EPOCH.astimezone(_zone(offset_us))
        if len(_EPOCHS) < 64:  # as _zone
            _EPOCHS[offset_us] = epoch
    return epoch


def id_at(blob: bytes) -> int:
    """Where the event id of ``blob`` starts."""
    return HEAD.size + (ZONE.size if blob[0] & ZONED else 0)


def dump_values(value: Any) -> bytes:
    """Compact JSON in UTF-8 (pydantic-core's serializer: several times the json module's
    speed); a text with a lone surrogate, which UTF-8 cannot hold, through the json module."""
    try:
        return pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        return _JSON.encode(value).encode("utf-8", "surrogatepass")


def _load(data: bytes) -> Any:
    try:
        return pydantic_core.from_json(data)
    except ValueError:  # written by dump_values' fallback
        return json.loads(data.decode("utf-8", "surrogatepass"))


def pack_event(code: int, micros: int, offset_us: int, offset: int, size: int, event_id: str,
               values: bytes) -> bytes:
    head = HEAD.pack(code | (ZONED if offset_us else 0), micros, offset, size)
    if offset_us:
        head += ZONE.pack(offset_us)
    return head + event_id.encode() + SEP + values


def unpack_event(blob: bytes) -> tuple[int, int, int, int, int, str, bytes]:
    """code, µs, UTC offset (µs), Kafka offset, size, event id, values (JSON) of a blob."""
    flags, micros, offset, size = HEAD.unpack_from(blob)
    offset_us = ZONE.unpack_from(blob, HEAD.size)[0] if flags & ZONED else 0
    at = id_at(blob)
    end = blob.index(SEP, at)
    return (flags & ~ZONED, micros, offset_us, offset, size, blob[at:end].decode(),
            blob[end + 1:])


def encodable(size: int, offset: int) -> bool:
    return 0 <= size <= _MAX_SIZE and -(1 << 63) <= offset < (1 << 63)


def encode_event(event: FeedbackEvent, offset: int, size: int, user_id: str | None,
                 earlier: tuple[bytes, ...] = (), joined: bytes | None = None) -> bytes:
    """One event as :class:`OpenSlot` holds it; its user id left out when it is ``user_id``
    (its session's; None: always written), and each text an ``earlier`` event of the session
    holds already written as a reference to it (``[k, i]``: value ``i`` of event ``k``).
    ``joined``: the earlier events as one ``bytes`` (``b"".join(earlier)``), if at hand."""
    code = _CODE[type(event)]
    fields = event.__dict__  # the validated values, as getattr would read them
    values: list[Any] = [None if event.user_id == user_id else event.user_id]
    values += [fields[f] for f in _FIELDS[code]]
    if earlier:
        for i in _TEXT_AT[code]:
            if len(values[i]) >= MIN_SHARED_TEXT:
                if joined is None:
                    joined = b"".join(earlier)
                values[i] = _shared(values[i], earlier, joined)
    body = dump_values(values)
    return pack_event(code, *micros_in_zone(event.ts), offset, size, event.event_id, body)


def _shared(text: str, earlier: tuple[bytes, ...], joined: bytes) -> str | list[int]:
    """A reference to ``text`` in an earlier event of the session, or ``text`` itself.

    Found by its JSON form in the encoded events (a fast byte search, first in all of them at
    once), then confirmed on the decoded values: a match inside a longer text is no reference."""
    needle = dump_values(text)
    if needle not in joined:
        return text
    for k, blob in enumerate(earlier):
        if needle in blob:
            values = values_of(blob)
            for i in _TEXT_AT[blob[0] & ~ZONED]:
                if values[i] == text:
                    return [k, i]
    return text


def values_of(blob: bytes) -> list[Any]:
    """The values of ``blob`` as they are held (texts of earlier events as references)."""
    at = blob.index(SEP, id_at(blob)) + 1
    return _load(blob[at:])  # type: ignore[no-any-return]


def event_time(blob: bytes) -> datetime:
    """The event time of ``blob``, in its own UTC offset."""
    flags, micros = HEAD.unpack_from(blob)[:2]
    offset_us = ZONE.unpack_from(blob, HEAD.size)[0] if flags & ZONED else 0
    return _epoch_in(offset_us) + timedelta(0, 0, micros)


def written_user(blob: bytes, user_id: str) -> bool:
    """Whether ``blob`` (a slot's first) names ``user_id`` as its user."""
    at = blob.index(SEP, id_at(blob)) + 1
    name = dump_values(user_id)
    return blob.startswith(b"[" + name + b",", at)


def decode_events(blobs: tuple[bytes, ...], session_id: str, user_id: str | None,
                  heads: list[tuple[int, int, int, int]] | None = None,
                  ) -> tuple[SessionEvent, ...]:
    """The :class:`SessionEvent` each of a session's events was when :func:`encode_event`
    encoded it (the very values it had), in arrival order; ``user_id``: the session's (None:
    the first event's); ``heads``: their headers (:data:`HEAD`), if read already.

    This runs for every event of a session that closes: the values of all of them are read in
    one JSON array, and each event's fields are set on a copy of a template of its type."""
    if heads is None:
        heads = [HEAD.unpack_from(blob) for blob in blobs]
    items = []
    bodies = []
    for blob, (flags, micros, offset, size) in zip(blobs, heads, strict=True):
        at = HEAD.size
        epoch = EPOCH
        if flags & ZONED:
            epoch = _epoch_in(ZONE.unpack_from(blob, at)[0])
            at += ZONE.size
        end = blob.index(SEP, at)
        items.append((flags & ~ZONED, epoch + timedelta(0, 0, micros), offset, size,
                      blob[at:end].decode()))
        bodies.append(blob[end + 1:])
    try:
        rows = pydantic_core.from_json(b"[" + b",".join(bodies) + b"]")
    except ValueError:  # one was written by dump_values' fallback
        rows = [_load(body) for body in bodies]
    if user_id is None:
        user_id = rows[0][0]
    out = []
    for (code, ts, offset, size, event_id), values in zip(items, rows, strict=True):
        for i in _TEXT_AT[code]:
            if isinstance(values[i], list):  # a reference to an earlier event's text
                k, j = values[i]
                values[i] = rows[k][j]
        fields = _TEMPLATE[code].copy()  # every field, in the model's order
        fields["event_id"], fields["session_id"], fields["ts"] = event_id, session_id, ts
        fields.update(zip(_NAMES[code], values, strict=True))
        if values[0] is None:  # the session's user
            fields["user_id"] = user_id
        event = construct(EVENT_TYPES[code], fields)
        out.append(construct(SessionEvent, {"offset": offset, "event": event, "n_bytes": size}))
    return tuple(out)


def construct(cls: Any, values: dict[str, Any]) -> Any:
    """``cls.model_construct(**values)`` for these plain frozen models (every field given in
    the declared order, as validation sets ``__dict__``; no private attributes, no post-init),
    without its per-field loop: this runs for every event of a session that closes.

    Every model of a class shares one set of the fields set (all of them): a frozen model never
    changes its own, and pydantic copies it before a copy changes it (``model_copy``)."""
    fields_set = _ALL_FIELDS.get(cls)
    if fields_set is None:
        fields_set = _ALL_FIELDS[cls] = set(cls.model_fields)
    model = _new(cls)
    _setattr(model, "__dict__", values)
    _setattr(model, "__pydantic_fields_set__", fields_set)
    _setattr(model, "__pydantic_extra__", None)
    _setattr(model, "__pydantic_private__", None)
    return model
