"""Crash safety of the trainer: ``prefstream trainer --once`` killed at known points.

Each run is its own process running ``prefstream.cli.main`` (what the console script calls) on a
real data dir with the tiny backbone. The processes are forked from a multiprocessing forkserver
that imported the trainer once: a fresh interpreter spends ~7 s importing torch and
transformers, a forked one none. ``PREFSTREAM_TRAINER_PAUSE_AT`` (``trainer.control``) makes a
run wait at a known point, where the test kills it with SIGKILL (or stops it with SIGTERM); it
then checks what is on disk and that the next ``--once`` run recovers.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
from trainer_fixtures import build_data_dir, tiny_backbone, tiny_config

from prefstream.storage.catalog import connect_readonly, ensure_catalog
from prefstream.trainer.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from prefstream.trainer.config import TrainConfig
from prefstream.trainer.control import PAUSE_ENV
from prefstream.trainer.registry import (
    METADATA,
    VERSION_RE,
    current_version,
    list_versions,
    models_dir,
    read_metadata,
    registry_lock,
)

pytestmark = pytest.mark.slow

#: what a kill at each pause point leaves in ``models/`` besides ``.lock`` (a fresh data dir)
LEFT_BY_KILL = {
    "load": [],
    "train": [],
    "audit": [],
    "write": [r"\.v0001\.[0-9a-f]{8}\.tmp"],  # complete but never renamed: not a version
    "promote": [r"\.current\.next", "v0001"],  # in place, promotion staged, not switched
}


def _cli(argv: list[str], pause_at: str, out: Path, err: Path) -> None:
    """In the child process: the console script's ``main``, stdout and stderr to files."""
    os.environ[PAUSE_ENV] = pause_at
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    from prefstream.cli import main

    sys.exit(main(argv))


