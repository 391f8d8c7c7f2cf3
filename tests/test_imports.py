"""The module map is a rule, not a wish: every import in the package (function-level ones included) is
checked against it, the package's import graph has no cycle, and tools never import each other's
private names. The rules are those of docs/architecture.md, "Who may import whom".
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"qgraph": "qgraph", "passes": "qgraph.passes", "kernels": "qgraph.kernels"}

#: What each part of the package may import of qgraph: (allowed prefixes, refused prefixes).
#: The foundation, bottom up: errors < ir < ops (ir reads and writes files through qgraph.modelfile,
#: which stays below it and is not part of the vocabulary kernels use).
FOUNDATION = ("qgraph.errors", "qgraph.ir", "qgraph.ops")
FRONT_ENDS = ("qgraph.cli", "qgraph.api")
RULES = {
    "qgraph.errors": ((), ()),
    "qgraph.modelfile": (("qgraph.errors",), ()),
    "qgraph.ir": (("qgraph.errors", "qgraph.modelfile"), ()),
    "qgraph.ops": (("qgraph.errors", "qgraph.ir"), ()),
    # kernels: the runtime stands on the shared vocabulary only, never on passes or the pipeline
    "qgraph.kernels": (FOUNDATION + ("qgraph.kernels",), ()),
    # passes: the core, not the runtime, the observers or the front ends
    "qgraph.passes": (("qgraph.",), ("qgraph.kernels", "qgraph.instruments") + FRONT_ENDS),
    # observers: the core and the pipeline; imported only by the front ends (checked below)
    "qgraph.instruments": (("qgraph.",), ("qgraph.passes", "qgraph.kernels") + FRONT_ENDS),
    # the front ends sit on top of everything
    "qgraph.cli": (("qgraph",), ()),
    "qgraph.api": (("qgraph",), ()),
    "qgraph": (("qgraph",), ()),   # the package __init__ (re-exports the API)
}
#: Every other core module: the core, never the layers above it.
CORE = (("qgraph.",), ("qgraph.passes", "qgraph.kernels", "qgraph.instruments") + FRONT_ENDS)


def module_name(path: Path) -> str:
    folder = FOLDERS[path.parent.name]
    return folder if path.stem == "__init__" else f"{folder}.{path.stem}"


def imports_of(source: str, module: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, imported module, names) for every import statement, at any depth; relative imports
    resolved against ``module``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                base = ".".join(parts[: len(parts) - node.level] + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            out.append((node.lineno, base, names))
            if base == "qgraph":     # "from qgraph import ir" imports the submodule qgraph.ir
                out.extend((node.lineno, f"{base}.{n}", ()) for n in names)
    return out


def rule_for(module: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(allowed prefixes, refused prefixes) for ``module``."""
    for key in sorted(RULES, key=len, reverse=True):
        if module == key or (key != "qgraph" and module.startswith(key + ".")):
            return RULES[key]
    return CORE


def violations(module: str, source: str) -> list[str]:
    """The imports of ``module`` (its source given) that break the rules, one line each."""
    allowed, never = rule_for(module)
    bad = []
    for line, target, _ in imports_of(source, module):
        if not (target == "qgraph" or target.startswith("qgraph.")):
            continue
        if target == "qgraph" and module.startswith("qgraph."):
            continue          # "from qgraph import ir": the submodule entry is checked instead
        ok = any(target == p or target.startswith(p + ".") or (p.endswith(".") and target.startswith(p))
                 for p in allowed)
        if ok and not any(target == p or target.startswith(p + ".") for p in never):
            continue
        bad.append(f"{module}:{line} imports {target}")
    return bad


def package_modules() -> dict[str, str]:
    out = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).glob("*.py")):
            out[module_name(path)] = path.read_text()
    return out


def test_every_import_follows_the_module_map():
    bad = [v for mod, src in package_modules().items() for v in violations(mod, src)]
    assert not bad, "import rules broken (docs/architecture.md):\n" + "\n".join(bad)


def test_the_checker_refuses_a_kernel_that_imports_a_pass():
    src = "import numpy as np\n\ndef f():\n    from qgraph.passes.fold import FoldBatchNorm\n    return FoldBatchNorm\n"
    assert violations("qgraph.kernels.conv", src) == ["qgraph.kernels.conv:4 imports qgraph.passes.fold"]
    assert violations("qgraph.kernels.conv", "from qgraph import pipeline\n") == \
        ["qgraph.kernels.conv:1 imports qgraph.pipeline"]
    assert violations("qgraph.kernels.conv", "from qgraph.ops import INT_RANGES\n") == []


def test_the_checker_refuses_core_modules_that_reach_up():
    assert violations("qgraph.ops", "from qgraph.qparams import qrange\n") == ["qgraph.ops:1 imports qgraph.qparams"]
    assert violations("qgraph.calibrate", "from qgraph.passes import PASSES\n") == \
        ["qgraph.calibrate:1 imports qgraph.passes"]
    assert violations("qgraph.pipeline", "import qgraph.instruments\n") == ["qgraph.pipeline:1 imports qgraph.instruments"]
    assert violations("qgraph.api", "from qgraph.instruments import Report\n") == []


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    graph = {m: set() for m in mods}
    for mod, src in mods.items():
        for _, target, names in imports_of(src, mod):
            for cand in [target] + [f"{target}.{n}" for n in names]:
                if cand in mods and cand != mod:
                    graph[mod].add(cand)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_package_import_graph_has_no_cycle():
    # a package __init__ re-exporting its submodules is not a cycle of ideas: leave the __init__s out
    graph = {m: {t for t in ts if t not in FOLDERS.values()} for m, ts in import_graph().items()
             if m not in FOLDERS.values()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def tools_private_imports() -> list[str]:
    tools = {p.stem: p for p in (REPO / "tools").glob("*.py")}
    bad = []
    for stem, path in tools.items():
        for line, target, names in imports_of(path.read_text(), stem):
            if target.split(".")[0] in tools:
                bad.extend(f"tools/{stem}.py:{line} imports {target}.{n}" for n in names if n.startswith("_"))
    return bad


def test_tools_never_import_each_others_private_names():
    bad = tools_private_imports()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["passes", "kernels"])
def test_package_dir_guards_refuse_the_bare_name(folder):
    src = (REPO / folder / "__init__.py").read_text()
    assert f'if __name__ != "qgraph.{folder}"' in src
