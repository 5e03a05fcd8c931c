"""A real worker whose pipeline process dies stops, with a line saying so, and never hangs
(``streams/worker/offload.py``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefstream.settings import Settings
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.worker.offload import DEAD_GRACE_S
from prefstream.streams.worker.run import prepare

pytestmark = pytest.mark.broker

STARTED = re.compile(r"pipeline process started \(pid (\d+)\)")


def test_a_worker_whose_pipeline_process_dies_stops_with_a_clear_line(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    name = "deadchild"
    settings = Settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path / "data",
                        app_id=name, events_topic=f"{name}-events",
                        dead_letter_topic=f"{name}-dlq", late_topic=f"{name}-late",
                        partitions=2, metrics_port=0, rebalance_timeout_s=2.0,
                        session_timeout_s=4.0,  # a quick first join
                        pipeline_process=True)
    prepare(settings)
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "prefstream.cli", "worker"],
                                  env={**os.environ, **settings.as_env()}, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (found := STARTED.search(log_path.read_text(errors="replace"))):
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        os.kill(int(found.group(1)), signal.SIGKILL)
        code = worker.wait(timeout=DEAD_GRACE_S + 15)  # stopped, or forced out: never hangs
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log_path.read_text(errors="replace")
    assert code != 0
    assert f"the pipeline process (pid {found.group(1)}) ended with signal 9: stopping the " \
        "worker" in text
