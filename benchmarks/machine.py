"""What every benchmark records about its run: the machine, package versions, load, the date.

``machine_info()`` describes the host (CPU model, cores, RAM, OS, Python and the versions of the
packages the figures depend on); :class:`LoadMonitor` samples the 1-minute load average in a
background thread while a benchmark runs, so a figure taken on a busy machine says so.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

#: packages whose versions the figures depend on (absent ones are recorded as None)
PACKAGES = ("prefstream", "faust-streaming", "aiokafka", "kafka-python", "duckdb", "pyarrow",
            "torch", "transformers", "trl")


def machine_info() -> dict[str, Any]:
    """CPU model, logical and usable cores, RAM, OS, Python and package versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
        "ram_gb": _ram_gb(), "os": _os_name(), "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {pkg: _version(pkg) for pkg in PACKAGES},
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _ram_gb() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))} ({platform.system()} " \
                       f"{platform.release()})"
    return f"{platform.system()} {platform.release()}"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


class LoadMonitor:
    """``with LoadMonitor() as load: ...; load.summary()``: the 1-minute load average at the
    start and end and its mean and max over samples taken every ``interval_s``."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self.start: list[float] | None = None
        self.end: list[float] | None = None

    def __enter__(self) -> LoadMonitor:
        self.start = _loadavg()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        self.end = _loadavg()

    def _run(self) -> None:
        while not self._stop.is_set():
            load = _loadavg()
            if load is not None:
                self.samples.append(load[0])
            self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, Any]:
        samples = self.samples or [0.0]
        return {"loadavg_start": self.start, "loadavg_end": self.end or _loadavg(),
                "load1_mean": round(sum(samples) / len(samples), 2),
                "load1_max": round(max(samples), 2), "samples": len(self.samples)}


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line(script: str, argv: list[str] | None) -> str:
    """How a benchmark was run: its path relative to the repository root, and ``argv`` (the
    process's own arguments when None)."""
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path(__file__).resolve().parents[1])
    return shlex.join(["python", str(path), *(sys.argv[1:] if argv is None else argv)])


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a result JSON atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)


def elapsed_since(started: float) -> float:
    return round(time.perf_counter() - started, 1)
