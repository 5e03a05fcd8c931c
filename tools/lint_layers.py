"""Check the import contracts of pyproject.toml (``[tool.importlinter]``) with ``lint-imports``.

The product's folders (``streams/``, ``storage/``...) install as subpackages of ``prefstream``
(``[tool.setuptools.package-dir]``), a layout that exists only once installed: import-linter reads
the package from its folder, so this script lays the installed layout out in a temporary folder
(symbolic links to the checkout's folders) and runs ``lint-imports`` on it.

    python tools/lint_layers.py        # exit 0: every contract kept
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def lay_out(into: Path) -> None:
    """``into/prefstream/...`` as installed: a package holding mapped subpackages is a real folder
    of links to its own entries, every other package a link to its folder. Nothing is ever
    created inside the checkout."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = mapping["package-dir"]
    for package, folder in sorted(packages.items()):
        target = into.joinpath(*package.split("."))
        if target.is_symlink() or target.exists():
            continue
        if not target.parent.resolve().is_relative_to(into.resolve()):
            raise RuntimeError(f"{package}: {target} would be created outside {into}")
        if any(other.startswith(package + ".") for other in packages):
            target.mkdir(parents=True)
            for entry in (ROOT / folder).iterdir():
                if entry.name != "__pycache__":
                    (target / entry.name).symlink_to(entry)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(ROOT / folder, target_is_directory=True)


def main() -> int:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    with tempfile.TemporaryDirectory(prefix="prefstream-layers-") as tmp:
        lay_out(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        done = subprocess.run([lint, str(ROOT / "pyproject.toml")], cwd=tmp, env=env)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
