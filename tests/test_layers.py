"""The package's layers: imports go downward only (lazy imports inside functions included), no module
imports another of its own layer in a circle, and files stay small."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlsd_kernels"
# Bottom to top; a module may import from its own layer (without a cycle) or a lower one.
LAYERS = [
    ("reference", "flags", "scalars", "schedule"),
    ("kernels",),
    ("launch",),
    ("call",),
    ("forms",),
    ("autograd",),
    ("api",),
    ("__init__",),
    ("modules", "integrations"),
]
MAX_LINES = 400


def _module(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module):
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")


def _imports(path, module):
    """The package modules that ``path`` imports anywhere in its body (absolute names)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "rlsd_kernels":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                sub = PACKAGE.parent / candidate.replace(".", "/")
                found.add(candidate if sub.with_suffix(".py").exists() or sub.is_dir() else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rlsd_kernels"}
    return found - {module}


def _graph():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        graph[module] = _imports(path, module)
    return graph


def test_imports_go_downward():
    upward = []
    for module, imported in _graph().items():
        for other in imported:
            if other == "rlsd_kernels" and module.startswith("rlsd_kernels.") and _layer(module) > _layer(other):
                continue
            if _layer(other) > _layer(module):
                upward.append(f"{module} -> {other}")
    assert not upward, "imports that reach up a layer: " + ", ".join(sorted(upward))


def test_no_circular_imports():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "circular imports: " + "; ".join(cycles)


def test_files_stay_small():
    large = [f"{p.relative_to(PACKAGE)} ({n} lines)" for p in PACKAGE.rglob("*.py")
             if p.name != "reference.py" and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not large, f"over {MAX_LINES} lines: " + ", ".join(large)


def test_the_checker_sees_an_upward_import(tmp_path):
    """A launcher that imports the API inside a function is caught (the check can fail)."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from ..api.losses import rlsd_loss\n    from . import terms\n")
    imported = _imports(fake, "rlsd_kernels.launch.fake")
    assert imported == {"rlsd_kernels.api.losses", "rlsd_kernels.launch.terms"}
    assert _layer("rlsd_kernels.api.losses") > _layer("rlsd_kernels.launch.fake")
