"""Prometheus text-format metrics of a worker, served over HTTP from a daemon thread.

Counters are updated by the stream (one asyncio thread) and read by the HTTP thread; a lock
keeps each scrape a consistent snapshot.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]

HELP = {
    "prefstream_events_total": ("counter", "Messages read, by outcome."),
    "prefstream_pairs_total": ("counter", "Preference pairs stored, by rule."),
    "prefstream_refusals_total": ("counter", "Candidate comparisons refused, by reason."),
    "prefstream_rows_total": ("counter", "Rows stored, by table."),
    "prefstream_flushes_total": ("counter", "Batches made durable and committed."),
    "prefstream_partitions_sealed_total": ("counter", "Storage partitions sealed."),
    "prefstream_sessions_open": ("gauge", "Open sessions, by Kafka partition."),
    "prefstream_sessions_evicted_total": ("counter", "Open sessions closed early by "
                                          "max_open_sessions, by Kafka partition."),
    "prefstream_sessions_max_bytes_total": ("counter", "Sessions closed early because their "
                                            "state reached max_session_bytes / 2, by Kafka "
                                            "partition."),
    "prefstream_starts_at_same_offset": ("gauge", "Takeovers in a row of a Kafka partition "
                                         "that read from the same offset (3 or more: stuck)."),
    "prefstream_stored_duplicates_total": ("counter", "Events refused because their id was "
                                           "stored within dedupe_horizon_s, by Kafka "
                                           "partition."),
    "prefstream_watermark_seconds": ("gauge", "Event-time watermark, by Kafka partition."),
    "prefstream_lag_messages": ("gauge", "Messages behind the partition end, by partition."),
    "prefstream_files_quarantined": ("gauge", "Damaged data files in quarantine/ at start."),
    "prefstream_trainer_runs_total": ("counter", "Training cycles, by outcome."),
    "prefstream_trainer_sealed_partitions": ("gauge", "Sealed partitions in the manifest."),
    "prefstream_trainer_last_run_seconds": ("gauge", "Wall time of the last cycle."),
    "prefstream_trainer_heldout_accuracy": ("gauge", "Held-out accuracy of the last cycle."),
    "prefstream_trainer_calibration_agreement": ("gauge", "Calibration agreement, last cycle."),
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def snapshot(self) -> dict[str, dict[Labels, float]]:
        """Every series' value now (to copy them into another process's :class:`Metrics`)."""
        with self._lock:
            return {name: dict(series) for name, series in self._values.items()}

    def update(self, snapshot: dict[str, dict[Labels, float]]) -> None:
        """Set every series of ``snapshot`` (another :class:`Metrics`' values) here."""
        with self._lock:
            for name, series in snapshot.items():
                self._values[name].update(series)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        lines: list[str] = []
        for name in sorted(snapshot):
            kind, text = HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{_labels(key)} {value:g}"
                      for key, value in sorted(snapshot[name].items())]
        return "\n".join(lines) + "\n"


def _labels(key: Iterable[tuple[str, str]]) -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in key]
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def serve(render: Callable[[], str], *, host: str, port: int) -> HTTPServer | None:
    """Serve ``GET /metrics`` on one daemon thread; None (and a warning) if the port is taken.

    One request at a time, on the same thread: a scrape takes a millisecond, and a thread per
    request would start a new thread every scrape for the life of the worker. A client that
    stops sending or reading is dropped after ``timeout`` seconds.
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = 5.0

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            return

    try:
        server = HTTPServer((host, port), Handler)
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%d: %s", host, port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
