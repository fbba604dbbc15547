"""The house drawn from the imports: one way only, no circle, each concept in one place, modules that stay small.

The order, first to last: ``lake`` (knows Zarr and fsspec, nothing of models), then the stages of
``tasks`` (``common`` first, then each stage in the order it can use the ones before it), then
``flows`` (which wire tasks).  A module may import from its own folder, and from anything
earlier; never from a later stage.  Projection comes before gradients because extraction
applies the projectors on the fly; it never needs the gradient stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["lake", "tasks.common", "tasks.data", "tasks.projection", "tasks.gradients", "tasks.evaluate", "tasks.training",
         "tasks.influence", "tasks.attribution", "tasks.tracing", "flows"]
MAX_LINES = 450
# Modules over MAX_LINES whose one concept is a single loop or table that reads best whole: none today.
LONG_BY_DESIGN: dict[str, str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for top in ("lake", "tasks", "flows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[f"gradlake.{name}"] = path
    return found


MODULES = modules()


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every gradlake import in a file, those inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradlake"):
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("gradlake")]
    return out


def edges() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, module, names in imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def place(module: str) -> int:
    """The module's position in ORDER (its folder: lake, a stage of tasks, or flows)."""
    short = module.removeprefix("gradlake.")
    for rank in range(len(ORDER) - 1, -1, -1):
        if short == ORDER[rank] or short.startswith(ORDER[rank] + "."):
            return rank
    return -1  # gradlake.tasks itself


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.FunctionDef, ast.ClassDef)):
                    names.add(inner.name)
                elif isinstance(inner, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[0] for a in inner.names)
                elif isinstance(inner, ast.Assign):
                    names.update(n.id for t in inner.targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_every_stage_folder_is_placed():
    folders = {f"tasks.{p.name}" for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists()}
    assert folders == {o for o in ORDER if o.startswith("tasks.")}


def test_every_gradlake_import_names_something_that_exists():
    """Lazy imports inside functions too: a name moved to another module is found here, not by a user."""
    wrong = []
    for path in [*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for line, module, names in imports(path):
            if module not in MODULES:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: no module {module}")
                continue
            have = defined_names(MODULES[module])
            for n in names:
                if n not in have and f"{module}.{n}" not in MODULES:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} has no {n}")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_modules():
    crossing = [f"{path.relative_to(ROOT)}:{line}: {module}.{n}"
                for path in [*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
                for line, module, names in imports(path) for n in names if n.startswith("_")]
    assert not crossing, "\n".join(crossing)


def test_imports_run_one_way():
    backwards = [f"{a} -> {b}" for a, targets in edges().items() for b in targets if place(b) > place(a)]
    assert not backwards, "\n".join(sorted(backwards))


def test_no_import_circle():
    graph = edges()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    if name in LONG_BY_DESIGN:
        return
    assert lines < MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines; split it along its concepts"


def test_prefect_tasks_live_in_tasks_and_flows_only_in_flows():
    """DESIGN: flows wire, tasks compute; a stage's @task wrappers sit beside the functions they wrap."""
    misplaced = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in node.decorator_list:
                    kind = (d.func if isinstance(d, ast.Call) else d)
                    kind = getattr(kind, "id", getattr(kind, "attr", ""))
                    if (kind == "task" and name.startswith("gradlake.flows")) or \
                            (kind == "flow" and not name.startswith("gradlake.flows")):
                        misplaced.append(f"{path.relative_to(ROOT)}: @{kind} {node.name}")
    assert not misplaced, "\n".join(misplaced)
