"""The package's layering, read from the source with `ast` (nothing is imported): no import circles, no
import pointing up a layer (nor sideways to another package of its layer, but in the bottom layer, whose
modules are the shared base and use each other), no module over 500 lines.

Every import counts, also one inside a function (a lazy import still ties the modules together), except
under `if TYPE_CHECKING:` (never run). `from pkg import name` is an edge to pkg.name when that is a
module, otherwise to pkg.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gensynth"

# Top-level name under gensynth -> layer; an import may point to its own layer or below, never above.
LAYERS = {
    "__main__": 7,  # python -m gensynth: only calls the CLI
    "cli": 6,
    "cluster": 5, "inspection": 5, "demo": 5,
    "train": 4, "generate": 4,
    "evaluate": 3,
    "families": 2,
    "models": 1, "data": 1, "runtime": 1, "storage": 1, "config": 1, "export": 1, "imaging": 1,
    "reconstruction": 1, "errors": 1, "progress": 1,
    "__init__": 0,  # gensynth/__init__.py: only the version
}

BOTTOM = 1  # the shared base: its top-level names may import each other (the circle check still applies)
SIDEWAYS = {  # (importer, imported) top-level names on one layer above BOTTOM -> why that import is right
    ("demo", "inspection"): "the demo prints its shard sets as `gensynth inspect --verify` does",
}

MAX_LINES = 500
TOO_LONG_FOR_NOW: dict[str, str] = {}  # path under gensynth/ -> why it is still allowed over MAX_LINES


def module_name(path: Path, package: Path) -> str:
    parts = ["gensynth", *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def edges(name: str, path: Path, known: set[str]) -> set[str]:
    """The gensynth modules `name` (the module in `path`) imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in imported(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            targets = [f"{pkg}.{alias.name}" if f"{pkg}.{alias.name}" in known else pkg for alias in node.names]
        for target in targets:
            # `import gensynth.a.b` names a module; an unknown tail (`from x import y.z`) falls back to its package
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                out.add(target)
    return out


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(package)
    return {name: edges(name, path, set(found)) for name, path in found.items()}


def layer_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_right():
    g = graph()
    # a plain import, a `from pkg import module`, a `from module import name`, and a lazy one in a function
    assert "gensynth.data.manifest" in g["gensynth.data.shards"]
    assert "gensynth.storage" in g["gensynth.generate.job"]  # from gensynth import __version__, storage
    assert "gensynth" in g["gensynth.generate.job"]
    assert "gensynth.train.loop" in g["gensynth.cli"]  # imported inside run()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "gensynth"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import mod\nfrom ..low import x\n")
    (pkg / "sub" / "mod.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from gensynth import low\nfrom .. import sub\n")
    assert graph(pkg) == {"gensynth": set(), "gensynth.low": set(),
                          "gensynth.sub": {"gensynth.sub.mod", "gensynth.low"}, "gensynth.sub.mod": {"gensynth.sub"}}


def test_every_module_has_a_layer():
    missing = sorted({layer_name(m) for m in modules()} - set(LAYERS))
    assert not missing, f"top-level names without a layer in LAYERS: {missing}"


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def allowed(a: str, b: str) -> bool:
    """May module a import module b?"""
    top_a, top_b = layer_name(a), layer_name(b)
    low, high = LAYERS[top_b], LAYERS[top_a]
    return top_a == top_b or low < high or (low == high and (high <= BOTTOM or (top_a, top_b) in SIDEWAYS))


def test_the_rule():
    assert allowed("gensynth.cli", "gensynth.cluster.training")
    assert allowed("gensynth.train.loop", "gensynth.evaluate.metrics")  # train sits above evaluate
    assert allowed("gensynth.data.stream", "gensynth.storage")  # the bottom layer shares itself
    assert allowed("gensynth.cluster.training", "gensynth.cluster.jobs")  # inside one package
    assert not allowed("gensynth.runtime.ranks", "gensynth.train.loop")  # up
    assert not allowed("gensynth.generate", "gensynth.train.checkpoint")  # sideways above the bottom
    assert not allowed("gensynth.inspection", "gensynth.cluster")


def test_imports_point_down():
    wrong = [f"{a} -> {b} (layer {LAYERS[layer_name(a)]} -> layer {LAYERS[layer_name(b)]})"
             for a, targets in sorted(graph().items()) for b in sorted(targets) if not allowed(a, b)]
    assert not wrong, "imports pointing up a layer, or sideways above the bottom one:\n" + "\n".join(wrong)
    used = {(layer_name(a), layer_name(b)) for a, targets in graph().items() for b in targets}
    assert not set(SIDEWAYS) - used, f"SIDEWAYS names imports that no longer exist: {set(SIDEWAYS) - used}"


def test_no_module_over_500_lines():
    lengths = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in modules().values()}
    too_long = [f"{name}: {n} lines" for name, n in sorted(lengths.items())
                if n > MAX_LINES and name not in TOO_LONG_FOR_NOW]
    assert not too_long, f"modules over {MAX_LINES} lines:\n" + "\n".join(too_long)
    stale = [name for name in TOO_LONG_FOR_NOW if lengths.get(name, 0) <= MAX_LINES]
    assert not stale, f"allowed over {MAX_LINES} lines but no longer are (drop them from TOO_LONG_FOR_NOW): {stale}"
