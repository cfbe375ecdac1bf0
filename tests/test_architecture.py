"""The stage rules of ../shared/docs/architecture.md, checked on every import statement of the source tree."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml's package-dir)
STAGES = {"rrcm": "rrcm", "train": "rrcm.train", "export": "rrcm.export", "engine": "rrcm.engine",
          "kernels": "rrcm.kernels"}
STAGE_PACKAGES = {"rrcm.train", "rrcm.export", "rrcm.engine", "rrcm.kernels"}
# What each stage may import of the other stages (rrcm/'s shared modules are open to all).
ALLOWED = {
    "rrcm": set(),  # shared pieces use no stage; cli.py names commands as strings and imports them on use
    "kernels": set(),
    "train": set(),
    "export": set(),
    "engine": {"rrcm.kernels", "rrcm.export"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def stage_of(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


@pytest.mark.parametrize("folder", list(STAGES))
def test_stages_import_only_what_the_architecture_allows(folder):
    own = STAGES[folder]
    problems = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for module in imported_modules(path):
            stage = stage_of(module)
            if stage is not None and stage != own and stage not in ALLOWED[folder]:
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not problems, problems


def test_the_rule_catches_a_forbidden_import(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from rrcm.train.loop import run_loop\n")
    assert stage_of(next(iter(imported_modules(path)))) == "rrcm.train"
