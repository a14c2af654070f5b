"""Imports follow the layers (README "Layout"): no module imports one of a higher layer, and
the project's modules form no import cycle — counting imports inside functions too, which is
where a cycle usually hides."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_trapo"

# lowest first; a module may import its own layer or lower ones
LAYERS = [
    {"config", "platform", "algorithms", "data", "models", "reward", "metrics", "plotting",
     "rollout.types"},
    {"rollout"},
    {"train"},
    {"conversion"},
    {"eval", "launch", "cpu_demo"},
    {"cli", ""},
]


def modules():
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        out[name] = path
    return out


def imports(path: Path, known) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if not name.startswith("megatron_trapo."):
                continue
            name = name[len("megatron_trapo."):]
            while name and name not in known:  # `from pkg.mod import Class` → pkg.mod
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer(module: str) -> int:
    for i, members in enumerate(LAYERS):
        if module in members:
            return i
    top = module.split(".")[0]
    for i, members in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"megatron_trapo.{module} is in no layer: add it to LAYERS")


def test_no_module_imports_a_higher_layer():
    mods = modules()
    upward = [f"{a} (layer {layer(a)}) → {b} (layer {layer(b)})"
              for a, path in sorted(mods.items()) for b in sorted(imports(path, mods) - {a})
              if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycles():
    mods = modules()
    graph = {m: imports(p, mods) - {m} for m, p in mods.items()}
    # a package imports its own modules through __init__ re-exports: not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def _function_imports_without_reason(path: Path) -> list:
    """Imports inside functions whose group (consecutive import statements) has no ``# lazy:``
    comment right above it."""
    lines = path.read_text().splitlines()
    missing = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for body in (getattr(n, f, None) for n in ast.walk(fn)
                     for f in ("body", "orelse", "finalbody")):
            if not isinstance(body, list):
                continue
            for i, node in enumerate(body):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                if i and isinstance(body[i - 1], (ast.Import, ast.ImportFrom)):
                    continue  # the group's first import carries the reason
                above, k = [], node.lineno - 2
                while k >= 0 and lines[k].strip().startswith("#"):
                    above.append(lines[k])
                    k -= 1
                if not any("# lazy:" in c for c in above):
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return missing


def test_imports_inside_functions_say_why():
    """Imports sit at module level; one inside a function says why (``# lazy: …``: an optional
    dependency, megatron-core's import cost on a light path, a package __init__ every submodule
    import runs)."""
    missing = [m for path in sorted(PACKAGE.rglob("*.py"))
               for m in _function_imports_without_reason(path)]
    assert missing == []
