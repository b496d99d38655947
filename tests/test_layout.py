"""The package's import graph: no import cycle inside ``memtrain/``, and the layers depend one way only,
``configs, optim <- adapters <- hf <- recipes <- bench, cli`` (README, "Layout").

The graph is read from the source (``pkgutil`` finds the modules, ``ast`` their import statements), so nothing is
imported and the test takes milliseconds. What counts as an edge:

* absolute and relative imports alike; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module,
  else to ``pkg`` itself. Importing a module also runs its parent packages' ``__init__``; those implicit edges are
  not counted (a package importing its own submodules is the normal shape of a package, not a cycle).
* function-level imports count, in both checks. A lazy import cannot fail at import time, but it hides a cycle
  only from the interpreter, not from the design: ``optim/base`` reaching back into ``optim/registry`` inside a
  function was such a cycle. Module-level cycles (which would break ``import``) are also checked on their own,
  with no exception. ``if TYPE_CHECKING:`` imports are not edges (they never run).
"""
from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import memtrain

ROOT = Path(memtrain.__file__).parent
#: Layer of each top-level part of the package; a module may import from its own layer and the layers below.
LAYERS = {"version": 0, "configs": 0, "optim": 0, "adapters": 1, "hf": 2, "recipes": 3, "bench": 4, "estimate": 4, "cli": 4, "__main__": 5,
          "": 2}  # "": memtrain/__init__.py, the public facade over optim (and, lazily, hf)
#: Imports against the direction (and the cycle they close) that exist today, each to be removed by the change that
#: owns it. The tests fail on any other, and on an entry here that no longer exists (so the list only shrinks).
KNOWN_EXCEPTIONS = {
    # ``memtrain finetune --benchmark`` dispatches to the fine-tuning benchmark from the recipe; the dispatch
    # belongs in the bench/cli layer (the bench runner rework).
    ("memtrain.recipes.finetune", "memtrain.bench.finetune"),
}


def modules() -> dict[str, Path]:
    found = {"memtrain": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="memtrain."):
        path = ROOT.joinpath(*info.name.split(".")[1:])
        found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """``(node, module_level)`` for every import statement."""
    def walk(nodes, module_level):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, module_level
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.body, False)
                yield from walk(node.orelse, module_level)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(ast.iter_child_nodes(node), False)
            else:
                yield from walk(ast.iter_child_nodes(node), module_level)
    yield from walk(tree.body, True)


def edges(known: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """``(importer, imported, module_level)`` for every import of a memtrain module by a memtrain module."""
    out = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, module_level in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                while target and target not in known and "." in target:  # import a.b.c of an attribute path
                    target = target.rpartition(".")[0]
                if target in known and target != name:
                    out.append((name, target, module_level))
    return out


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return LAYERS[part]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_the_package():
    known = modules()
    assert {"memtrain.optim.registry", "memtrain.optim.base", "memtrain.adapters.lorapro", "memtrain.hf.trainer",
            "memtrain.recipes.pretrain", "memtrain.bench.optimizers", "memtrain.cli"} <= set(known)
    found = {(a, b) for a, b, _ in edges(known)}
    assert ("memtrain.optim.base", "memtrain.optim.sharding") in found  # a relative module import
    assert ("memtrain.adapters.common", "memtrain.optim.registry") in found  # from ..optim import registry


def graph(module_level_only: bool) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, b, module_level in edges(modules()):
        if (module_level or not module_level_only) and (a, b) not in KNOWN_EXCEPTIONS:
            out.setdefault(a, set()).add(b)
    return out


def test_no_module_level_import_cycle():
    cycle = find_cycle(graph(module_level_only=True))
    assert cycle is None, "import cycle at import time: " + " -> ".join(cycle)


def test_no_import_cycle_even_through_function_level_imports():
    cycle = find_cycle(graph(module_level_only=False))
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_layers_depend_one_way():
    against = {(a, b): level for a, b, level in edges(modules()) if layer(b) > layer(a)}
    assert KNOWN_EXCEPTIONS <= set(against), f"fixed, remove from KNOWN_EXCEPTIONS: {KNOWN_EXCEPTIONS - set(against)}"
    wrong = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" + ("" if level else ", inside a function")
                   for (a, b), level in against.items() if (a, b) not in KNOWN_EXCEPTIONS)
    assert not wrong, "imports against the layer direction configs, optim <- adapters <- hf <- recipes <- bench, " \
                      "cli:\n" + "\n".join(wrong)


def test_optim_imports_only_torch_and_itself():
    """``memtrain.optim`` is usable with torch alone (no transformers, peft, accelerate, deepspeed)."""
    heavy = ("transformers", "peft", "accelerate", "deepspeed", "datasets")
    wrong = []
    for name, path in modules().items():
        if name.startswith("memtrain.optim"):
            for node, _ in _imports(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                wrong += [f"{name}: {n}" for n in names if n.split(".")[0] in heavy and not getattr(node, "level", 0)]
    assert not wrong, wrong
