"""The first hour of a user, as docs/first-hour.md lists it, against the embedded broker: the
demo, status, the README's producer, the query with a DuckDB 1.x client, the trainer, score, and
``models/current`` loaded with transformers. One demo run (tests/conftest.py ``demo_run``)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
GUIDE = (ROOT / "docs" / "first-hour.md").read_text()
README = (ROOT / "README.md").read_text()
#: the guide's commands, in the order this test runs them
ORDER = ["prefstream demo", "prefstream status", "prefstream worker",
         "cd prefstream-data && duckdb -readonly prefstream.duckdb", "prefstream trainer --once",
         "prefstream score"]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for b in blocks(text, "bash") for line in b.splitlines()]
    return [line for line in lines if line.startswith(("prefstream", "cd "))]


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180
        ) -> subprocess.CompletedProcess[str]:
    prog = [sys.executable, "-m", "prefstream.cli"] if args[0] == "prefstream" else []
    return subprocess.run(prog + args[1:] if prog else args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def duckdb_1x() -> str:
    """The DuckDB 1.x CLI the dev extra installs (``duckdb-cli<2``) beside this Python."""
    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    assert cli, "duckdb-cli (a dev dependency) is not installed: make install"
    version = subprocess.run([cli, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("v1."), version.stdout
    return cli


def test_the_guide_lists_the_commands_in_this_order() -> None:
    found = commands(GUIDE)
    positions = [next(i for i, c in enumerate(found) if c.startswith(o)) for o in ORDER]
    assert positions == sorted(positions), found


def test_first_hour(demo_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, data_dir, env = demo_run["cwd"], demo_run["data_dir"], demo_run["env"]
    # demo: the default data dir, said plainly, and what to try next
    training = demo_run["summary"]["training"]
    assert data_dir.is_dir() and training["promoted"], training
    assert f"demo: data in {data_dir}" in demo_run["stderr"] and "Next:" in demo_run["stderr"]
    assert "LOAD REPORT" not in demo_run["stderr"] and "MISSING" not in demo_run["stderr"]
    assert "group_id is None" not in demo_run["stderr"]  # kafka-python's, for end offsets
    assert "<root>" not in demo_run["summary"]["dead_letter_reasons"]

    status = run(["prefstream", "status"], cwd, env)
    assert status.returncode == 0, status.stderr
    assert f"data dir     {data_dir}" in status.stdout and "sealed" in status.stdout

    produce_through_a_worker(cwd, env)

    query = subprocess.run([duckdb_1x(), "-readonly", "-csv", "prefstream.duckdb",
                            "SELECT rule, count(*) FROM pairs GROUP BY 1 ORDER BY 1"],
                           cwd=data_dir, capture_output=True, text=True, timeout=60)
    assert query.returncode == 0, query.stderr
    counts = dict(line.split(",") for line in query.stdout.splitlines()[1:])
    assert {k: int(v) for k, v in counts.items()} == demo_run["summary"]["pairs_by_rule"]

    trainer = run(["prefstream", "trainer", "--once"], cwd, env)
    assert trainer.returncode == 0, trainer.stderr[-2000:]
    assert "no new sealed partitions" in trainer.stdout

    score = run(["prefstream", "score", "--prompt", "How do I reverse a list?",
                 "--answer", "Use reversed(xs)."], cwd, env)
    assert score.returncode == 0, score.stderr[-2000:]

    [snippet] = blocks(GUIDE, "python")
    printed = io.StringIO()
    monkeypatch.chdir(cwd)
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "docs/first-hour.md", "exec"), {})
    assert abs(float(printed.getvalue()) - float(score.stdout)) < 1e-4
    card = (data_dir / "models" / "current" / "README.md").read_text()
    assert "text pair" in card and demo_run["summary"]["training"]["version"] in card


def produce_through_a_worker(cwd: Path, env: dict[str, str]) -> None:
    """``prefstream worker`` (embedded broker, address printed), then the README's producer as
    written, against the printed address (localhost:9092 unless that port was taken here)."""
    worker = subprocess.Popen([sys.executable, "-m", "prefstream.cli", "worker"], cwd=cwd,
                              env={**env, "PREFSTREAM_METRICS_PORT": "0"}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert worker.stdout is not None
        banner = worker.stdout.readline()
        found = re.search(r"listening on (localhost:\d+)", banner)
        assert found, banner
        section = README.split("## Producing events", 1)[1]
        [code] = blocks(section, "python")
        names: dict[str, Any] = {}
        exec(compile(code.replace("localhost:9092", found.group(1)), "README", "exec"), names)
        # acknowledged by the broker: 2 impressions, the copy, the session end
        assert (names["producer"].sent, names["producer"].failed) == (4, 0)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_a_copied_data_dir_reads_its_own_files(demo_run: dict[str, Any], tmp_path: Path
                                               ) -> None:
    """The views name files relative to the data dir: a copy with one table emptied reads the
    copy (the original's views held absolute paths and read the original)."""
    copy = tmp_path / "copy"
    shutil.copytree(demo_run["data_dir"], copy, symlinks=True,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    for hour in (copy / "ties").iterdir():
        if hour.name != "_schema":
            shutil.rmtree(hour)
    cli = duckdb_1x()
    query = "SELECT count(*) FROM ties"
    original = subprocess.run([cli, "-readonly", "-csv", "-noheader", "prefstream.duckdb", query],
                              cwd=demo_run["data_dir"], capture_output=True, text=True)
    copied = subprocess.run([cli, "-readonly", "-csv", "-noheader", "prefstream.duckdb", query],
                            cwd=copy, capture_output=True, text=True)
    assert int(original.stdout) == demo_run["summary"]["ties"] > 0
    assert (copied.returncode, copied.stdout.strip()) == (0, "0"), copied.stderr


def test_ctrl_c_during_ingest_stops_the_demo_within_seconds(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFSTREAM_")}
    demo = subprocess.Popen([sys.executable, "-m", "prefstream.cli", "demo", "--events", "20000",
                             "--data-dir", str(tmp_path / "d")], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert demo.stderr is not None
    for line in demo.stderr:  # the worker is started right after the topics are
        if "created topics" in line:
            break
    time.sleep(1.0)
    sent = time.monotonic()
    demo.send_signal(signal.SIGINT)
    rc = demo.wait(timeout=60)
    took = time.monotonic() - sent
    rest = demo.stderr.read()
    assert rc == 130, rest
    assert took < 8, f"took {took:.1f}s to stop"
    assert "Traceback" not in rest
    assert not (tmp_path / "d" / "models").exists()


def test_ctrl_c_during_training_stops_the_demo_and_promotes_nothing(
        demo_run: dict[str, Any], tmp_path: Path) -> None:
    """The demo's trainer step under a real SIGINT (the demo's own handler, in this process):
    it stops at the next stage or step, within seconds, and writes no version."""
    import threading
    from datetime import datetime

    from prefstream.sim.demo import _train
    from prefstream.sim.traffic import TrafficConfig, generate_traffic

    copy = tmp_path / "copy"
    shutil.copytree(demo_run["data_dir"], copy, symlinks=True,
                    ignore=shutil.ignore_patterns("models"))
    t = demo_run["summary"]["traffic"]
    traffic = generate_traffic(TrafficConfig(n_events=t["events"], seed=t["seed"],
                                             end=datetime.fromisoformat(t["end"])))
    sent: list[float] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(1.5, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(copy, traffic)
    finally:
        timer.cancel()
    assert sent and time.monotonic() - sent[0] < 10
    models = copy / "models"  # absent when the interrupt came before training made it
    assert not models.exists() or not [
        p for p in models.iterdir() if p.name.startswith(("v0", "current"))]
