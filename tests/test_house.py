"""The rules of the house, checked on the source: the import graph has no cycle and no two folders import each
other, no module reaches into another's private names or imports inside a function to dodge a cycle,
registration happens only in package __init__ files, a method's or allocator's file name is its registry
name, functions and modules stay short, only the layer engine loops over the decoder layers, and nothing in
the package points outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import svdkit
from svdkit.allocators import ALLOCATORS
from svdkit.methods import METHODS

SRC = Path(svdkit.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
MODULES = sorted(SRC.rglob("*.py"))
MAX_LINES = 80
OPTIONAL = {"lm_eval", "datasets", "matplotlib", "pydoc_data", "onnx", "onnxruntime", "onnxscript"}  # optional/slow
SLOW = {"transformers.modeling_utils", "transformers.models.llama.modeling_llama"}  # seconds: only when needed
VERSIONED = {"transformers.exporters", "transformers.exporters.utils"}  # transformers 5.24 and later


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def top_level_imports(path: Path) -> set[str]:
    """svdkit modules imported at module level (for ``from pkg import name``, pkg.name when it is a module)."""
    known = {module_name(p) for p in MODULES}
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("svdkit")}
        elif isinstance(node, ast.ImportFrom):
            target = resolve(path, node)
            if target.startswith("svdkit"):
                subs = {f"{target}.{a.name}" for a in node.names} & known
                found |= subs or {target}
    return {m for m in found if m in known} - {module_name(path)}


def test_the_import_graph_has_no_cycle():
    graph = {}
    for path in MODULES:
        name = module_name(path)
        edges = set()
        for target in top_level_imports(path):  # importing a module runs its packages' __init__ first
            parts = target.split(".")
            ancestors = {".".join(parts[:i]) for i in range(2, len(parts))}
            edges |= {target} | {a for a in ancestors if not name.startswith(a + ".")}
        graph[name] = edges - {name}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _function_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom | ast.Import):
                    yield node.name, inner


def test_no_function_imports_svdkit_or_anything_it_always_loads():
    """Imports inside functions are only for optional or version-dependent packages, never to dodge a cycle."""
    for path in MODULES:
        for func, node in _function_imports(path):
            names = [resolve(path, node)] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                root = name.split(".")[0]
                allowed = root in OPTIONAL or name in SLOW | VERSIONED or name == "transformers.cache_utils"
                assert allowed, f"{path.relative_to(SRC)}:{node.lineno} imports {name} inside {func}()"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("root", [SRC, TESTS], ids=["src", "tests"])
def test_nothing_uses_a_private_name_of_another_module(root):
    """Neither ``from svdkit.x import _name`` nor ``x._name`` on a name imported from svdkit."""
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(path, node) if root is SRC else node.module or ""
                if target.startswith("svdkit"):
                    private = [a.name for a in node.names if _private(a.name)]
                    assert not private, f"{path}:{node.lineno} imports private {private} from {target}"
                    imported |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("svdkit")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
                assert not _private(node.attr), f"{path}:{node.lineno} uses {node.value.id}.{node.attr}"


def test_side_effect_imports_only_in_package_init():
    for path in MODULES:
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module is None:  # from . import module
                modules = [a.name for a in node.names if (path.parent / f"{a.name}.py").exists()]
                assert not modules, f"{path.relative_to(SRC)}:{node.lineno} imports modules {modules} for side effects"


def test_registry_names_are_file_names():
    methods = {p.stem if p.name != "__init__.py" else p.parent.name for p in (SRC / "methods").rglob("*.py")}
    for name in METHODS.names():
        assert name.replace("-", "_") in methods, f"method '{name}' has no file methods/{name.replace('-', '_')}.py"
        module = METHODS.get(name).decompose.__module__
        assert module.split(".")[2] == name.replace("-", "_"), f"method '{name}' is registered in {module}"
    for name in ALLOCATORS.names():
        module = ALLOCATORS.get(name).allocate.__module__
        assert module == f"svdkit.allocators.{name}", f"allocator '{name}' is registered in {module}"


def test_functions_are_short():
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_LINES, f"{path.relative_to(SRC)}:{node.lineno} {node.name}() has {lines} lines"


def test_the_package_points_nowhere_outside_the_repository():
    for path in MODULES:
        text = path.read_text()
        for outside in ("../shared", "shared/data", "METHODS.md", "PROTOCOL.md", "docs/results"):
            assert outside not in text, f"{path.relative_to(SRC)} mentions {outside}"


def test_public_modules_declare_all():
    for path in MODULES:
        tree = ast.parse(path.read_text())
        declared = any(
            isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)
            for n in tree.body
        )
        has_code = any(isinstance(n, ast.FunctionDef | ast.ClassDef) for n in tree.body)
        if has_code or path.name == "__init__.py" and any(isinstance(n, ast.ImportFrom) for n in tree.body):
            assert declared or path.name == "__main__.py", f"{path.relative_to(SRC)} has no __all__"


MAX_MODULE_LINES = 350
LAYER_LOOPS_ALLOWED = {"svdkit.core.architecture"}  # finding the decoder layers and their targets' shapes


def test_modules_are_short():
    long = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: split them at their seams"


def test_only_the_engine_loops_over_decoder_layers():
    """One walk over the decoder layers (svdkit.engine): any other `for` over ``.layers`` (or their count) is a
    second walk that owns hidden states, device moves or progress of its own."""
    found = []
    for path in MODULES:
        name = module_name(path)
        if name.startswith("svdkit.engine") or name in LAYER_LOOPS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.For | ast.comprehension):
                text = ast.unparse(node.iter)
                if re.search(r"\.layers\b|num_hidden_layers", text):
                    found.append(f"{name}: for ... in {text}")
    assert found == []


def test_no_two_folders_import_each_other():
    """The folders of src form layers (core at the bottom, cli at the top): no two import each other."""
    edges: set[tuple[str, str]] = set()
    for path in MODULES:
        parts = path.relative_to(SRC).parts
        if len(parts) < 2:
            continue  # svdkit/errors.py and the other top-level modules
        folder = parts[0]
        for target in top_level_imports(path):
            other = target.split(".")[1] if target.count(".") >= 1 else ""
            if other and other != folder and (SRC / other).is_dir():
                edges.add((folder, other))
    assert sorted((a, b) for a, b in edges if (b, a) in edges and a < b) == []


def test_the_onnx_runtime_model_is_known_by_its_class_only_in_deploy():
    """Code outside deploy/ tells an exported model from a torch one by what it is (not an nn.Module, which
    says what it times and names its runtime), never with ``isinstance(..., OnnxCausalLM)``."""
    found = []
    for path in MODULES:
        name = module_name(path)
        if name.startswith("svdkit.deploy"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance" and len(node.args) == 2:
                if "OnnxCausalLM" in ast.unparse(node.args[1]):
                    found.append(f"{name}: {ast.unparse(node)}")
    assert found == []
