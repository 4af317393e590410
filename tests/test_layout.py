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


def core_imports() -> dict[str, set[str]]:
    """Which core modules each core module imports, anywhere in the file (an import inside a
    function counts: it only hides a cycle)."""
    graph = {}
    for path in CORE:
        targets = set()
        for module in imported_modules(path):
            if module.startswith(".") and not module.startswith(".."):
                targets.add(module[1:].split(".")[0] or "__init__")
            elif module.startswith("ddp_helpers"):
                targets.add(module.split(".")[1] if "." in module else "__init__")
        graph[path.stem] = {target for target in targets if (PACKAGE / f"{target}.py").exists()}
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the imports go one way only."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return []
        for target in sorted(graph[name]):
            cycle = visit(target, path + [name])
            if cycle:
                return cycle
        done.add(name)
        return []

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return []


def test_the_core_modules_import_each_other_one_way_only():
    assert a_cycle(core_imports()) == []
    assert a_cycle({"sync": {"local_sgd"}, "local_sgd": {"sync"}}) == ["local_sgd", "sync", "local_sgd"]


def test_every_strategy_the_config_accepts_has_one_row_in_the_table():
    """config.py names the strategies as plain values (it imports neither torch nor any module of
    ours); sync.STRATEGIES builds them. The two lists are one list."""
    from ddp_helpers.config import SYNC_STRATEGIES
    from ddp_helpers.sync import STRATEGIES

    assert tuple(STRATEGIES) == SYNC_STRATEGIES
