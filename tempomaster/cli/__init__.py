"""The command line: the only layer that knows argparse.

One module per command group (`export`: tm-export, `run`: tm-run); each turns
flags into typed values and calls one library function. Heavy libraries
(torch, onnx) are imported only after the flags are parsed.
"""

from __future__ import annotations


def export_main(argv: list[str] | None = None) -> int:
    from .export import main

    return main(argv)


def run_main(argv: list[str] | None = None) -> int:
    from .run import main

    return main(argv)


__all__ = ["export_main", "run_main"]
