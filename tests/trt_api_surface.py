"""Which TensorRT names does our source use? Which does the 11.4 binding library define?

`used_names(source)` reads Python source (never imports it) and follows the
TensorRT module and the objects it hands out:

- the module: a name or attribute called `trt` (the package's convention:
  `trt = import_tensorrt(...)`, `self.trt`, functions taking `trt`);
  `check_module_aliases` makes sure nothing binds it under another name;
- TensorRT objects: a value produced by calling or reading an attribute of
  the module or of another TensorRT object (`builder = trt.Builder(...)`,
  `network = builder.create_network()`, `e = parser.get_error(i)`), followed
  through assignments, tuple unpacking, comprehensions, `self.X` attributes,
  properties and functions returning one, and positional arguments passed to
  functions of the same module (fixpoint over the module);
- every attribute read or written on the module or a TensorRT object is a
  name used, e.g. `trt.BuilderFlag.STRIP_PLAN` -> BuilderFlag, STRIP_PLAN;
  `ctx.execute_async_v3(...)` -> execute_async_v3.

Objects of our own classes (even a subclass of trt.ILogger) are not
TensorRT objects: only what TensorRT returns is.

`bound_names(so_path)`: a pybind11 module keeps every bound name as a
NUL-terminated string in its read-only data; the linker may store a string
as the tail of a longer one ("REFIT" inside "INCLUDE_REFIT", "Runtime"
inside "IPluginV3OneRuntime"), so a name counts as present when it is a
whole string or the tail of one; `name_evidence` says which.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

MODULE_ALIAS = "trt"


def _is_module(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == MODULE_ALIAS) or (
        isinstance(node, ast.Attribute) and node.attr == MODULE_ALIAS
    )


def _key(node: ast.AST) -> str | None:
    """'x' for a Name, 'self.x' for self.x (the attribute name only: `.x` on any object)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return "." + node.attr
    return None


@dataclass
class _State:
    tainted_names: dict[str, set[str]] = field(default_factory=dict)  # function qualname -> local names
    tainted_attrs: set[str] = field(default_factory=set)  # ".attr" holding a TensorRT object
    returning: set[str] = field(default_factory=set)  # function names returning a TensorRT object
    params: dict[str, set[int]] = field(default_factory=dict)  # function name -> tainted positional params
    used: dict[str, set[int]] = field(default_factory=dict)  # name -> line numbers


