"""Model versions under ``<data_dir>/models/`` and the ``models`` view of the DuckDB catalog.

Layout::

    models/v0001/               save_pretrained (model + tokenizer) + metadata.json + README.md
    models/current -> v0001     symlink to the promoted version, replaced atomically on promotion:
                                ``from_pretrained("<data-dir>/models/current")`` loads it
    models/.v0002.<hex>.tmp/    a version being written, renamed into place once complete
    models/.current.next        a promotion staged before the rename, switched in after it
    models/.lock                flock of the one trainer working on this data dir (holder's pid)

Crash safety: files are fsynced before each rename, so a version folder exists only complete.
A run killed at any point leaves at most a hidden ``.tmp`` folder (never listed, removed by the
next run's ``recover``) or a staged promotion of a complete version (finished by ``recover``).
The lock is an ``flock``: the kernel releases it when its holder dies, so it never goes stale.
The ``models`` view over these folders is one of the views ``storage.catalog`` registers
explicitly (``MODELS_VIEW_SQL``); saving a version rewrites the catalog (no torch import
here).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any, Protocol

from prefstream.storage.catalog import ensure_catalog
from prefstream.storage.files import fsync_path
from prefstream.trainer import TrainerError
from prefstream.trainer.card import model_card

log = logging.getLogger(__name__)

MODELS_DIR = "models"
CURRENT = "current"
NEXT = ".current.next"
METADATA = "metadata.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")

CARD = "README.md"
class Saveable(Protocol):
    def save_pretrained(self, save_directory: str | Path) -> Any: ...


def models_dir(data_dir: Path) -> Path:
    return data_dir / MODELS_DIR


def list_versions(data_dir: Path) -> list[str]:
    """Complete versions, oldest first (a folder counts once its metadata is in place)."""
    root = models_dir(data_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if VERSION_RE.match(p.name) and (p / METADATA).exists()]
    return sorted(names, key=lambda n: int(n[1:]))


def read_metadata(data_dir: Path, version: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((models_dir(data_dir) / version / METADATA).read_text())
    return result


def latest_metadata(data_dir: Path) -> dict[str, Any] | None:
    """Metadata of the newest version, promoted or not."""
    versions = list_versions(data_dir)
    return read_metadata(data_dir, versions[-1]) if versions else None


def current_version(data_dir: Path) -> str | None:
    """The promoted version: the target of the ``current`` link (a text file naming it in data
    dirs written before the link, converted by :func:`recover`)."""
    path = models_dir(data_dir) / CURRENT
    if path.is_symlink():
        return Path(os.readlink(path)).name or None
    if path.is_dir():  # a copy that followed the link
        return str(json.loads((path / METADATA).read_text())["version"])
    if not path.exists():
        return None
    return path.read_text().strip() or None


def version_path(data_dir: Path, version: str | None = None) -> Path:
    """Folder of a version (the current one by default); ``TrainerError`` when there is none."""
    version = version or current_version(data_dir)
    if version is None:
        raise TrainerError(f"no promoted model in {models_dir(data_dir)}")
    if not VERSION_RE.match(version):
        raise TrainerError(f"not a model version name: {version!r} (expected v0001...)")
    path = models_dir(data_dir) / version
    if not (path / METADATA).exists():
        raise TrainerError(f"model version {version} not found in {models_dir(data_dir)}")
    return path


def next_version(data_dir: Path) -> str:
    """One past every version folder, complete or not, so a name is never reused."""
    root = models_dir(data_dir)
    if not root.is_dir():
        return "v0001"
    numbers = [int(p.name[1:]) for p in root.iterdir() if VERSION_RE.match(p.name)]
    return f"v{max(numbers, default=0) + 1:04d}"


@contextmanager
def registry_lock(data_dir: Path) -> Iterator[None]:
    """One trainer per data dir: a second one fails fast instead of racing on version names.

    ``flock`` rather than a marker file: the kernel drops it when the holder exits or is killed,
    so a crashed trainer never blocks the next one. The holder's pid is written for operators.
    """
    root = models_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise TrainerError(f"another trainer (pid {holder}) holds {root / '.lock'}") from exc
        try:
            fh.truncate(0)
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


def recover(data_dir: Path) -> list[str]:
    """Finish or undo what a killed run left (call under ``registry_lock``); returns what it did.

    A staged promotion of a complete version is switched in (the killed run had decided it and
    written the version); one naming no complete version is dropped; temp folders are removed.
    """
    root = models_dir(data_dir)
    done: list[str] = []
    old = root / CURRENT
    if old.is_file() and not old.is_symlink() and (version := current_version(data_dir)):
        _write_durably(root / NEXT, version + "\n")  # the text file of older releases: a link
        _switch_current(root)
        done.append(f"linked current to {version}")
    staged = root / NEXT
    if staged.exists():
        version = staged.read_text().strip()
        if version in list_versions(data_dir):
            _switch_current(root)
            log.warning("finished the promotion of %s left by a killed run", version)
            done.append(f"promoted {version}")
        else:
            staged.unlink()
            done.append(f"dropped promotion of missing {version}")
    done += [f"removed {name}" for name in clean_partial(data_dir)]
    return done


def clean_partial(data_dir: Path) -> list[str]:
    """Remove half-written versions left by a killed run (call under ``registry_lock``)."""
    root = models_dir(data_dir)
    removed = [p for p in root.glob(".*.tmp") if p.is_dir()] if root.is_dir() else []
    for path in removed:
        log.warning("removing half-written model version %s", path)
        shutil.rmtree(path)
    for link in root.glob(f".{CURRENT}.*.link") if root.is_dir() else []:
        link.unlink()  # a link made for a switch that was killed before its rename
    return [p.name for p in removed]


def _no_pause(point: str) -> None:
    return None


def save_version(data_dir: Path, version: str, *, model: Saveable, tokenizer: Saveable,
                 metadata: dict[str, Any], promote: bool = False,
                 pause: Callable[[str], None] = _no_pause) -> Path:
    """Write model, tokenizer and metadata to a temp folder, fsync it, rename it into place;
    with ``promote``, then point ``current`` at it.

    The promotion is staged (``.current.next``) before the rename, so a run killed between the
    rename and the switch is finished by the next ``recover``. ``pause`` is the crash-test hook
    (``trainer.control.PAUSE_ENV``), called at ``write`` (temp folder complete, not renamed) and
    ``promote`` (version in place, ``current`` not switched yet).
    """
    root = models_dir(data_dir)
    final = root / version
    if final.exists():
        raise TrainerError(f"model version {version} already exists in {root}")
    tmp = root / f".{version}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, default=json_default))
        (tmp / CARD).write_text(model_card(metadata))
        _fsync_tree(tmp)
        pause("write")
        if promote:
            _write_durably(root / NEXT, version + "\n")
        os.replace(tmp, final)
        fsync_path(root)
    finally:
        if tmp.exists():  # failed before the rename: nothing was published or staged
            shutil.rmtree(tmp)
            if promote:
                (root / NEXT).unlink(missing_ok=True)
    ensure_catalog(data_dir)
    log.info("saved model version %s", final)
    pause("promote")
    if promote:
        _switch_current(root)
        log.info("promoted model version %s", version)
    return final


def promote(data_dir: Path, version: str) -> None:
    """Point ``current`` at a saved version (atomic replace: readers see old or new)."""
    version_path(data_dir, version)
    root = models_dir(data_dir)
    _write_durably(root / NEXT, version + "\n")
    _switch_current(root)
    log.info("promoted model version %s", version)


def _switch_current(root: Path) -> None:
    """Point ``current`` at the staged version: a new relative link renamed over the old one
    (readers see the old version or the new one), then the staged name removed."""
    version = (root / NEXT).read_text().strip()
    link = root / f".{CURRENT}.{uuid.uuid4().hex[:8]}.link"
    os.symlink(version, link)
    os.replace(link, root / CURRENT)
    fsync_path(root)
    (root / NEXT).unlink()
    fsync_path(root)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_tree(folder: Path) -> None:
    """Make every file of a folder owner-only (whatever wrote it, whatever the umask) and flush
    it, then the folder, to disk (before it is renamed)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        path.chmod(0o700 if path.is_dir() else 0o600)
        fsync_path(path)
    folder.chmod(0o700)
    fsync_path(folder)




def json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
