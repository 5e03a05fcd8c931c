"""Logging of every ``prefstream`` process: text lines (default) or one JSON object a line.

``PREFSTREAM_LOG_FORMAT=json`` (``Settings.log_format``) selects JSON for log shippers: each line
holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and, for an exception, ``exc``.
The worker passes the same formatter to Faust (:func:`faust_logging_config`). See
docs/first-hour.md ("Logs").
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any, Literal, get_args

from prefstream.errors import ConfigError

LogFormat = Literal["text", "json"]
LOG_FORMAT_ENV = "PREFSTREAM_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: loggers whose INFO lines are protocol chatter (connections, metadata): warnings only
NOISY = ("kafka", "aiokafka")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class NewHeadReport(logging.Filter):
    """transformers' load report when the only news is a freshly initialised scalar head.

    Loading a backbone into ``AutoModelForSequenceClassification`` always leaves the head
    (``classifier.*``, ``score.*``) missing from the checkpoint: expected, not an error. That
    report (a table of MISSING keys, at WARNING) becomes one INFO line; any other report stays.
    """

    HEADS = ("classifier.", "score.")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        keys = _report_keys(message)
        if not keys or not all(k.startswith(self.HEADS) and s == "MISSING" for k, s in keys):
            return True
        log.info("new reward head initialised (%s): expected when training from a backbone",
                 ", ".join(k for k, _ in keys))
        return False


def _report_keys(report: str) -> list[tuple[str, str]]:
    """``(key, status)`` rows of a transformers load-report table (``key | STATUS | ...``)."""
    rows = []
    for line in ANSI.sub("", report).splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[0] not in ("", "Key") and not set(cells[0]) <= set("-+"):
            rows.append((cells[0], cells[1]))
    return rows


def log_format() -> LogFormat:
    """The format ``PREFSTREAM_LOG_FORMAT`` asks for; :class:`ConfigError` naming it if bad."""
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() or "text"
    if value not in get_args(LogFormat):
        raise ConfigError(f"{LOG_FORMAT_ENV}={value!r} is not a log format: use text or json")
    return value  # type: ignore[return-value]


def setup_logging(*, verbose: bool = False, fmt: LogFormat = "text") -> None:
    """Root handler on stderr in ``fmt``; quiet protocol loggers; the head-report filter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("transformers.modeling_utils").addFilter(NewHeadReport())
    if fmt == "json":
        _json_for_transformers()


def _json_for_transformers() -> None:
    """transformers logs through its own handler, not the root's: route it to ours."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def faust_logging_config(fmt: LogFormat, level: str) -> dict[str, Any] | None:
    """``logging_config`` for Faust's worker: None keeps Faust's text lines."""
    if fmt != "json":
        return None
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": "prefstream.logs.JsonFormatter"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json",
                                 "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["default"]},
    }
