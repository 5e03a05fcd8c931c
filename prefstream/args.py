"""Command-line plumbing the commands share: argparse types and the settings flags (one flag per
``Settings`` field, its help naming the variable). Below every command module, so a command
never imports ``prefstream.cli`` (which imports the commands)."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Sequence
from typing import Any

from pydantic import ValidationError


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def describe_validation(exc: ValidationError, flags: Collection[str] = (), *,
                        prefix: str = "PREFSTREAM_", what: str = "configuration") -> str:
    """A settings error on one line: each field with its variable, and its flag only where the
    command has one (``flags``: the fields given a flag), so the line never names a flag that
    does not exist. A check across fields (no field of its own) is its message alone: the
    message names the variables."""
    parts = []
    for err in exc.errors(include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            parts.append(message)
            continue
        name = "__".join(str(p) for p in err["loc"])
        flag = f"--{name.replace('_', '-')} or " if name in flags else ""
        parts.append(f"{name} ({flag}{prefix}{name.upper()}): {message}")
    return f"invalid {what}: " + "; ".join(parts)


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """One flag per settings field, help text generated from the model (``[env: ...]``)."""
    from prefstream.settings import Settings

    for name in names:
        field = Settings.model_fields[name]
        default = field.default if field.default is not None else "embedded broker"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(),
            help=f"{field.description or ''} [env: PREFSTREAM_{name.upper()}] "
                 f"[default: {default}]".strip(),
        )


def settings_from(args: argparse.Namespace, names: Sequence[str], **overrides: Any) -> Any:
    """Settings from env vars, overridden by the flags given on the command line."""
    from prefstream.settings import Settings

    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return Settings(**{**overrides, **given})
