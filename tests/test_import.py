"""`import igniter_dist` stays light: optional integrations are imported only when used."""

import ast
import subprocess
import sys
from pathlib import Path

import igniter_dist


def test_import_pulls_no_optional_integration():
    code = ("import sys, igniter_dist; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'s3fs', 'mlflow', 'sagemaker', 'boto3', 'moto'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path, module: str, is_package: bool) -> set[str]:
    """The igniter_dist modules `path` imports when it runs, function-level imports included (not the
    `if TYPE_CHECKING:` ones, which never run)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - child.level + 1])
                    base = f"{parent}.{base}" if base else parent
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)  # `from . import x` names a module
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the igniter_dist modules it imports, with the packages importing them runs first (but the
    root package, and the module's own packages, which are already running when it runs)."""
    root = Path(igniter_dist.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        is_package = rel.name == "__init__"
        name = ".".join(rel.parts[:-1] if is_package else rel.parts)
        modules[name] = (path, is_package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        targets: set[str] = set()
        for imported in _imports(path, name, is_package) & modules.keys():
            parts = imported.split(".")
            targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # importing a.b.c runs a.b
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        graph[name] = targets - own
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert cycle_in(import_graph()) is None, " -> ".join(cycle_in(import_graph()) or [])


def test_the_cycle_check_finds_a_function_level_cycle():
    graph = import_graph()
    assert "igniter_dist.tracking.flags" in graph["igniter_dist.args"]
    graph["igniter_dist.values"].add("igniter_dist.args")  # as `from .args import ...` inside a function would
    assert cycle_in(graph) is not None


def test_the_engine_does_not_import_the_command_line():
    graph = import_graph()
    seen: set[str] = set()
    todo = ["igniter_dist.engine"]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert "igniter_dist.args" not in seen and "igniter_dist.main" not in seen
