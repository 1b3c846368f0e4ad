"""The library is laid out by pipeline stage, and no module imports one of a later stage."""

import ast
from pathlib import Path

import weightscope

PACKAGE = Path(weightscope.__file__).parent
# params -> load -> prepare -> compute -> chapters -> publish; io (atomic writes, versions, cache keys) sits
# right above config, which every stage may read
STAGES = {"config": 0, "io": 1, "load": 2, "prepare": 3, "compute": 4, "chapters": 5, "publish": 6}


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "weightscope" or len(parts) < 2:
        return None
    return STAGES.get(parts[1])


def _imports(path: Path) -> list[str]:
    """Every weightscope module `path` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]  # `from weightscope import io`
    return [m for m in out if m.startswith("weightscope.")]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield path, ".".join(rel.parts)


def test_every_module_belongs_to_a_stage():
    loose = [name for path, name in _modules() if name != "weightscope.__init__" and _stage(name) is None]
    assert not loose, f"modules outside the stage packages {sorted(STAGES)}: {loose}"


def test_no_import_runs_up_the_stages():
    bad = []
    for path, name in _modules():
        own = _stage(name)
        for imported in _imports(path):
            other = _stage(imported)
            if own is not None and other is not None and other > own:
                bad.append(f"{name} imports {imported}")
    assert not bad, "imports that run up the pipeline stages:\n" + "\n".join(bad)


def test_the_check_can_fail(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from weightscope.publish.book import run\n")
    assert "weightscope.publish.book" in _imports(fake)
    assert _stage("weightscope.publish.book") > _stage("weightscope.load.saes")


# --- no import cycle among the library's modules, no private name imported from another module ---


def _module_names() -> set[str]:
    return {name.removesuffix(".__init__") for _, name in _modules()}


def _resolve(imported: str, known: set[str]) -> str | None:
    """The library module an import names: itself, or the module holding the imported name."""
    while imported and imported not in known:
        imported = imported.rpartition(".")[0]
    return imported or None


def import_graph(modules: list[tuple[Path, str]]) -> dict[str, set[str]]:
    """{module: library modules it imports anywhere in its file (function-level imports count)}."""
    known = {name.removesuffix(".__init__") for _, name in modules}
    graph = {}
    for path, name in modules:
        name = name.removesuffix(".__init__")
        targets = {_resolve(m, known) for m in _imports(path)}
        graph[name] = {t for t in targets if t is not None and t != name and t != "weightscope"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def private_imports(modules: list[tuple[Path, str]]) -> list[str]:
    """`from weightscope.a import _name` or `a._name` in another module: a private name used across modules."""
    known = {name.removesuffix(".__init__") for _, name in modules}
    out = []
    for path, name in modules:
        name = name.removesuffix(".__init__")
        aliases = {}  # local name -> library module it is bound to
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weightscope"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in known:
                        aliases[alias.asname or alias.name] = full
                    elif _private(alias.name) and node.module != name:
                        out.append(f"{name}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr) and aliases[node.value.id] != name):
                out.append(f"{name}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    return sorted(set(out))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_import_cycle():
    cycle = find_cycle(import_graph(list(_modules())))
    assert cycle is None, "import cycle among the library's modules: " + " -> ".join(cycle)


def test_no_private_name_crosses_modules():
    found = private_imports(list(_modules()))
    assert not found, "private names imported from another module (make them public):\n" + "\n".join(found)


def test_the_cycle_and_privacy_checks_can_fail(tmp_path):
    pkg = tmp_path / "weightscope"
    (pkg / "load").mkdir(parents=True)
    (pkg / "load" / "a.py").write_text("from weightscope.load.b import f\n")
    (pkg / "load" / "b.py").write_text("def f():\n    from weightscope.load import c\n")
    (pkg / "load" / "c.py").write_text("import weightscope.load.a as a\nx = a._hidden\n")
    (pkg / "load" / "d.py").write_text("from weightscope.load.a import _helper\n")
    modules = [(p, "weightscope.load." + p.stem) for p in sorted((pkg / "load").glob("*.py"))]
    graph = import_graph(modules)
    assert graph["weightscope.load.b"] == {"weightscope.load.c"}  # a function-level import counts
    assert find_cycle(graph) == ["weightscope.load.a", "weightscope.load.b", "weightscope.load.c",
                                 "weightscope.load.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
    assert private_imports(modules) == ["weightscope.load.c: a._hidden (weightscope.load.a)",
                                        "weightscope.load.d: from weightscope.load.a import _helper"]


def unresolved_imports(modules: list[tuple[Path, str]]) -> list[str]:
    """`from weightscope.x import name` (at the top or inside a function) where module x has no `name`:
    an import that fails only when that function runs, e.g. after a name moved to another module."""
    import importlib.util

    out = []
    for path, name in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.startswith("weightscope")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                is_package = hasattr(module, "__path__")
                if not hasattr(module, alias.name) and not (
                        is_package and importlib.util.find_spec(f"{node.module}.{alias.name}")):
                    out.append(f"{name}:{node.lineno}: from {node.module} import {alias.name}")
    return out


def test_every_library_import_names_something_that_exists():
    found = unresolved_imports(list(_modules()))
    assert not found, "imports of names that do not exist:\n" + "\n".join(found)


def test_the_unresolved_import_check_can_fail(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from weightscope.config.paths import no_such_name, data_dir\n"
                    "    from weightscope.config import params\n")
    assert unresolved_imports([(fake, "weightscope.m")]) == [
        "weightscope.m:2: from weightscope.config.paths import no_such_name"]
