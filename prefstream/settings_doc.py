"""The configuration tables of docs/configuration.md, generated from the settings models.

One table per settings model: the worker's ``Settings`` (``PREFSTREAM_<FIELD>``, nested models
such as the pair rules as ``PREFSTREAM_RULES__<FIELD>``), the trainer's ``TrainConfig``
(``PREFSTREAM_TRAIN_<FIELD>``) and every ``BaseSettings`` model a command module defines (the
simulator's ``PREFSTREAM_SIMULATE_<FIELD>``...). One row per environment variable: the flags whose
help names it (``[env: VARIABLE]``), the default, the description and the allowed range.

    python -m prefstream.settings_doc                     # print the tables
    python -m prefstream.settings_doc --write docs/configuration.md   # rewrite between the markers
    python -m prefstream.settings_doc --check docs/configuration.md   # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
#: modules holding settings models, in table order; then those of ``cli.COMMANDS``
SETTINGS_MODULES = ("prefstream.settings", "prefstream.trainer.config")
ENV_IN_HELP = re.compile(r"\[env: (PREFSTREAM_\w+)\]")
BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


@dataclass(frozen=True)
class Row:
    model: str
    variable: str
    flags: tuple[str, ...]
    default: str
    description: str


def models() -> list[type[BaseSettings]]:
    """Every ``BaseSettings`` class defined in a settings or command module, in table order."""
    from prefstream.cli import COMMANDS

    found: list[type[BaseSettings]] = []
    for module in (*map(importlib.import_module, SETTINGS_MODULES), *COMMANDS):
        found += [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, BaseSettings)
                  and obj is not BaseSettings and obj.__module__ == module.__name__
                  and obj not in found]
    return found


def variables(model: type[BaseModel], prefix: str,
              delimiter: str | None) -> Iterator[tuple[str, FieldInfo]]:
    """``(VARIABLE, field)`` for every field; nested models expand with ``delimiter``."""
    for name, info in model.model_fields.items():
        sub = info.annotation
        if delimiter and isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from variables(sub, f"{prefix}{name.upper()}{delimiter}", None)
        else:
            yield f"{prefix}{name.upper()}", info


def model_variables(model: type[BaseSettings]) -> dict[str, FieldInfo]:
    config = model.model_config
    return dict(variables(model, config.get("env_prefix", ""), config.get("env_nested_delimiter")))


def all_variables() -> dict[str, FieldInfo]:
    """Every environment variable the settings models read, in table order."""
    return {var: info for model in models() for var, info in model_variables(model).items()}


def env_flags(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """``VARIABLE -> ["worker --flag", ...]`` from the ``[env: VARIABLE]`` in each flag's help."""
    found: dict[str, list[str]] = {}
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command, sub in action.choices.items():
            for opt in sub._actions:
                for var in ENV_IN_HELP.findall(opt.help or ""):
                    found.setdefault(var, []).append(f"{command} {opt.option_strings[-1]}")
    return found


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{value}`"


def _allowed(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        parts += [f"{sym} {getattr(meta, attr)}" for attr, sym in BOUNDS
                  if getattr(meta, attr, None) is not None]
        if getattr(meta, "pattern", None):
            parts.append(f"matches `{meta.pattern}`")
    return f"Allowed: {', '.join(parts)}." if parts else ""


def rows() -> list[Row]:
    from prefstream.cli import build_parser

    flags = env_flags(build_parser())
    return [Row(model.__name__, var, tuple(flags.get(var, ())), _default(info),
                " ".join(p for p in ((info.description or "").strip(), _allowed(info)) if p))
            for model in models() for var, info in model_variables(model).items()]


def _cell(text: str) -> str:
    """Pipes would split the cell; ``<data-dir>`` would vanish as an unknown HTML tag."""
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text.replace("|", "\\|").replace("\n", " "))


def _flags(flags: Sequence[str]) -> str:
    """``worker --x`` alone; one option on several commands: ``--x`` (worker, trainer)."""
    by_option: dict[str, list[str]] = {}
    for flag in flags:
        command, option = flag.split(" ", 1)
        by_option.setdefault(option, []).append(command)
    return ", ".join(f"`{cmds[0]} {opt}`" if len(cmds) == 1 else f"`{opt}` ({', '.join(cmds)})"
                     for opt, cmds in by_option.items()) or "env only"


def render(table_rows: Sequence[Row]) -> str:
    """One captioned table per model."""
    out: list[str] = []
    for model in dict.fromkeys(r.model for r in table_rows):
        if out:
            out.append("")
        out += [f"**`{model}`**", "", "| variable | flag | default | description |",
                "|---|---|---|---|"]
        out += [f"| `{r.variable}` | {_cell(_flags(r.flags))} | {_cell(r.default)} | "
                f"{_cell(r.description)} |" for r in table_rows if r.model == model]
    return "\n".join(out) + "\n"


def replace_section(text: str, table: str) -> str:
    """``text`` with everything between the markers replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} markers in the text")
    return f"{text[:start]}{BEGIN}\n{table}{text[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefstream.settings_doc",
                                     description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="DOC", help="rewrite its tables")
    group.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if they are stale")
    args = parser.parse_args(argv)
    table = render(rows())
    path = args.write or args.check
    if path is None:
        print(table, end="")
        return 0
    text = path.read_text()
    try:
        new = replace_section(text, table)
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path}: the configuration tables are stale; run python -m "
                  f"prefstream.settings_doc --write {path}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
