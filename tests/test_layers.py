"""The package's import structure (read with ast, imports inside functions included): layers whose
arrows point down only, no circles, and a read side that never loads the write side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tallfmt

PACKAGE = Path(tallfmt.__file__).resolve().parent

# Low to high. A module imports only modules of its own layer or below; read and write never import
# each other. The package's face (tallfmt/__init__.py) hands names on lazily and is not a layer.
LAYERS = [
    ("errors", ["tallfmt.errors"]),
    ("format", ["tallfmt.format"]),
    ("kernels and mask math", ["tallfmt.kernels", "tallfmt.compute"]),
    ("checkpoint I/O", ["tallfmt.checkpoints"]),
    ("write and read", ["tallfmt.write", "tallfmt.read"]),
    ("tuning and reports", ["tallfmt.tuning", "tallfmt.summary"]),
    ("CLI, demo, testing", ["tallfmt.cli", "tallfmt.demo", "tallfmt.testing"]),
]
APART = [("tallfmt.read", "tallfmt.write")]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every tallfmt module ``name`` imports, at module level or inside functions. ``from tallfmt.x
    import y`` counts as importing tallfmt.x.y when that is a module, else tallfmt.x."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] == "tallfmt")
    out.discard(name)
    return {t for t in out if t in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def layer_of(name: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    assert [n for n in graph if n != "tallfmt" and layer_of(n) is None] == []


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports into a higher layer (the package face counts as the top one)."""
    top = len(LAYERS) - 1
    return sorted((a, b) for a, deps in graph.items() if a != "tallfmt" for b in deps
                  if (layer_of(b) if b != "tallfmt" else top) > layer_of(a))


def test_arrows_point_down(graph: dict[str, set[str]]) -> None:
    assert upward(graph) == [], "imports that point up a layer"
    # and the check can fail
    assert upward({"tallfmt.format.header": {"tallfmt.write.plan"}, "tallfmt.read.archive": {"tallfmt"}}) == [
        ("tallfmt.format.header", "tallfmt.write.plan"), ("tallfmt.read.archive", "tallfmt")]


def test_read_and_write_stay_apart(graph: dict[str, set[str]]) -> None:
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen
    for a, b in APART:
        for side, other in ((a, b), (b, a)):
            for m in graph:
                if m.startswith(side + "."):
                    bad = sorted(d for d in reach(m) if d == other or d.startswith(other + "."))
                    assert bad == [], f"{m} reaches {bad}"


def test_no_circles(graph: dict[str, set[str]]) -> None:
    # Tarjan's strongly connected components: any component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v] - {"tallfmt"}:  # the face's lazy names point everywhere by design
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index and v != "tallfmt":
            visit(v)
    assert circles == []


def test_the_graph_reader_sees_function_level_imports() -> None:
    # the test above can only fail if lazy imports are seen: read/archive.py imports decoding inside a method
    g = {n: imports_of(n, p, set(modules())) for n, p in modules().items()}
    assert "tallfmt.read.decoding" in g["tallfmt.read.archive"]
    assert "tallfmt.format.planes" in g["tallfmt.format.codecs"]


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=PACKAGE.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


def test_decoding_a_sharded_archive_loads_no_encoder(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(40, generator=g), "b": torch.randn(6, generator=g)}
    tasks = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("x", "y")}
    tallfmt.encode(base, tasks, tmp_path / "zoo", shards=2)
    out = _run(f"import sys, tallfmt\nz = tallfmt.open({str(tmp_path / 'zoo')!r})\nz.decode('x'); z.merge('consensus', k=1)\n"
               "print(sorted(m for m in sys.modules if m.startswith('tallfmt.write')))")
    assert out == "[]"


def test_header_only_calls_import_no_torch_or_numba(tmp_path: Path) -> None:
    base = {"a": torch.zeros(8)}
    tallfmt.encode(base, {"x": {"a": torch.ones(8)}}, tmp_path / "z.tall")
    out = _run("import sys, tallfmt\n"
               f"z = tallfmt.open({str(tmp_path / 'z.tall')!r})\n"
               "z.tasks, z.task_info('x'), z.roles, z.sizes()\n"
               "from tallfmt.cli import main\n"
               "try:\n"
               f"    main(['info', {str(tmp_path / 'z.tall')!r}, '--json'])\n"
               "except SystemExit:\n"
               "    pass\n"
               "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numba'}))")
    assert out.splitlines()[-1] == "LOADED []"
