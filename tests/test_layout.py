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
