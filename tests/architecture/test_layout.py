"""The package layout is the data flow: which package may import which, no import cycles (function-
local imports included), no private names across packages, one job per module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vermouth_cache"

# Each package may import only the ones listed (and itself). The order is the flow; `store` sits
# early because extract writes it and train reads it, and it knows nothing of models.
MAY_IMPORT = {
    "core": set(),
    "data": {"core"},
    "store": {"core"},
    "models": {"core", "data"},
    "methods": {"core", "data", "models"},
    "extract": {"core", "data", "models", "methods", "store"},
    "train": {"core", "data", "models", "methods", "store", "extract"},
    "sweep": {"core", "data", "models", "methods", "store", "extract", "train"},
    "demo": {"core", "data", "models", "methods", "store", "extract", "train"},
    "cli": {"core", "data", "models", "methods", "store", "extract", "train", "sweep", "demo"},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "bundled_" in str(path.relative_to(PACKAGE)):
            continue  # shipped data (data/make_demo.py), not package code
        parts = ["vermouth_cache", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, local ones too."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("vermouth_cache")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("vermouth_cache"):
                continue
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module
            for n in names:
                if f"{mod}.{n}" in known:
                    found.append((f"{mod}.{n}", [], node.lineno))
            found.append((mod, [n for n in names if f"{mod}.{n}" not in known], node.lineno))
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph():
    mods = modules()
    known = set(mods)
    return mods, {m: imports_of(m, p, known) for m, p in mods.items()}


def test_packages_import_only_what_comes_before_them():
    mods, edges = graph()
    wrong = []
    for m, imps in edges.items():
        src = package_of(m)
        for target, _, line in imps:
            dst = package_of(target)
            if dst in ("", src) or src == "":
                continue
            if dst not in MAY_IMPORT[src]:
                wrong.append(f"{mods[m].relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_even_through_function_local_imports():
    mods, edges = graph()
    def executed(m: str, target: str) -> set[str]:
        """Importing a.b.c runs a/__init__ and a/b/__init__ first, unless `m` is inside them."""
        parts = target.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts) + 1)} - {m} - {
            p for p in mods if m.startswith(p + ".")}

    succ = {m: sorted({x for t, _, _ in imps for x in executed(m, t) if x in mods}) for m, imps in edges.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    for m in succ:
        succ[m] = [t for t in succ[m] if not t.startswith(m + ".")]
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in succ[m]:
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(succ):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_private_names_cross_packages():
    mods, edges = graph()
    wrong = []
    for m, imps in edges.items():
        for target, names, line in imps:
            if package_of(target) != package_of(m):
                private = [n for n in names if n.startswith("_") and n not in ("__version__",)]
                if private:
                    wrong.append(f"{mods[m].relative_to(PACKAGE.parent)}:{line} takes {private} from {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_says_what_it_is_for():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in modules().values() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