class _Analyzer:
    def __init__(self, tree: ast.Module):
        self.tree = tree
        self.state = _State()
        self.functions: dict[str, ast.FunctionDef] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, node)

    # -- is an expression TensorRT-valued? -------------------------------------------
    def trt_valued(self, node: ast.AST, local: set[str]) -> bool:
        if _is_module(node):
            return True
        if isinstance(node, ast.Name):
            return node.id in local
        if isinstance(node, ast.Attribute):
            if (
                isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and "." + node.attr in self.state.tainted_attrs
            ):
                return True
            if "." + node.attr in self.state.tainted_attrs and isinstance(node.value, ast.Attribute):
                return True
            return self.trt_valued(node.value, local)
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and self.trt_valued(f.value, local):
                return True
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            return name in self.state.returning
        if isinstance(node, ast.Subscript):
            return self.trt_valued(node.value, local)
        if isinstance(node, (ast.ListComp, ast.GeneratorExp)):
            inner = set(local)
            for gen in node.generators:
                if self.trt_valued(gen.iter, inner):
                    inner |= _target_names(gen.target)
            return self.trt_valued(node.elt, inner)
        return False

    # -- one pass over a function ----------------------------------------------------
    def scan_function(self, fn: ast.FunctionDef, qual: str) -> bool:
        local = self.state.tainted_names.setdefault(qual, set())
        before = (
            len(local),
            len(self.state.tainted_attrs),
            len(self.state.returning),
            sum(map(len, self.state.params.values())),
        )
        args = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        for i, a in enumerate(args):
            if a == MODULE_ALIAS or i in self.state.params.get(fn.name, set()):
                local.add(a)
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                if self.trt_valued(node.value, local):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                            if isinstance(el, ast.Name):
                                local.add(el.id)
                            elif isinstance(el, ast.Attribute) and not _is_module(el):
                                self.state.tainted_attrs.add("." + el.attr)
            elif isinstance(node, (ast.For, ast.comprehension)):
                if self.trt_valued(node.iter, local):
                    local |= _target_names(node.target)
            elif (
                isinstance(node, ast.Return)
                and node.value is not None
                and (
                    self.trt_valued(node.value, local)
                    or (isinstance(node.value, ast.Tuple) and any(self.trt_valued(e, local) for e in node.value.elts))
                )
            ):
                self.state.returning.add(fn.name)
                if any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list):
                    self.state.tainted_attrs.add("." + fn.name)
            elif isinstance(node, ast.Call):
                f = node.func
                callee = (
                    f.id
                    if isinstance(f, ast.Name)
                    else (
                        f.attr
                        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self"
                        else None
                    )
                )
                if callee in self.functions and not (isinstance(f, ast.Attribute) and self.trt_valued(f.value, local)):
                    shift = 1 if isinstance(f, ast.Attribute) else 0
                    for i, a in enumerate(node.args):
                        if self.trt_valued(a, local):
                            self.state.params.setdefault(callee, set()).add(i + shift)
        after = (
            len(local),
            len(self.state.tainted_attrs),
            len(self.state.returning),
            sum(map(len, self.state.params.values())),
        )
        return after != before

    def run(self) -> dict[str, set[int]]:
        fns = [
            (n, f"{n.name}@{n.lineno}")
            for n in ast.walk(self.tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        module_local = self.state.tainted_names.setdefault("<module>", set())
        for _ in range(50):
            changed = False
            for fn, qual in fns:
                changed |= self.scan_function(fn, qual)
            if not changed:
                break
        # collect: every attribute on a TensorRT-valued expression, within its function's taint
        for fn, qual in fns:
            local = self.state.tainted_names[qual]
            self._collect(fn, local)
        self._collect(self.tree, module_local, top_only=True)
        return self.state.used

    def _collect(self, root: ast.AST, local: set[str], top_only: bool = False) -> None:
        nodes = (
            ast.walk(root)
            if not top_only
            else (
                n for stmt in root.body if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(stmt)
            )
        )
        for node in nodes:
            if isinstance(node, ast.Attribute) and self.trt_valued(node.value, local) and not _is_module(node):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    continue  # our own attribute holding a TensorRT object, not a TensorRT name
                self.state.used.setdefault(node.attr, set()).add(node.lineno)


def _target_names(t: ast.AST) -> set[str]:
    if isinstance(t, ast.Name):
        return {t.id}
    if isinstance(t, (ast.Tuple, ast.List)):
        out = set()
        for el in t.elts:
            out |= _target_names(el)
        return out
    return set()


def used_names(source: str) -> dict[str, set[int]]:
    """TensorRT attribute names used in `source` -> the lines that use them."""
    return _Analyzer(ast.parse(source)).run()


def check_module_aliases(source: str) -> list[str]:
    """Bindings of the tensorrt module under a name other than `trt` (which the analysis would miss)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tensorrt" and (a.asname or a.name) not in (MODULE_ALIAS, "tensorrt"):
                    problems.append(f"line {node.lineno}: import {a.name} as {a.asname}")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            if (isinstance(f, ast.Name) and f.id == "import_tensorrt") or (
                isinstance(f, ast.Attribute) and f.attr == "import_tensorrt"
            ):
                for t in node.targets:
                    if not (isinstance(t, ast.Name) and t.id == MODULE_ALIAS) and not (
                        isinstance(t, ast.Attribute) and t.attr == MODULE_ALIAS
                    ):
                        problems.append(f"line {node.lineno}: import_tensorrt() bound to {ast.unparse(t)}")
    return problems


def bound_strings(so_path: Path) -> set[bytes]:
    return set(Path(so_path).read_bytes().split(b"\0"))


def python_level_names(init_path: Path) -> set[str]:
    """Names the package's __init__.py defines itself (e.g. __version__, nptype)."""
    tree = ast.parse(Path(init_path).read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out.add(t.id)
    return out


def name_evidence(name: str, strings: set[bytes], python_names: set[str]) -> str | None:
    """'string', 'tail of <longer string>', 'python' or None (not in the bindings)."""
    if name in python_names:
        return "python"
    b = name.encode()
    if b in strings:
        return "string"
    tails = sorted((s for s in strings if s.endswith(b) and len(s) > len(b)), key=len)
    if tails:
        return f"tail of {tails[0].decode(errors='replace')!r}"
    return None
