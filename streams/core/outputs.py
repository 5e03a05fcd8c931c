"""Rows a closed session contributes to storage, and the privacy rewrites of what is stored
(pure).

* :func:`pseudonym`: a user id replaced by a keyed hash (HMAC-SHA256, hex prefix): stable for a
  key, so one user's rows still group together, but not reversible without the key.
* :func:`scrub_text` per ``text_storage``: ``full`` keeps a text, ``redact`` keeps its SHA-256
  prefix and length (distinct texts stay distinct and a text at hand can be checked against a
  row), ``drop`` keeps nothing.
* :func:`scrub_raw`: the same for a raw message kept in a dead-letter or late-event row.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr

from prefstream.schemas.records import (
    UNSTAMPED,
    ClosedSession,
    PairingResult,
    SessionSummary,
    construct_valid,
    given_fields,
)

PSEUDONYM_HEX_CHARS = 32  # 128 bits: collisions are out of reach for any user count
REDACT_HEX_CHARS = 32
#: text columns of the stored tables
TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "pairs": ("prompt", "chosen", "rejected"),
    "ties": ("prompt", "response_a", "response_b"),
    "unpaired": ("prompt", "completion"),
}
#: fields of an event message kept as sent (ids, times, numbers); every other field (prompt,
#: response_text, edited_text, and any field outside the event schema) is free text
EVENT_ID_FIELDS = frozenset({
    "type", "event_id", "schema_version", "session_id", "user_id", "request_id", "ts",
    "response_id", "position", "model_version", "dwell_ms", "previous_request_id",
})
Row = TypeVar("Row", bound=BaseModel)
_SUMMARY_FIELDS = given_fields(SessionSummary)


def pseudonym(user_id: str, key: SecretStr) -> str:
    """The stored stand-in for ``user_id``: a hex prefix of HMAC-SHA256 under ``key``."""
    return _hmac_prefix(key.get_secret_value(), user_id)


@functools.lru_cache(maxsize=1 << 15)  # users recur: a hit costs a tenth of the HMAC
def _hmac_prefix(key: str, user_id: str) -> str:
    mac = hmac.new(key.encode(), user_id.encode(), hashlib.sha256)
    return mac.hexdigest()[:PSEUDONYM_HEX_CHARS]


def scrub_text(text: str, text_storage: str) -> str:
    if text_storage == "full":
        return text
    if text_storage == "drop":
        return ""
    digest = hashlib.sha256(text.encode()).hexdigest()[:REDACT_HEX_CHARS]
    return f"<redacted sha256:{digest} len:{len(text)}>"


def scrub_row(row: Row, table: str, text_storage: str) -> Row:
    columns = TEXT_COLUMNS.get(table, ())
    if text_storage == "full" or not columns:
        return row
    return row.model_copy(update={c: scrub_text(getattr(row, c), text_storage) for c in columns})


def scrub_raw(raw: bytes, *, pseudonym_key: SecretStr | None, text_storage: str,
              limit: int | None = None) -> str:
    """A raw message as it may be stored: the user id pseudonymized and free texts scrubbed.

    Without either option the message is kept as sent (decoded leniently). A message that
    cannot be scrubbed field by field is kept only as its hash and length (``redact``, and
    whenever a pseudonym key is set) or not at all (``drop``): one that is not a JSON object,
    nested too deep for Python's parser, or holding a lone surrogate (a ``\\ud800`` escape is
    valid JSON but no UTF-8 string: it could be neither hashed nor stored).
    """
    if pseudonym_key is None and text_storage == "full":
        return raw.decode("utf-8", errors="replace")[:limit]
    try:
        message = json.loads(raw)
        if isinstance(message, dict):
            text = json.dumps(scrub_message(message, pseudonym_key=pseudonym_key,
                                            text_storage=text_storage), ensure_ascii=False)
            text.encode()  # a lone surrogate in a field kept as sent raises here
            return text[:limit]
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        pass
    text = raw.decode("utf-8", errors="replace")
    return scrub_text(text, "drop" if text_storage == "drop" else "redact")


def scrub_message(message: dict[str, Any], *, pseudonym_key: SecretStr | None,
                  text_storage: str) -> dict[str, Any]:
    """A decoded event with ``user_id`` pseudonymized and every free-text field scrubbed."""
    out = {}
    for name, value in message.items():
        as_text = value if isinstance(value, str) else json.dumps(value)
        if name == "user_id" and pseudonym_key is not None:
            value = pseudonym(as_text, pseudonym_key)
        elif name not in EVENT_ID_FIELDS and text_storage != "full":
            value = scrub_text(as_text, text_storage)
        out[name] = value
    return out


def scrub_event(event: BaseModel, text_storage: str) -> bytes:
    """A valid event as JSON with its free texts scrubbed (its user id is already stored as
    given: the worker pseudonymizes events when it validates them)."""
    message = scrub_message(event.model_dump(mode="json"), pseudonym_key=None,
                            text_storage=text_storage)
    return json.dumps(message, ensure_ascii=False).encode()


def session_summary(closed: ClosedSession, result: PairingResult) -> SessionSummary:
    """The ``sessions`` row of a closed session (its storage ``partition`` left to the writer).

    Built without re-validating (``construct_valid``): its values are counts and fields of
    validated models (tests/streams/core/test_pairing_reference.py compares it with a
    validated row)."""
    session = closed.session
    requests, n_impressions = set(), 0
    for item in session.events:  # one pass: the events are many, the counts two
        requests.add(item.event.request_id)
        n_impressions += item.event.type == "impression"
    return construct_valid(SessionSummary, {
        "session_key": session.key,
        "session_id": session.session_id,
        "user_id": session.user_id,
        "kafka_partition": session.kafka_partition,
        "start": session.start,
        "end": session.last,
        "close_reason": closed.reason,
        "n_events": len(session.events),
        "n_duplicates": session.n_duplicates,
        "n_requests": len(requests),
        "n_impressions": n_impressions,
        "n_candidates": result.n_candidates,
        "n_pairs": len(result.pairs),
        "n_ties": len(result.ties),
        "n_unpaired": len(result.unpaired),
        "n_refusals": len(result.refusals),
        "partition": UNSTAMPED,
    }, set(_SUMMARY_FIELDS))


def session_rows(closed: ClosedSession, result: PairingResult, *,
                 text_storage: str = "full") -> dict[str, list[BaseModel]]:
    """Table name -> rows for one closed session, texts stored as ``text_storage`` says.

    Pairing ran on the full texts, so ids and rules do not depend on the storage mode. The
    rows' storage ``partition`` is the writer's to stamp (``storage.partitions.stamp``).
    """
    rows: dict[str, list[BaseModel]] = {
        "pairs": list(result.pairs),
        "ties": list(result.ties),
        "unpaired": list(result.unpaired),
        "refusals": list(result.refusals),
        "sessions": [session_summary(closed, result)],
    }
    if text_storage == "full":  # nothing to scrub: the lists as they are
        return rows
    return {table: [scrub_row(r, table, text_storage) for r in table_rows]
            for table, table_rows in rows.items()}
