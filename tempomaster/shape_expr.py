"""Symbolic tensor dimensions ("batch", "2*batch", "6*frames") evaluated without `eval`.

A build's manifest and its ONNX files name dynamic dimensions as small
integer expressions over symbols. They come from a file, so they are parsed
with Python's `ast` and only a tiny grammar is walked: integer constants,
symbol names, parentheses, unary minus and the binary operators + - * //.
Everything else (powers, calls, attributes, floats, ...) is refused, and every
constant and intermediate value is bounded, so no expression can run long or
build a huge number (`batch*9**9**9` is refused before anything is computed).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping

MAX_EXPR_CHARS = 200
MAX_ABS_VALUE = 2**62  # far above any tensor dimension; keeps every step a small integer
SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _bounded(value: int, text: str) -> int:
    if abs(value) > MAX_ABS_VALUE:
        raise ValueError(f"dimension {text!r}: a value past {MAX_ABS_VALUE:.3g}")
    return value


def eval_dim_expr(text: str, symbols: Mapping[str, int]) -> int:
    """The integer value of `text` at the given symbol values; ValueError for anything outside the grammar."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"dimension {text!r}: not an expression")
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"dimension {text[:40]!r}...: longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"dimension {text!r}: not an integer expression") from None

    def walk(node) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return _bounded(node.value, text)
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise ValueError(f"dimension {text!r}: unknown symbol {node.id!r}")
            return _bounded(int(symbols[node.id]), text)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise ValueError(f"dimension {text!r}: division by zero")
            return _bounded(_BINARY[type(node.op)](left, right), text)
        raise ValueError(f"dimension {text!r}: only integers, symbols, ( ), + - * and // are allowed")

    try:
        return walk(tree)
    except RecursionError:
        raise ValueError(f"dimension {text[:40]!r}: nested too deeply") from None


def symbols_in(text: str) -> set[str]:
    """The symbol names an expression mentions."""
    return set(SYMBOL.findall(text))
