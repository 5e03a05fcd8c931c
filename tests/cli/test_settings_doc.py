"""The docs stay true: the generated configuration table (docs/configuration.md) is current,
and the README's producer section's code runs and means what its text says.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from factories import read_records
from pydantic_settings import BaseSettings

from prefstream.cli import COMMAND_MODULES, SETTINGS_FLAGS, build_parser
from prefstream.schemas.events import EVENT_ADAPTER, EVENT_TYPES
from prefstream.schemas.records import ClosedSession, Session, SessionEvent
from prefstream.settings import Settings
from prefstream.settings_doc import (
    BEGIN,
    END,
    _cell,
    all_variables,
    env_flags,
    main,
    models,
    render,
    replace_section,
    rows,
)
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.core.pairing import (
    REFORMULATE_SIM_DISCOUNT,
    REFUSAL_REASONS,
    RULES,
    RuleConfig,
    session_to_pairs,
)
from prefstream.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
PRODUCING = ROOT / "docs" / "producing.md"  # the wire contract, moved from the README


def section(title: str) -> str:
    text = README.read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


# --- the configuration table -----------------------------------------------------------------

def test_readme_table_is_current() -> None:
    text = CONFIGURATION.read_text()
    assert replace_section(text, render(rows())) == text, (
        "docs/configuration.md's configuration table is stale: run "
        "python -m prefstream.settings_doc --write docs/configuration.md")
    assert text.index(BEGIN) > text.index("# Configuration\n")


def test_every_field_of_every_settings_model_has_a_row() -> None:
    names = [r.variable for r in rows()]
    assert len(names) == len(set(names))
    nested = {f"PREFSTREAM_RULES__{n.upper()}" for n in RuleConfig.model_fields}
    top = {f"PREFSTREAM_{n.upper()}" for n in Settings.model_fields if n != "rules"}
    train = {f"PREFSTREAM_TRAIN_{n.upper()}" for n in TrainConfig.model_fields}
    assert nested | top | train <= set(names)
    assert [m.__name__ for m in models()][:2] == ["Settings", "TrainConfig"]


def test_settings_models_of_command_modules_are_found() -> None:
    """A command module's own ``BaseSettings`` (the simulator's...) gets a table too."""
    found = set(models())
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseSettings) and \
                    obj.__module__ == name:
                assert obj in found, obj


def test_flags_are_the_cli_flags_that_name_the_variable() -> None:
    table = {r.variable: r.flags for r in rows()}
    for name in SETTINGS_FLAGS:
        assert f"worker --{name.replace('_', '-')}" in table[f"PREFSTREAM_{name.upper()}"]
    for name in TrainConfig.model_fields:
        assert table[f"PREFSTREAM_TRAIN_{name.upper()}"][0] == f"trainer --{name.replace('_', '-')}"
    assert {"worker --data-dir", "trainer --data-dir", "status --data-dir"} <= set(
        table["PREFSTREAM_DATA_DIR"])
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for flags in table.values():
        for flag in flags:  # every flag named exists on its subcommand
            command, option = flag.split()
            assert option in subcommands.choices[command]._option_string_actions, flag


def test_every_env_named_in_any_help_is_a_documented_variable() -> None:
    known = all_variables()
    for var, flags in env_flags(build_parser()).items():
        assert var in known, f"{flags} claim [env: {var}], which no settings model reads"


@pytest.mark.parametrize(("variable", "value", "read"), [
    ("PREFSTREAM_GAP_S", "60", lambda: Settings().gap_s == 60),
    ("PREFSTREAM_RULES__MIN_DWELL_MS", "1234", lambda: Settings().rules.min_dwell_ms == 1234),
    ("PREFSTREAM_TRAIN_MAX_LENGTH", "300", lambda: TrainConfig().max_length == 300),
])
def test_documented_variables_are_read_by_the_models(monkeypatch: pytest.MonkeyPatch,
                                                      variable: str, value: str, read) -> None:
    assert variable in all_variables()
    monkeypatch.setenv(variable, value)
    assert read()


def test_defaults_and_ranges_come_from_the_fields() -> None:
    table = {r.variable: r for r in rows()}
    assert table["PREFSTREAM_PARTITIONS"].default == "`4`"
    assert "Allowed: >= 1, <= 256." in table["PREFSTREAM_PARTITIONS"].description
    assert table["PREFSTREAM_KAFKA_BOOTSTRAP"].default == "unset"
    assert table["PREFSTREAM_RULES__THUMBS_CONFIDENCE"].flags == ()
    lines = render(rows()).splitlines()
    assert "`--data-dir` (worker, demo, trainer," in next(x for x in lines if "_DATA_DIR`" in x)
    assert "| `worker --gap-s` |" in next(x for x in lines if "PREFSTREAM_GAP_S`" in x)
    assert "| env only |" in next(x for x in lines if "RULES__THUMBS_CONFIDENCE" in x)
    line = next(x for x in render(rows()).splitlines() if "PREFSTREAM_TRAIN_DEVICE" in x)
    assert r"auto\|cpu" in line  # pipes escaped: the row keeps its four cells
    assert len(re.findall(r"(?<!\\)\|", line)) == 5
    assert _cell("unset = <data-dir>/x; <= 1, < 1") == "unset = &lt;data-dir>/x; <= 1, < 1"


def test_write_replaces_only_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(f"# t\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    assert main(["--check", str(doc)]) == 1
    assert main(["--write", str(doc)]) == 0
    assert doc.read_text() == f"# t\n\nbefore\n\n{BEGIN}\n{render(rows())}{END}\n\nafter\n"
    assert main(["--check", str(doc)]) == 0
    doc.write_text("no markers\n")
    assert main(["--write", str(doc)]) == 2 and doc.read_text() == "no markers\n"


def test_module_prints_the_table() -> None:
    done = subprocess.run([sys.executable, "-m", "prefstream.settings_doc"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("PREFSTREAM_")})
    assert done.returncode == 0, done.stderr
    assert done.stdout == render(rows())


# --- producing events ------------------------------------------------------------------------

@pytest.mark.broker
def test_readme_producer_runs_and_yields_the_pair_it_promises(broker: EmbeddedBroker) -> None:
    [code] = code_blocks(section("Producing events"), "python")
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    assert code.count('"localhost:9092"') == 1
    exec(compile(code.replace('"localhost:9092"', repr(broker.bootstrap)), "README", "exec"), {})

    records = read_records(broker.bootstrap, "prefstream-events")
    assert {r.key for r in records} == {b"s1"}
    events = [EVENT_ADAPTER.validate_json(r.value) for r in records]
    assert [e.type for e in events] == ["impression", "impression", "copy", "session_end"]
    first = min(e.ts for e in events)
    session = Session(session_id="s1", user_id="u1", start=first, last=max(e.ts for e in events),
                      events=tuple(SessionEvent(offset=r.offset, event=e)
                                   for r, e in zip(records, events, strict=True)))
    result = session_to_pairs(ClosedSession(session=session, reason="session_end"), RuleConfig())
    [pair] = result.pairs
    assert (pair.rule, pair.chosen, pair.rejected) == (
        "copy_over_skipped", "Use reversed(xs).", "Use a for loop.")
    assert result.refusals == ()


def test_readme_json_example_is_a_valid_event() -> None:
    [example] = code_blocks(PRODUCING.read_text(), "json")
    event = EVENT_ADAPTER.validate_json(example)
    assert event.type == "copy" and event.ts.tzinfo is not None
    assert set(json.loads(example)) == set(type(event).model_fields)


def test_readme_schema_command_is_the_cli() -> None:
    assert "`prefstream schema > feedback-event.schema.json`" in PRODUCING.read_text()
    assert build_parser().parse_args(["schema"]).command == "schema"


def test_readme_event_table_covers_every_type_rule_and_reason() -> None:
    text = PRODUCING.read_text()
    table = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {t for line in table for t in re.findall(r"`(\w+)`", line.split("|")[1])}
    assert documented == {m.model_fields["type"].default for m in EVENT_TYPES}
    for name in (*RULES, *REFUSAL_REASONS):
        assert f"`{name}`" in text, name


def test_readme_event_table_numbers_are_the_rule_defaults() -> None:
    text = " ".join(PRODUCING.read_text().split())
    r = RuleConfig()
    for rule, conf in (("thumbs", r.thumbs_confidence), ("copy_over_skipped", r.copy_confidence),
                       ("click_over_skipped_above", r.click_confidence),
                       ("regenerate_accept", r.regenerate_confidence),
                       ("edit", r.edit_confidence),
                       ("reformulate_same_intent", r.reformulate_confidence)):
        assert f"(`{rule}`, {conf}" in text, rule
    assert f"`min_dwell_ms` ({r.min_dwell_ms:,})" in text
    assert f"`reformulate_min_similarity` {r.reformulate_min_similarity}" in text
    assert f"`reformulate_max_gap_s` {r.reformulate_max_gap_s:g} s" in text
    assert f"`min_confidence` ({r.min_confidence})" in text
    assert f"(1 - {REFORMULATE_SIM_DISCOUNT} x (1 - similarity))" in text
