"""The code's shape, held: modules of one concept and readable size, functions short
enough to read, no import circles, job records and Redis names each owned by one module,
layers that import downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("magicface_core", "magicface_cli", "magicface_client", "service", "worker")
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 80
# Functions allowed past MAX_FUNCTION_LINES, each with why.
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_every_package_is_found():
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_line_limit(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_FILE_LINES, f"{name}: {lines} lines (at most {MAX_FILE_LINES})"


def test_no_function_is_over_the_line_limit():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                where = f"{name}.{node.name}"
                if length > MAX_FUNCTION_LINES and where not in LONG_FUNCTIONS:
                    long.append(f"{where} ({length} lines)")
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {long}"


def _imports(name: str, path: Path) -> set[str]:
    """Our modules `name` imports at module level (imports inside functions are lazy
    on purpose and cannot make an import circle at load)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in _tree(path).body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_circle_check_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    # A package importing its own submodules (to re-export them) is no circle:
    # the submodules are loaded from it, not the other way round.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert not _cycles(graph), f"import circles: {_cycles(graph)}"


def _source(path: Path) -> str:
    return path.read_text()


def test_job_records_are_read_and_written_in_records_only():
    owner = MODULES["service.records"]
    bad = []
    for name, path in MODULES.items():
        if path == owner:
            continue
        text = _source(path)
        for needle in (".meta[", ".meta.get(", "save_meta(", ".meta =", ".meta.update(",
                       ".meta.setdefault(", "set(job.meta)"):
            if needle in text:
                bad.append(f"{name}: {needle}")
    assert not bad, bad


def test_redis_names_are_spelled_in_keys_only():
    owner = MODULES["service.keys"]
    bad = [name for name, path in MODULES.items()
           if name.split(".")[0] in ("service", "worker") and path != owner
           and any(s in _source(path) for s in ('"magicface:', '":terminal"', '"rq:job:'))]
    assert not bad, bad


def test_storage_layout_is_spelled_in_storage_only():
    owner = MODULES["service.storage"]
    bad = [name for name, path in MODULES.items()
           if path != owner and 'f"jobs/{' in _source(path)]
    assert not bad, bad


# The one version string of both distributions (the client's User-Agent says it).
ALLOWED_ACROSS = {"magicface_core.version"}


@pytest.mark.parametrize("pkg,forbidden", [
    ("magicface_core", ("fastapi", "rq", "redis", "boto3", "httpx", "service", "worker",
                        "magicface_cli", "magicface_client")),
    ("magicface_client", ("magicface_core", "magicface_cli", "service", "worker", "torch")),
    ("service", ("torch", "diffusers", "worker", "magicface_cli")),
    ("magicface_cli", ("service", "worker")),
])
def test_layers_import_downwards(pkg, forbidden):
    bad = []
    for name, path in MODULES.items():
        if name.split(".")[0] != pkg:
            continue
        for node in ast.walk(_tree(path)):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            bad += [f"{name} imports {m}" for m in mods
                    if m.split(".")[0] in forbidden and m not in ALLOWED_ACROSS]
    assert not bad, bad
