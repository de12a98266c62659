"""The package's shape, read from its own code: each module's imports (every `import` and
`from ... import` in it, at the top or inside a function) run one way between the stages, with
no cycle, and the top level stays small."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fluxtune"
# What each stage may import besides itself and fluxtune.errors. The recipe level (the modules at
# the top: cli, config, train, plan, ...) may import every stage; no stage imports it.
MAY_IMPORT = {
    "models": set(),
    "data": {"models"},
    "lora": {"models"},
    "training": {"models", "lora"},
}
TOP_LEVEL_MODULES, TOP_LEVEL_LINES = 8, 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The fluxtune modules `path` imports, resolved to module names."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fluxtune"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "fluxtune":
                continue
            for alias in node.names:  # `from fluxtune.lora import tools` imports a module
                sub = f"{base}.{alias.name}"
                found.add(sub if _exists(sub) else base)
    return found


def _exists(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def stage(name: str) -> str:
    """models, data, lora, training; errors; or top for the recipe level."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in MAY_IMPORT:
        return parts[1]
    return "errors" if name == "fluxtune.errors" else "top"


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_each_stage_imports_only_the_stages_below_it():
    wrong = [f"{m} imports {i}" for m, deps in graph().items() for i in sorted(deps)
             if stage(m) in MAY_IMPORT and stage(i) not in MAY_IMPORT[stage(m)] | {stage(m), "errors"}]
    wrong += [f"fluxtune.errors imports {i}" for i in graph()["fluxtune.errors"]]
    assert not wrong, "imports that run against the flow:\n" + "\n".join(wrong)


def test_only_the_recipe_level_reads_the_whole_config():
    readers = sorted(m for m, deps in graph().items() if "fluxtune.config" in deps and stage(m) != "top")
    assert not readers, f"{readers} import fluxtune.config; pass them the section or the values they need"


def test_no_import_cycle():
    deps = graph()
    cycles, done = [], set()

    def visit(m, path):
        for d in sorted(deps.get(m, ()) - {m}):
            if d in path:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in done:
                visit(d, path + [d])
        done.add(m)

    for m in sorted(deps):
        if m not in done:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_top_level_is_small():
    modules = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= TOP_LEVEL_MODULES, [p.name for p in modules]
    long = {p.name: n for p in modules if (n := len(p.read_text(encoding="utf-8").splitlines())) > TOP_LEVEL_LINES}
    assert not long, f"over {TOP_LEVEL_LINES} lines: {long}"


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_stage_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and ("import" in doc.lower())


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """Mutation: a data module importing training is reported."""
    fake = tmp_path / "fluxtune"
    for p in PACKAGE.rglob("*.py"):
        target = fake / p.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    (fake / "data" / "buckets.py").write_text("from fluxtune.training.flow import add_noise\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="fluxtune.data.buckets imports fluxtune.training.flow"):
        test_each_stage_imports_only_the_stages_below_it()
