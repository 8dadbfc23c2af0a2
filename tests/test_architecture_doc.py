"""docs/architecture.md matches the tree: every module it names exists, and every module of the
packages it maps is named there, so a newcomer reading it before a change is not misled (#16)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SECTION = re.compile(r"^## (\w+)/")
NAME = re.compile(r"`([\w/]+\.py)`")


def named_modules() -> dict[Path, int]:
    """Each module path the doc's tables name, with the line naming it first."""
    folder: str | None = None
    found: dict[Path, int] = {}
    for line_no, line in enumerate(DOC.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("## "):
            m = SECTION.match(line)
            folder = m.group(1) if m else None  # "Training and evaluation": paths carry their folder
            continue
        if not line.startswith("| `"):
            continue
        current = folder
        for name in NAME.findall(line):
            if "/" in name:
                current, name = name.rsplit("/", 1)
            if current is None:
                continue
            found.setdefault(ROOT / current / name, line_no)
    return found


def test_every_module_the_doc_names_exists():
    missing = [f"{p.relative_to(ROOT)} (line {n})" for p, n in named_modules().items() if not p.exists()]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_of_the_mapped_packages_is_named():
    named = set(named_modules())
    folders = {p.parent for p in named}
    unnamed = sorted(str(p.relative_to(ROOT)) for folder in folders for p in folder.glob("*.py")
                     if p.name != "__init__.py" and p not in named)
    assert not unnamed, f"modules docs/architecture.md does not mention: {unnamed}"
