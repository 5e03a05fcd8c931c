"""The CLI registers its subcommands explicitly: the ones ``prefstream.cli`` builds, plus those
its listed ``COMMANDS`` modules add through ``register(subparsers)``, and no other."""

from __future__ import annotations

import argparse

from prefstream.cli import COMMANDS, build_parser


def test_the_cli_registers_exactly_its_listed_commands() -> None:
    """Its own three, and those its listed modules add through ``register``: no other."""
    sub = argparse.ArgumentParser().add_subparsers()
    for module in COMMANDS:
        module.register(sub)
    [built] = [a for a in build_parser()._actions if a.dest == "command"]
    assert set(built.choices) == {"schema", "worker", "demo", *sub.choices}
    assert {"trainer", "export", "simulate", "status", "report"} <= set(sub.choices)
