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
    {"eval", "launch", "embedded"},
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
