"""`tm-export build` as a library call: checkpoints -> ONNX (plain, or calibrated FP8) -> TensorRT plans.

    export_and_build(BUILD, ExportSource(preset=..., checkpoints=...), precision="bf16")
        exports the ONNX exactly as `tm-export onnx` does (for fp8: calibrates
        and writes the Q/DQ graphs as `tm-export onnx --precision fp8`),
        records the engine options asked for, then builds the plans
        (`engines.builder.build_engines`).

It sits above export, calibration and engines so that engines never imports
calibration: the choice between the two ONNX writers is made here.
On a machine without TensorRT or without a CUDA GPU everything before the
engine step is done and kept; `tm-export build --resume BUILD` on a GPU
machine finishes the job (`engines.build.resume_build`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .calibration.export import FP8Options
from .engines.build import ENGINE_REQUEST_KEY, BuildResult, check_engine_precision
from .engines.builder import EngineOptions, build_engines
from .errors import UsageError, print_to_stderr
from .export.source import ExportSource


def export_and_build(
    out: str | os.PathLike,
    source: ExportSource = ExportSource(),
    *,
    precision: str = "bf16",
    options: EngineOptions = EngineOptions(),
    fp8: FP8Options | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print_to_stderr,
) -> BuildResult:
    """The ONNX export of `tm-export onnx` (same source), then the TensorRT plans.

    source.graphs: a subset of the build's graphs (default all; `tm-run` needs all).
    fp8: the fp8 options when precision is "fp8" (default FP8Options()).
    """
    from .export.build import export_build
    from .export.target import prepare_target

    check_engine_precision(precision)
    options = options.validate()
    prepare_target(Path(out).absolute())  # before any model loads: a refusal costs nothing
    if precision == "fp8":
        return _fp8_export_and_build(out, source, options, fp8 or FP8Options(), log=log, progress=progress)
    t0 = time.perf_counter()
    log(f"[I] exporting ONNX ({precision}, t5 {source.t5_precision_for(precision)}) to {out}")
    manifest = export_build(
        out, source, precision=precision, progress=progress, extra={ENGINE_REQUEST_KEY: options.as_dict()}
    )
    return _build_plans(out, precision, manifest, source, options, time.perf_counter() - t0, log)


def _build_plans(out, precision, manifest, source, options, onnx_seconds, log) -> BuildResult:
    log(f"[I] ONNX: {len(manifest['graphs'])} graphs in {onnx_seconds:.1f}s")
    t1 = time.perf_counter()
    section = build_engines(out, options, graphs=source.graphs, log=log)
    return BuildResult(Path(out), precision, onnx_seconds, time.perf_counter() - t1, section)


def _fp8_export_and_build(
    out, source: ExportSource, options: EngineOptions, fp8: FP8Options, *, log, progress
) -> BuildResult:
    """The calibrated FP8 ONNX (calibration.export.fp8_build), then the plans: TensorRT 11 reads FP8 from the Q/DQ nodes."""
    from .calibration.export import fp8_build
    from .export.build import describe_fp8

    if fp8.twin:
        raise UsageError(
            "--fp8-twin is an fp32-based graph for onnxruntime checks, not for TensorRT engines; use tm-export onnx"
        )
    t0 = time.perf_counter()
    log(f"[I] calibrating and exporting the FP8 ONNX to {out}")
    manifest = fp8_build(out, source, fp8, progress=progress, extra={ENGINE_REQUEST_KEY: options.as_dict()})
    log(f"[I] {describe_fp8(manifest)}")
    return _build_plans(out, "fp8", manifest, source, options, time.perf_counter() - t0, log)
