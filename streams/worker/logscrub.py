"""No user text in any log line when texts are not stored in full (``text_storage`` redact/drop).

Libraries log payloads at debug level: Faust's ``send: topic=... k=b'...' v=b'...'`` carries
every changelog record, hence every open session's prompts and answers. :func:`install` replaces
the process's log record factory, so every record, from any logger and whatever handlers Faust
or the user configure later, is scrubbed once when it is made (:func:`scrub`):

- a ``bytes`` argument, and any bytes literal (``b'...'``) in the message, is withheld whole:
  payloads on the wire;
- the value after a text field's name (``prompt``, ``response_text``, ``chosen``...) in JSON,
  a dict or a keyword repr, at any depth of escaping, and a validation error's ``input_value``,
  is withheld;
- a traceback is scrubbed the same way.

Limit (``docs/storage-safety.md``): a text quoted outside those shapes (bare, under another
name) is not recognised; prefstream's own log lines name ids, never texts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

WITHHELD = "<withheld>"
#: field names whose values are user text (events, stored rows, dead letters)
TEXT_FIELDS = ("prompt", "response_text", "edited_text", "chosen", "rejected", "completion",
               "response_a", "response_b", "raw", "text", "input_value")
_BYTES = re.compile(r"(?<![\w'\"\\])b(?=['\"])")
_FIELD = re.compile(r"(?<![\w])(?:" + "|".join(TEXT_FIELDS) + r")(\\*['\"])?\s*[:=]\s*(\\*)(['\"])")


def _string_end(text: str, start: int, quote: str, depth_slashes: int) -> int:
    """Index just past the closing quote of a string opened before ``start`` by
    ``depth_slashes`` backslashes and ``quote``: the first ``quote`` preceded by a run of
    backslashes ``r`` with ``r % (2k + 2) == k`` (k = ``depth_slashes``; longer runs escape it
    at this depth). ``len(text)`` when it never closes."""
    k = depth_slashes
    i = start
    while True:
        i = text.find(quote, i)
        if i < 0:
            return len(text)
        run = 0
        while i - run - 1 >= start and text[i - run - 1] == "\\":
            run += 1
        if run % (2 * k + 2) == k:
            return i + 1
        i += 1


def scrub(text: str) -> str:
    """``text`` with bytes literals and text-field values replaced by ``<withheld>``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        field = _FIELD.search(text, i)
        literal = _BYTES.search(text, i)
        found = min((m for m in (field, literal) if m is not None), key=lambda m: m.start(),
                    default=None)
        if found is None:
            break
        if found is literal:
            quote = text[found.end()]
            end = _string_end(text, found.end() + 1, quote, 0)
            out += [text[i:found.start()], WITHHELD]
        else:
            slashes, quote = found.group(2), found.group(3)
            end = _string_end(text, found.end(), quote, len(slashes))
            out += [text[i:found.start(2)], WITHHELD]  # quotes too: their kind tells a ' apart
        i = end
    out.append(text[i:])
    return "".join(out)


def _scrubbed_record(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if isinstance(record.args, tuple):
            record.args = tuple(WITHHELD if isinstance(a, (bytes, bytearray, memoryview)) else a
                                for a in record.args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: left to the handler's report
            return record
        record.msg, record.args = scrub(message), ()
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return record

    make.scrubs_texts = True  # type: ignore[attr-defined]
    return make


def install(text_storage: str) -> bool:
    """Scrub every log record of this process unless texts are stored in full; returns
    whether scrubbing is on. Idempotent."""
    if text_storage == "full":
        return False
    current = logging.getLogRecordFactory()
    if not getattr(current, "scrubs_texts", False):
        logging.setLogRecordFactory(_scrubbed_record(current))
    return True
