"""The architecture as rules, checked on the real import graph (every import in a file counts, one
inside a function too): the core never imports the study or the exhibits; the exhibits' charts read
records and import no study code; the model imports nothing of ours; the torchrun path never imports
the spawn supervisor; the records import no checkpoint code; and the imports go one way only."""

import ast
import subprocess
import sys
from pathlib import Path

import ddp_helpers

PACKAGE = Path(ddp_helpers.__file__).parent
CORE = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("study", "exhibits"))


def imported_modules(path: Path) -> set[str]:
    """Every name an import in the file may load: ``from .a import b`` gives ``.a`` and ``.a.b``
    (``b`` may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.add(module)
            names.update(module.rstrip(".") + "." + alias.name if node.module else module + alias.name
                         for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_core_module_imports_the_study_or_the_exhibits():
    offenders = {module_name(path): sorted(m for m in imported_modules(path)
                                   if any(part in ("study", "exhibits") for part in m.replace(".", " ").split()))
                 for path in CORE}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_model_is_self_contained():
    assert not [m for m in imported_modules(PACKAGE / "model.py") if m.startswith(".") or "ddp_helpers" in m]


def module_name(path: Path) -> str:
    """A core file's module inside the package: "engine", "sync" (its __init__.py), "sync.base";
    "__init__" for the package's own."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def resolve(importer: Path, module: str) -> str | None:
    """What an import in ``importer`` names, as a module_name; None outside the package."""
    if module == "ddp_helpers" or module.startswith("ddp_helpers."):
        return module.partition(".")[2] or "__init__"
    if not module.startswith("."):
        return None
    rest = module.lstrip(".")
    level = len(module) - len(rest)  # 1: the importer's own package, 2: the one above, ...
    package = importer.relative_to(PACKAGE).parent.parts
    return ".".join(package[:len(package) - level + 1] + ((rest,) if rest else ())) or "__init__"


def core_imports() -> dict[str, set[str]]:
    """Which core modules each core module imports, anywhere in the file (an import inside a
    function counts: it only hides a cycle). Importing ``a.b`` runs ``a`` first, so it imports
    ``a`` too, unless ``a`` is the importer's own package (already being imported)."""
    nodes = {module_name(path) for path in CORE}
    graph = {}
    for path in CORE:
        name, targets = module_name(path), set()
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} | {"__init__"}
        for target in filter(None, (resolve(path, m) for m in imported_modules(path))):
            parts = target.split(".")
            targets.add(target)
            targets.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p not in own)
        graph[name] = {target for target in targets if target in nodes and target != name}
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
    assert a_cycle({"sync": {"sync.ddp"}, "sync.ddp": {"sync"}}) == ["sync", "sync.ddp", "sync"]


def test_every_strategy_builds_on_the_base_alone_and_only_the_table_imports_them_all():
    graph = core_imports()
    assert graph["sync.base"] == set()
    for strategy in ("sync.ddp", "sync.manual", "sync.local_sgd", "sync.bucketed"):
        assert graph[strategy] - {"errors"} == {"sync.base"}, strategy
    assert graph["sync"] - {"errors"} == {"sync.base", "sync.ddp", "sync.manual", "sync.local_sgd", "sync.bucketed"}
    assert "sync" in graph["trainer"]  # ``from .sync import make_sync``


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing ``start`` loads (itself included)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_the_torchrun_path_never_imports_the_spawn_supervisor():
    """A rank under torchrun or srun runs ``rank.launch_rank``: nothing it loads starts processes."""
    graph = core_imports()
    assert "workers" not in reachable(graph, "rank")
    assert "workers" not in reachable(graph, "failures") and "workers" not in reachable(graph, "place")


def test_the_records_import_no_checkpoint_code_and_write_through_the_one_atomic_writer():
    graph = core_imports()
    assert "checkpoint" not in reachable(graph, "results") and "resume" not in reachable(graph, "results")
    assert "files" in graph["results"] and "files" in graph["checkpoint"]


def test_the_plain_listing_is_torch_the_model_and_the_data_loader():
    assert core_imports()["plain_ddp"] == {"model", "data"}
    assert reachable(core_imports(), "data") <= {"data", "errors"}


def test_importing_the_package_loads_no_process_machinery():
    """The package's __init__ loads its names on first use: importing the model or a chart stays cheap."""
    code = ("import sys, ddp_helpers; from ddp_helpers.model import MLP; "
            "print(sorted(m for m in sys.modules if m.startswith('ddp_helpers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['ddp_helpers', 'ddp_helpers.model']"


def test_the_exhibits_charts_read_records_and_import_no_study_code():
    charts = PACKAGE / "exhibits" / "charts.py"
    assert not [m for m in imported_modules(charts) if "study" in m.replace(".", " ").split()]
    assert not [m for m in imported_modules(charts) if m.lstrip(".") in ("launcher", "rank", "workers", "trainer")]


def test_every_strategy_the_config_accepts_has_one_row_in_the_table():
    """config.py names the strategies as plain values (it imports neither torch nor any module of
    ours but the error types); sync.STRATEGIES builds them. The two lists are one list."""
    from ddp_helpers.config import SYNC_STRATEGIES
    from ddp_helpers.sync import STRATEGIES

    assert tuple(STRATEGIES) == SYNC_STRATEGIES
