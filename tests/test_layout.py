"""The architecture as a rule: the core package never imports the study or the notebook exhibits."""

import ast
from pathlib import Path

import ddp_helpers

PACKAGE = Path(ddp_helpers.__file__).parent
CORE = sorted(PACKAGE.glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_core_module_imports_the_study_or_the_exhibits():
    offenders = {path.name: sorted(m for m in imported_modules(path)
                                   if any(part in ("study", "exhibits") for part in m.replace(".", " ").split()))
                 for path in CORE}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_model_is_self_contained():
    assert not [m for m in imported_modules(PACKAGE / "model.py") if m.startswith(".") or "ddp_helpers" in m]