@dataclass
class Run:
    process: BaseProcess
    out: Path
    err: Path

    def log(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process.is_alive(), f"exited {self.process.exitcode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.log()}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120.0) -> int | None:
        self.process.join(timeout)
        assert not self.process.is_alive(), f"still running after {timeout} s:\n{self.log()}"
        return self.process.exitcode

    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


Launch = Callable[..., Run]


def tiny_flags() -> list[str]:
    """``tiny_config()`` as ``prefstream trainer`` flags (every field off its default); no
    explicit labels here, so promotion is the loud opt-in ``--allow-unaudited``."""
    flags = []
    for name, value in tiny_config(allow_unaudited=True).model_dump().items():
        if value != TrainConfig.model_fields[name].default:
            flag = f"--{name.replace('_', '-')}"
            flags += [flag] if isinstance(value, bool) else [flag, str(value)]
    return flags


@pytest.fixture(scope="module")
def forkserver() -> Iterator[BaseContext]:
    """A forkserver that imports the trainer while this process builds the tiny backbone."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["prefstream.cli", "prefstream.trainer.service"])
    multiprocessing.forkserver.ensure_running()
    tiny_backbone()
    yield context
    # it holds torch (~500 MB): stop it (the stdlib's own tests do so) instead of keeping it
    # for the rest of the session
    multiprocessing.forkserver._forkserver._stop()


@pytest.fixture
def launch(forkserver: BaseContext, tmp_path: Path) -> Iterator[Launch]:
    """``launch(data_dir, pause_at="")`` starts ``prefstream trainer --data-dir D --once``."""
    runs: list[Run] = []

    def start(data_dir: Path, pause_at: str = "") -> Run:
        name = f"run{len(runs)}"
        argv = ["trainer", "--data-dir", str(data_dir), "--once", *tiny_flags()]
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        process = forkserver.Process(target=_cli, args=(argv, pause_at, out, err), name=name)
        process.start()
        runs.append(Run(process, out, err))
        return runs[-1]

    yield start
    for run in runs:  # a failed test must not leave a paused trainer behind
        if run.process.is_alive():
            run.process.kill()
            run.process.join()


def data_dir_with_catalog(tmp_path: Path) -> Path:
    """Four sealed hours, and the catalog views a worker creates when it starts."""
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=4, unsealed=False)
    assert ensure_catalog(data_dir)
    return data_dir


def registry_state(data_dir: Path) -> dict[str, Any]:
    """What ``models/`` holds, after checking the invariants a crash must never break."""
    root = models_dir(data_dir)
    entries = sorted(p.name for p in root.iterdir())
    versions, current = list_versions(data_dir), current_version(data_dir)
    for name in entries:
        if VERSION_RE.match(name):  # every version folder is complete
            assert name in versions and read_metadata(data_dir, name)["version"] == name
            _assert_loads(root / name)
    assert current is None or current in versions
    with registry_lock(data_dir):  # free: a killed holder's flock died with it
        pass
    con = connect_readonly(data_dir)
    try:
        view = con.execute("SELECT version, is_current FROM models ORDER BY version").fetchall()
    finally:
        con.close()
    assert view == [(v, v == current) for v in versions]
    return {"entries": [e for e in entries if e != ".lock"], "versions": versions,
            "current": current}


def _assert_loads(folder: Path) -> None:
    """Model weights and tokenizer load as a scalar reward model."""
    from prefstream.trainer.model import load

    model, tokenizer = load(folder)
    assert model.config.num_labels == 1 and tokenizer("a b")["input_ids"]


def _matches(patterns: list[str], names: list[str]) -> bool:
    return len(patterns) == len(names) and all(
        re.fullmatch(p, n) for p, n in zip(sorted(patterns), sorted(names), strict=True))


@pytest.mark.parametrize("point", list(LEFT_BY_KILL))
def test_a_run_killed_at_any_point_leaves_no_half_version_and_the_next_run_recovers(
        point: str, launch: Launch, tmp_path: Path) -> None:
    data_dir = data_dir_with_catalog(tmp_path)
    killed = launch(data_dir, pause_at=point)
    killed.wait_for(f"paused at {point}")
    os.kill(killed.process.pid, signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    after_kill = registry_state(data_dir)
    assert after_kill["current"] is None
    assert _matches(LEFT_BY_KILL[point], after_kill["entries"]), after_kill
    if point == "write":
        tmp = models_dir(data_dir) / after_kill["entries"][0]
        assert (tmp / METADATA).exists()  # killed during registration, not before it
    staged = point == "promote"
    first = read_metadata(data_dir, "v0001") if staged else None

    again = launch(data_dir)
    assert again.finish() == EXIT_OK, again.log()
    recovered = registry_state(data_dir)
    assert recovered == {"entries": ["current", "v0001"], "versions": ["v0001"],
                         "current": "v0001"}
    if staged:  # the killed run's version is promoted as it was, not trained again
        assert again.summary() == {"status": "no new sealed partitions"}
        assert read_metadata(data_dir, "v0001") == first
        assert "finished the promotion of v0001 left by a killed run" in again.log()
    else:
        assert again.summary()["version"] == "v0001" and again.summary()["promoted"]
        assert ("removing half-written model version" in again.log()) == (point == "write")


def test_sigterm_during_training_exits_cleanly_without_a_version(launch: Launch,
                                                                 tmp_path: Path) -> None:
    data_dir = data_dir_with_catalog(tmp_path)
    run = launch(data_dir, pause_at="train")
    run.wait_for("paused at train")
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.finish() == EXIT_INTERRUPTED
    assert "trainer: stop requested during the head stage" in run.log()
    assert not run.out.read_text()
    assert registry_state(data_dir) == {"entries": [], "versions": [], "current": None}


def test_sigterm_during_registration_finishes_it(launch: Launch, tmp_path: Path) -> None:
    data_dir = data_dir_with_catalog(tmp_path)
    run = launch(data_dir, pause_at="write")
    run.wait_for("paused at write")
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.finish() == EXIT_OK, run.log()
    assert run.summary()["version"] == "v0001"
    assert registry_state(data_dir) == {"entries": ["current", "v0001"], "versions": ["v0001"],
                                        "current": "v0001"}


def test_an_unknown_pause_point_is_a_usage_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import prefstream.trainer.cli

    parser = argparse.ArgumentParser()
    prefstream.trainer.cli.register(parser.add_subparsers())
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=1, unsealed=False)
    args = parser.parse_args(["trainer", "--data-dir", str(data_dir), "--once"])
    monkeypatch.setenv(PAUSE_ENV, "train,nap")
    assert args.func(args) == EXIT_USAGE
    assert "unknown pause point(s) nap (known: load, train, audit" in capsys.readouterr().err
    assert not models_dir(data_dir).exists()
