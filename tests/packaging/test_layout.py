"""The repository's layout as its documents state it: the README's length and links, the layer
table of docs/architecture.md against the import contracts of pyproject.toml, and test modules
that share helpers through ``tests/helpers/`` instead of importing each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SCRIPT_IMPORT = re.compile(r"^\s*(?:from|import) (\w+)", flags=re.MULTILINE)


def layers() -> list[list[str]]:
    """The layers contract of pyproject.toml, top down: each layer's packages."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [layered] = [c for c in contracts["contracts"] if c["type"] == "layers"]
    return [[p.strip() for p in layer.split("|")] for layer in layered["layers"]]


def slug(heading: str) -> str:
    """A Markdown heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(doc: Path) -> list[str]:
    out = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            out.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
            if anchor not in {slug(h) for h in headings}:
                out.append(target)
    return out


def test_the_readme_stays_under_200_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_of_the_readme_and_docs_resolves() -> None:
    broken = {doc.name: links for doc in DOCS if (links := broken_links(doc))}
    assert broken == {}


def test_a_link_to_a_missing_file_or_heading_is_found(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Top\n## The demo\n")
    doc = tmp_path / "b.md"
    doc.write_text("[ok](a.md#the-demo) [x](gone.md) [y](a.md#nowhere) [w](https://x.org/z)\n")
    assert broken_links(doc) == ["gone.md", "a.md#nowhere"]


def test_the_architecture_table_lists_every_layer_top_down() -> None:
    """Each package of the layers contract is named on one line of docs/architecture.md's
    table, and the lines follow the contract's layers from the top down."""
    rows = [line for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()
            if line.startswith("| `prefstream")]
    first_cells = [line.split("|")[1] for line in rows]
    spans = []
    for layer in layers():
        at = []
        for package in layer:
            lines = [i for i, cell in enumerate(first_cells)
                     if f"`{package}`" in cell or expands_to(cell, package)]
            assert len(lines) == 1, f"{package} is on lines {lines} of the table"
            at += lines
        spans.append((min(at), max(at)))
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


def expands_to(cell: str, package: str) -> bool:
    """``prefstream.streams.{broker,producer}`` names ``prefstream.streams.broker``."""
    m = re.search(r"`([\w.]+)\.\{([\w,]+)\}`", cell)
    return bool(m) and package in {f"{m[1]}.{name}" for name in m[2].split(",")}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports, in its code and in the string constants
    that read as Python run in a subprocess (those import things too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.update(SCRIPT_IMPORT.findall(node.value))
    return names


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/helpers/ (or beside tests/factories.py): a test module that
    imported another one would run only when pytest happened to put that one's folder on
    ``sys.path`` first."""
    test_modules = {p.stem for p in TESTS.rglob("test_*.py")}
    found = {}
    for path in TESTS.rglob("*.py"):
        if hits := sorted(imported_modules(path) & test_modules):
            found[str(path.relative_to(TESTS))] = hits
    assert found == {}
