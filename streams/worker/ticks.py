"""Watermark ticks only the workers can make: HMAC-signed control messages.

A tick is a message in the events topic (so a replay meets it where the worker met it, and decides
lateness the same way). Any producer can write to that topic, so a tick is trusted only when it
carries an HMAC-SHA256, under the workers' tick key, of the topic, the Kafka partition it was
sent to and its wall time: a forged or altered one, or one copied to another partition, is
dead-lettered and moves nothing (see ``docs/hostile-input.md``).

The key is ``PREFSTREAM_TICK_KEY`` when set, else a random key kept owner-only in
``<data-dir>/tick.key``, created by the first worker: workers sharing a data dir share it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path

from pydantic import SecretStr, ValidationError

from prefstream.schemas.events import Tick
from prefstream.settings import Settings

TICK_KEY_FILE = "tick.key"
TICK_KEY_BYTES = 32


def _digest(key: bytes, topic: str, partition: int, wall_ms: int) -> str:
    message = f"{topic}\x00{partition}\x00{wall_ms}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_tick(key: bytes, topic: str, partition: int, wall_ms: int) -> bytes:
    """The tick message for one partition of ``topic`` at ``wall_ms``."""
    tick = Tick(wall_ms=wall_ms, partition=partition,
                mac=_digest(key, topic, partition, wall_ms))
    return tick.model_dump_json().encode()


def verify_tick(key: bytes, topic: str, partition: int, raw: bytes) -> tuple[int | None, str]:
    """``(wall_ms, "")`` for a tick a worker signed for this partition; ``(None, reason)``
    otherwise (malformed, unsigned, signed with another key or for another partition)."""
    try:
        tick = Tick.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        return None, f"tick: {loc}: {first['msg']}"
    want = _digest(key, topic, partition, tick.wall_ms)
    if tick.partition != partition or not hmac.compare_digest(want, tick.mac):
        return None, ("tick: not signed by a worker for this partition (forged, altered or "
                      "copied): only events' own times and the workers' ticks move the clock")
    return tick.wall_ms, ""


def tick_key(settings: Settings) -> bytes:
    """The workers' tick key: the setting, else the data dir's key file (created if missing)."""
    if settings.tick_key is not None:
        return settings.tick_key.get_secret_value().encode()
    return _key_file(settings.data_dir / TICK_KEY_FILE)


def with_tick_key_of(settings: Settings, source: Settings) -> Settings:
    """``settings`` trusting the ticks ``source``'s workers signed (a replay of their log
    elsewhere, e.g. a reference run in another data dir)."""
    key = tick_key(source).decode()
    return settings.model_copy(update={"tick_key": SecretStr(key)})


def _key_file(path: Path) -> bytes:
    """Read the key file, or create it owner-only; two workers starting at once agree (the
    file appears whole, under its name, exactly once)."""
    try:
        return path.read_text().strip().encode()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(TICK_KEY_BYTES).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails when another worker created it first: theirs counts
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()
