"""Data flows one way: models -> export -> engines -> runtime -> calibration -> toolchain -> toy (training) -> serve, the CLI on top, no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tempomaster"
# Order of the layers; the modules at the package root (errors, planner, rope, ...) sit below them all.
# Calibration sits above the runtime: it runs the runtime's own sampling loop (torch
# backend + pipeline), so the amax it records comes from the real trajectory. The
# toolchain module (export -> calibration -> plans) chooses the ONNX writer above them.
LAYERS = ["models", "export", "engines", "runtime", "calibration", "toolchain", "toy", "serve", "cli"]
LIBRARY = ["models", "export", "engines", "runtime", "calibration", "toy"]
# No upward edge at all.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every tempomaster module `path` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "tempomaster")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tempomaster":
                continue
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _layer_name(module: str) -> str | None:
    return LAYERS[layer(module)] if layer(module) >= 0 else None


def test_layers_import_only_downwards():
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        for d in deps
        if layer(d) > layer(m) and (_layer_name(m), _layer_name(d)) not in ALLOWED_UPWARD
    ]
    assert wrong == []


def test_the_runtime_never_imports_export_or_calibration():
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        if _layer_name(m) == "runtime"
        for d in deps
        if _layer_name(d) in ("export", "calibration")
    ]
    assert wrong == []


def test_only_the_cli_knows_argparse():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path).startswith("tempomaster.cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            if any(n.split(".")[0] == "argparse" for n in names):
                offenders.append(module_name(path))
    assert offenders == []


def test_library_import_loads_no_cli_module():
    modules = sorted(module_name(p) for layer_name in LIBRARY for p in (PACKAGE / layer_name).rglob("*.py"))
    code = (
        "import importlib, sys\n"
        "import tempomaster.runtime, tempomaster.export, tempomaster.engines\n"
        f"for m in {modules!r}:\n"
        "    try:\n        importlib.import_module(m)\n"
        "    except ImportError as err:\n"
        "        if 'tensorrt' not in str(err) and 'onnxruntime' not in str(err): raise\n"
        "cli = sorted(m for m in sys.modules if m.startswith('tempomaster.cli'))\n"
        "assert not cli, cli\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
