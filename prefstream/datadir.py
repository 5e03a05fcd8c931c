"""The data dir every command shares: one default, one check that it is one, one that it can be
written. A wrong folder is bad usage (exit 2, one line naming ``--data-dir`` and
``PREFSTREAM_DATA_DIR``), found before anything is created in it."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from prefstream.errors import StorageError

DATA_DIR_ENV = "PREFSTREAM_DATA_DIR"
#: the one default of every command, the demo's included
DEFAULT_DATA_DIR = Path("prefstream-data")
#: folders ``storage.files.init_data_dir`` creates: their absence means "not a data dir"
LAYOUT = ("manifest", "watermarks")
HINT = f"(--data-dir or {DATA_DIR_ENV})"


def default_data_dir() -> Path:
    """``PREFSTREAM_DATA_DIR`` when set, else ``prefstream-data`` in the working directory."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def check_data_dir(data_dir: Path) -> None:
    """:class:`StorageError` unless ``data_dir`` has the layout a worker creates."""
    missing = [name for name in LAYOUT if not (data_dir / name).is_dir()]
    if not data_dir.is_dir() or missing:
        why = "no such folder" if not data_dir.is_dir() else f"no {', '.join(missing)} folder"
        raise StorageError(f"{data_dir} is not a prefstream data dir ({why}): give the folder a "
                           f"worker or the demo writes to {HINT}")


def check_writable(data_dir: Path, *, needed_by: str) -> None:
    """:class:`StorageError` when files cannot be created in ``data_dir`` (or in the folder
    that would hold it): tried for real, since root ignores permission bits but not a
    read-only mount."""
    target = data_dir if data_dir.exists() else _existing_parent(data_dir)
    probe = target / f".prefstream-write-test.{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        why = "read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else str(exc)
        raise StorageError(f"{data_dir} is {why}: {needed_by} writes there; give a writable "
                           f"folder {HINT}") from None


def _existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")
