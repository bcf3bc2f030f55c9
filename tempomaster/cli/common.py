"""What every command shares: one-line argparse errors, typed flag values, the error boundary.

Only the standard library is imported here, so a bad flag is answered before
torch or onnx is loaded.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import TempoMasterError
from ..interrupts import catch_interrupts
from ..limits import MAX_FRAME_INTERVAL, MAX_SIDE, MAX_VIDEO_FRAMES

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT
# Errors of the disk, not of the program: one line and exit 1 from any writer the atomic helpers do not wrap.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
PRESETS = ("toy", "tiny", "wan-1.3b", "tempomaster-14b")
SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes (as an unsigned value)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) with exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_list(flag: str, kind=int, example: str = "4,2,1", low=None, high=None):
    """argparse type for comma-separated values, e.g. --steps 50,32,32, each within [low, high] when given."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {noun} such as {example}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value such as {example}, got {text!r}")
        if kind is float and not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
        if (low is not None and min(values) < low) or (high is not None and max(values) > high):
            bounds = " and ".join(
                b
                for b in (f"at least {low}" if low is not None else "", f"at most {high}" if high is not None else "")
                if b
            )
            raise argparse.ArgumentTypeError(f"expected {noun} of {bounds}, got {text!r}")
        return values

    return parse


def finite_number(low: float, low_inclusive: bool = True, high: float | None = None):
    """argparse type for a finite float within [low or (low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value < low if low_inclusive else value <= low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    return parse


def bounded_int(low: int, high: int | None = None):
    """argparse type for an integer within [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            upper = f", at most {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"expected an integer of at least {low}{upper}, got {text!r}")
        return value

    return parse


def add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=PRESETS,
        help="model preset (default: toy, the trained toy that ships with the package, when no checkpoints are given; "
        "tiny: random weights)",
    )
    p.add_argument("--checkpoints", type=Path, help="checkpoint directory in the release's layout")
    p.add_argument(
        "--config", type=Path, help="the release's inference_configs.json (model_configs, inference settings, cases)"
    )


def options_from_flags(cls, args: argparse.Namespace, **given):
    """`cls` (an options dataclass) from the parsed flags named like its fields, `given` winning.

    Only the flags this subcommand has count; a field without a flag keeps its default.
    """
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls) if f.name not in given and hasattr(args, f.name)]
    return cls(**{name: getattr(args, name) for name in names}, **given)


def add_backend(p: argparse.ArgumentParser, backend_default: str) -> None:
    """--engines, --backend and the TensorRT runtime flags (tm-run generate, plan and serve)."""
    p.add_argument(
        "--engines", type=Path, help="a build directory from tm-export: run its graphs instead of the torch models"
    )
    p.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "tensorrt"],
        default=None,
        help=f"force a backend (default: {backend_default})",
    )
    p.add_argument(
        "--cuda-graphs", action="store_true", help="tensorrt backend: replay each call shape as a CUDA graph"
    )
    p.add_argument(
        "--weight-streaming-budget",
        default=None,
        metavar="SIZE",
        help="tensorrt backend, plans built with --weight-streaming: device memory for weights, e.g. 20GiB "
        "(default: TensorRT's automatic budget)",
    )


def add_shape(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--num-frames", type=bounded_int(1, MAX_VIDEO_FRAMES), help=f"stage-0 frames {what} (rounded up to 4k+1)"
    )
    p.add_argument(
        "--height", type=bounded_int(16, MAX_SIDE), help=f"output height in pixels {what} (a multiple of 16)"
    )
    p.add_argument("--width", type=bounded_int(16, MAX_SIDE), help=f"output width in pixels {what} (a multiple of 16)")
    p.add_argument(
        "--intervals",
        type=number_list("--intervals", low=1, high=MAX_FRAME_INTERVAL),
        help=f"frame interval per stage {what}, e.g. 4,2,1",
    )


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Call `command`; a user error is one line with its exit code, Ctrl-C one line and 130."""
    try:
        with catch_interrupts():
            return command()
    except TempoMasterError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # `tm-run plan | head`: the reader left; nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"{prog}: error: cannot write{where}: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
