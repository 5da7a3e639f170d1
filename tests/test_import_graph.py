"""The package's structure, checked from its source: no import cycles, no reaching into privates.

An AST walk of ``src/vram_residency`` builds the graph of imports between its modules, every
import counted (module level, function level and ``TYPE_CHECKING`` alike: a cycle that is only
broken by deferring an import is still a cycle in the design). Then:

- the graph has no cycle;
- no module imports another module's ``_private`` name, nor a module inside a private package
  from outside that package (``vram_residency._core.store`` is the core's business; everyone
  else imports ``vram_residency._core``);
- no module reads a ``_private`` attribute that it does not define itself (``x._entry`` where
  ``_entry`` is another module's member), except on ``self``/``cls`` (a subclass using its base
  class's protected members).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vram_residency"

#: Underscore names that are other libraries' public API (namedtuple's methods, ctypes' structure
#: fields, the interpreter's exit and frame calls; argparse has no public name for the type that
#: ``add_subparsers`` returns, and typeshed spells it ``_SubParsersAction``), not anyone's private
#: member.
FOREIGN_PUBLIC = frozenset(
    {
        "_replace",
        "_asdict",
        "_fields",
        "_make",
        "_exit",
        "_getframe",
        "_fields_",
        "_pack_",
        "_SubParsersAction",
    }
)


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _load() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        modules[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    return modules


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _inside(importer: str, package: str) -> bool:
    return importer == package or importer.startswith(package + ".")


def _check_module_path(mod: Module, target: str) -> None:
    parts = target.split(".")
    for i, part in enumerate(parts):
        if not _private(part):
            continue
        parent = ".".join(parts[:i])
        own = ".".join(parts[: i + 1])
        if not _inside(mod.name, parent):
            mod.problems.append(f"imports private module {own} from outside {parent}")
        elif i + 1 < len(parts) and not _inside(mod.name, own):
            mod.problems.append(f"imports {target}, inside private package {own}: import {own} instead")


def _defined_private_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)  # dataclass(..., _field=...) constructors of this module's classes
    return {n for n in names if _private(n)}


def _analyse(modules: dict[str, Module]) -> None:
    for mod in modules.values():
        own = _defined_private_names(mod.tree)
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE):
                        mod.imports.add(alias.name)
                        _check_module_path(mod, alias.name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                if not target.startswith(PACKAGE):
                    continue
                _check_module_path(mod, target)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        mod.imports.add(sub)
                        _check_module_path(mod, sub)
                    else:
                        mod.imports.add(target)
                        if _private(alias.name) and target != mod.name:
                            mod.problems.append(f"imports private name {alias.name} from {target}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                receiver = node.value
                if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                    continue
                if node.attr in own or node.attr in FOREIGN_PUBLIC:
                    continue
                mod.problems.append(
                    f"line {node.lineno}: reads {ast.unparse(node)}, another module's private member"
                )


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    graph = {m.name: sorted(t for t in m.imports if t in modules and t != m.name) for m in modules.values()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    mods = _load()
    _analyse(mods)
    return mods


def test_the_walk_sees_the_package(modules: dict[str, Module]) -> None:
    # Known answers, so that a broken walk cannot pass by finding nothing.
    assert "vram_residency.manager" in modules and "vram_residency._core" in modules
    assert "vram_residency._core" in modules["vram_residency.manager"].imports
    assert "vram_residency.sources.files" in modules["vram_residency.manager"].imports  # function level


def test_the_checks_catch_what_they_look_for() -> None:
    fake = {
        "vram_residency.a": Module("vram_residency.a", Path("a.py"), False, ast.parse(
            "from vram_residency.b import x, _hidden\nimport vram_residency._core.store\n"
            "def f(m):\n    from vram_residency import b\n    return m._entry(1)\n"
        )),
        "vram_residency.b": Module("vram_residency.b", Path("b.py"), False, ast.parse(
            "from vram_residency.a import f\n_hidden = 1\nx = 2\n"
        )),
    }  # fmt: skip
    _analyse(fake)
    problems = " | ".join(fake["vram_residency.a"].problems)
    assert "private name _hidden" in problems
    assert "vram_residency._core.store" in problems
    assert "m._entry" in problems
    assert _cycles(fake) == [["vram_residency.a", "vram_residency.b"]]


def test_no_import_cycles(modules: dict[str, Module]) -> None:
    cycles = _cycles(modules)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_reads_another_modules_private_names(modules: dict[str, Module]) -> None:
    problems = [f"{m.name}: {p}" for m in modules.values() for p in m.problems]
    assert not problems, "\n".join(problems)
