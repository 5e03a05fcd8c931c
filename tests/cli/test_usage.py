"""Bad usage of every command: one line on stderr naming the problem and the flag or variable
to change, exit code 2, no traceback, nothing created (docs/first-hour.md, "Bad usage")."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefstream.cli import main
from prefstream.storage.catalog import ensure_catalog
from prefstream.storage.files import init_data_dir
from prefstream.streams.broker import free_port


def usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``prefstream argv`` in this process; the one stderr line (exit 2 asserted)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, no PREFSTREAM_* variables."""
    for name in [n for n in os.environ if n.startswith("PREFSTREAM_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("argv", [
    ["export", "--data-dir", "notes", "--out", "pairs.jsonl"],
    ["trainer", "--once", "--data-dir", "notes"],
    ["score", "--data-dir", "notes", "--prompt", "p", "--answer", "a"],
    ["rerank", "--data-dir", "notes", "--prompt", "p", "a", "b"],
    ["status", "--data-dir", "notes"],
    ["report", "--data-dir", "notes"],
])
def test_a_folder_that_is_not_a_data_dir(argv: list[str], here: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (here / "notes").mkdir()
    (here / "notes" / "todo.txt").write_text("x")
    err = usage(argv, capsys)
    assert "notes is not a prefstream data dir" in err and "--data-dir" in err
    assert entries(here / "notes") == ["todo.txt"] and entries(here) == ["notes"]


@pytest.mark.parametrize("argv", [
    ["score", "--data-dir", "missing", "--prompt", "p", "--answer", "a"],
    ["rerank", "--data-dir", "missing", "--prompt", "p", "a"],
])
def test_a_missing_data_dir(argv: list[str], here: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert "missing is not a prefstream data dir (no such folder)" in usage(argv, capsys)
    assert entries(here) == []


@pytest.mark.parametrize("events", ["0", "-3", "many"])
def test_demo_events_must_be_positive(events: str, here: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert "--events" in usage(["demo", "--events", events], capsys)
    assert entries(here) == []


@pytest.mark.parametrize(("bootstrap", "why"), [
    ("host:abc", "port 'abc' is not a number"), ("host", "is not host:port"),
    ("h:9092,h:70000", "port '70000'"),
])
def test_worker_bootstrap_must_be_host_port(bootstrap: str, why: str, here: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    err = usage(["worker", "--kafka-bootstrap", bootstrap], capsys)
    assert why in err and "--kafka-bootstrap or PREFSTREAM_KAFKA_BOOTSTRAP" in err
    assert entries(here) == []


def test_an_unreachable_bootstrap_fails_fast_and_quietly(here: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    err = usage(["worker", "--kafka-bootstrap", address], capsys)
    assert time.monotonic() - started < 10
    assert f"no Kafka broker answers at {address}" in err and "--kafka-bootstrap" in err
    assert entries(here) == []


@pytest.fixture
def read_only_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A real data dir on a read-only mount (root ignores permission bits, not a mount)."""
    data_dir = tmp_path / "ro"
    init_data_dir(data_dir)
    assert ensure_catalog(data_dir)
    if os.geteuid() != 0:
        data_dir.chmod(0o555)
        yield data_dir
        data_dir.chmod(0o755)
        return
    mount = ["mount", "--bind", str(data_dir), str(data_dir)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("root without mount rights: no read-only folder to test with")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(data_dir)], check=True,
                       capture_output=True)
        yield data_dir
    finally:
        subprocess.run(["umount", str(data_dir)], check=True)


@pytest.mark.parametrize("argv", [["report"], ["trainer", "--once"], ["worker"], ["demo"]])
def test_a_read_only_data_dir(argv: list[str], read_only_data_dir: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    before = entries(read_only_data_dir)
    err = usage([*argv, "--data-dir", str(read_only_data_dir)], capsys)
    assert f"{read_only_data_dir} is read-only" in err and "--data-dir" in err
    assert "locked" not in err
    assert entries(read_only_data_dir) == before


def test_an_unknown_log_format(here: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PREFSTREAM_LOG_FORMAT", "xml")
    assert "PREFSTREAM_LOG_FORMAT='xml' is not a log format" in usage(["status"], capsys)


def test_the_demo_never_overwrites_data_it_did_not_write(here: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    init_data_dir(here / "prefstream-data")  # a worker's, say
    before = entries(here / "prefstream-data")
    err = usage(["demo"], capsys)
    assert "prefstream-data already holds data the demo did not write" in err
    assert entries(here / "prefstream-data") == before


def test_the_demo_replaces_its_own_previous_data(tmp_path: Path) -> None:
    from prefstream.sim.demo import DEMO_MARK, fresh_demo_dir

    old = tmp_path / "prefstream-data"
    init_data_dir(old)
    (old / DEMO_MARK).touch()
    fresh_demo_dir(old)
    assert not old.exists()


def options(command: str) -> set[str]:
    """The flags ``prefstream command`` has."""
    from prefstream.cli import build_parser

    [sub] = [a for a in build_parser()._actions if a.dest == "command"]
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


@pytest.mark.parametrize(("argv", "variable", "value", "named"), [
    (["worker"], "PREFSTREAM_PIPELINE_PROCESS", "maybe",
     "pipeline_process (PREFSTREAM_PIPELINE_PROCESS)"),  # a setting without a flag
    (["demo"], "PREFSTREAM_PIPELINE_PROCESS", "maybe",
     "pipeline_process (PREFSTREAM_PIPELINE_PROCESS)"),
    (["worker"], "PREFSTREAM_PARTITIONS", "0",
     "partitions (--partitions or PREFSTREAM_PARTITIONS)"),
    (["worker"], "PREFSTREAM_RULES__GAP_S", "x", "rules__gap_s (PREFSTREAM_RULES__GAP_S)"),
    (["worker"], "PREFSTREAM_RULES__PARTITION_HOURS", "5",  # a check across fields
     "rules.partition_hours must divide 24, got 5 (PREFSTREAM_RULES__PARTITION_HOURS)"),
    (["worker"], "PREFSTREAM_KAFKA_SECURITY_PROTOCOL", "SSL", "needs PREFSTREAM_KAFKA_BOOTSTRAP"),
])
def test_a_bad_setting_names_its_variable_and_no_flag_the_command_lacks(
        argv: list[str], variable: str, value: str, named: str, here: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(variable, value)
    err = usage(argv, capsys)
    assert named in err
    assert set(re.findall(r"--[a-z][a-z-]*", err)) <= options(argv[0]), err
    assert "PREFSTREAM_SETTINGS" not in err and entries(here) == []


def test_a_trainer_config_check_across_fields_names_no_empty_flag(
        here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init_data_dir(here / "prefstream-data")
    err = usage(["trainer", "--once", "--epochs", "0", "--head-epochs", "0"], capsys)
    assert "epochs and head_epochs are both 0" in err and "(-- or" not in err


def test_an_empty_data_dir_variable_is_the_default_for_every_command(
        here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PREFSTREAM_DATA_DIR=`` (an unset variable in a script): the worker's settings and
    the other commands agree on ``prefstream-data``, never the working directory."""
    from prefstream.datadir import default_data_dir
    from prefstream.settings import Settings

    monkeypatch.setenv("PREFSTREAM_DATA_DIR", "")
    assert Settings().data_dir == default_data_dir() == Path("prefstream-data")
